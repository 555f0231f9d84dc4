from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from acwi_node.config import ConfigError, load_settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 reads TOML with the tomli backport
    import tomli as tomllib

EXAMPLE = """
[node]
ae_title = "ACWI"
dicom_port = 11112
http_port = 8080
data_dir = "acwi-data"

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242

[[routes]]
name = "chest"
match = { modality = ["CR", "DX"] }
model = "default"
destinations = ["pacs"]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "acwi.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file() -> None:
    s = load_settings(None)
    assert s.node.ae_title == "ACWI"
    assert s.node.dicom_port == 11112
    assert s.node.http_port == 8080
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("ledger.sqlite")
    assert s.broker_url == "filesystem://"
    assert s.routes == [] and s.destinations == []


def test_issue_example_shape_is_accepted(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, EXAMPLE))
    assert s.destination("pacs").ae_title == "ORTHANC"
    assert s.destination("pacs").associations == 2  # results over two associations at once
    assert s.routes[0].match.modality == ["CR", "DX"]
    assert s.routes[0].destinations == ["pacs"]
    assert s.model_manifest("default").name == "manifest.json"


def test_env_overrides_scalar_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACWI_NODE__DICOM_PORT", "11999")
    monkeypatch.setenv("ACWI_NODE__BROKER_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("ACWI_COMPLETION__QUIET_PERIOD_S", "0.5")
    s = load_settings(write(tmp_path, EXAMPLE))
    assert s.node.dicom_port == 11999
    assert s.broker_url == "redis://127.0.0.1:6379/3"
    assert s.completion.quiet_period_s == 0.5


def test_acwi_config_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACWI_CONFIG", str(write(tmp_path, EXAMPLE.replace('"ACWI"', '"NODE2"'))))
    assert load_settings(None).node.ae_title == "NODE2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (EXAMPLE.replace("dicom_port = 11112", "dicom_port = 99999"), "node.dicom_port"),
        (EXAMPLE.replace('ae_title = "ORTHANC"', 'ae_title = "WAY_TOO_LONG_AE_TITLE"'), "ae_title"),
        (EXAMPLE.replace('destinations = ["pacs"]', 'destinations = ["nowhere"]'), "'nowhere'"),
        (EXAMPLE.replace("port = 4242", "port = 4242\nassociations = 0"), "associations"),
        (EXAMPLE.replace("port = 4242", "port = 4242\nassociations = 17"), "associations"),
        (EXAMPLE.replace('model = "default"', 'model = "missing"'), "'missing'"),
        (EXAMPLE + "\n[node2]\nx = 1\n", "node2"),
        (EXAMPLE.replace("http_port = 8080", "http_prot = 8080"), "http_prot"),
        ("[node\n", "cannot read"),
        ("[worker]\nmc_samples = 1\n", "mc_samples"),
        (EXAMPLE.replace("port = 4242", "port = 4242\nresults = []"), "results"),
        (EXAMPLE.replace("port = 4242", 'port = 4242\nresults = ["pdf"]'), "results"),
        (
            EXAMPLE.replace("port = 4242", 'port = 4242\nquery_source = "archive"'),
            "destinations.pacs: query_source 'archive' is not defined in [[sources]]",
        ),
    ],
)
def test_invalid_configuration_is_reported_clearly(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text))
    assert message in str(err.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_a_destination_takes_the_result_kinds_it_lists(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, EXAMPLE.replace("port = 4242", 'port = 4242\nresults = ["sr"]'))
    )
    assert settings.destination_takes("pacs", "sr")
    assert settings.destination_takes("pacs", "sr-verified")  # a radiologist's verified SR
    assert not settings.destination_takes("pacs", "heatmap")
    assert not settings.destination_takes("pacs", "parametric_map")
    assert settings.destination_takes("gone", "heatmap")  # no longer configured: unfiltered
    everything = load_settings(write(tmp_path, EXAMPLE))
    assert everything.destination_takes("pacs", "parametric_map")


def test_a_destination_may_be_called_from_another_ae_title(tmp_path: Path) -> None:
    def destination(**extra: object) -> dict[str, object]:
        return {"name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 104, **extra}

    settings = load_settings(
        None,
        node={"data_dir": tmp_path, "ae_title": "ACWI"},
        destinations=[destination(calling_ae_title="AI_NODE_7"), destination(name="other")],
    )
    named, default = settings.destinations
    assert named.calling_ae(settings.node.ae_title) == "AI_NODE_7"
    assert default.calling_ae(settings.node.ae_title) == "ACWI"
    with pytest.raises(ConfigError, match="calling_ae_title"):
        load_settings(
            None,
            node={"data_dir": tmp_path},
            destinations=[destination(calling_ae_title="A" * 17)],
        )
    with pytest.raises(ConfigError, match="calling_ae_title applies to DIMSE"):
        load_settings(
            None,
            node={"data_dir": tmp_path},
            destinations=[{"name": "web", "url": "http://pacs/dicom-web", "calling_ae_title": "X"}],
        )


def documented_settings(readme: str) -> set[str]:
    """``section.key`` names the README documents: in the configuration table (a row may
    group keys of one section: `` `ingest.acse_timeout_s`, `dimse_timeout_s` ``) and in its
    TOML examples (keys under a ``[section]`` header, commented out or not)."""
    import re

    names: set[str] = set()
    for line in readme.splitlines():
        row = re.match(r"\| `\[?([a-z0-9_]+)\.[a-z0-9_]+\]?`", line)
        if row:  # the row's keys, its first cell's and those its description names
            names.update(
                f"{row.group(1)}.{k}"
                for k in re.findall(r"`\[?(?:[a-z0-9_]+\.)?([a-z0-9_]+)\]?`", line)
            )
    for block in re.findall(r"```toml\n(.*?)```", readme, re.DOTALL):
        section = ""
        for line in block.splitlines():
            header = re.match(r"\s*#?\s*\[+([a-z0-9_.]+)\]+", line)
            if header:
                section = header.group(1)
                continue
            key = re.match(r"\s*#?\s*([a-z_]+)\s*=", line)
            if key and section:
                names.add(f"{section}.{key.group(1)}")
    return names


def documented_table_keys(readme: str) -> set[str]:
    """``path.key`` names the README documents for the keys of a table or list of tables
    (``[hl7.ris]``, ``[[destinations]]`` and its ``[destinations.tls]``): those a row of the
    configuration table names, whose first cell is the table (`` `[hl7.ris]` ``) or one of its
    keys, under that table and its section; the first column of a table of its own
    (`` | `[routes.select]` key | ``); and the keys of TOML examples under its header."""
    import re

    names = documented_settings(readme)
    table = ""
    for line in readme.splitlines():
        if not line.startswith("|"):
            table = ""
            continue
        header = re.match(r"\| `\[+([a-z0-9_.]+)\]+` key \|", line)
        if header:
            table = header.group(1)
            continue
        if table:
            key = re.match(r"\| `([a-z0-9_]+)` \|", line)
            if key:
                names.add(f"{table}.{key.group(1)}")
            continue
        first = re.match(r"\| `(\[*)([a-z0-9_.]+)\]*`", line)
        if not first:
            continue
        path = first.group(2) if first.group(1) else first.group(2).rpartition(".")[0]
        keys = re.findall(r"`\[*(?:[a-z0-9_]+\.)*([a-z0-9_]+)\]*(?:`| =)", line)
        for prefix in {path, path.split(".")[0]}:
            names.update(f"{prefix}.{k}" for k in keys)
    return names


def _settings_model(annotation: Any) -> Any:
    """The settings model an annotation holds (``X``, ``X | None``, ``list[X]``), if any."""
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _settings_model(arg)
        if found is not None:
            return found
    return None


def test_documented_table_keys_reads_rows_tables_and_examples() -> None:
    readme = (
        "| `[hl7.ris]` | none | `host`, `receiving_application` (`RIS`) |\n"
        "| `[[destinations]]` | | `name`; `[destinations.tls]`: `ca_file` |\n"
        "\n| `[routes.select]` key | default | meaning |\n|---|---|---|\n"
        "| `modality` | any | its Modality |\n\n"
        '```toml\n[[notify]]\nname = "pager"\n# timeout_s = 10\n```\n'
    )
    names = documented_table_keys(readme)
    assert {"hl7.ris.host", "hl7.ris.receiving_application", "destinations.ca_file"} <= names
    assert {"routes.select.modality", "notify.name", "notify.timeout_s"} <= names
    assert "hl7.ris.port" not in names and "routes.select.default" not in names


def test_every_setting_is_documented_in_the_readme() -> None:
    """Each key of each configuration section, and of each table and list of tables in them
    (``[hl7.ris]``, ``[[destinations]]`` and ``[destinations.tls]``, ``[routes.select]``), is
    named in the README: the configuration table, a table of its own, or a TOML example."""
    from acwi_node.config import Settings

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented = documented_table_keys(readme)
    missing: list[str] = []
    seen: set[type] = set()

    def walk(model: Any, path: str) -> None:
        for key, field in model.model_fields.items():
            name = f"{path}.{key}" if path else key
            if path and not {name, f"{path.split('.')[0]}.{key}"} & documented:
                missing.append(name)
            sub = _settings_model(field.annotation)
            # Each model once: [notify.tls] and [sources.tls] have the keys of [destinations.tls].
            if sub is not None and sub not in seen:
                seen.add(sub)
                walk(sub, name)

    walk(Settings, "")
    assert sorted(missing) == []


def _readme() -> str:
    return (Path(__file__).resolve().parents[2] / "README.md").read_text()


def settings_defaults(model: Any, path: str = "") -> dict[str, Any]:
    """Each setting's ``path.key`` (``[notify.tls]`` and ``[sources.tls]`` too, with the keys
    of ``[destinations.tls]``) and its default (``...`` for a key that must be given)."""
    from pydantic_core import PydanticUndefined

    found: dict[str, Any] = {}
    for key, field in model.model_fields.items():
        name = f"{path}.{key}" if path else key
        default = field.get_default(call_default_factory=True)
        found[name] = ... if default is PydanticUndefined else default
        sub = _settings_model(field.annotation)
        if sub is not None:
            found.update(settings_defaults(sub, name))
    return found


def test_every_setting_has_a_row_in_a_table_of_the_readme() -> None:
    """An administrator looks a key up in the configuration table (or a table of its own, as
    ``[routes.select]``'s): a key shown only in a TOML example elsewhere has no default and
    no meaning there to find."""
    from acwi_node.config import Settings

    tables = re.sub(r"```toml\n.*?```", "", _readme(), flags=re.DOTALL)
    documented = documented_table_keys(tables)
    missing = []
    for name in settings_defaults(Settings):
        # [notify.tls] and [sources.tls]: "the keys of [destinations.tls]"
        name = re.sub(r"^(notify|sources)\.tls\.", "destinations.tls.", name)
        section, leaf = name.split(".")[0], name.rpartition(".")[2]
        if "." in name and not {name, f"{section}.{leaf}"} & documented:
            missing.append(name)
    assert missing == []


def _literal(text: str) -> tuple[bool, Any]:
    """``(True, value)`` for a stated default that is a value: a TOML literal (``11112``,
    ``true``, ``["review"]``) or a word, a name or an address (``ACWI``, ``fp32``,
    ``0.0.0.0``); ``(False, None)`` for one that says what the node works out
    (``<data_dir>/engines``) or shows a form (``http://host:port``)."""
    try:
        return True, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return (True, text) if re.fullmatch(r"[\w.:-]+", text) else (False, None)


def documented_defaults(readme: str) -> list[tuple[int, str, str]]:
    """``(line, key, value)`` for each default the configuration table states: a row's keys
    (`` `node.dicom_host` / `node.dicom_port` ``) with its default column's values, one each
    (`` `0.0.0.0` / `11112` ``, a remark in parentheses after them); and in a table's row
    (`` `[hl7.ris]` ``, `` `[[destinations]]` ``) a key written `` `key = value` `` or followed
    by its default in parentheses: `` `max_attempts` (5) ``, `` `associations` (`2`: ...) ``."""
    found: list[tuple[int, str, str]] = []
    for number, line in enumerate(readme.splitlines(), 1):
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)]
        if len(cells) != 5 or cells[0] or cells[-1]:
            continue
        first, default, meaning = cells[1:4]
        table = re.fullmatch(r"`\[+([a-z0-9_.]+)\]+`", first)
        if table:
            # `enabled = false` as the default, or in parentheses (`hsts_max_age_days = 365`);
            # elsewhere in the row an example (`results = ["sr"]`)
            for cell, said, then in ((default, "`", ""), (meaning, r"\(`", r"(?=[);])")):
                for key, value in re.findall(said + r"([a-z0-9_]+) = ([^`]+)`" + then, cell):
                    found.append((number, f"{table.group(1)}.{key}", value))
            for key, quoted, bare in re.findall(
                r"`([a-z0-9_]+)` \((?:`([^`]+)`|(-?[0-9][0-9.]*))(?=[),;:])", meaning
            ):
                found.append((number, f"{table.group(1)}.{key}", quoted or bare))
            continue
        keys = re.fullmatch(r"`([a-z0-9_]+)\.([a-z0-9_]+)`((?:(?: /|,) `[a-z0-9_.]+`)*)", first)
        values = re.fullmatch(r"`([^`]+)`((?:(?: /|,) `[^`]+`)*)(?: \(.*\))?", default)
        if keys and values:
            names = [keys.group(2), *re.findall(r"`(?:[a-z0-9_]+\.)?([a-z0-9_]+)`", keys.group(3))]
            stated = [values.group(1), *re.findall(r"`([^`]+)`", values.group(2))]
            if len(names) == len(stated):
                found += [
                    (number, f"{keys.group(1)}.{n}", v) for n, v in zip(names, stated, strict=True)
                ]
    return found


