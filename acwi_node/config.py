"""Typed configuration: one TOML file, every scalar key overridable by an ``ACWI_...`` variable.

The file is named by ``--config FILE`` or ``ACWI_CONFIG``. Nested keys use a double underscore in
the environment: ``ACWI_NODE__DICOM_PORT=11113`` overrides ``[node] dicom_port``. Everything is
validated at start-up; :func:`load_settings` raises :class:`ConfigError` with one line per problem.
"""

from __future__ import annotations

import os
import re
import ssl
import zoneinfo
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no "\"


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem, one per line."""


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not AE_TITLE_RE.match(value) or len(value) > 16:
        raise ValueError(
            f"AE title {value!r} must be 1-16 printable ASCII characters, no backslash"
        )
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


def _check_host(value: str) -> str:
    """A host name or an IP address as a socket takes it: an IPv6 address without brackets
    (``::1``; they belong in URLs), no port (it has a key of its own)."""
    import ipaddress

    if value.startswith("[") or value.endswith("]"):
        raise ValueError(
            f"host {value!r}: write an IPv6 address without brackets ({value.strip('[]')!r});"
            " brackets go only in URLs (http://[::1]:8080/)"
        )
    if ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise ValueError(
                f"host {value!r} is neither a host name nor an IP address"
                " (the port has a key of its own)"
            ) from None
    elif any(c.isspace() or c in "/@?#" for c in value):
        raise ValueError(f"host {value!r} is neither a host name nor an IP address")
    return value


#: A host name or an IP address (IPv4, or IPv6 without brackets).
Host = Annotated[str, AfterValidator(_check_host)]


def _check_trusted_proxies(value: list[str]) -> list[str]:
    """``node.http_trusted_proxies``: IP addresses and networks (CIDR), written as
    :mod:`ipaddress` writes them, or ``["*"]`` alone. uvicorn takes an entry it cannot read
    (a host name, a typo, a network with host bits set) for a literal that no peer ever
    matches: such an entry is refused here instead of being silently never trusted."""
    import ipaddress

    if "*" in value:
        if value != ["*"]:
            raise ValueError('"*" (every peer) stands alone in http_trusted_proxies')
        return value
    written: list[str] = []
    for entry in value:
        item = entry.strip()
        try:
            if "/" in item:
                written.append(str(ipaddress.ip_network(item, strict=True)))
            else:
                written.append(str(ipaddress.ip_address(item)))
        except ValueError as exc:
            raise ValueError(
                f"trusted proxy {entry!r} is neither an IP address nor a network"
                f" (10.0.0.5, 10.0.0.0/24, fd00::/64): {exc}"
            ) from None
    return written


#: Reverse proxies whose forwarded headers the web app takes (``node.http_trusted_proxies``).
TrustedProxies = Annotated[list[str], AfterValidator(_check_trusted_proxies)]

#: A path segment of ``node.http_root_path``: letters, digits and ``-._~`` (no character a
#: URL, a cookie's ``Path`` or an HTML attribute would need to quote).
_ROOT_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")


def _check_root_path(value: str) -> str:
    """``node.http_root_path``: ``""`` (the web app at the host's root) or a path such as
    ``/acwi`` or ``/apps/acwi``: it starts with ``/``, does not end with one, and each of its
    segments is plain (:data:`_ROOT_PATH_SEGMENT`, not ``.`` nor ``..``): it is written
    unquoted before every link, redirect and cookie path the web app makes."""
    if value == "":
        return value
    if not value.startswith("/") or value.endswith("/"):
        raise ValueError(
            f"http_root_path {value!r} must start with / and not end with one"
            ' ("/acwi"; "" for the host\'s root)'
        )
    for segment in value[1:].split("/"):
        if not _ROOT_PATH_SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise ValueError(
                f"http_root_path {value!r}: segment {segment!r} is not a plain name"
                " (letters, digits, - . _ ~; not . or ..)"
            )
    return value


#: Where a reverse proxy publishes the web app (``node.http_root_path``).
RootPath = Annotated[str, AfterValidator(_check_root_path)]


def _unbracketed_ipv6(url: str) -> str:
    """The message refusing ``url`` when its host is an IPv6 address without brackets
    (``http://::1:8080/``), else ``""``: it names the URL's own scheme, not the URL (which
    could hold credentials)."""
    scheme, _, rest = url.partition("://")
    netloc = rest.split("/", 1)[0].rpartition("@")[2]
    if netloc.count(":") > 1 and "[" not in netloc:
        shown = scheme if scheme.isascii() and scheme.isalpha() and len(scheme) <= 8 else "https"
        return (
            f"an IPv6 address goes in brackets in a URL: {shown}://[fd00::5]:8080/,"
            f" not {shown}://fd00::5:8080/"
        )
    return ""


#: The longest duration a ``*_s`` setting may name (30 days): longer is no wait the node can
#: keep (a timestamp past it overflows the clock's types), and no interval anyone means.
MAX_DURATION_S = 30 * 86_400


#: Most processes a setting of 0 ("one per core") starts on a host with more cores:
#: ``ingest.processes`` (storage SCP listeners) and ``node.http_workers`` (web processes). Each
#: is a process of about 100 MiB with a ledger connection pool of its own (up to 10 connections
#: to PostgreSQL), and a PACS rarely opens more associations or connections at once than this.
MAX_AUTO_PROCESSES = 8


def processes_per_core(configured: int, cores: int | None = None) -> int:
    """Processes to run for a setting that takes 0 for one per core: ``configured`` when set,
    else one per core (``cores``: the machine's), at most :data:`MAX_AUTO_PROCESSES`."""
    if configured:
        return configured
    return max(1, min(cores or os.cpu_count() or 1, MAX_AUTO_PROCESSES))


class _Strict(BaseModel):
    # No inf or nan: a loop told to sleep for ever dies on it (OverflowError) while its
    # process runs on.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _a_duration_the_node_can_keep(cls, value: Any, info: ValidationInfo) -> Any:
        """Every ``*_s`` setting (seconds) at most :data:`MAX_DURATION_S`."""
        name = info.field_name or ""
        if (
            name.endswith("_s")
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and value > MAX_DURATION_S
        ):
            raise ValueError(f"at most {MAX_DURATION_S} seconds (30 days), got {value:g}")
        return value


class HttpTlsSettings(_Strict):
    """HTTPS on the web port (``[node.http_tls]``): the review app, the API and STOW-RS."""

    enabled: bool = False
    #: The web server's certificate (PEM, leaf first, then intermediates) and private key.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: How long a browser that reached the node over HTTPS keeps to HTTPS for its host
    #: (``Strict-Transport-Security: max-age``, RFC 6797), in days; 0: no such header.
    hsts_max_age_days: int = Field(365, ge=0, le=730)

    @model_validator(mode="after")
    def _usable(self) -> HttpTlsSettings:
        if not self.enabled:
            return self
        if self.cert_file is None or self.key_file is None:
            raise ValueError("enabled HTTPS needs cert_file and key_file")
        from acwi_node.tls import server_context

        # A missing file, or a key that is not the certificate's, fails at start-up.
        server_context(
            cert_file=self.cert_file.expanduser(),
            key_file=self.key_file.expanduser(),
            ca_file=None,
            require_client_cert=False,
        )
        return self


class NodeSettings(_Strict):
    """Identity, ports and storage of this node."""

    ae_title: AETitle = "ACWI"
    dicom_host: Host = "0.0.0.0"
    dicom_port: int = Field(11112, ge=1, le=65535)
    http_host: Host = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    #: Processes of ``acwi-node web`` serving ``http_port`` (review app, API, STOW-RS), for
    #: requests on several connections at once to use several cores; 0: one per core, at most
    #: :data:`MAX_AUTO_PROCESSES` (:func:`processes_per_core`).
    http_workers: int = Field(1, ge=0, le=64)
    #: HTTPS on ``http_port`` (TLS 1.2 or newer), for a web port reached from other hosts
    #: without a reverse proxy in front.
    http_tls: HttpTlsSettings = Field(default_factory=HttpTlsSettings)
    #: Peers (IP addresses or CIDR networks) whose ``X-Forwarded-For`` and
    #: ``X-Forwarded-Proto`` the web app takes for the client's address (sign-in throttle,
    #: audit trail) and the scheme: the reverse proxies in front of it. Loopback by default
    #: (a proxy on the same host); ``[]``: no peer; ``["*"]``: every peer, so that any client
    #: names its own address (only where nothing but the proxy can reach the port).
    #: uvicorn's ``FORWARDED_ALLOW_IPS`` environment variable is not read.
    http_trusted_proxies: TrustedProxies = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    #: The path a reverse proxy publishes the web app under (``/acwi`` for
    #: ``https://apps.hospital.local/acwi/``), the proxy stripping it from the requests it
    #: passes on (nginx: ``location /acwi/ { proxy_pass http://127.0.0.1:8080/; }``): every
    #: link, form, redirect and cookie of the review app, the STOW-RS answers' RetrieveURL and
    #: the OpenAPI document's server carry it. ``""``: the host's root. A plain path (starts
    #: with ``/``, no trailing ``/``, no ``.``/``..`` segment); ``X-Forwarded-Prefix`` is not
    #: read.
    http_root_path: RootPath = ""
    data_dir: Path = Path("acwi-data")
    #: SQLAlchemy URL of the ledger; default ``sqlite:///<data_dir>/ledger.sqlite``.
    database_url: str | None = None
    #: A file holding the password of ``database_url``'s PostgreSQL user (a Docker secret, a
    #: systemd credential), read once at start-up: the password then appears in no URL, log,
    #: output or environment. One trailing newline is not part of it.
    database_password_file: Path | None = None
    #: Celery broker; default an embedded broker in ``<data_dir>/broker`` (no server needed).
    broker_url: str | None = None
    #: A file holding the broker's password (Redis ``requirepass`` or an ACL user's, the user
    #: in ``broker_url``), read once at start-up as ``database_password_file`` is.
    broker_password_file: Path | None = None
    log_level: str = "INFO"
    #: Log patient identifiers (names, IDs). Off by default.
    log_phi: bool = False

    _database_password: SecretStr | None = PrivateAttr(None)
    _broker_password: SecretStr | None = PrivateAttr(None)

    @field_validator("database_url")
    @classmethod
    def _ledger_url(cls, v: str | None) -> str | None:
        """SQLite or PostgreSQL (``postgres://``, as some hosting services write it, is
        PostgreSQL)."""
        if v is None:
            return v
        if v.startswith("postgres://"):
            v = "postgresql://" + v[len("postgres://") :]
        scheme = v.split("://", 1)[0] if "://" in v else ""
        if scheme not in ("sqlite", "postgresql", "postgresql+psycopg"):
            raise ValueError("a ledger is sqlite:///PATH or postgresql://USER@HOST[:PORT]/DATABASE")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"log_level {v!r} is not one of DEBUG, INFO, WARNING, ERROR")
        return v

    @field_serializer("database_url", "broker_url")
    def _shown_without_password(self, url: str | None) -> str | None:
        """``acwi-node config`` (and any dump of the settings) shows a URL's password as
        ``***``."""
        return None if url is None else masked_url(url)

    @model_validator(mode="after")
    def _password_files(self) -> NodeSettings:
        """Read ``database_password_file`` and ``broker_password_file``: each for a server
        whose URL carries no password of its own."""
        if self.database_password_file is not None:
            if self.database_url is None or not self.database_url.startswith("postgresql"):
                raise ValueError(
                    "database_password_file needs a PostgreSQL database_url"
                    " (postgresql://USER@HOST/DATABASE); an SQLite ledger has no password"
                )
            if url_password(self.database_url) is not None:
                raise ValueError(
                    "database_url carries a password and database_password_file names"
                    " another: give one of them (the file, keeping the URL without it)"
                )
            self._database_password = read_password_file(
                "database_password_file", self.database_password_file
            )
        if self.broker_password_file is not None:
            if self.broker_url is None or self.broker_url.startswith("filesystem://"):
                raise ValueError(
                    "broker_password_file needs a broker server's broker_url (redis://HOST);"
                    " the embedded broker has no password"
                )
            if url_password(self.broker_url) is not None:
                raise ValueError(
                    "broker_url carries a password and broker_password_file names another:"
                    " give one of them (the file, keeping the URL without it)"
                )
            self._broker_password = read_password_file(
                "broker_password_file", self.broker_password_file
            )
        return self


def url_password(url: str) -> str | None:
    """The password a server URL carries (``user:PASSWORD@`` or a ``password=`` query
    parameter, which libpq reads too), None without one."""
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return None
    if password:
        return password
    given = parse_qs(parts.query).get("password")
    return given[0] if given and given[0] else None


def masked_url(url: str) -> str:
    """``url`` with its password, in the user part or a ``password=`` query parameter, shown
    as ``***``; the rest as written."""
    from urllib.parse import parse_qsl, urlencode, urlsplit

    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError:  # not a URL urllib reads (a bad port): hide what could be a password
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    in_query = any(key == "password" for key, _ in pairs)
    if not has_password and not in_query:
        return url
    netloc = parts.netloc
    if has_password:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = parts.query
    if in_query:
        query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    return shown + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def read_password_file(setting: str, path: Path) -> SecretStr:
    """The password in the file a ``*_password_file`` setting names, without one trailing
    newline (``echo`` writes one); raises ``ValueError`` naming the setting and the file, never
    what the file holds."""
    where = path.expanduser()
    try:
        raw = where.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{setting} {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{setting} {path} is a folder, not a file") from None
    except OSError as exc:
        raise ValueError(f"{setting} {path} cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{setting} {path} is not UTF-8 text") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise ValueError(f"{setting} {path} is empty")
    if "\n" in text or "\r" in text or "\x00" in text:
        raise ValueError(
            f"{setting} {path} holds more than one line: the password is its only line"
        )
    return SecretStr(text)


class IngestTlsSettings(_Strict):
    """DICOM TLS on the storage SCP's port (PS3.15 Annex B; TLS 1.2 or newer).

    When enabled the port speaks only TLS. The handshake runs in the connection's own thread
    with ``handshake_timeout_s``, so a peer that never finishes it holds up nobody else.
    """

    enabled: bool = False
    #: The node's certificate (PEM, leaf first, then intermediates) and its private key.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: CAs (PEM) that sign the certificates of sending systems.
    ca_file: Path | None = None
    #: Refuse a client without a certificate from ``ca_file`` (mutual TLS).
    require_client_cert: bool = True
    handshake_timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _usable(self) -> IngestTlsSettings:
        if not self.enabled:
            return self
        if self.cert_file is None or self.key_file is None:
            raise ValueError("enabled TLS needs cert_file and key_file")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CAs of client certificates)")
        self.context()  # a missing or unreadable file fails at start-up, not at first use
        return self

    def context(self) -> ssl.SSLContext:
        """The server SSL context (raises ``TlsConfigError``)."""
        from acwi_node.tls import server_context

        assert self.cert_file is not None and self.key_file is not None
        return server_context(
            cert_file=self.cert_file.expanduser(),
            key_file=self.key_file.expanduser(),
            ca_file=self.ca_file.expanduser() if self.ca_file else None,
            require_client_cert=self.require_client_cert,
        )


class IngestSettings(_Strict):
    """Storage SCP policy."""

    #: Calling AE titles allowed to associate; empty means any.
    allowed_calling_aes: list[str] = Field(default_factory=list)
    #: Host check: a calling AE title listed here may associate only from these addresses or
    #: networks (e.g. ``{ CT1 = ["10.1.2.3"], PACS = ["10.9.0.0/16"] }``); from elsewhere it is
    #: rejected. With no ``allowed_calling_aes``, these titles are the allow-list.
    calling_ae_hosts: dict[str, list[IPvAnyNetwork]] = Field(default_factory=dict)
    #: Associations served at once (per listener process when ``processes`` > 1).
    max_associations: int = Field(16, ge=1, le=1024)
    #: Storage SCP processes sharing the DICOM port (0: one per core, at most 8). One process
    #: serves its associations on one core; more use more cores for parallel associations.
    processes: int = Field(1, ge=0, le=64)
    #: Largest PDU the node receives (bytes); 0 means no limit.
    max_pdu_size: int = Field(0, ge=0)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    #: Flush each instance to disk before answering success (durability); turn off only for
    #: tests.
    fsync: bool = True
    #: Make instances durable through the ingest journal (one flush per instance, shared by
    #: the associations flushing at that moment) rather than by flushing each spool file, its
    #: directory and its ledger row (three). Either way nothing is answered before it is on
    #: disk; see "Durability" in the README.
    journal: bool = True
    #: Instances larger than this (bytes) are flushed in the spool before the answer, and the
    #: journal gets only their CRC-32 (their bytes are written once); smaller ones, CT and MR
    #: slices included, are written to the journal whole and answered once it is flushed, their
    #: spool file written after the answer (their bytes are written twice, the second time
    #: without a flush of its own). Flushing a preallocated journal costs less than a new
    #: file's data, inode and directory entries: CT slices 1.1-1.2x faster on one association.
    journal_max_bytes: int = Field(1 << 20, ge=0)
    #: The journal's checkpoint flushes the spool and the ledger and deletes the journal behind
    #: them (what a restart after a power loss replays). It runs once the SCP process has
    #: journaled nothing for ``journal_checkpoint_idle_s``, else once the journal holds
    #: ``journal_checkpoint_bytes`` or its oldest record is ``journal_checkpoint_s`` old: not
    #: in the middle of a study's burst, where the sender would wait for it.
    journal_checkpoint_s: float = Field(10.0, gt=0, le=300)
    journal_checkpoint_idle_s: float = Field(0.5, gt=0, le=300)
    journal_checkpoint_bytes: int = Field(256 << 20, ge=1 << 20)
    #: Also act as Modality Performed Procedure Step SCP (N-CREATE/N-SET): a COMPLETED step
    #: completes its studies as soon as every instance it lists has arrived.
    mpps: bool = True
    #: ``event``: associations sleep until data or work arrives (see ingest/reactor.py);
    #: ``polling``: pynetdicom's own loops, which poll every millisecond.
    reactor: Literal["event", "polling"] = "event"
    #: While an SCP process has associations open, ask the kernel to keep every CPU able to
    #: wake within this many microseconds (PM QoS, ``/dev/cpu_dma_latency``; 0: idle CPUs
    #: poll instead of sleeping). None: never. Faster answers on one association (CPUs that
    #: sleep while a flush runs wake slowly), for idle CPUs that spin while studies arrive;
    #: needs write access to the device (see deploy/README.md, "Latency tuning").
    cpu_wakeup_latency_us: int | None = Field(None, ge=0, le=2_000_000_000)
    #: DICOM TLS on the DICOM port (``[ingest.tls]``).
    tls: IngestTlsSettings = IngestTlsSettings()


class CompletionSettings(_Strict):
    """When is a study complete."""

    #: Seconds of silence after the last sending association was released (bench/turnaround.py:
    #: it dominates a radiograph's turnaround; MPPS and release-complete senders skip it).
    quiet_period_s: float = Field(1.0, ge=0)
    #: Upper bound: seconds since the last instance while an association stays open.
    max_wait_s: float = Field(120.0, gt=0)
    poll_interval_s: float = Field(0.1, gt=0)
    #: Re-queue jobs not started after this many seconds (lost broker message).
    requeue_after_s: float = Field(120.0, gt=0)
    #: Calling AE titles whose A-RELEASE means "the studies I sent are complete" (a PACS that
    #: forwards only stable studies): no quiet period for them.
    release_complete_aes: list[str] = Field(default_factory=list)


#: The work a worker takes (``worker.queues``).
WorkerQueue = Literal["stat", "routine", "shadow"]


def _all_queues() -> list[WorkerQueue]:
    return ["stat", "routine", "shadow"]


class WorkerSettings(_Strict):
    """Analysis worker."""

    concurrency: int = Field(1, ge=1, le=64)
    #: The work this worker takes, always in this order of preference: ``stat`` (STAT
    #: studies), ``routine``, ``shadow`` (the routes' shadow models). A worker given
    #: ``["shadow"]`` alone runs the shadow models apart (another machine, its own GPU); one
    #: without ``shadow`` never runs them.
    queues: list[WorkerQueue] = Field(default_factory=_all_queues, min_length=1, max_length=3)
    #: Monte-Carlo dropout samples of the head: at least 2, as one sample's mutual information
    #: (the epistemic uncertainty) is 0 whatever the image. None: each model's own (its
    #: manifest's ``mc_samples``, those its uncertainty threshold was calibrated with).
    mc_samples: int | None = Field(None, ge=2, le=1000)
    #: Torch intra-op threads; 0 lets torch decide.
    torch_threads: int = Field(0, ge=0)
    device: str = "cpu"
    #: Seconds a task may run before the broker redelivers it (must exceed the longest task).
    visibility_timeout_s: int = Field(3600, ge=60)
    #: A worker renews its claim on a job every lease_s / 3 seconds while it analyses; a job
    #: whose claim was not renewed for lease_s (the worker was killed or hangs) is taken again.
    lease_s: float = Field(30.0, ge=3.0, le=3600.0)
    #: A job whose lease ran out this many times (every worker that took it was killed or
    #: hung: a study too large for the worker's memory, a decoder that crashes) fails, with
    #: that as its reason, instead of being taken again and again.
    max_attempts: int = Field(3, ge=1, le=100)
    #: Backbone engine: auto | pytorch | onnxruntime | tensorrt (see inference/engines).
    engine: Literal["auto", "pytorch", "onnxruntime", "tensorrt"] = "auto"
    #: Backbone precision: fp32 | fp16 | bf16 | int8 (fp16 and int8 need device cuda).
    precision: Literal["fp32", "fp16", "bf16", "int8"] = "fp32"
    #: Images per backbone batch (a series is analysed in batches of this size).
    batch_size: int = Field(16, ge=1, le=32)
    #: Exported ONNX files and TensorRT engines; default ``<data_dir>/engines``.
    engine_cache_dir: Path | None = None
    #: TensorRT builder workspace limit (MiB).
    trt_workspace_mb: int = Field(1024, ge=16, le=65536)
    #: TensorRT DLA core (Jetson Orin); unset runs on the GPU only.
    dla_core: int | None = Field(None, ge=0, le=7)
    #: DICOM folder of real images for INT8 calibration; default synthetic phantoms.
    calibration_dir: Path | None = None
    #: Engine pytorch on device cuda: capture the backbone as CUDA graphs and replay them.
    cuda_graphs: bool = True
    #: Which heatmap objects are written: all, only positive or uncertain images, or none.
    heatmaps: Literal["all", "positive_or_uncertain", "none"] = "all"
    #: The colour map of the heatmaps (secondary captures, the review page's overlay and its
    #: scale): ``jet`` (blue to red), or a perceptually uniform one that readers with a
    #: colour-vision deficiency tell apart as well, ``cividis`` or ``viridis``.
    heatmap_colours: Literal["jet", "cividis", "viridis"] = "jet"
    #: Also write each analysed series' heatmaps as one Parametric Map (values 0-1, for viewers
    #: that overlay it themselves); only images with a frame of reference (CT, MR, PET).
    parametric_maps: bool = False
    #: In the SR, an AI region (TID 1410 planar ROI, which viewers draw on the image) for each
    #: image the model reports a finding on: the box around its heatmap's hot region.
    sr_regions: bool = True
    #: The AI region is the connected part of the heatmap at or above this fraction of its
    #: peak that holds the peak (lower: larger boxes).
    sr_region_fraction: float = Field(0.5, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _engine_combination(self) -> WorkerSettings:
        cuda = self.device.strip().lower().startswith("cuda")
        if self.precision == "fp16" and not cuda:
            raise ValueError("precision fp16 needs device 'cuda' (use fp32 or bf16 on cpu)")
        if self.precision == "int8" and (self.engine not in ("auto", "tensorrt") or not cuda):
            raise ValueError("precision int8 needs engine 'tensorrt' (or 'auto') on device 'cuda'")
        if self.precision == "bf16" and self.engine == "onnxruntime":
            raise ValueError("engine 'onnxruntime' does not support precision bf16")
        if self.engine == "tensorrt" and not cuda:
            raise ValueError("engine 'tensorrt' needs device 'cuda'")
        if self.dla_core is not None and self.engine != "tensorrt":
            raise ValueError("dla_core needs engine 'tensorrt'")
        return self


class ExporterSettings(_Strict):
    """Delivery of results by C-STORE."""

    max_attempts: int = Field(5, ge=1)
    backoff_initial_s: float = Field(2.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0)
    poll_interval_s: float = Field(0.25, gt=0)
    timeout_s: float = Field(30.0, gt=0)
    #: A destination that cannot be reached at all (the connection refused or timed out, the
    #: association rejected; a DICOMweb service that does not answer) is an outage, not a
    #: refusal: its deliveries are tried again, at most every ``backoff_max_s``, for this long
    #: before they fail, and those attempts do not count against ``max_attempts`` (a PACS
    #: restarted or down for maintenance gets its results once it is back). 0: an outage
    #: counts like any failed attempt.
    outage_patience_s: float = Field(86_400.0, ge=0, le=30 * 86_400)
    #: Once a later analysis of a study by another model version is delivered, withdraw the
    #: earlier version's results from the PACS with a rejection note (README "Withdrawing
    #: results from the PACS"): the new results have other UIDs and would stand beside them.
    withdraw_replaced: bool = True

    def backoff_s(self, attempts_so_far: int) -> float:
        """Seconds to wait before the next attempt after ``attempts_so_far + 1`` failures."""
        return float(
            min(self.backoff_max_s, self.backoff_initial_s * (2 ** max(0, attempts_so_far)))
        )


class RetentionSettings(_Strict):
    """How long received images and result files stay on the node's disk (README "Storage
    retention"). The PACS keeps the study; the node keeps its copy only while it needs it."""

    #: A finished study's images and result files are deleted this many hours after its last
    #: activity (0: kept until space runs short).
    keep_hours: float = Field(168.0, ge=0, le=876_000)
    #: The same for a study that went through the review worklist: its images are the feedback
    #: for the next training round (``acwi-node feedback export``).
    reviewed_keep_hours: float = Field(2160.0, ge=0, le=876_000)
    #: When the data directory's file system has less free space than this (percent), finished
    #: studies are deleted oldest first, whatever their age, until it has this much again
    #: (0: never).
    min_free_percent: float = Field(10.0, ge=0, lt=100)
    #: How often the exporter process looks for studies to delete.
    interval_s: float = Field(300.0, gt=0)
    #: This many days after a study's files were deleted, the ledger's records of it are
    #: compacted: its instance rows become one row per generation and sending AE, and the
    #: patient identifiers kept for the RIS (its HL7 order's, its ORU^R01 messages') are
    #: erased. HL7 orders no study names and inbound HL7 messages go the same many days after
    #: they were received. 0: the ledger keeps everything.
    records_keep_days: float = Field(30.0, ge=0, le=36_500)
    #: A study folder in the spool or results the ledger has no row of (nor the ingest
    #: journal a record of) is deleted once its files are this many hours old (at least one):
    #: left by a crash between a file and its row, a ledger restored older than the data
    #: directory, rows deleted by hand. 0: kept (``acwi-node check`` lists them).
    orphan_keep_hours: float = Field(720.0, ge=0, le=876_000)


class DestinationTls(_Strict):
    """DICOM TLS to a destination (``[destinations.tls]``)."""

    #: CAs (PEM) the destination's certificate must chain to; default the system trust store.
    ca_file: Path | None = None
    #: The node's client certificate and key, for destinations that require one.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: The certificate must name the host (``server_name``, default ``host``).
    verify_hostname: bool = True
    server_name: str | None = None

    @model_validator(mode="after")
    def _usable(self) -> DestinationTls:
        self.context()
        return self

    def context(self) -> ssl.SSLContext:
        """The client SSL context (raises ``TlsConfigError``)."""
        from acwi_node.tls import client_context

        return client_context(
            ca_file=self.ca_file.expanduser() if self.ca_file else None,
            cert_file=self.cert_file.expanduser() if self.cert_file else None,
            key_file=self.key_file.expanduser() if self.key_file else None,
            verify_hostname=self.verify_hostname,
        )


#: Associations results are sent to a destination over at once, unless it says otherwise.
DEFAULT_DESTINATION_ASSOCIATIONS = 2


#: The most DICOM bytes in one STOW-RS request, unless a destination says otherwise.
DEFAULT_STOW_REQUEST_BYTES = 64 * 1024 * 1024


#: Ledger result kinds that a destination's ``results`` names otherwise: a verified SR is an SR.
RESULT_KIND_GROUPS = {"sr-verified": "sr"}


def _check_peer(peer: Any, what: str, dimse_only: tuple[str, ...]) -> None:
    """A destination's or source's fields name one kind of peer: a DICOM node (``ae_title``,
    ``host``, ``port``) or a DICOMweb service (``url``, with its credentials and proxy); raises
    ``ValueError`` saying what is wrong. ``dimse_only``: further fields of DICOM nodes only."""
    dimse = [k for k in ("ae_title", "host", "port") if getattr(peer, k) is not None]
    if peer.url is None:
        missing = sorted({"ae_title", "host", "port"} - set(dimse))
        if missing:
            raise ValueError(
                f"{what} {peer.name!r}: {', '.join(missing)} missing (a DICOM node"
                " needs ae_title, host and port; a DICOMweb service, url)"
            )
        auth = [
            k
            for k in (
                "username",
                "password_file",
                "token_file",
                "proxy",
                "proxy_username",
                "proxy_password_file",
            )
            if getattr(peer, k)
        ]
        if auth:
            raise ValueError(
                f"{what} {peer.name!r}: {', '.join(auth)} apply to DICOMweb (url) only"
            )
        return
    if dimse:
        raise ValueError(
            f"{what} {peer.name!r}: url (DICOMweb) or ae_title/host/port (DIMSE),"
            f" not both ({', '.join(dimse)} given)"
        )
    for key in dimse_only:
        if getattr(peer, key):
            raise ValueError(
                f"{what} {peer.name!r}: {key} applies to DIMSE {what}s (ae_title, host, port) only"
            )
    from urllib.parse import urlsplit

    parts = urlsplit(peer.url)
    if parts.scheme not in ("http", "https") or not parts.hostname or _unbracketed_ipv6(peer.url):
        raise ValueError(
            f"{what} {peer.name!r}: url "
            + (_unbracketed_ipv6(peer.url) or "must be http:// or https://")
        )
    if parts.username or parts.password:
        raise ValueError(
            f"{what} {peer.name!r}: no credentials in url (username and"
            " password_file, or token_file)"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"{what} {peer.name!r}: url takes no query or fragment")
    if (peer.username is None) != (peer.password_file is None):
        raise ValueError(f"{what} {peer.name!r}: username and password_file go together")
    if peer.username is not None and peer.token_file is not None:
        raise ValueError(f"{what} {peer.name!r}: Basic (username) or token_file, not both")
    if peer.tls is not None and parts.scheme != "https":
        raise ValueError(f"{what} {peer.name!r}: tls needs an https:// url")
    _check_proxy(f"{what} {peer.name!r}", peer, ("password_file", "token_file"))


def _check_proxy(who: str, peer: Any, files: tuple[str, ...] = ()) -> None:
    """A web peer's ``proxy`` (``http://host:port``, no credentials in it), its
    ``proxy_username`` and ``proxy_password_file`` (together, and only with a proxy), and the
    credential files it names (``files`` and ``proxy_password_file``) present; ``who`` names
    the peer in the messages."""
    from urllib.parse import urlsplit

    if (peer.proxy_username is None) != (peer.proxy_password_file is None):
        raise ValueError(f"{who}: proxy_username and proxy_password_file go together")
    if peer.proxy_username is not None and peer.proxy is None:
        raise ValueError(f"{who}: proxy_username needs a proxy")
    for key in (*files, "proxy_password_file"):
        path = getattr(peer, key)
        if path is not None and not path.expanduser().is_file():
            raise ValueError(f"{who}: {key} {path} is not a file")
    if peer.proxy is not None:
        proxy = urlsplit(peer.proxy)
        if (
            proxy.scheme != "http"
            or not proxy.hostname
            or proxy.path not in ("", "/")
            or _unbracketed_ipv6(peer.proxy)
        ):
            raise ValueError(
                f"{who}: proxy "
                + (_unbracketed_ipv6(peer.proxy) or f"must be http://host:port, not {peer.proxy!r}")
            )
        if proxy.username or proxy.password:
            raise ValueError(
                f"{who}: no credentials in proxy (proxy_username and proxy_password_file)"
            )


class Destination(_Strict):
    """Where results are sent: a DICOM node by C-STORE (``ae_title``, ``host``, ``port``), or
    a DICOMweb service by STOW-RS (``url``)."""

    name: str
    ae_title: AETitle | None = None
    host: Host | None = None
    port: int | None = Field(None, ge=1, le=65535)
    #: DIMSE: the calling AE title the node uses towards this destination (default
    #: ``node.ae_title``), for a PACS that knows the node under another name.
    calling_ae_title: AETitle | None = None
    #: DIMSE: DICOM TLS (PS3.15 Annex B), plain TCP when absent. DICOMweb: the CAs and client
    #: certificate of an ``https`` URL (the system trust store when absent).
    tls: DestinationTls | None = None
    #: Associations a study's results are sent over at once (the first, then up to this many
    #: more at the same time, each taking the next file). An extra association the
    #: destination refuses costs only itself: its files go over the others.
    associations: int = Field(DEFAULT_DESTINATION_ASSOCIATIONS, ge=1, le=16)
    #: DICOMweb instead of DIMSE: the service's base URL (``http://`` or ``https://``, no
    #: user name or password in it); results are stored by STOW-RS, ``POST {url}/studies``.
    url: str | None = None
    #: DICOMweb HTTP Basic authentication: the user name and a file holding the password.
    username: str | None = None
    password_file: Path | None = None
    #: DICOMweb bearer token (OAuth 2.0 and the like): a file holding it, read for every
    #: request, so that a token renewed by another program is used at once.
    token_file: Path | None = None
    #: DICOMweb: the most DICOM bytes in one STOW-RS request (a study's results take several
    #: requests beyond it; an object larger than it goes alone).
    request_max_bytes: int = Field(DEFAULT_STOW_REQUEST_BYTES, ge=1024 * 1024)
    #: DICOMweb through an HTTP proxy (``http://proxy:3128``): ``https`` URLs by a CONNECT
    #: tunnel, ``http`` URLs by requests in absolute form. None: straight to the service.
    proxy: str | None = None
    #: DICOMweb: a proxy that asks for authentication (HTTP 407): the user name and a file
    #: holding the password, sent as ``Proxy-Authorization: Basic`` to the proxy alone (on the
    #: CONNECT of an ``https`` URL, on each request of an ``http`` one), read for every call.
    proxy_username: str | None = None
    proxy_password_file: Path | None = None
    #: The kinds of result object sent here (``sr``: the SR and a radiologist's verified SR;
    #: ``heatmap``: the secondary captures; ``parametric_map``); not given: every kind. For a
    #: PACS that refuses one (an older PACS and Parametric Maps), or results split between
    #: systems (the SR to an AI results archive, the heatmaps to the PACS).
    results: list[Literal["sr", "heatmap", "parametric_map"]] | None = Field(None, min_length=1)
    #: DIMSE: ask the destination for storage commitment (PS3.4 Annex J, Push Model) after it
    #: stored results: a result counts as delivered only once the destination's report (an
    #: N-EVENT-REPORT to the node's DICOM port, or on the request's association) commits it,
    #: and one the report refuses is sent again.
    storage_commitment: bool = False
    #: How long to wait for the storage commitment report before asking again; after
    #: ``exporter.max_attempts`` requests without a report the delivery fails.
    commitment_wait_s: float = Field(300.0, gt=0, le=86_400)
    #: Keep the request's association open this long for the report, for a destination that
    #: sends it only on that association (0: released at once; the destination opens one).
    commitment_linger_s: float = Field(0.0, ge=0, le=30)
    #: The ``[[sources]]`` entry that queries this destination's archive (its Query/Retrieve
    #: SCP or QIDO-RS service). Withdrawing results whose files storage retention deleted
    #: asks it for the study's patient and study attributes, which the rejection note needs;
    #: without it such results are rejected in the PACS by hand.
    query_source: str | None = None

    def calling_ae(self, node_ae_title: str) -> str:
        """The calling AE title of the node's associations to this destination."""
        return self.calling_ae_title or node_ae_title

    def takes(self, kind: str) -> bool:
        """Whether result objects of ``kind`` (a ledger result kind) are sent here."""
        if self.results is None:
            return True
        return RESULT_KIND_GROUPS.get(kind, kind) in self.results

    @model_validator(mode="after")
    def _one_kind(self) -> Destination:
        _check_peer(self, "destination", ("storage_commitment", "calling_ae_title"))
        return self

    @property
    def kind(self) -> Literal["dimse", "dicomweb"]:
        """How results reach it: C-STORE, or STOW-RS."""
        return "dicomweb" if self.url is not None else "dimse"

    @property
    def where(self) -> str:
        """Where it is, for people: ``AE@host:port`` or the URL."""
        if self.url is not None:
            return self.url
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


class RetrieveSettings(_Strict):
    """Studies the node retrieves from a ``[[sources]]`` PACS by C-FIND and C-MOVE
    (README "Retrieving studies from the PACS"), run by the ``scp`` process."""

    #: Attempts of a retrieval whose PACS could not be reached or refused the move; each
    #: retries only the studies not yet retrieved.
    max_attempts: int = Field(3, ge=1, le=20)
    #: Seconds before the next attempt (doubled each time).
    backoff_s: float = Field(30.0, gt=0, le=86_400)
    #: DIMSE timeout towards the source: the longest wait for the next C-FIND or C-MOVE
    #: response (a C-MOVE reports after each instance, or only at the end).
    timeout_s: float = Field(600.0, gt=0, le=86_400)
    #: The most studies one request may retrieve (a query by date and modality matching more
    #: is refused, so that a typo does not pull a year of the archive).
    max_studies: int = Field(200, ge=1, le=100_000)
    #: DICOMweb sources: the largest WADO-RS response (one study) the node reads.
    max_study_bytes: int = Field(8 * 1024**3, ge=1024 * 1024)
    #: The most studies of one retrieval on the node at once that wait for their analysis
    #: (received, complete, queued, analysing); the next is moved once one is analysed. A
    #: query of a hundred studies then neither fills the disk nor queues a hundred analyses
    #: ahead of the studies the modalities send; another retrieval runs in the meantime.
    studies_ahead: int = Field(2, ge=1, le=1000)
    #: How often the ``scp`` process looks for retrievals to run (and how long a retrieval
    #: waiting for its studies' analyses lets others go first).
    poll_interval_s: float = Field(1.0, gt=0, le=3600)

    @property
    def lease_s(self) -> float:
        """How long a running retrieval stays its runner's without a renewal; renewed on every
        C-MOVE response: a source silent for longer than the DIMSE timeout has ended the
        C-MOVE anyway."""
        return self.timeout_s + 60.0


class Source(_Strict):
    """A PACS the node may retrieve studies from (``acwi-node studies retrieve``,
    ``POST /api/retrievals``): a DICOM node (``ae_title``, ``host``, ``port``), queried by
    C-FIND and asked for studies by C-MOVE to the node's own storage SCP; or a DICOMweb service
    (``url``), queried by QIDO-RS and read by WADO-RS."""

    name: str
    ae_title: AETitle | None = None
    host: Host | None = None
    port: int | None = Field(None, ge=1, le=65535)
    #: DIMSE: the calling AE title of the node's associations to it (default ``node.ae_title``).
    calling_ae_title: AETitle | None = None
    #: DIMSE: how the source sends a study: ``move`` (default), a C-MOVE to the node's storage
    #: SCP, which the source connects to; ``get``, a C-GET, the instances coming back over the
    #: node's own association (a source that cannot connect to the node: a firewall, NAT).
    retrieve_with: Literal["move", "get"] | None = None
    #: DIMSE: the move destination, the AE title under which the source knows the node's
    #: storage SCP (its host and port are configured on the source); default ``node.ae_title``.
    move_destination: AETitle | None = None
    #: DIMSE: DICOM TLS (PS3.15 Annex B), plain TCP when absent. DICOMweb: the CAs and client
    #: certificate of an ``https`` URL (the system trust store when absent).
    tls: DestinationTls | None = None
    #: DICOMweb: the service's base URL (``http://`` or ``https://``, no credentials in it);
    #: studies are searched at ``{url}/studies`` and read from ``{url}/studies/{uid}``.
    url: str | None = None
    #: DICOMweb credentials and proxy, as for a destination (``[[destinations]]``).
    username: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None
    proxy: str | None = None
    proxy_username: str | None = None
    proxy_password_file: Path | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Source:
        _check_peer(self, "source", ("calling_ae_title", "move_destination", "retrieve_with"))
        if self.retrieve_with == "get" and self.move_destination:
            raise ValueError(
                f"source {self.name!r}: move_destination applies to retrieve_with = 'move'"
                " only (with 'get' the instances come back over the node's association)"
            )
        return self

    @property
    def uses_get(self) -> bool:
        """Whether studies come by C-GET (else C-MOVE, or WADO-RS for DICOMweb)."""
        return self.kind == "dimse" and self.retrieve_with == "get"

    @property
    def kind(self) -> Literal["dimse", "dicomweb"]:
        return "dicomweb" if self.url is not None else "dimse"

    def calling_ae(self, node_ae_title: str) -> str:
        return self.calling_ae_title or node_ae_title

    def destination_ae(self, node_ae_title: str) -> str:
        return self.move_destination or node_ae_title

    @property
    def where(self) -> str:
        if self.url is not None:
            return self.url
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


class RouteMatch(_Strict):
    """Conditions of a route; each given list must contain the study's value (AND across keys)."""

    modality: list[str] | None = None
    sop_class_uid: list[str] | None = None
    body_part: list[str] | None = None
    calling_ae: list[str] | None = None
    #: Only studies whose Study Date is at most this many days before the day they complete
    #: (the node's local date): a PACS that sends a patient's priors along with the new study
    #: does not get them analysed. A study without a Study Date matches.
    max_age_days: int | None = Field(None, ge=0)


class RouteSelect(_Strict):
    """Which instances of a study the route matched its model reads (the others are listed
    among the job's skipped images, with the reason). Every given condition must hold."""

    #: The instance's Modality must be one of these. Not given: the route's
    #: ``match.modality`` (a route for CT does not read the PET images of a PET/CT study);
    #: ``[]``: any modality.
    modality: list[str] | None = None
    #: The instance's SOP Class UID must be one of these. Not given: the route's
    #: ``match.sop_class_uid``; ``[]``: any SOP class.
    sop_class_uid: list[str] | None = None
    #: An instance with any of these among its Image Type values is left out, e.g.
    #: ``["SECONDARY", "REFORMATTED", "MPR", "MIP"]`` keeps a CT's reformats and projections
    #: out of its figures (localizers are never analysed).
    image_type_exclude: list[str] = Field(default_factory=list)
    #: Only series whose Series Description matches one of these regular expressions
    #: (searched, case-insensitive); not given: any series.
    series_description: list[str] | None = None

    @field_validator("series_description")
    @classmethod
    def _patterns_compile(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"series_description {pattern!r} is not a regular expression: {exc}"
                ) from exc
        return value


class RouteResults(_Strict):
    """Which result objects a route's jobs write beside the SR, and the SR's AI regions; not
    given: the worker's."""

    #: ``all``, ``positive_or_uncertain`` or ``none`` (``worker.heatmaps``'s values).
    heatmaps: Literal["all", "positive_or_uncertain", "none"] | None = None
    #: Also each analysed series' heatmaps as one Parametric Map (``worker.parametric_maps``).
    parametric_maps: bool | None = None
    #: The SR's AI regions (TID 1410) for this route's studies (``worker.sr_regions``): off
    #: for a model whose heatmaps do not localise its findings.
    sr_regions: bool | None = None
    #: The fraction of the heatmap's peak the AI region is found at, for this route's model
    #: (``worker.sr_region_fraction``; ``acwi-models evaluate --region-fraction`` measures it).
    sr_region_fraction: float | None = Field(None, gt=0.0, le=1.0)

    def region_fraction(self, worker: WorkerSettings) -> float | None:
        """The fraction of the heatmap's peak the SR's AI regions are found at for this
        route's jobs (the route's settings, else the worker's); None: the SR has none."""
        regions = worker.sr_regions if self.sr_regions is None else self.sr_regions
        if not regions:
            return None
        return (
            worker.sr_region_fraction
            if self.sr_region_fraction is None
            else self.sr_region_fraction
        )


class Route(_Strict):
    """Which model analyses which studies and where its results go."""

    name: str
    match: RouteMatch = Field(default_factory=RouteMatch)
    select: RouteSelect = Field(default_factory=RouteSelect)
    results: RouteResults = Field(default_factory=RouteResults)
    model: str = "default"
    #: Models that analyse the route's studies in the shadow of ``model``, after it: their
    #: results are kept in the ledger and compared with the live model's and with the
    #: radiologists' verdicts (``acwi-node monitor``), never sent, reviewed or notified.
    #: A new version proves itself on this hospital's studies before it goes live.
    shadow_models: list[str] = Field(default_factory=list, max_length=4)
    destinations: list[str] = Field(default_factory=list)
    #: Higher runs first.
    priority: int = 0


class ModelSpec(_Strict):
    """A model the node can run, by the path of its manifest."""

    name: str
    manifest: Path


class ObservabilitySettings(_Strict):
    """Logs, metrics and health endpoints (see ``docs/observability.md``)."""

    #: ``text`` (one readable line per record) or ``json`` (one JSON object per line).
    log_format: Literal["text", "json"] = "text"
    #: Address the scp, worker and exporter health/metrics servers listen on.
    ops_host: Host = "127.0.0.1"
    #: Port of the scp process's ``/healthz``, ``/readyz`` and ``/metrics``; 0 = none.
    scp_port: int = Field(0, ge=0, le=65535)
    #: Port of the worker process's health and metrics server; 0 = none.
    worker_port: int = Field(0, ge=0, le=65535)
    #: Port of the exporter process's health and metrics server; 0 = none.
    exporter_port: int = Field(0, ge=0, le=65535)
    #: A background loop (outbox, completion) that made no pass for this long is not ready.
    loop_stale_s: float = Field(120.0, gt=0)

    def port_for(self, kind: str) -> int:
        """The health/metrics port of a non-web process kind (0 = disabled)."""
        ports = {"scp": self.scp_port, "worker": self.worker_port, "exporter": self.exporter_port}
        return ports[kind]


class RisSettings(_Strict):
    """The RIS that receives ORU^R01 results over MLLP."""

    host: Host
    port: int = Field(ge=1, le=65535)
    receiving_application: str = "RIS"
    receiving_facility: str = ""
    max_attempts: int = Field(5, ge=1)
    backoff_initial_s: float = Field(2.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0)
    #: A RIS that cannot be connected to (refused, timed out) is waited for this long, the
    #: attempts not counted in ``max_attempts``, as ``exporter.outage_patience_s`` (0: off).
    outage_patience_s: float = Field(86_400.0, ge=0, le=30 * 86_400)
    #: Connect, send and wait for the ACK, each.
    timeout_s: float = Field(30.0, gt=0)
    poll_interval_s: float = Field(0.5, gt=0)


class Hl7Settings(_Strict):
    """HL7 v2 with the RIS: the order listener (MLLP) and the ORU^R01 results sender."""

    listen_host: Host = "0.0.0.0"
    #: MLLP listener port for orders (ORM^O01, OMI^O23); 0 means no listener.
    listen_port: int = Field(0, ge=0, le=65535)
    #: Largest message (a batch: the whole frame) accepted; a larger one closes the connection.
    #: Also the largest acknowledgement of a result read from the RIS.
    max_message_bytes: int = Field(1_048_576, ge=256, le=64 * 1_048_576)
    #: A message (an order from the RIS, an acknowledgement of a result) with more segments,
    #: fields in a segment, repetitions of a field, components in a repetition, subcomponents
    #: in a component, or separators in all, is refused (AR) before it is parsed. The lower
    #: bounds let every standard segment and data type through; the upper ones keep parsing
    #: a hostile message (hl7apy's time and memory grow with each element) bounded.
    max_segments: int = Field(500, ge=20, le=10_000)
    max_fields: int = Field(100, ge=50, le=1_000)
    max_repetitions: int = Field(100, ge=10, le=10_000)
    max_components: int = Field(64, ge=30, le=1_000)
    max_subcomponents: int = Field(32, ge=10, le=1_000)
    max_separators: int = Field(5_000, ge=1_000, le=200_000)
    #: Concurrent connections; more are closed at once.
    max_connections: int = Field(16, ge=1, le=1024)
    #: From the start byte of a message to its end bytes.
    read_timeout_s: float = Field(30.0, gt=0)
    #: A connection without a new message for this long is closed.
    idle_timeout_s: float = Field(300.0, gt=0)
    #: MSH-3 / MSH-4 of what the node sends (ACKs and results).
    sending_application: str = Field("ACWI", min_length=1, max_length=180)
    sending_facility: str = Field("ACWI", max_length=180)
    #: Where results go; none means no ORU^R01 is sent.
    ris: RisSettings | None = None

    @property
    def enabled(self) -> bool:
        return self.listen_port > 0 or self.ris is not None


class DicomwebSettings(_Strict):
    """Studies received by DICOMweb: STOW-RS at ``/dicomweb/studies`` of the web process, for
    accounts with the ``sender`` (or ``admin``) role (see README, "Receiving by DICOMweb")."""

    #: Accept STOW-RS requests at all.
    stow_enabled: bool = True
    #: The largest request body taken (bytes); a larger one is refused with 413 before any of
    #: it is stored. The body waits on disk beside the spool while its objects are stored.
    max_request_bytes: int = Field(4 << 30, ge=1 << 20)


class ReviewSettings(_Strict):
    """The radiologist review web app (see README, "For radiologists")."""

    #: A sign-in lasts at most this long.
    session_lifetime_s: int = Field(8 * 3600, ge=60, le=7 * 24 * 3600)
    #: A session unused for this long ends.
    idle_timeout_s: int = Field(1800, ge=60, le=24 * 3600)
    #: Send the session cookie only over HTTPS; turn off only behind plain-HTTP loopback.
    cookie_secure: bool = True
    #: File holding the key that signs CSRF tokens; default ``<data_dir>/review-secret.key``
    #: (created with mode 0600 when missing).
    secret_key_file: Path | None = None
    #: Verifying Organization (0040,A027) written into verified SRs.
    organization: str = Field("ACWI Node", min_length=1, max_length=64)
    #: HTTP Basic credentials (JSON API, STOW-RS) that verified are remembered in memory this
    #: long, so that a client's next requests skip the scrypt verification; 0: verify each.
    basic_auth_cache_s: int = Field(300, ge=0, le=3600)
    #: Failed sign-ins in a row (form or HTTP Basic) before the next attempts for that user
    #: name must wait: 1 s, then twice as long after each further failure, at most
    #: ``sign_in_max_delay_s`` (0: never wait).
    sign_in_free_failures: int = Field(5, ge=1, le=1000)
    sign_in_max_delay_s: int = Field(60, ge=0, le=3600)
    #: Failed sign-ins in a row from one client address (any user names, form or HTTP Basic;
    #: a success from it clears them) before its next attempts wait as a user name's do (0:
    #: never): one guesser trying many names, or made-up names that each cost a password
    #: check, is held to the same pace as one trying one name.
    sign_in_address_free_failures: int = Field(50, ge=0, le=100_000)
    #: Percentage of the studies the model was sure of that also go to the worklist as
    #: quality-control samples (chosen by a hash of the Study Instance UID): their verdicts
    #: estimate the accuracy of the results the PACS receives unreviewed. 0: none.
    quality_sample_percent: float = Field(0.0, ge=0.0, le=100.0)
    #: Seconds an open case a radiologist opened counts as being read by them: the worklist
    #: and the case page tell the others, so that two do not read it at once (a hint, not a
    #: lock: anyone may still decide). 0: not shown.
    reading_claim_s: int = Field(600, ge=0, le=24 * 3600)
    #: The worklist page reloads itself this often, so that new cases show without a click.
    #: 0: never.
    worklist_refresh_s: int = Field(60, ge=0, le=3600)
    #: The address the radiologists open the review app at (``https://ai-node.hospital``):
    #: notifications link to the case with it. Unset: they carry no link.
    public_url: str | None = None

    @field_validator("public_url")
    @classmethod
    def _web_address(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("review.public_url must be an http:// or https:// address")
        return value


#: What a ``[[notify]]`` target may be told of (README "Notifications").
NotifyEvent = Literal[
    "review", "finding", "failed", "shift", "stopped", "slow", "withdrawn", "unreachable"
]


def _review_event() -> list[NotifyEvent]:
    return ["review"]


class NotifyTarget(_Strict):
    """A webhook told of what needs someone soon (``[[notify]]``): a chat channel's incoming
    webhook, a pager gateway, an on-call system. The JSON it gets holds no patient data."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    #: ``http://`` or ``https://``; each notification is one POST of a JSON object to it.
    url: str
    #: ``review``: a case the model asked about lands on the worklist (of at least
    #: ``min_priority``); ``finding``: a study analysed with one of ``labels`` at
    #: ``min_probability`` or more; ``failed``: a study failed (its reason); ``shift``: a
    #: model version's monitoring signal has shifted against its baseline (weekly while so);
    #: ``stopped``: far fewer studies than usual came from a source or reached a route
    #: (daily while so); ``slow``: a route's results reach the PACS slower than the goal;
    #: ``withdrawn``: an administrator withdrew AI results from the PACS (one per request);
    #: ``unreachable``: a destination or the RIS, with results waiting, could not be reached
    #: for ``min_outage_s`` (once per outage).
    events: list[NotifyEvent] = Field(default_factory=_review_event, min_length=1)
    #: The body's shape: ``json`` (the whole object), ``text`` (``{"text": ...}``: Slack,
    #: Mattermost, Rocket.Chat, Google Chat), ``teams`` (an Adaptive Card message for a
    #: Microsoft Teams workflow webhook); acwi_node/notify/formats.py.
    format: Literal["json", "text", "teams"] = "json"
    min_priority: int = Field(0, ge=0)
    labels: list[str] = Field(default_factory=list)
    min_probability: float = Field(0.5, ge=0.0, le=1.0)
    #: ``unreachable``: how long a destination must have been unreachable.
    min_outage_s: float = Field(600.0, ge=0, le=7 * 24 * 3600)
    #: A bearer token (read at each POST, so it can be rotated): ``Authorization: Bearer``.
    token_file: Path | None = None
    #: ``https``: the CAs and client certificate (default the system trust store).
    tls: DestinationTls | None = None
    #: Through an HTTP proxy (``http://proxy:3128``): ``https`` by a CONNECT tunnel, ``http``
    #: asking the proxy for the whole URL; a proxy that asks for credentials (HTTP 407) gets
    #: Basic from ``proxy_username`` and the file ``proxy_password_file``.
    proxy: str | None = None
    proxy_username: str | None = None
    proxy_password_file: Path | None = None
    timeout_s: float = Field(10.0, gt=0, le=300)
    #: Attempts before a notification fails for good (back-off 5 s, doubling, at most 5 min).
    max_attempts: int = Field(8, ge=1, le=100)
    #: A webhook that cannot be reached (no connection, no answer, HTTP 502, 503 or 504 from it
    #: or a proxy) is tried again, at most every 5 minutes, for this long before the
    #: notification fails; those attempts do not count against ``max_attempts`` (0: they do).
    outage_patience_s: float = Field(3600.0, ge=0, le=7 * 24 * 3600)
    #: What happened longer ago than this when the exporter first sees it (it was down) is
    #: not notified: a notification is for what needs someone now.
    lookback_s: int = Field(3600, ge=60, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _usable(self) -> NotifyTarget:
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or _unbracketed_ipv6(self.url)
        ):
            raise ValueError(
                f"notify {self.name}: url "
                + (_unbracketed_ipv6(self.url) or "must be http:// or https:// with a host")
            )
        if "finding" in self.events and not self.labels:
            raise ValueError(f"notify {self.name}: the finding event needs labels")
        _check_proxy(f"notify {self.name}", self, ("token_file",))
        return self


class BurnedInRegions(_Strict):
    """Where one kind of image carries text in its pixels, to blank in the de-identified
    feedback export (``[[feedback.burned_in]]``: the profile's Clean Pixel Data Option). An
    image matches when every criterion given matches (text case-insensitively)."""

    manufacturer: str = ""
    #: Manufacturer's Model Name.
    model: str = ""
    modality: str = ""
    rows: int | None = Field(None, ge=1)
    columns: int | None = Field(None, ge=1)
    #: Each ``[x0, y0, x1, y1]``: the first and last column and row blanked, in the image's
    #: pixels (a region past the image's edge is cut at it).
    regions: list[list[int]] = Field(min_length=1)

    @model_validator(mode="after")
    def _usable(self) -> BurnedInRegions:
        if not (self.manufacturer or self.model or self.modality or self.rows or self.columns):
            raise ValueError(
                "feedback.burned_in: name the images (manufacturer, model, modality, rows,"
                " columns): a region blanked in every image is no signature"
            )
        for region in self.regions:
            if len(region) != 4 or not (
                0 <= region[0] <= region[2] and 0 <= region[1] <= region[3]
            ):
                raise ValueError(
                    f"feedback.burned_in: region {region} is not [x0, y0, x1, y1] with"
                    " 0 <= x0 <= x1 and 0 <= y0 <= y1"
                )
        return self

    def matches(
        self, manufacturer: str, model: str, modality: str, rows: int, columns: int
    ) -> bool:
        """Whether an image with these attributes is one of this kind."""
        texts = ((self.manufacturer, manufacturer), (self.model, model), (self.modality, modality))
        if any(want and want.strip().lower() != got.strip().lower() for want, got in texts):
            return False
        return (self.rows is None or self.rows == rows) and (
            self.columns is None or self.columns == columns
        )


class FeedbackSettings(_Strict):
    """``acwi-node feedback export``: the reviewed cases as a labelled dataset (README
    "For radiologists")."""

    #: De-identify the exported images (DICOM PS3.15 Annex E, Basic Application Level
    #: Confidentiality Profile); off, or ``--identified`` on the command line: exact copies.
    deidentify: bool = True
    #: Keep the patient's age, sex, size and weight (the profile's Retain Patient
    #: Characteristics Option): what a model's subgroup evaluation needs.
    retain_patient_characteristics: bool = True
    #: Move every date of a patient's images back by the same 365 to 3,649 days (a keyed
    #: hash of the patient) instead of removing them: the profile's Retain Longitudinal
    #: Temporal Information with Modified Dates Option, for studies of intervals and follow-up.
    shift_dates: bool = False
    #: The key that makes replaced UIDs and patient pseudonyms the same in every export (an
    #: HMAC key: without it nobody can tell which original a pseudonym stands for); default
    #: ``<data_dir>/feedback-deid.key``, created with mode 0600 when missing.
    key_file: Path | None = None
    #: Images whose pixels carry text at known places (a device's burned-in patient name):
    #: those regions are blanked, and such images are exported (README "Feedback").
    burned_in: list[BurnedInRegions] = Field(default_factory=list)


class AuditSettings(_Strict):
    """The audit trail (README "Audit trail"): JSON lines, optionally syslog (IHE ATNA)."""

    enabled: bool = True
    #: JSON-lines file, mode 0600; default ``<data_dir>/audit/audit.jsonl``.
    file: Path | None = None
    #: Also send DICOM audit messages (RFC 5424) to ``udp://host:514``, ``tcp://host:601``
    #: (RFC 6587 octet counting) or ``tls://host:6514`` (RFC 5425).
    syslog_url: str | None = None
    #: CAs for a ``tls://`` collector's certificate (default the system trust store), and the
    #: node's client certificate if the collector asks for one.
    syslog_ca_file: Path | None = None
    syslog_cert_file: Path | None = None
    syslog_key_file: Path | None = None
    #: Put patient IDs in audit records (ATNA's patient participant). Off: Study UIDs only.
    patient_id: bool = False
    #: AuditEnterpriseSiteID of the audit messages.
    enterprise_site: str = ""

    @field_validator("syslog_url")
    @classmethod
    def _syslog_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in {"udp", "tcp", "tls"} or not parts.hostname or _unbracketed_ipv6(v):
            raise ValueError(
                f"syslog_url {v!r}: "
                + (
                    _unbracketed_ipv6(v)
                    or "must look like udp://host:514, tcp://host:601 or tls://host:6514"
                )
            )
        return v

    @model_validator(mode="after")
    def _tls_usable(self) -> AuditSettings:
        self.syslog_context()
        return self

    def syslog_context(self) -> ssl.SSLContext | None:
        """The client SSL context of a ``tls://`` collector (None for udp/tcp)."""
        if not self.syslog_url or not self.syslog_url.startswith("tls://"):
            return None
        from acwi_node.tls import client_context

        return client_context(
            ca_file=self.syslog_ca_file.expanduser() if self.syslog_ca_file else None,
            cert_file=self.syslog_cert_file.expanduser() if self.syslog_cert_file else None,
            key_file=self.syslog_key_file.expanduser() if self.syslog_key_file else None,
            verify_hostname=True,
        )


class MonitoringSettings(_Strict):
    """Model monitoring (README "Model monitoring"): each model version's recent studies
    compared with its baseline, to tell a change in what it sees or says."""

    #: The recent window: studies analysed in the last this many days.
    window_days: int = Field(7, ge=1, le=365)
    #: A version's baseline, until one is pinned (``acwi-node monitor baseline``): its first
    #: this many analysed studies on this node.
    baseline_studies: int = Field(200, ge=10, le=100_000)
    #: Fewer studies than this in the baseline or the window: not compared ("too few").
    min_studies: int = Field(30, ge=5, le=100_000)
    #: Population stability index of a distribution (uncertainty, OOD score, predicted label,
    #: equipment, site) from which it is to be watched, and from which it has shifted ...
    psi_watch: float = Field(0.1, gt=0.0)
    psi_shift: float = Field(0.25, gt=0.0)
    #: ... and a rate's (finding, review, out-of-distribution) least move that counts ...
    min_rate_change: float = Field(0.02, ge=0.0, le=1.0)
    #: ... each provided the change is that unlikely by chance (a chi-square test of the
    #: distribution, a two-proportion z test of the rate): a small window's noise is no shift.
    p_watch: float = Field(0.01, gt=0.0, lt=1.0)
    p_shift: float = Field(0.001, gt=0.0, lt=1.0)
    #: The metrics endpoint recomputes the comparison at most this often.
    refresh_s: int = Field(300, ge=0, le=86_400)
    #: Studies arriving: the studies of the last this many hours (each horizon apart), from
    #: each source (calling AE) and for each route, against the same hours of the same
    #: weekday in the ``traffic_weeks`` weeks before. A short horizon tells a busy source
    #: that stopped within hours; a day tells a quiet one.
    traffic_hours: list[int] = Field(default_factory=lambda: [2, 24], min_length=1, max_length=4)
    traffic_weeks: int = Field(4, ge=1, le=26)
    #: Fewer weeks before than this on this node's ledger: not compared ("too few").
    traffic_min_weeks: int = Field(2, ge=1, le=26)
    #: A drop counts from this share of the expected studies (and below every week before,
    #: and unlikely by chance at ``p_watch`` / ``p_shift``).
    traffic_min_drop: float = Field(0.5, gt=0.0, le=1.0)
    #: The hospital's time zone (an IANA name, ``Europe/Berlin``): "the same hours of the
    #: same weekday" are its wall-clock hours, so that a clock change to or from summer time
    #: does not compare a morning with the hour before it. Also the clock of the review pages'
    #: times and days, HL7 messages' times, results' own dates and times (where the source
    #: study has no Timezone Offset From UTC) and routes' ``max_age_days``.
    timezone: str = "UTC"
    #: Turnaround: the results stored in the last this many hours, last instance to stored,
    #: step by step, per route ...
    turnaround_hours: int = Field(24, ge=1, le=720)
    #: ... read "slow" when their 95th percentile exceeds this many seconds (over at least
    #: ``turnaround_min_studies``); a study still on its way this long after its last
    #: instance is "overdue".
    turnaround_goal_s: float = Field(300.0, gt=0.0, le=86_400.0)
    turnaround_min_studies: int = Field(5, ge=1, le=100_000)
    #: The same goal for STAT studies (a STAT order from the RIS, or a route whose priority
    #: is 1000 or more), whose figures are a row of their own (``stat``).
    turnaround_stat_goal_s: float = Field(120.0, gt=0.0, le=86_400.0)

    @model_validator(mode="after")
    def _ordered(self) -> MonitoringSettings:
        if self.psi_shift < self.psi_watch:
            raise ValueError("monitoring.psi_shift must be at least monitoring.psi_watch")
        if self.p_shift > self.p_watch:
            raise ValueError("monitoring.p_shift must not exceed monitoring.p_watch")
        if self.min_studies > self.baseline_studies:
            raise ValueError("monitoring.min_studies must not exceed monitoring.baseline_studies")
        if self.traffic_min_weeks > self.traffic_weeks:
            raise ValueError(
                "monitoring.traffic_min_weeks must not exceed monitoring.traffic_weeks"
            )
        if any(not 1 <= h <= 168 for h in self.traffic_hours):
            raise ValueError("monitoring.traffic_hours must each be 1 to 168 (a week)")
        if len(set(self.traffic_hours)) != len(self.traffic_hours):
            raise ValueError("monitoring.traffic_hours must not repeat a horizon")
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            raise ValueError(
                f"monitoring.timezone: unknown time zone {self.timezone!r} (an IANA name such"
                " as Europe/Berlin)"
            ) from None
        return self


def _url_path(url: str | None) -> str | None:
    """The path of ``url`` without its trailing ``/`` (``https://h/acwi/``: ``/acwi``;
    ``https://h``: ``""``); None without a URL."""
    if url is None:
        return None
    from urllib.parse import urlsplit

    return urlsplit(url).path.rstrip("/")


class Settings(BaseSettings):
    """The whole node configuration."""

    model_config = SettingsConfigDict(
        env_prefix="ACWI_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    node: NodeSettings = NodeSettings()
    ingest: IngestSettings = IngestSettings()
    completion: CompletionSettings = CompletionSettings()
    worker: WorkerSettings = WorkerSettings()
    exporter: ExporterSettings = ExporterSettings()
    retention: RetentionSettings = RetentionSettings()
    hl7: Hl7Settings = Hl7Settings()
    destinations: list[Destination] = Field(default_factory=list)
    sources: list[Source] = Field(default_factory=list)
    notify: list[NotifyTarget] = Field(default_factory=list)
    retrieve: RetrieveSettings = RetrieveSettings()
    routes: list[Route] = Field(default_factory=list)
    models: list[ModelSpec] = Field(default_factory=list)
    observability: ObservabilitySettings = ObservabilitySettings()
    review: ReviewSettings = ReviewSettings()
    feedback: FeedbackSettings = FeedbackSettings()
    dicomweb: DicomwebSettings = DicomwebSettings()
    audit: AuditSettings = AuditSettings()
    monitoring: MonitoringSettings = MonitoringSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = _CONFIG_FILE.get("path")
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        problems: list[str] = []
        dest_names = [d.name for d in self.destinations]
        for dup in {n for n in dest_names if dest_names.count(n) > 1}:
            problems.append(f"destinations: name {dup!r} is used twice")
        source_names = [src.name for src in self.sources]
        for dup in {n for n in source_names if source_names.count(n) > 1}:
            problems.append(f"sources: name {dup!r} is used twice")
        for queried in self.destinations:
            if queried.query_source is not None and queried.query_source not in source_names:
                problems.append(
                    f"destinations.{queried.name}: query_source {queried.query_source!r} is"
                    " not defined in [[sources]]"
                )
        notify_names = [n.name for n in self.notify]
        for dup in {n for n in notify_names if notify_names.count(n) > 1}:
            problems.append(f"notify: name {dup!r} is used twice")
        route_names = [r.name for r in self.routes]
        for dup in {n for n in route_names if route_names.count(n) > 1}:
            problems.append(f"routes: name {dup!r} is used twice")
        model_names = {m.name for m in self.models} | {"default"} | self._activated_models()
        for route in self.routes:
            for dest in route.destinations:
                if dest not in dest_names:
                    problems.append(
                        f"routes.{route.name}: destination {dest!r} is not defined"
                        " in [[destinations]]"
                    )
            if route.model not in model_names and _ROUTE_MODELS_KNOWN["checked"]:
                problems.append(
                    f"routes.{route.name}: model {route.model!r} is not defined in [[models]]"
                    " nor activated in the model registry (acwi-node models install DIR"
                    f" --name {route.model} --activate)"
                )
            for shadow in route.shadow_models:
                if shadow not in model_names and _ROUTE_MODELS_KNOWN["checked"]:
                    problems.append(
                        f"routes.{route.name}: shadow model {shadow!r} is not defined in [[models]]"
                    )
                elif shadow == route.model:
                    problems.append(
                        f"routes.{route.name}: shadow model {shadow!r} is the route's own model"
                    )
            for dup in {m for m in route.shadow_models if route.shadow_models.count(m) > 1}:
                problems.append(f"routes.{route.name}: shadow model {dup!r} is listed twice")
        # A root path set names where the app is published: the notifications' links must
        # be there too. Without one, a public_url with a path is taken as before (a proxy
        # that rewrites the app's pages, say): nothing an earlier release took is refused.
        public_path = _url_path(self.review.public_url)
        root_path = self.node.http_root_path
        if root_path and public_path is not None and public_path != root_path:
            problems.append(
                f"review.public_url {self.review.public_url!r} is under"
                f" {public_path or '/'!r} but node.http_root_path is"
                f" {self.node.http_root_path!r}: the web app's links would not be the"
                " notifications' (give the path a reverse proxy publishes it under in both)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ----------------------------------------------------------------- derived values
    def destination_takes(self, destination: str, kind: str) -> bool:
        """Whether results of ``kind`` go to the destination named (one no longer configured
        takes everything: the exporter reports it)."""
        found = next((d for d in self.destinations if d.name == destination), None)
        return found is None or found.takes(kind)

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir.expanduser().resolve()

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def review_secret_key_file(self) -> Path:
        return self.review.secret_key_file or self.data_dir / "review-secret.key"

    @property
    def feedback_key_file(self) -> Path:
        return self.feedback.key_file or self.data_dir / "feedback-deid.key"

    @property
    def database_url(self) -> str:
        if self.node.database_url:
            return self.node.database_url
        return f"sqlite:///{self.data_dir / 'ledger.sqlite'}"

    @property
    def ledger_url(self) -> str | URL:
        """What the ledger connects to: ``database_url``, with the password of
        ``node.database_password_file`` where that is set (a SQLAlchemy URL then, whose
        ``str()`` shows the password as ``***``). Never log or print it whole."""
        password = self.node._database_password
        if password is None:
            return self.database_url
        from sqlalchemy.engine import make_url

        return make_url(self.database_url).set(password=password.get_secret_value())

    @property
    def broker_url(self) -> str:
        return self.node.broker_url or "filesystem://"

    @property
    def broker_password(self) -> str | None:
        """The password of ``node.broker_password_file``, None without one (a password in
        ``broker_url`` is the URL's own)."""
        password = self.node._broker_password
        return None if password is None else password.get_secret_value()

    @property
    def embedded_broker_dir(self) -> Path:
        return self.data_dir / "broker"

    def source(self, name: str) -> Source:
        for src in self.sources:
            if src.name == name:
                return src
        raise KeyError(name)

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    @property
    def models_dir(self) -> Path:
        """The model registry: ``<data_dir>/models/<name>/<version>/`` (``acwi-node models``)."""
        return self.data_dir / "models"

    def _activated_models(self) -> set[str]:
        from acwi_node.model_registry import ModelRegistry

        try:
            return set(ModelRegistry(self.models_dir).activated())
        except OSError:
            return set()

    def model_manifest(self, name: str) -> Path:
        """The manifest path of a model name, first match wins: the version activated in the
        model registry (``acwi-node models activate``), a ``[[models]]`` entry, and for
        ``default`` the bundled model."""
        from acwi_node.model_registry import ModelRegistry

        active = ModelRegistry(self.models_dir).active_manifest(name)
        if active is not None:
            return active
        for spec in self.models:
            if spec.name == name:
                return spec.manifest.expanduser().resolve()
        if name == "default":
            from acwi_node.inference.manifest import default_model_dir

            return default_model_dir() / "manifest.json"
        raise KeyError(name)


_CONFIG_FILE: dict[str, Path | None] = {"path": None}
#: Whether the settings being loaded must name only known models in their routes (False
#: while ``acwi-node models`` loads them: see :func:`load_settings`).
_ROUTE_MODELS_KNOWN: dict[str, bool] = {"checked": True}


def load_settings(
    config_file: Path | str | None = None, *, route_models_known: bool = True, **overrides: Any
) -> Settings:
    """Read the TOML file (argument, else ``ACWI_CONFIG``), apply ``ACWI_...`` overrides, validate.

    Raises :class:`ConfigError` with a readable message for every invalid key.
    ``route_models_known`` False: a route may name a model neither in ``[[models]]`` nor
    activated in the registry (``acwi-node models``, which installs and activates it).
    """
    path_text = str(config_file) if config_file else os.environ.get("ACWI_CONFIG")
    path: Path | None = None
    if path_text:
        path = Path(path_text).expanduser()
        if not path.is_file():
            raise ConfigError(f"configuration file {path} does not exist")
    _CONFIG_FILE["path"] = path
    _ROUTE_MODELS_KNOWN["checked"] = route_models_known
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}:\n" + "\n".join(lines)) from None
    except Exception as exc:  # TOML syntax errors and the like
        raise ConfigError(f"cannot read configuration {path}: {exc}") from None
    finally:
        _CONFIG_FILE["path"] = None
        _ROUTE_MODELS_KNOWN["checked"] = True
