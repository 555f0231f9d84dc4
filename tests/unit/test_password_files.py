"""The ledger's and the broker's passwords from files (``node.database_password_file``,
``node.broker_password_file``): read at start-up, checked, put into the connection only, and
never shown; and the passwords a URL carries, masked wherever the settings are printed."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest

from acwi_node import cli
from acwi_node.config import ConfigError, Settings, load_settings
from acwi_node.ledger import Ledger
from acwi_node.tasks.app import celery_config

SECRET = "s3cr:et@/pw?x=1 "  # characters a URL would have to escape, a trailing space kept
LEDGER = "postgresql://acwi@127.0.0.1:5432/acwi"


def password_file(tmp_path: Path, text: str, name: str = "ledger-password") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def settings_with(tmp_path: Path, **node: object) -> Settings:
    return load_settings(None, node={"data_dir": tmp_path / "data", **node})


def refusal(tmp_path: Path, **node: object) -> str:
    with pytest.raises(ConfigError) as caught:
        settings_with(tmp_path, **node)
    return str(caught.value)


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(list(args))
    return status, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------ reading the file
@pytest.mark.parametrize(
    ("written", "password"),
    [
        (SECRET, SECRET),
        (SECRET + "\n", SECRET),  # echo's newline
        (SECRET + "\r\n", SECRET),
        ("  spaced  \n", "  spaced  "),  # one newline off, nothing else
    ],
)
def test_the_password_is_the_file_less_one_trailing_newline(
    tmp_path: Path, written: str, password: str
) -> None:
    settings = settings_with(
        tmp_path,
        database_url=LEDGER,
        database_password_file=password_file(tmp_path, written),
    )
    url = settings.ledger_url
    assert not isinstance(url, str)
    assert url.password == password
    assert url.username == "acwi" and url.host == "127.0.0.1" and url.database == "acwi"


def test_the_setting_comes_from_the_environment_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACWI_NODE__DATABASE_URL", LEDGER)
    monkeypatch.setenv(
        "ACWI_NODE__DATABASE_PASSWORD_FILE", str(password_file(tmp_path, SECRET + "\n"))
    )
    settings = load_settings(None, node={"data_dir": tmp_path / "data"})
    assert not isinstance(settings.ledger_url, str)
    assert settings.ledger_url.password == SECRET


def test_without_a_file_the_ledger_url_is_the_database_url(tmp_path: Path) -> None:
    assert settings_with(tmp_path).ledger_url == settings_with(tmp_path).database_url
    assert settings_with(tmp_path, database_url=LEDGER).ledger_url == LEDGER


@pytest.mark.parametrize(
    ("written", "said"),
    [
        ("", "is empty"),
        ("\n", "is empty"),
        (SECRET + "\n\n", "more than one line"),
        (SECRET + "\nsecond line\n", "more than one line"),
    ],
)
def test_a_file_that_holds_no_one_password_is_refused(
    tmp_path: Path, written: str, said: str
) -> None:
    path = password_file(tmp_path, written)
    message = refusal(tmp_path, database_url=LEDGER, database_password_file=path)
    assert f"database_password_file {path}" in message and said in message
    assert SECRET not in message and "second line" not in message


def test_a_missing_file_or_a_folder_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ledger-password"
    message = refusal(tmp_path, database_url=LEDGER, database_password_file=missing)
    assert f"database_password_file {missing}: no such file" in message
    message = refusal(tmp_path, database_url=LEDGER, database_password_file=tmp_path)
    assert f"database_password_file {tmp_path} is a folder" in message


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="the tests run as root, who reads a file of mode 0000 (and whose Python no other"
    " user may run)",
)
def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = password_file(tmp_path, SECRET)
    path.chmod(0)
    message = refusal(tmp_path, database_url=LEDGER, database_password_file=path)
    assert f"database_password_file {path} cannot be read" in message
    assert SECRET not in message


def test_a_file_that_is_not_text_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger-password"
    path.write_bytes(b"\xff\xfe\x00binary")
    message = refusal(tmp_path, database_url=LEDGER, database_password_file=path)
    assert "is not UTF-8 text" in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://acwi:inline-pw@127.0.0.1:5432/acwi",
        "postgres://acwi:inline-pw@127.0.0.1/acwi",
        "postgresql://acwi@127.0.0.1/acwi?password=inline-pw",
    ],
)
def test_a_password_in_the_url_and_a_file_both_are_refused(tmp_path: Path, url: str) -> None:
    path = password_file(tmp_path, SECRET)
    message = refusal(tmp_path, database_url=url, database_password_file=path)
    assert "database_url carries a password and database_password_file" in message
    assert "inline-pw" not in message and SECRET not in message


@pytest.mark.parametrize("url", [None, "sqlite:////tmp/ledger.sqlite"])
def test_a_password_file_with_an_sqlite_ledger_is_refused(tmp_path: Path, url: str | None) -> None:
    path = password_file(tmp_path, SECRET)
    node: dict[str, object] = {"database_password_file": path}
    if url is not None:
        node["database_url"] = url
    message = refusal(tmp_path, **node)
    assert "database_password_file needs a PostgreSQL database_url" in message


# --------------------------------------------------------------------------- the broker
def test_the_broker_password_goes_to_celery_beside_the_url(tmp_path: Path) -> None:
    settings = settings_with(
        tmp_path,
        broker_url="redis://127.0.0.1:6379/0",
        broker_password_file=password_file(tmp_path, SECRET + "\n", "broker-password"),
    )
    assert settings.broker_password == SECRET
    conf = celery_config(settings)
    assert conf["broker_password"] == SECRET
    assert SECRET not in conf["broker_url"]


def test_without_a_broker_file_celery_gets_no_password(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, broker_url="redis://127.0.0.1:6379/0")
    assert settings.broker_password is None
    assert "broker_password" not in celery_config(settings)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        (None, "broker_password_file needs a broker server's broker_url"),
        ("filesystem://", "broker_password_file needs a broker server's broker_url"),
        ("redis://:inline-pw@127.0.0.1:6379/0", "broker_url carries a password"),
        ("redis://acwi:inline-pw@127.0.0.1:6379/0", "broker_url carries a password"),
    ],
)
def test_a_broker_file_needs_a_server_without_a_password_in_its_url(
    tmp_path: Path, url: str | None, said: str
) -> None:
    node: dict[str, object] = {
        "broker_password_file": password_file(tmp_path, SECRET, "broker-password")
    }
    if url is not None:
        node["broker_url"] = url
    message = refusal(tmp_path, **node)
    assert said in message
    assert "inline-pw" not in message and SECRET not in message


# ------------------------------------------------------------------------- never shown
def test_the_password_is_in_the_engine_only(tmp_path: Path) -> None:
    settings = settings_with(
        tmp_path,
        database_url=LEDGER,
        database_password_file=password_file(tmp_path, SECRET),
    )
    ledger = Ledger(settings.ledger_url, create=False)  # no connection made
    try:
        assert ledger.engine.url.password == SECRET
        assert ledger.engine.url.drivername == "postgresql+psycopg"
        assert ledger.url == LEDGER
        for shown in (
            str(settings.ledger_url),
            repr(settings.ledger_url),
            repr(settings),
            str(settings),
            settings.model_dump_json(),
            ledger.url,
            repr(ledger.engine),
        ):
            assert SECRET not in shown
    finally:
        ledger.dispose()


def test_config_output_masks_the_passwords_in_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "acwi.toml"
    config.write_text(
        "[node]\n"
        f'data_dir = "{tmp_path / "data"}"\n'
        'database_url = "postgresql://acwi:ledger-pw-1@db.example:5432/acwi"\n'
        'broker_url = "redis://:broker-pw-2@redis.example:6379/0"\n',
        encoding="utf-8",
    )
    status, out, err = run_cli("--config", str(config), "config")
    assert status == 0, err
    assert "ledger-pw-1" not in out and "broker-pw-2" not in out
    assert '"database_url": "postgresql://acwi:***@db.example:5432/acwi"' in out
    assert '"broker_url": "redis://:***@redis.example:6379/0"' in out


def test_config_output_shows_the_password_file_not_its_contents(tmp_path: Path) -> None:
    path = password_file(tmp_path, SECRET)
    config = tmp_path / "acwi.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\ndatabase_url = "{LEDGER}"\n'
        f'database_password_file = "{path}"\n',
        encoding="utf-8",
    )
    status, out, err = run_cli("--config", str(config), "config")
    assert status == 0, err
    assert f'"database_password_file": "{path}"' in out
    assert f'"database_url": "{LEDGER}"' in out
    assert SECRET.strip() not in out + err


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://acwi:pw@h:5432/d", "postgresql://acwi:***@h:5432/d"),
        (
            "postgresql://acwi@h/d?password=pw&sslmode=require",
            "postgresql://acwi@h/d?password=***&sslmode=require",
        ),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:p%40w@h/0", "rediss://user:***@h/0"),
        ("postgresql://acwi@h/d", "postgresql://acwi@h/d"),
        ("sqlite:////var/lib/acwi/ledger.sqlite", "sqlite:////var/lib/acwi/ledger.sqlite"),
        ("filesystem://", "filesystem://"),
        ("redis://:pw@h:notaport/0", "redis://:***@h:notaport/0"),
    ],
)
def test_masked_url(url: str, shown: str) -> None:
    from acwi_node.config import masked_url

    assert masked_url(url) == shown


def test_every_process_kind_opens_the_ledger_with_the_password() -> None:
    """Each ``Ledger(...)`` of the node (scp, worker, exporter, web, hl7, the health checks, the
    commands) opens ``settings.ledger_url``, which carries the file's password, not
    ``database_url``, which does not."""
    package = Path(cli.__file__).resolve().parent
    opened = []
    for source in sorted(package.rglob("*.py")):
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if "Ledger(" in line and "database_url" in line:
                opened.append(f"{source.relative_to(package)}:{number}: {line.strip()}")
    assert opened == []