def test_documented_defaults_reads_rows_and_their_tables() -> None:
    readme = (
        "| `node.dicom_host` / `node.dicom_port` | `0.0.0.0` / `11112` | listener |\n"
        "| `ingest.max_pdu_size` | `0` (unlimited) | largest PDU |\n"
        "| `node.database_url` | SQLite in `data_dir` | ledger |\n"
        "| `[node.http_tls]` | `enabled = false` | `cert_file` (PEM) (`hsts_max_age_days = 365`;"
        ' 0: none), split (`results = ["sr"]` to an archive) |\n'
        "| `[hl7.ris]` | none | `receiving_application` (`RIS`), `max_attempts` (5), "
        "`request_max_bytes` (64 MiB), `proxy` (`http://host:port`: a tunnel) |\n"
    )
    assert documented_defaults(readme) == [
        (1, "node.dicom_host", "0.0.0.0"),
        (1, "node.dicom_port", "11112"),
        (2, "ingest.max_pdu_size", "0"),
        (4, "node.http_tls.enabled", "false"),
        (4, "node.http_tls.hsts_max_age_days", "365"),
        (5, "hl7.ris.receiving_application", "RIS"),
        (5, "hl7.ris.max_attempts", "5"),
        (5, "hl7.ris.proxy", "http://host:port"),
    ]
    assert _literal("http://host:port") == (False, None)
    assert _literal("0.0.0.0") == (True, "0.0.0.0") and _literal('["a"]') == (True, ["a"])


