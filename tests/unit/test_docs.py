"""The guides say what the node does: their links resolve, the commands and options they show
are the command line's, and the HTTP paths they name are the web app's."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from acwi_node.cli import build_parser
from acwi_node.config import ConfigError, Settings, load_settings
from acwi_node.web.api import create_app
from tests.support.certs import Pki, make_pki
from tests.unit.test_config import documented_settings, settings_defaults

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 reads TOML with the tomli backport
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
GUIDES = [
    ROOT / name
    for name in (
        "README.md",
        "deploy/README.md",
        "docs/conformance.md",
        "docs/observability.md",
        "docs/speed.md",
        "models/README.md",
        "orthanc/README.md",
    )
]


def _prose(path: Path) -> str:
    """The guide without its code blocks (their lines kept blank, so line numbers hold)."""
    return re.sub(
        r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), path.read_text(), flags=re.DOTALL
    )


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (``## A study's trace`` ->
    ``a-studys-trace``; a repeated heading gets ``-1``, ``-2``)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for heading in re.findall(r"(?m)^#{1,6}\s+(.*?)\s*$", _prose(path)):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        if slug in seen:
            seen[slug] += 1
            slug = f"{slug}-{seen[slug]}"
        else:
            seen[slug] = 0
        found.add(slug)
    return found


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def broken_links(path: Path) -> list[str]:
    """``file:line: target`` of each relative link or anchor of a guide that resolves to nothing."""
    broken = []
    for number, line in enumerate(_prose(path).splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            where = f"{_shown(path)}:{number}: {target}"
            if not linked.exists() or (
                anchor and linked.suffix == ".md" and anchor not in anchors(linked)
            ):
                broken.append(where)
    return broken


def test_anchors_and_broken_links_are_found(tmp_path: Path) -> None:
    guide = tmp_path / "guide.md"
    guide.write_text(
        "# Guide\n## A study's trace\n## For radiologists: the app\n## Notes\n## Notes\n"
        "[a](#a-studys-trace) [b](#for-radiologists-the-app) [c](#notes-1) [d](guide.md#guide)\n"
        "```\n## not a heading\n```\n[e](#not-a-heading) [f](#speed) [g](missing.md)\n"
    )
    assert anchors(guide) == {"guide", "a-studys-trace", "for-radiologists-the-app", "notes"} | {
        "notes-1"
    }
    found = [line.rpartition(": ")[2] for line in broken_links(guide.resolve())]
    assert found == ["#not-a-heading", "#speed", "missing.md"]


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_between_the_guides_resolve(guide: Path) -> None:
    assert broken_links(guide) == []


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every command of the command line (``""``, ``studies``, ``studies show``, ...)."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        found[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    walk(subparser, f"{name} {sub}".strip())

    walk(build_parser(), "")
    return found


def _guides_text() -> str:
    # A synopsis's alternatives (`users disable\|enable NAME`) name each command.
    return "\n".join(g.read_text() for g in GUIDES).replace("\\|", "|")


def test_every_command_and_option_is_named_in_the_guides() -> None:
    text = _guides_text()
    missing = []
    for name, parser in commands().items():
        if name:
            *parents, last = name.split()
            said = (
                rf"(?:acwi-node |`)(?:[a-z-]+[ |])*{' '.join(parents)}[ |]?(?:[a-z-]+\|)*{last}\b"
            )
            if not re.search(said, text):
                missing.append(f"acwi-node {name}")
        for action in parser._actions:
            missing += [
                f"acwi-node {name} {option}".replace("  ", " ")
                for option in action.option_strings
                if option not in ("-h", "--help") and not re.search(rf"{option}\b", text)
            ]
    assert missing == []


def test_the_options_the_guides_show_are_the_commands_own() -> None:
    """``acwi-node CMD ... --option`` in a guide: CMD takes that option."""
    known = commands()
    wrong = []
    for guide in GUIDES:
        text = re.sub(r"\\\n\s*", " ", guide.read_text())  # a command continued on the next line
        for number, line in enumerate(text.splitlines(), 1):
            for shown in re.finditer(
                r"acwi-node\s+([a-z][a-z-]*(?:\s+[a-z][a-z-]*)?)([^`\n]*)", line
            ):
                words = shown.group(1).split()
                name = next(
                    (" ".join(words[:n]) for n in (2, 1) if " ".join(words[:n]) in known), ""
                )
                if not name:
                    continue
                options = {o for a in known[name]._actions for o in a.option_strings} | {"--config"}
                rest = (shown.group(1) + shown.group(2))[len(name) :]
                rest = re.split(r"\s#|[;&)]\s|\s\|\s", rest)[0]  # a comment, the next command
                for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest):
                    if option not in options:
                        wrong.append(f"{guide.relative_to(ROOT)}:{number}: {name} {option}")
    assert wrong == []


@pytest.fixture(scope="module")
def http_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """The web app's paths (``{}`` for each parameter) and their methods."""
    data = tmp_path_factory.mktemp("docs") / "data"
    app = create_app(load_settings(None, node={"data_dir": data}))
    document: dict[str, Any] = app.openapi()
    paths = {path: {method.upper() for method in item} for path, item in document["paths"].items()}
    for route in app.routes:  # the OpenAPI document's own paths, /api/openapi.json
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if isinstance(path, str) and methods:
            paths.setdefault(path, set()).update(methods)
    return {re.sub(r"\{[^}]+\}", "{}", path): methods for path, methods in paths.items()}


