"""Typed configuration: one TOML file, every scalar key overridable by an ``ACWI_...`` variable.

The file is named by ``--config FILE`` or ``ACWI_CONFIG``. Nested keys use a double underscore in
the environment: ``ACWI_NODE__DICOM_PORT=11113`` overrides ``[node] dicom_port``. Everything is
validated at start-up; :func:`load_settings` raises :class:`ConfigError` with one line per problem.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSettings(_Strict):
    """Identity, ports and storage of this node."""

    ae_title: AETitle = "ACWI"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(11112, ge=1, le=65535)
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    data_dir: Path = Path("acwi-data")
    #: SQLAlchemy URL of the ledger; default ``sqlite:///<data_dir>/ledger.sqlite``.
    database_url: str | None = None
    #: Celery broker; default an embedded broker in ``<data_dir>/broker`` (no server needed).
    broker_url: str | None = None
    log_level: str = "INFO"
    #: Log patient identifiers (names, IDs). Off by default.
    log_phi: bool = False

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"log_level {v!r} is not one of DEBUG, INFO, WARNING, ERROR")
        return v


class IngestSettings(_Strict):
    """Storage SCP policy."""

    #: Calling AE titles allowed to associate; empty means any.
    allowed_calling_aes: list[str] = Field(default_factory=list)
    max_associations: int = Field(16, ge=1, le=1024)
    #: Largest PDU the node receives (bytes); 0 means no limit.
    max_pdu_size: int = Field(0, ge=0)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    #: fsync each instance before answering success (durability); turn off only for tests.
    fsync: bool = True


class CompletionSettings(_Strict):
    """When is a study complete."""

    #: Seconds of silence after the last sending association was released.
    quiet_period_s: float = Field(2.0, ge=0)
    #: Upper bound: seconds since the last instance while an association stays open.
    max_wait_s: float = Field(120.0, gt=0)
    poll_interval_s: float = Field(0.25, gt=0)
    #: Re-queue jobs not started after this many seconds (lost broker message).
    requeue_after_s: float = Field(120.0, gt=0)


class WorkerSettings(_Strict):
    """Analysis worker."""

    concurrency: int = Field(1, ge=1, le=64)
    mc_samples: int = Field(20, ge=1, le=1000)
    #: Torch intra-op threads; 0 lets torch decide.
    torch_threads: int = Field(0, ge=0)
    device: str = "cpu"
    #: Seconds a task may run before the broker redelivers it (must exceed the longest task).
    visibility_timeout_s: int = Field(3600, ge=60)
    #: A worker renews its claim on a job every lease_s / 3 seconds while it analyses; a job
    #: whose claim was not renewed for lease_s (the worker was killed or hangs) is taken again.
    lease_s: float = Field(30.0, ge=3.0, le=3600.0)


class ExporterSettings(_Strict):
    """Delivery of results by C-STORE."""

    max_attempts: int = Field(5, ge=1)
    backoff_initial_s: float = Field(2.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0)
    poll_interval_s: float = Field(0.25, gt=0)
    timeout_s: float = Field(30.0, gt=0)


class Destination(_Strict):
    """A DICOM node results are sent to."""

    name: str
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)


class RouteMatch(_Strict):
    """Conditions of a route; each given list must contain the study's value (AND across keys)."""

    modality: list[str] | None = None
    sop_class_uid: list[str] | None = None
    body_part: list[str] | None = None
    calling_ae: list[str] | None = None


class Route(_Strict):
    """Which model analyses which studies and where its results go."""

    name: str
    match: RouteMatch = Field(default_factory=RouteMatch)
    model: str = "default"
    destinations: list[str] = Field(default_factory=list)
    #: Higher runs first.
    priority: int = 0


class ModelSpec(_Strict):
    """A model the node can run, by the path of its manifest."""

    name: str
    manifest: Path


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
    destinations: list[Destination] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    models: list[ModelSpec] = Field(default_factory=list)

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
        route_names = [r.name for r in self.routes]
        for dup in {n for n in route_names if route_names.count(n) > 1}:
            problems.append(f"routes: name {dup!r} is used twice")
        model_names = {m.name for m in self.models} | {"default"}
        for route in self.routes:
            for dest in route.destinations:
                if dest not in dest_names:
                    problems.append(
                        f"routes.{route.name}: destination {dest!r} is not defined"
                        " in [[destinations]]"
                    )
            if route.model not in model_names:
                problems.append(
                    f"routes.{route.name}: model {route.model!r} is not defined in [[models]]"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ----------------------------------------------------------------- derived values
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
    def database_url(self) -> str:
        if self.node.database_url:
            return self.node.database_url
        return f"sqlite:///{self.data_dir / 'ledger.sqlite'}"

    @property
    def broker_url(self) -> str:
        return self.node.broker_url or "filesystem://"

    @property
    def embedded_broker_dir(self) -> Path:
        return self.data_dir / "broker"

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    def model_manifest(self, name: str) -> Path:
        """The manifest path of a configured model; ``default`` is the bundled model."""
        for spec in self.models:
            if spec.name == name:
                return spec.manifest.expanduser().resolve()
        if name == "default":
            from acwi_node.inference.manifest import default_model_dir

            return default_model_dir() / "manifest.json"
        raise KeyError(name)


_CONFIG_FILE: dict[str, Path | None] = {"path": None}


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (argument, else ``ACWI_CONFIG``), apply ``ACWI_...`` overrides, validate.

    Raises :class:`ConfigError` with a readable message for every invalid key.
    """
    path_text = str(config_file) if config_file else os.environ.get("ACWI_CONFIG")
    path: Path | None = None
    if path_text:
        path = Path(path_text).expanduser()
        if not path.is_file():
            raise ConfigError(f"configuration file {path} does not exist")
    _CONFIG_FILE["path"] = path
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