def _same(stated: Any, default: Any) -> bool:
    from enum import Enum

    if isinstance(default, list):
        return (
            isinstance(stated, list)
            and len(stated) == len(default)
            and all(_same(s, d) for s, d in zip(stated, default, strict=True))
        )
    if isinstance(default, Enum):
        default = default.value
    if isinstance(default, bool) or isinstance(stated, bool):
        return stated is default
    if isinstance(default, int | float) and isinstance(stated, int | float):
        return float(stated) == float(default)
    return default is not None and str(stated) == str(default)


def test_the_defaults_the_configuration_table_states_are_the_settings() -> None:
    """``| `retrieve.timeout_s` | `600` |``, ``[[destinations]]``: ``associations`` (`2`):
    each default the configuration table states is the one the node takes without the key
    (a key of a table's table, ``verify_hostname`` of ``[destinations.tls]``, by its name)."""
    from pydantic import BaseModel

    from acwi_node.config import Settings

    defaults = settings_defaults(Settings)
    wrong = []
    for number, key, value in documented_defaults(_readme()):
        table, _, leaf = key.rpartition(".")
        name = key if key in defaults else None
        for other in defaults if name is None else ():
            if other.startswith(f"{table}.") and other.rpartition(".")[2] == leaf:
                name = other
                break
        if name is None:
            wrong.append(f"README.md:{number}: {key}: no such setting")
            continue
        is_value, stated = _literal(value)
        default = defaults[name]
        if is_value and not isinstance(default, BaseModel) and not _same(stated, default):
            wrong.append(f"README.md:{number}: {name}: README {value}, the node {default!r}")
    assert wrong == []


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "ACWI_COMPLETION__POLL_INTERVAL_S",
            "inf",
            "completion.poll_interval_s: Input should be a finite number",
        ),
        ("ACWI_EXPORTER__TIMEOUT_S", "nan", "exporter.timeout_s: Input should be a finite number"),
        (
            "ACWI_RETENTION__INTERVAL_S",
            "1e300",
            "retention.interval_s: Value error, at most 2592000 seconds",
        ),
        ("ACWI_WORKER__VISIBILITY_TIMEOUT_S", "99999999999", "worker.visibility_timeout_s"),
        ("ACWI_INGEST__NETWORK_TIMEOUT_S", "2592001", "ingest.network_timeout_s"),
    ],
)
def test_a_duration_no_loop_can_wait_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    """A loop told to sleep for ever (inf) or for 10^300 s died on the clock's overflow while
    its process ran on (no study completed, nothing sent): refused when settings load."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as err:
        load_settings(None)
    assert message in str(err.value)


def test_thirty_days_is_the_longest_duration() -> None:
    settings = load_settings(None, exporter={"outage_patience_s": 30 * 86_400})
    assert settings.exporter.outage_patience_s == 30 * 86_400


def test_a_route_may_name_the_model_a_models_command_installs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The route is written first, then ``acwi-node models install DIR --name chest-v2
    --activate``: that command loads the settings too and must not refuse them for the very
    model it installs; every other command still does, saying how to install it."""
    from acwi_node.cli import main

    config = write(
        tmp_path,
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
        '[[routes]]\nname = "chest"\nmodel = "chest-v2"\n',
    )
    with pytest.raises(ConfigError, match="--name chest-v2 --activate"):
        load_settings(config)
    settings = load_settings(config, route_models_known=False)
    assert settings.routes[0].model == "chest-v2"
    assert main(["--config", str(config), "models", "list"]) == 0
    assert main(["--config", str(config), "status"]) == 2
    assert "model 'chest-v2' is not defined" in capsys.readouterr().err
    with pytest.raises(ConfigError):  # the next load checks again
        load_settings(config)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("node", "dicom_host", "::"),
        ("node", "http_host", "::1"),
        ("node", "dicom_host", "fe80::1%eth0"),
        ("hl7", "listen_host", "0.0.0.0"),
        ("observability", "ops_host", "node.hospital.local"),
        ("hl7.ris", "host", "fd00::25"),
    ],
)
def test_host_fields_take_names_and_ip_addresses(section: str, key: str, value: str) -> None:
    overrides: dict[str, Any] = {section: {key: value}}
    if section == "hl7.ris":
        overrides = {"hl7": {"ris": {"host": value, "port": 2575}}}
    settings = load_settings(None, **overrides)
    if section == "hl7.ris":
        assert settings.hl7.ris is not None and settings.hl7.ris.host == value
    else:
        assert getattr(getattr(settings, section), key) == value


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("[::1]", "host '[::1]': write an IPv6 address without brackets ('::1')"),
        ("pacs.hospital:104", "is neither a host name nor an IP address (the port has a key"),
        ("pacs hospital", "is neither a host name nor an IP address"),
    ],
)
def test_a_host_that_no_socket_takes_is_refused_at_start(
    tmp_path: Path, host: str, message: str
) -> None:
    """A DIMSE destination's or source's host in brackets was accepted, and every
    association failed later with "cannot resolve host '[::1]'"."""
    text = EXAMPLE.replace('host = "127.0.0.1"', f'host = "{host}"')
    assert text != EXAMPLE
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text))
    assert "destinations.0.host" in str(err.value)
    assert message in str(err.value)
    with pytest.raises(ConfigError, match="node.dicom_host"):
        load_settings(None, node={"dicom_host": host})