#: ``GET /api/studies/{uid}``, ``/dicomweb/studies``, ``/metrics``: an optional method, a path.
HTTP_PATH = (
    r"(?:\b(GET|POST|PUT|DELETE) )?(?<![\w}.])"
    r"(/(?:api|dicomweb)/[\w{}./-]*|/healthz|/readyz|/metrics)(?![\w{}])"
)


def test_the_http_paths_the_guides_name_are_the_web_apps(http_paths: dict[str, set[str]]) -> None:
    """``/api/...``, ``/dicomweb/...``, ``/healthz``, ``/readyz``, ``/metrics``: each path a
    guide names (with the method it shows, if any) is one the web app answers."""
    wrong = []
    for guide in GUIDES:
        for number, line in enumerate(guide.read_text().splitlines(), 1):
            for method, path in re.findall(HTTP_PATH, line):
                path = re.sub(r"\{[^}]+\}", "{}", path.rstrip("./"))
                if path.endswith("/..") or path in ("/api", "/dicomweb"):
                    continue
                methods = http_paths.get(path)
                if methods is None and not any(p.startswith(path + "/") for p in http_paths):
                    wrong.append(f"{guide.relative_to(ROOT)}:{number}: {path}")
                elif methods is not None and method and method not in methods:
                    wrong.append(f"{guide.relative_to(ROOT)}:{number}: {method} {path}")
    assert wrong == []


def test_the_readme_opens_with_what_setup_and_ci_run() -> None:
    """The README's first two commands are those ``.ci/run`` runs, and its paragraph on them
    names each Debian package ``scripts/setup.sh --test`` installs."""
    readme = (ROOT / "README.md").read_text()
    opening = re.search(r"```bash\n(.*?)```", readme, re.DOTALL)
    assert opening is not None
    first, second = opening.group(1).splitlines()[:2]
    assert first.startswith("bash scripts/setup.sh && .venv/bin/acwi-node ")
    test_command = second.partition("#")[0].strip()
    assert test_command == "bash scripts/setup.sh --test && .venv/bin/python -m pytest"
    assert test_command in (ROOT / ".ci" / "run").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    packages = {p for group in re.findall(r"missing\+=\(([^)]*)\)", setup) for p in group.split()}
    assert {"orthanc", "dcmtk"} <= packages
    said = readme.split("## ", 1)[0].lower()
    # orthanc-dicomweb: "Orthanc (with its DICOMweb plugin)"
    assert sorted(p for p in packages if p.rpartition("-")[2] not in said) == []


