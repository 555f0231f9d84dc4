"""Start Debian's Orthanc with the repository's configuration for tests.

:class:`OrthancServer` derives its configuration from ``orthanc/orthanc.json``
and, when ``with_lua`` is set, copies ``orthanc/route_to_node.lua`` unchanged
next to the generated configuration file, so the script is loaded through the
same relative path as in production (Orthanc resolves ``LuaScripts`` against
the directory of the configuration file).  Only the settings that must differ
on a test machine are overridden: ports, storage, the node's modality entry,
``StableAge`` and anything that could reach beyond the loopback interface.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
import pytest

from .ports import free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_CONFIG = REPO_ROOT / "orthanc" / "orthanc.json"
REPO_LUA = REPO_ROOT / "orthanc" / "route_to_node.lua"
ORTHANC_CANDIDATES = (
    Path("/usr/sbin/Orthanc"),
    Path("/usr/bin/Orthanc"),
    Path("/usr/local/bin/Orthanc"),
)
NODE_MODALITY = "acwi"

T = TypeVar("T")


class OrthancError(RuntimeError):
    """Orthanc failed to start or answered a request with an error."""


def orthanc_binary() -> Path | None:
    """Return the Orthanc executable, or None when Orthanc is not installed."""
    for candidate in ORTHANC_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("Orthanc")
    return Path(found) if found else None


def require_orthanc() -> Path:
    """Return the Orthanc executable or skip the calling test with the reason."""
    binary = orthanc_binary()
    if binary is None:
        pytest.skip("Orthanc not found (/usr/sbin/Orthanc); install the Debian package 'orthanc'")
    return binary


def load_repo_config() -> dict[str, Any]:
    """Parse ``orthanc/orthanc.json`` as strict JSON."""
    with REPO_CONFIG.open(encoding="utf-8") as handle:
        config: dict[str, Any] = json.load(handle)
    return config


def derive_test_config(
    base: dict[str, Any],
    *,
    http_port: int,
    dicom_port: int,
    storage_dir: Path,
    temporary_dir: Path,
    node_ae: str,
    node_host: str,
    node_port: int,
    with_lua: bool,
    stable_age: int,
    aet: str | None = None,
) -> dict[str, Any]:
    """Return the repository configuration with the test-only overrides applied."""
    config = copy.deepcopy(base)
    config["HttpPort"] = http_port
    config["DicomPort"] = dicom_port
    config["StorageDirectory"] = str(storage_dir)
    config["IndexDirectory"] = str(storage_dir)
    config["TemporaryDirectory"] = str(temporary_dir)
    config["StableAge"] = stable_age
    if aet is not None:
        config["DicomAet"] = aet
    modalities = dict(config.get("DicomModalities", {}))
    modalities[NODE_MODALITY] = [node_ae, node_host, node_port]
    config["DicomModalities"] = modalities
    if not with_lua:
        config["LuaScripts"] = []
    # Nothing may leave the loopback interface.
    config["RemoteAccessAllowed"] = False
    config["OrthancPeers"] = {}
    config["HttpProxy"] = ""
    dicomweb = dict(config.get("DicomWeb", {}))
    dicomweb["Servers"] = {}
    config["DicomWeb"] = dicomweb
    # Plugins missing on this machine would abort the start-up.
    config["Plugins"] = [p for p in config.get("Plugins", []) if Path(p).exists()]
    return config


class OrthancServer:
    """A throw-away Orthanc on free loopback ports.

    Use as a context manager::

        with OrthancServer(node_ae="ACWI", node_port=11112, with_lua=True) as orthanc:
            orthanc.upload(path)

    ``overrides`` replaces top-level configuration keys after the standard
    test overrides; keep it for settings a test is explicitly about.  The
    Orthanc log is kept at :attr:`log_path`; failures include its tail.  Set
    ``ACWI_KEEP_ORTHANC=1`` to keep the working directory (log, storage) after
    the server stops.
    """

    def __init__(
        self,
        *,
        node_ae: str = "ACWI",
        node_host: str = "127.0.0.1",
        node_port: int = 11112,
        with_lua: bool = False,
        stable_age: int = 1,
        aet: str | None = None,
        verbose: bool = False,
        start_timeout_s: float = 90.0,
        workdir: Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        http_user: tuple[str, str] | None = None,
    ) -> None:
        self.node_ae = node_ae
        self.node_host = node_host
        self.node_port = node_port
        self.with_lua = with_lua
        self.stable_age = stable_age
        self.verbose = verbose
        self.start_timeout_s = start_timeout_s
        self._requested_aet = aet
        self.overrides = dict(overrides or {})
        #: HTTP Basic for the REST API and DICOMweb: Orthanc then refuses requests without it.
        self.http_user = http_user
        if http_user is not None:
            self.overrides["AuthenticationEnabled"] = True
            self.overrides["RegisteredUsers"] = {http_user[0]: http_user[1]}
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="acwi-orthanc-"))
        self.config_dir = self.workdir / "config"
        self.config_path = self.config_dir / "orthanc.json"
        self.storage_dir = self.workdir / "storage"
        self.temporary_dir = self.workdir / "tmp"
        self.log_path = self.workdir / "orthanc.log"
        self.http_port = 0
        self.dicom_port = 0
        self.config: dict[str, Any] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def aet(self) -> str:
        """Orthanc's own AE title."""
        return str(self.config.get("DicomAet", self._requested_aet or "ORTHANC"))

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def client(self) -> httpx.Client:
        """HTTP client bound to :attr:`url` (available while running)."""
        if self._client is None:
            raise OrthancError("Orthanc is not running")
        return self._client

    def __enter__(self) -> OrthancServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start Orthanc and wait until its REST API and DICOM port answer.

        Port collisions (another process grabbed a port between choosing and
        binding it) are retried with fresh ports.
        """
        binary = orthanc_binary()
        if binary is None:
            raise OrthancError("Orthanc is not installed (/usr/sbin/Orthanc)")
        base = load_repo_config()
        last_error: OrthancError | None = None
        for _attempt in range(3):
            self.http_port, self.dicom_port = free_ports(2)
            self._write_config(base)
            try:
                self._launch(binary)
                return
            except OrthancError as exc:
                last_error = exc
                self._terminate()
                if "address already in use" not in self.log_tail(200).lower():
                    break
        assert last_error is not None
        raise last_error

    def _write_config(self, base: dict[str, Any]) -> None:
        if self.storage_dir.exists():
            shutil.rmtree(self.storage_dir)
        for directory in (self.config_dir, self.storage_dir, self.temporary_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.config = derive_test_config(
            base,
            http_port=self.http_port,
            dicom_port=self.dicom_port,
            storage_dir=self.storage_dir,
            temporary_dir=self.temporary_dir,
            node_ae=self.node_ae,
            node_host=self.node_host,
            node_port=self.node_port,
            with_lua=self.with_lua,
            stable_age=self.stable_age,
            aet=self._requested_aet,
        )
        self.config.update(copy.deepcopy(self.overrides))
        self.config_path.write_text(json.dumps(self.config, indent=2), encoding="utf-8")
        if self.with_lua:
            for script in self.config.get("LuaScripts", []):
                if not Path(script).is_absolute():
                    shutil.copyfile(REPO_ROOT / "orthanc" / script, self.config_dir / script)

    def _launch(self, binary: Path) -> None:
        args = [str(binary), str(self.config_path)]
        if self.verbose:
            args.append("--verbose")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,
            )
        self._client = httpx.Client(
            base_url=self.url, timeout=60.0, trust_env=False, auth=self.http_user
        )
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._process.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with code {self._process.returncode} during start-up; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self._system_answers() and self._dicom_port_open():
                return
            if time.monotonic() > deadline:
                raise OrthancError(
                    f"Orthanc did not answer on {self.url}/system within "
                    f"{self.start_timeout_s:g} s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _system_answers(self) -> bool:
        try:
            return self.client.get("/system", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _dicom_port_open(self) -> bool:
        # Checked in /proc (state 0A = LISTEN) rather than by connecting, so
        # the readiness probe leaves no aborted association in the log.
        port_hex = f":{self.dicom_port:04X}"
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                return True
            for line in lines:
                fields = line.split()
                if len(fields) > 3 and fields[1].endswith(port_hex) and fields[3] == "0A":
                    return True
        return False

    def halt(self) -> None:
        """Stop the Orthanc process but keep its ports, configuration and storage."""
        self._terminate()

    def resume(self) -> None:
        """Start Orthanc again after :meth:`halt`, on the same ports with the same storage."""
        binary = orthanc_binary()
        if binary is None:
            raise OrthancError("Orthanc is not installed (/usr/sbin/Orthanc)")
        self._launch(binary)

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL) and remove the temporary files."""
        self._terminate()
        if self._own_workdir and os.environ.get("ACWI_KEEP_ORTHANC") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _terminate(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        process = self._process
        self._process = None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    @property
    def running(self) -> bool:
        """True while the Orthanc process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The Orthanc process's ID while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    def log_text(self) -> str:
        """The whole Orthanc log so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the Orthanc log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ------------------------------------------------------------------ REST

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise OrthancError(
                f"{response.request.method} {response.request.url.path} -> "
                f"HTTP {response.status_code}: {response.text[:2000]}\n"
                f"Orthanc log tail:\n{self.log_tail(30)}"
            )
        return response

    def require_dicomweb(self) -> None:
        """Skip the calling test where Orthanc's DICOMweb plugin (Debian's ``orthanc-dicomweb``,
        which ``scripts/setup.sh --test`` installs) is not loaded."""
        if "dicom-web" not in str(self.get_json("/plugins")):
            pytest.skip("Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb) is absent")

    def get_json(self, path: str) -> Any:
        """GET ``path`` and return the decoded JSON answer."""
        return self._check(self.client.get(path)).json()

    def post_json(self, path: str, body: Any) -> Any:
        """POST a JSON body to ``path`` and return the decoded JSON answer."""
        return self._check(self.client.post(path, json=body)).json()

    def system(self) -> dict[str, Any]:
        """The ``/system`` answer."""
        result: dict[str, Any] = self.get_json("/system")
        return result

    def studies(self) -> list[str]:
        """Orthanc identifiers of all studies."""
        return list(self.get_json("/studies"))

    def instances(self) -> list[str]:
        """Orthanc identifiers of all instances."""
        return list(self.get_json("/instances"))

    def find_study(self, study_uid: str) -> str | None:
        """Orthanc identifier of the study with this Study Instance UID, if stored."""
        for item in self._lookup(study_uid):
            if item.get("Type") == "Study":
                return str(item["ID"])
        return None

    def _lookup(self, uid: str) -> list[dict[str, Any]]:
        response = self._check(self.client.post("/tools/lookup", content=uid.encode("ascii")))
        return list(response.json())

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Instances of a study (``ID``, ``MainDicomTags``, ``ParentSeries``, ...)."""
        answer = self.post_json(
            "/tools/find",
            {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
        )
        return list(answer)

    def study_sop_instance_uids(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs stored for a study."""
        return {
            str(item["MainDicomTags"]["SOPInstanceUID"]) for item in self.study_instances(study_uid)
        }

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored Part-10 file of an instance."""
        return self._check(self.client.get(f"/instances/{orthanc_id}/file")).content

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """Simplified tags (keyword -> value) of an instance."""
        result: dict[str, Any] = self.get_json(f"/instances/{orthanc_id}/simplified-tags")
        return result

    def instance_metadata(self, orthanc_id: str) -> dict[str, str]:
        """All metadata of an instance (e.g. ``RemoteAET``, ``Origin``)."""
        result: dict[str, str] = self.get_json(f"/instances/{orthanc_id}/metadata?expand")
        return result

    def upload(self, path: Path) -> dict[str, Any]:
        """Store a Part-10 file through the REST API (``POST /instances``)."""
        response = self.client.post(
            "/instances",
            content=Path(path).read_bytes(),
            headers={"Content-Type": "application/dicom"},
        )
        result: dict[str, Any] = self._check(response).json()
        return result

    def store_to_modality(
        self, modality: str, resources: Sequence[str], *, synchronous: bool = True
    ) -> dict[str, Any]:
        """C-STORE resources (Orthanc identifiers) to a configured modality."""
        result: dict[str, Any] = self.post_json(
            f"/modalities/{modality}/store",
            {"Resources": list(resources), "Synchronous": synchronous},
        )
        return result

    def echo_modality(self, modality: str) -> bool:
        """C-ECHO a configured modality from Orthanc."""
        response = self.client.post(f"/modalities/{modality}/echo", json={})
        return response.status_code == 200

    def jobs(self, job_type: str | None = None) -> list[dict[str, Any]]:
        """Jobs known to Orthanc (expanded), optionally filtered by type."""
        jobs = list(self.get_json("/jobs?expand"))
        return [job for job in jobs if job_type is None or job.get("Type") == job_type]

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout_s: float = 30.0,
        *,
        interval_s: float = 0.2,
        message: str = "condition",
    ) -> T:
        """Poll ``predicate`` until it returns a truthy value, and return that value.

        Raises:
            AssertionError: on timeout, with the tail of the Orthanc log.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout_s:g} s waiting for {message}; "
                    f"Orthanc log {self.log_path} tail:\n{self.log_tail(40)}"
                )
            time.sleep(interval_s)

    def log_lines_matching(self, needle: str) -> list[str]:
        """Log lines that contain ``needle``."""
        return [line for line in self.log_text().splitlines() if needle in line]

    def delete_all(self, resources: Iterable[str] | None = None) -> None:
        """Delete the given studies (all studies by default)."""
        for study in list(resources) if resources is not None else self.studies():
            self._check(self.client.delete(f"/studies/{study}"))