@pytest.mark.parametrize(
    "table",
    [
        '[[destinations]]\nname = "web"\nurl = "http://fd00::5:8042/dicom-web"',
        '[[notify]]\nname = "hook"\nurl = "https://fd00::5/hook"',
        '[[notify]]\nname = "hook"\nurl = "https://hooks.example/x"\nproxy = "http://fd00::5:3128"',
        '[audit]\nsyslog_url = "tls://fd00::5:6514"',
    ],
)
def test_an_ipv6_address_in_a_url_is_asked_for_in_brackets(tmp_path: Path, table: str) -> None:
    """The refusal says what is wrong, with the URL's own scheme: not that an https:// URL
    must be http:// or https://."""
    with pytest.raises(ConfigError, match=r"an IPv6 address goes in brackets in a URL") as err:
        load_settings(write(tmp_path, table + "\n"))
    scheme = table.split("fd00::5")[0].rsplit('"', 1)[1]  # the scheme of the refused URL
    assert f"{scheme}[fd00::5]:8080/" in str(err.value)
    assert "must be" not in str(err.value) and "must look like" not in str(err.value)
    bracketed = table.replace("fd00::5", "[fd00::5]")
    load_settings(write(tmp_path, bracketed + "\n"))


def test_sr_regions_are_on_by_default_and_their_fraction_is_checked_at_start(
    tmp_path: Path,
) -> None:
    worker = load_settings(None).worker
    assert worker.sr_regions is True and worker.sr_region_fraction == 0.5
    for bad in ("0", "-0.25", "1.5", '"half"'):
        with pytest.raises(ConfigError, match="sr_region_fraction"):
            load_settings(write(tmp_path, f"[worker]\nsr_region_fraction = {bad}\n"))
    text = "[worker]\nsr_regions = false\nsr_region_fraction = 1\n"
    worker = load_settings(write(tmp_path, text)).worker
    assert worker.sr_regions is False and worker.sr_region_fraction == 1.0


