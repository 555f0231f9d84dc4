"""The ledger's and the broker's passwords from files, against the real servers: the ledger's
PostgreSQL role (libpq is handed the file's password) and a Redis of this test's own that
demands a password (``requirepass``), reached by the broker, the readiness check and the
queue-length metric with the file's password alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from acwi_node.config import Settings, load_settings
from acwi_node.ledger import Ledger
from acwi_node.observability.health import _ledger_for_checks, broker_check, ledger_check
from acwi_node.observability.metrics import broker_queue_length
from acwi_node.tasks.app import ANALYSIS_QUEUE, configure
from tests.conftest import POSTGRES_ADMIN_URL
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

LEDGER_SECRET = "ledger:s3cr@t/" + uuid.uuid4().hex[:8]
BROKER_SECRET = "broker:s3cr@t/" + uuid.uuid4().hex[:8]


@pytest.fixture
def ledger_role() -> Iterator[str]:
    """A PostgreSQL role with the password :data:`LEDGER_SECRET` and a database of its own;
    yields the database's URL, which carries no password."""
    admin = create_engine(
        POSTGRES_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://"),
        isolation_level="AUTOCOMMIT",
    )
    name = f"acwi_pw_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        quoted = LEDGER_SECRET.replace("'", "''")
        conn.execute(text(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{quoted}'"))
        conn.execute(text(f'CREATE DATABASE "{name}" OWNER "{name}"'))
    host = POSTGRES_ADMIN_URL.split("@", 1)[1].rsplit("/", 1)[0]
    yield f"postgresql://{name}@{host}/{name}"
    with admin.connect() as conn:
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
            {"n": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'DROP ROLE IF EXISTS "{name}"'))
    admin.dispose()


def _secret_file(tmp_path: Path, name: str, secret: str) -> Path:
    path = tmp_path / name
    path.write_text(secret + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def _config(tmp_path: Path, **node: str) -> Path:
    lines = ["[node]", f'data_dir = "{tmp_path / "data"}"']
    lines += [f'{key} = "{value}"' for key, value in node.items()]
    config = tmp_path / "acwi.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def test_the_ledger_connects_with_the_file_s_password(tmp_path: Path, ledger_role: str) -> None:
    settings = load_settings(
        None,
        node={
            "data_dir": tmp_path / "data",
            "database_url": ledger_role,
            "database_password_file": _secret_file(tmp_path, "ledger-pw", LEDGER_SECRET),
        },
    )
    role = ledger_role.rsplit("/", 1)[1]
    for ledger in (Ledger(settings.ledger_url), _ledger_for_checks(settings)):
        try:
            with ledger.engine.connect() as conn:
                # What libpq was handed for this connection (with trust authentication in
                # pg_hba.conf the server does not ask for it, so ask libpq).
                assert conn.connection.dbapi_connection.info.password == LEDGER_SECRET  # type: ignore[union-attr]
                assert conn.execute(text("SELECT current_user")).scalar() == role
            assert ledger_check(ledger)() == (True, "reachable")
            assert LEDGER_SECRET not in ledger.url
        finally:
            ledger.dispose()


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACWI_", "PG"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return subprocess.run(
        [sys.executable, "-m", "acwi_node.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_commands_read_the_file_and_never_print_it(tmp_path: Path, ledger_role: str) -> None:
    """``studies``, ``config`` and a ledger that cannot be reached: the file's contents (here
    not the role's password: pg_hba.conf may trust the connection) appear in no output."""
    wrong = "not-the-password-" + uuid.uuid4().hex
    pw_file = _secret_file(tmp_path, "ledger-pw", wrong)
    config = _config(tmp_path, database_url=ledger_role, database_password_file=str(pw_file))
    shown = _cli(config, "studies", "show", "1.2.3")
    if shown.returncode == 2 and "password authentication failed" in shown.stderr:
        pass  # the server checks passwords: the wrong one is refused, and not printed
    else:
        assert shown.returncode == 1, shown.stderr
        assert "not in the ledger" in shown.stderr
    dumped = _cli(config, "config")
    assert dumped.returncode == 0, dumped.stderr
    assert str(pw_file) in dumped.stdout
    closed = f"postgresql://acwi@127.0.0.1:{free_port()}/acwi"
    unreachable = _cli(
        _config(tmp_path, database_url=closed, database_password_file=str(pw_file)),
        "studies",
        "show",
        "1.2.3",
    )
    assert unreachable.returncode == 2
    assert f"cannot use the ledger {closed}" in unreachable.stderr
    for run in (shown, dumped, unreachable):
        assert wrong not in run.stdout + run.stderr


class _RedisWithPassword:
    """A Redis server of this test's own that takes :data:`BROKER_SECRET` only."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--requirepass",
                BROKER_SECRET,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url, password=BROKER_SECRET).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError("the test's Redis did not start")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[_RedisWithPassword]:
    server = _RedisWithPassword(tmp_path)
    yield server
    server.stop()


def _broker_settings(tmp_path: Path, url: str, **node: object) -> Settings:
    return load_settings(None, node={"data_dir": tmp_path / "data", "broker_url": url, **node})


def test_the_broker_is_reached_with_the_file_s_password(
    tmp_path: Path, locked_redis: _RedisWithPassword
) -> None:
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(locked_redis.url).ping()  # the server demands the password
    without = _broker_settings(tmp_path, locked_redis.url)
    with pytest.raises(redis.AuthenticationError):
        broker_check(without)()
    settings = _broker_settings(
        tmp_path,
        locked_redis.url,
        broker_password_file=_secret_file(tmp_path, "broker-pw", BROKER_SECRET),
    )
    assert broker_check(settings)() == (True, "reachable")
    assert broker_queue_length(settings, ANALYSIS_QUEUE) == 0
    app = configure(settings, register_tasks=False)
    try:
        app.send_task("acwi_node.analyse", args=[1], queue=ANALYSIS_QUEUE)
        assert broker_queue_length(settings, ANALYSIS_QUEUE) == 1
        with app.connection_for_read() as conn:
            assert BROKER_SECRET not in conn.as_uri()
    finally:
        configure(load_settings(None, node={"data_dir": tmp_path / "data"}), register_tasks=False)