#: The guides whose TOML examples are the node's configuration (``acwi-node --config``).
CONFIGURATION_GUIDES = [ROOT / "README.md", ROOT / "deploy" / "README.md"]


def toml_examples(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of each ```` ```toml ```` block of a guide."""
    text = path.read_text()
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1))
        for m in re.finditer(r"```toml\n(.*?)```", text, re.DOTALL)
    ]


def loadable(example: str, pki: Pki, secret: Path) -> str:
    """The example as a configuration file here: the certificates, keys and secrets it names
    (``/etc/acwi/tls/node.key``, ``/run/secrets/pacs-password``) the test's own, and a DIMSE
    destination for each one a route names that the example leaves out."""

    def local(found: re.Match[str]) -> str:
        path = found.group(1)
        name = path.rpartition("/")[2]
        if name.endswith(".key"):
            path = str(pki.server.key)
        elif name.endswith((".crt", ".pem")):
            path = str(pki.ca if "ca" in name.split(".")[0].split("-") else pki.server.cert)
        elif path.startswith("/run/secrets/"):
            path = str(secret)
        return f'"{path}"'

    text = re.sub(r'"(/(?:etc|run)/[^"]+)"', local, example)
    parsed = tomllib.loads(text)
    defined = {d["name"] for d in parsed.get("destinations", [])}
    for name in sorted({n for r in parsed.get("routes", []) for n in r.get("destinations", [])}):
        if name not in defined:
            text += f'\n[[destinations]]\nname = "{name}"\nae_title = "PACS"\n'
            text += 'host = "pacs"\nport = 104\n'
    return text


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_loadable_gives_an_example_the_files_it_names(tmp_path: Path, pki: Pki) -> None:
    example = (
        '[ingest.tls]\ncert_file = "/etc/acwi/tls/node.crt"\nkey_file = "/etc/acwi/tls/node.key"\n'
        'ca_file = "/etc/acwi/tls/hospital-ca.crt"\n[[notify]]\ntoken_file = "/run/secrets/t"\n'
        'manifest = "/etc/acwi/models/chest/manifest.json"\n'
        '[[routes]]\nname = "r"\ndestinations = ["pacs", "archive"]\n'
    )
    parsed = tomllib.loads(loadable(example, pki, tmp_path / "secret"))
    assert parsed["ingest"]["tls"] == {
        "cert_file": str(pki.server.cert),
        "key_file": str(pki.server.key),
        "ca_file": str(pki.ca),
    }
    assert parsed["notify"][0] == {
        "token_file": str(tmp_path / "secret"),
        "manifest": "/etc/acwi/models/chest/manifest.json",
    }
    assert [d["name"] for d in parsed["destinations"]] == ["archive", "pacs"]


@pytest.mark.parametrize("guide", CONFIGURATION_GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_toml_examples_of_the_guides_load(
    guide: Path, tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An administrator copies an example into the configuration: ``acwi-node config``
    accepts each as it stands (with the files it names, and the destination its routes
    send to), and each key it shows commented out (``# commitment_linger_s = 10``) is one
    of the section it stands in."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ACWI_CONFIG", raising=False)
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    settings = settings_defaults(Settings)
    wrong = []
    for number, example in toml_examples(guide):
        where = f"{guide.relative_to(ROOT)}:{number}"
        config = tmp_path / f"example-{number}.toml"
        config.write_text(loadable(example, pki, secret))
        try:
            load_settings(config, route_models_known=False)
        except ConfigError as exc:
            wrong.append(f"{where}: {exc}")
        wrong += [
            f"{where}: no setting {name}"
            for name in sorted(documented_settings(f"```toml\n{example}```"))
            if name not in settings
        ]
    assert wrong == []