def test_a_routes_sr_regions_are_the_workers_unless_it_says_and_checked_at_start(
    tmp_path: Path,
) -> None:
    """``[routes.results] sr_regions`` and ``sr_region_fraction``: a bad fraction stops the
    node at start-up, naming the route's key; what a route does not say is the worker's."""
    route = '[[routes]]\nname = "ct"\nresults = {{ {} }}\n'
    for bad, said in (
        ("0", "greater than 0"),
        ("-0.25", "greater than 0"),
        ("1.5", "less than or equal to 1"),
        ('"half"', "valid number"),
    ):
        with pytest.raises(ConfigError, match=f"routes.0.results.sr_region_fraction: .*{said}"):
            load_settings(write(tmp_path, route.format(f"sr_region_fraction = {bad}")))
    worker = "[worker]\nsr_region_fraction = 0.6\n"
    for results, fraction in (
        ("", 0.6),  # the worker's
        ("sr_region_fraction = 0.3", 0.3),
        ("sr_regions = false", None),
        ("sr_regions = false, sr_region_fraction = 0.3", None),
    ):
        settings = load_settings(write(tmp_path, worker + route.format(results)))
        assert settings.routes[0].results.region_fraction(settings.worker) == fraction, results
    off = "[worker]\nsr_regions = false\n"
    settings = load_settings(write(tmp_path, off + route.format("sr_regions = true")))
    assert settings.routes[0].results.region_fraction(settings.worker) == 0.5
    settings = load_settings(write(tmp_path, off + route.format("")))
    assert settings.routes[0].results.region_fraction(settings.worker) is None


@pytest.mark.parametrize(
    ("entries", "said"),
    [
        (["10.0.0.300"], "trusted proxy '10.0.0.300' is neither an IP address nor a network"),
        (["nonsense"], "trusted proxy 'nonsense' is neither an IP address nor a network"),
        (["proxy.hospital.local"], "'proxy.hospital.local' is neither an IP address"),
        (["10.0.0.1/8"], "10.0.0.1/8 has host bits set"),
        (["*", "10.0.0.5"], '"*" (every peer) stands alone'),
    ],
)
def test_a_trusted_proxy_that_is_no_address_or_network_is_refused_at_start(
    tmp_path: Path, entries: list[str], said: str
) -> None:
    """uvicorn takes an entry it cannot read for a name no peer matches: the proxy would be
    silently distrusted (or a typo in a network left the node trusting nobody)."""
    listed = ", ".join(f'"{entry}"' for entry in entries)
    with pytest.raises(ConfigError, match="node.http_trusted_proxies") as err:
        load_settings(write(tmp_path, f"[node]\nhttp_trusted_proxies = [{listed}]\n"))
    assert said in str(err.value)


def test_trusted_proxies_default_to_loopback_and_are_written_as_read() -> None:
    assert load_settings(None).node.http_trusted_proxies == ["127.0.0.1", "::1"]
    settings = load_settings(
        None, node={"http_trusted_proxies": [" 10.1.0.0/16", "FD00::0:5", "192.0.2.1/32"]}
    )
    assert settings.node.http_trusted_proxies == ["10.1.0.0/16", "fd00::5", "192.0.2.1/32"]
    assert load_settings(None, node={"http_trusted_proxies": []}).node.http_trusted_proxies == []
    assert load_settings(None, node={"http_trusted_proxies": ["*"]}).node.http_trusted_proxies == [
        "*"
    ]
