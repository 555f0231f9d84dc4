"""The review web app's pages: sign-in, worklist, case, verdict, dashboard.

:func:`install_review` adds the pages, the static files and an authentication middleware to the
node's FastAPI app. Every path needs a signed-in user except ``/login``, ``/static/``,
``/healthz``, ``/readyz`` and ``/metrics``. The JSON API (``/api/...``) also accepts HTTP Basic
credentials of an active local account, for scripts; it answers 401 rather than redirecting.
Behind a reverse proxy that publishes the app under a path (``node.http_root_path``), those
paths are the ones within the app: every link, form, redirect and cookie path a page names
starts with the root path (:mod:`acwi_node.web.paths`; ``{{ root }}`` in the templates).

Pages are Jinja2 templates with autoescaping on, served with a Content-Security-Policy that
allows no inline script: DICOM and HL7 text is always rendered as text.

Images: the source instance is rendered as the heatmap writer renders it
(:func:`acwi_node.results.heatmap.render_grey`: modality LUT / rescale, the file's VOI window if
present else a percentile window, MONOCHROME1 inverted), or in a window the reader chooses
(``images/<uid>.png?window=lung``: :data:`CT_WINDOWS`, ``auto``). The heatmap is a transparent
layer (``overlays/<uid>.png``): the secondary capture's colour map and opacity, made from the
map the worker kept beside the object (:mod:`acwi_node.results.overlay`), so that it lies over
the image in any window and its opacity slider fades it in and out exactly; where no map was
kept, the secondary capture itself (``heatmaps/<uid>.png``). A frame of a multi-frame image is
asked for by number (``?frame=N`` on each).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import io
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlencode

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader
from PIL import Image
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from acwi_node import __version__
from acwi_node.config import Settings
from acwi_node.dicom_pixels import read_deferred
from acwi_node.export.outbox import verify_destination, what_it_checks
from acwi_node.export.withdrawal import REASONS as WITHDRAWAL_REASON_KEYS
from acwi_node.export.withdrawal import NoSuchModel, withdraw_results
from acwi_node.hospital_clock import wall_clock
from acwi_node.inference.types import unit_name
from acwi_node.ingest.retrieval import QueryError, check_query
from acwi_node.ingest.spool import Spool, is_safe_uid
from acwi_node.ledger import Ledger, NoSuchStudy, StudyActionRefused
from acwi_node.ledger.models import VERIFIED_SR_KIND, WITHDRAWAL_REASONS, utcnow
from acwi_node.ledger.retrievals import QUERY_KEYS, Retrievals
from acwi_node.ledger.trace import study_trace
from acwi_node.ledger.withdrawals import Withdrawals
from acwi_node.model_overview import models_overview
from acwi_node.monitoring import pinning
from acwi_node.monitoring.report import BaselineRefused, ModelMonitor
from acwi_node.monitoring.shadow import ShadowComparison
from acwi_node.monitoring.traffic import traffic_monitor
from acwi_node.monitoring.turnaround import TurnaroundMonitor, duration
from acwi_node.observability import metrics
from acwi_node.results.heatmap import ColourMapName, Window, colour_map, render_grey
from acwi_node.results.overlay import heat_path, overlay_rgba, read_cam
from acwi_node.results.sr import summarise_sr
from acwi_node.results.uids import result_uids
from acwi_node.retention import disk_space
from acwi_node.review import auth
from acwi_node.review.inputs import RowId, printable, typed_text_error
from acwi_node.review.lesion_boxes import drafted_boxes, marked_boxes
from acwi_node.review.store import (
    WORKLIST_MAX_PER_PAGE,
    WORKLIST_PER_PAGE,
    ItemClosed,
    ReviewError,
    ReviewStore,
    SessionInfo,
    UserInfo,
    VerdictAmended,
    WorklistFilters,
    frame_number_of,
    worklist_page,
)
from acwi_node.review.verdicts import (
    amend_verdict,
    current_verdict,
    submit_verdict,
)
from acwi_node.web.guards import MAX_FORM_BODY
from acwi_node.web.paths import cookie_path, root_path, route_path

log = logging.getLogger("acwi_node.review")

HERE = Path(__file__).parent
PUBLIC_PATHS = {"/login", "/healthz", "/readyz", "/metrics", "/favicon.ico"}
PUBLIC_PREFIXES = ("/static/",)
#: Paths that take HTTP Basic credentials of a local account as well as a session.
BASIC_PREFIXES = ("/api/", "/dicomweb/")
#: The only paths a ``sender`` account (a PACS storing by STOW-RS) may use.
SENDER_PREFIXES = ("/dicomweb/",)
#: The largest form body (refused unread past it: :class:`~acwi_node.web.guards.ApiLimits`).
MAX_FORM_BYTES = MAX_FORM_BODY
#: The forms' fields of typed text (a verdict's reason, a withdrawal's note): their handlers
#: refuse a control character in them with the page again and the reason
#: (:func:`~acwi_node.review.inputs.typed_text_error`); :func:`_form` refuses one elsewhere.
TYPED_TEXT_FIELDS = frozenset({"reason", "note"})
#: Largest side of a rendered image (pixels).
DISPLAY_MAX = 1024
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
        "object-src 'none'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
#: What a case's rendered images carry: they show a patient's images, which no cache keeps
#: (``private`` let the browser keep them on the reading room's shared workstation after
#: sign-out, where the pages are ``no-store``).
IMAGE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
FILTER_NAMES = [
    ("modality", "Modality"),
    ("calling_ae", "Site (calling AE)"),
    ("model", "Model"),
    ("state", "Study state"),
    ("kind", "Why (flagged, quality-control sample)"),
]


def make_templates(timezone: str = "UTC") -> Environment:
    """The page templates; autoescaping is on for every template. Their filters show a ledger
    time in ``timezone``, with its offset from UTC: ``local`` (date and time), ``local_s``
    (with seconds), ``clock`` (time of day), ``clock_s`` (with seconds); ``day`` its date."""
    env = Environment(
        loader=FileSystemLoader(str(HERE / "templates")),
        autoescape=True,
        auto_reload=False,
    )
    env.filters["duration"] = duration
    env.filters["local"] = partial(wall_clock, zone=timezone)
    env.filters["local_s"] = partial(wall_clock, zone=timezone, shown="%Y-%m-%d %H:%M:%S")
    env.filters["clock"] = partial(wall_clock, zone=timezone, shown="%H:%M")
    env.filters["clock_s"] = partial(wall_clock, zone=timezone, shown="%H:%M:%S")
    env.filters["day"] = partial(wall_clock, zone=timezone, shown="%Y-%m-%d", offset=False)
    return env


def _text(value: object) -> str:
    """A DICOM attribute as plain text (rendering escapes it)."""
    return "" if value is None else str(value)


#: The image headers kept read (a few hundred bytes each): more than the open cases of a busy
#: worklist, which shows every case's patient and accession and reloads every minute; a
#: smaller cache would be read through on every load and keep none of them.
HEADER_CACHE = 8192


@lru_cache(maxsize=HEADER_CACHE)
def _header(path: str, mtime_ns: int) -> dict[str, str]:
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except Exception:
        return {}
    return {
        "patient_name": _text(ds.get("PatientName")),
        "patient_id": _text(ds.get("PatientID")),
        "birth_date": _text(ds.get("PatientBirthDate")),
        "sex": _text(ds.get("PatientSex")),
        "accession": _text(ds.get("AccessionNumber")),
        "study_description": _text(ds.get("StudyDescription")),
        "study_date": _text(ds.get("StudyDate")),
    }


def _png(rgb_or_grey: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb_or_grey).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def display_size(rows: int, columns: int) -> tuple[int, int]:
    """(width, height) of a rendered image: at most DISPLAY_MAX on its longer side."""
    scale = min(1.0, DISPLAY_MAX / max(rows, columns, 1))
    return max(1, round(columns * scale)), max(1, round(rows * scale))


#: Windows a reader may choose instead of the file's, for a CT (centre, width in HU), in the
#: order the case page offers them; every image may also be shown ``auto`` (percentiles).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "abdomen": (50.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
AUTO_WINDOW: Literal["auto"] = "auto"


def window_choices(modality: str) -> list[str]:
    """The windows the case page offers for a study of ``modality`` (``CT\\PT`` and the
    like: any CT among them), besides the file's own."""
    return [*CT_WINDOWS, AUTO_WINDOW] if "CT" in modality.split("\\") else [AUTO_WINDOW]


def parse_window(name: str | None) -> Window | None:
    """A window named in a request (None: the file's); raises ValueError for another name."""
    if name is None or name == "":
        return None
    if name == AUTO_WINDOW:
        return AUTO_WINDOW
    if name in CT_WINDOWS:
        return CT_WINDOWS[name]
    raise ValueError(f"window must be one of {', '.join([*CT_WINDOWS, AUTO_WINDOW])}")


def render_source_png(
    path: Path, frame_number: int | None = None, window: Window | None = None
) -> bytes:
    """The source image (frame ``frame_number`` of a multi-frame one) windowed for display
    (the file's window, or ``window``), as an 8-bit greyscale PNG. The Pixel Data is read
    when used: a frame's picture reads that frame's bytes of the file, not the whole
    image's."""
    ds = read_deferred(path)
    grey = render_grey(ds, frame_number, window=window)
    image = Image.fromarray(np.clip(np.rint(grey * 255.0), 0, 255).astype(np.uint8))
    size = display_size(*grey.shape)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return _png(np.asarray(image))


#: Images named at the top of a case page of more images than this (a CT's hundreds).
LEADING_IMAGES = 3


def leading_images(images: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """For a case of more than :data:`LEADING_IMAGES` images, the numbers (1-based, as the page
    numbers them) of those with the highest probability of the predicted label and of the
    most uncertain, each with its value: where a reader of a CT's hundreds of slices looks
    first. Empty for fewer images (the page shows them all at once)."""
    if len(images) <= LEADING_IMAGES:
        return {}

    def top(key: str) -> list[tuple[int, float]]:
        order = sorted(range(len(images)), key=lambda i: (-images[i][key], i))
        return [(i + 1, float(images[i][key])) for i in order[:LEADING_IMAGES]]

    return {"probability": top("probability"), "uncertainty": top("uncertainty")}


def render_overlay_png(
    cam: np.ndarray, rows: int, columns: int, colours: ColourMapName = "jet"
) -> bytes:
    """The heatmap's colour map ``colours`` as a transparent layer (RGBA) at the display size
    of a ``rows`` x ``columns`` source (:func:`acwi_node.results.overlay.overlay_rgba`)."""
    width, height = display_size(rows, columns)
    return _png(overlay_rgba(cam, height, width, colours))


#: Width and height of the heatmap's colour scale on the case page (pixels).
LEGEND_SIZE = (256, 14)


#: What the case page's colour scale says of each colour map (its alternative text).
LEGEND_WORDS = {
    "jet": "dark blue (0, none) through cyan, green and yellow to dark red (1, strongest)",
    "cividis": "dark blue (0, none) through grey to light yellow (1, strongest)",
    "viridis": "dark purple (0, none) through blue, teal and green to yellow (1, strongest)",
}


@lru_cache(maxsize=len(LEGEND_WORDS))
def render_legend_png(colours: ColourMapName = "jet") -> bytes:
    """The heatmap's colour map ``colours`` from heat 0 (left) to 1 (right), as the overlays
    and the secondary captures draw it (:func:`acwi_node.results.heatmap.colour_map`)."""
    width, height = LEGEND_SIZE
    row = np.clip(np.rint(colour_map(np.linspace(0.0, 1.0, width), colours) * 255.0), 0, 255)
    return _png(np.repeat(row.astype(np.uint8)[None], height, axis=0))


def render_heatmap_png(heatmap_path: Path, rows: int, columns: int) -> bytes:
    """The heatmap secondary capture at the display size of a ``rows`` x ``columns`` source."""
    ds = dcmread(heatmap_path)
    rgb = np.asarray(ds.pixel_array, dtype=np.uint8)
    image = Image.fromarray(rgb, mode="RGB")
    size = display_size(rows, columns)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return _png(np.asarray(image))


def _has_cam(results: Spool, relative: str) -> bool:
    """Whether the heatmap object at ``relative`` in the results folder has its map kept."""
    try:
        return heat_path(results.resolve(relative)).is_file()
    except (OSError, ValueError):
        return False


class ReviewApp:
    """State shared by the pages: settings, ledger store, templates and the CSRF key."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.store = ReviewStore(ledger)
        self.templates = make_templates(settings.monitoring.timezone)
        self.key = auth.load_secret_key(settings.review_secret_key_file)
        self.credentials = auth.VerifiedCredentials(settings.review.basic_auth_cache_s)
        self.throttle = auth.SignInThrottle(
            settings.review.sign_in_free_failures, settings.review.sign_in_max_delay_s
        )
        #: the form's failed sign-ins from browsers that signed in before, by device id
        #: (:func:`~acwi_node.review.auth.known_device`), timed on :attr:`throttle`'s clock
        self.devices = auth.SignInThrottle(
            settings.review.sign_in_free_failures,
            settings.review.sign_in_max_delay_s,
            clock=lambda: self.throttle.clock(),
        )
        #: failed sign-ins by client address, whatever the names (0 free failures: none)
        per_address = settings.review.sign_in_address_free_failures
        self.addresses = auth.SignInThrottle(
            max(1, per_address),
            settings.review.sign_in_max_delay_s if per_address else 0,
            clock=lambda: self.throttle.clock(),
        )

    # ------------------------------------------------------------- helpers
    def csrf_for(self, user: SessionInfo) -> str:
        return auth.csrf_token(self.key, "session", user.token_hash)

    def page(
        self,
        name: str,
        request: Request,
        status_code: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        user: SessionInfo | None = getattr(request.state, "user", None)
        html = self.templates.get_template(name).render(
            user=user,
            csrf=self.csrf_for(user) if user else "",
            version=__version__,
            # every link, form and image of a page starts with it (node.http_root_path)
            root=root_path(request.scope),
            session_left=session_left(user, self.settings.review.idle_timeout_s),
            **context,
        )
        return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)

    def authenticate(self, request: Request) -> SessionInfo | None:
        token = request.cookies.get(auth.SESSION_COOKIE)
        if token:
            found = self.store.session_user(
                auth.token_hash(token),
                idle_timeout_s=self.settings.review.idle_timeout_s,
                touch=not is_auto_reload(request),
            )
            if found is not None:
                return found
        if route_path(request.scope).startswith(BASIC_PREFIXES):
            return self._basic(request.headers.get("authorization", ""), _client_address(request))
        return None

    def _basic(self, header: str, address: str) -> SessionInfo | None:
        """The account of HTTP Basic credentials; a failure is counted by the throttle and
        recorded in the audit trail (``login_failed``, "HTTP Basic")."""
        if not header.lower().startswith("basic "):
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        name, _, password = decoded.partition(":")
        user = self.account(name)
        # Credentials that verified a moment ago pass even while the name is throttled: they
        # hold the password already (a PACS storing by STOW-RS keeps working while someone
        # guesses at its account).
        if (
            user is not None
            and not user.disabled
            and self.credentials.known(name, password, user.password_hash)
        ):
            return SessionInfo(user.id, user.name, user.role, "", utcnow())
        wait = max(self.wait_s(name, user), self.addresses.wait_s(address))
        if wait > 0:
            raise auth.SignInThrottled(wait)
        if (
            user is None
            or user.disabled
            or not self.credentials.verify(name, password, user.password_hash)
        ):
            if user is None or user.disabled:
                auth.verify_password(password, auth.DUMMY_HASH)  # the same time either way
            self.sign_in_failed(name, "basic", user, address=address)
            self.store.audit(
                printable(name)[:64], "login_failed", detail="HTTP Basic", address=address
            )
            return None
        self.sign_in_succeeded(user, address)
        return SessionInfo(user.id, user.name, user.role, "", utcnow())

    def account(self, name: str) -> UserInfo | None:
        """The account a sign-in names; None, without asking the ledger, for a name with a
        control character, which no account has (and PostgreSQL cannot compare a NUL): it
        fails like an unknown name."""
        if typed_text_error(name) is not None:
            return None
        return self.store.get_user(name)

    def wait_s(self, name: str, user: UserInfo | None, device: str | None = None) -> float:
        """Seconds before ``name`` may try to sign in again (0: now): an account's failures
        are in the ledger (every web process sees them), other names' in this process; from a
        browser that signed in as ``name`` before (``device``), that browser's own failures
        alone, so that a guesser's cannot shut its owner out."""
        if device is not None:
            return self.devices.wait_s(device)
        if user is None:
            return self.throttle.wait_s(name)
        if user.last_failed_sign_in_at is None:
            return 0.0
        last = user.last_failed_sign_in_at.replace(tzinfo=dt.timezone.utc).timestamp()
        return self.throttle.wait_after(user.failed_sign_ins, last)

    def sign_in_failed(
        self,
        name: str,
        method: str,
        user: UserInfo | None,
        device: str | None = None,
        *,
        address: str = "",
    ) -> None:
        """Count a failed sign-in (``method``: form or basic) for the throttle and metrics;
        the user name's count either way, the client address's, and the browser's where it
        signed in before."""
        metrics.SIGN_IN_FAILURES.labels(method).inc()
        if device is not None:
            self.devices.failed(device)
        if address:
            self.addresses.failed(address)
        if user is None:
            failures = self.throttle.failed(name)
        else:
            at = dt.datetime.fromtimestamp(self.throttle.clock(), dt.timezone.utc)
            failures = self.store.sign_in_failed(user.id, at.replace(tzinfo=None))
        if failures == self.settings.review.sign_in_free_failures:
            log.warning(
                "%d failed sign-ins in a row for user name %r: its next attempts wait (up to %d s)",
                failures,
                name[:64],
                self.settings.review.sign_in_max_delay_s,
            )

    def sign_in_succeeded(self, user: UserInfo, address: str = "") -> None:
        """Clear an account's failed sign-ins (a write only when there were some), and the
        client address's."""
        self.addresses.succeeded(address)
        if user.failed_sign_ins:
            self.store.sign_in_succeeded(user.id)

    def case_header(self, case: dict[str, Any]) -> dict[str, str]:
        return self._first_header(self.store.job_instance_paths(case["job_id"]))

    def _first_header(self, paths: Iterable[str]) -> dict[str, str]:
        """The header of the first of the spool ``paths`` that is a readable image."""
        spool = Spool(self.settings.spool_dir, fsync=False)
        for rel in paths:
            try:
                path = spool.resolve(rel)
                found = _header(str(path), path.stat().st_mtime_ns)
            except (OSError, ValueError):
                continue
            if found:
                return found
        return {}

    def add_headers(self, items: list[dict[str, Any]]) -> None:
        """Each listed case's patient name and accession (``patient_name``, ``accession``)
        from its images' header, as :meth:`case_header` reads it: the paths of every case's
        images in one query, however many cases."""
        paths = self.store.jobs_instance_paths([it["job_id"] for it in items])
        for it in items:
            header = self._first_header(paths.get(it["job_id"], ()))
            it["patient_name"] = header.get("patient_name", "")
            it["accession"] = header.get("accession", "")


#: The query parameter that marks a page's reload of itself (the worklist's ``<meta
#: http-equiv="refresh">``): such a request is nobody's doing, and does not keep a session from
#: its idle timeout.
AUTO_RELOAD = "auto"


def is_auto_reload(request: Request) -> bool:
    """Whether ``request`` is a page reloading itself (:data:`AUTO_RELOAD`), not a reader's."""
    return request.method in ("GET", "HEAD") and request.query_params.get(AUTO_RELOAD) == "1"


def _client_address(request: Request) -> str:
    """The address the request came from: behind a reverse proxy in
    ``node.http_trusted_proxies``, the client's it forwards (``X-Forwarded-For``, taken by
    uvicorn before the app sees the request), else the proxy's."""
    return request.client.host if request.client is not None else ""


def _form(body: bytes, *, text: Collection[str] = TYPED_TEXT_FIELDS) -> dict[str, str]:
    """A posted form's fields. A field's name, or a value of a field but those of ``text``
    (which their handler checks), with a control character (a NUL, which PostgreSQL refuses)
    is refused with a 422 that names the field and the character: a model's name, a label,
    a lesion box's image name hold none, and the handlers look them up."""
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(status_code=413, detail="form too large")
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPException(status_code=400, detail="malformed form") from exc
    form = {k: v[0] for k, v in parsed.items()}
    for key, value in form.items():
        problem = typed_text_error(key, f"a field's name ({printable(key)})")
        if problem is None and key not in text:
            problem = typed_text_error(value, key)
        if problem is not None:
            raise HTTPException(status_code=422, detail=problem)
    return form


def _safe_next(value: str) -> str:
    """A redirect target after sign-in: a local path only."""
    if value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/review/worklist"


def destination_outboxes(store: ReviewStore, settings: Settings) -> list[dict[str, Any]]:
    """:meth:`ReviewStore.delivery_status` of the configured destinations, each configured one
    with where it is (``AE@host:port`` or its URL) and the check the dashboard offers for it
    (C-ECHO, or QIDO-RS for a DICOMweb service)."""
    rows = store.delivery_status(
        [d.name for d in settings.destinations],
        ris=settings.hl7.ris is not None,
        notify=[t.name for t in settings.notify],
    )
    known = {d.name: d for d in settings.destinations}
    for row in rows:
        dest = known.get(row["name"])
        row["where"] = dest.where if dest is not None else ""
        row["check"] = what_it_checks(dest) if dest is not None else ""
    return rows


#: Paths answered in JSON whatever the client accepts: programs call them.
MACHINE_PREFIXES = (*BASIC_PREFIXES, "/healthz", "/readyz", "/metrics", "/static/")


def session_left(user: SessionInfo | None, idle_timeout_s: float) -> dict[str, int] | None:
    """How long a signed-in reader's session lasts: ``idle_left_s`` until it ends for want of
    a request of theirs, ``lifetime_left_s`` until its ``session_lifetime_s`` is over, and the
    ``idle_timeout_s`` a request starts again. The pages warn before either (WCAG 2.2.1) and
    offer to stay signed in; None without a session (HTTP Basic)."""
    if user is None or user.idle_ends_at is None:
        return None
    now = utcnow()
    return {
        "idle_left_s": max(0, int((user.idle_ends_at - now).total_seconds())),
        "lifetime_left_s": max(0, int((user.expires_at - now).total_seconds())),
        "idle_timeout_s": int(idle_timeout_s),
    }


#: Page titles of the HTTP errors a browser may meet on the review pages.
ERROR_TITLES = {401: "Sign in required", 403: "Forbidden", 404: "Not found", 405: "Not allowed"}


def wants_page(request: Request) -> bool:
    """Whether an error is answered as a page: a browser's request (it accepts HTML) for a
    path that is no program's (:data:`MACHINE_PREFIXES`)."""
    path = route_path(request.scope)
    return not path.startswith(MACHINE_PREFIXES) and "text/html" in request.headers.get(
        "accept", ""
    )


async def error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
    """The review app's page of an HTTP error (:func:`wants_page`)."""
    review: ReviewApp = request.app.state.review
    return await run_in_threadpool(
        partial(
            review.page,
            "error.html",
            request,
            status_code=status_code,
            title=ERROR_TITLES.get(status_code, f"Error {status_code}"),
            message=message,
        )
    )


def install_review(app: FastAPI, settings: Settings, ledger: Ledger) -> ReviewApp:
    """Add the review pages and the authentication middleware to ``app``."""
    review = ReviewApp(settings, ledger)
    app.state.review = review

    @app.exception_handler(StarletteHTTPException)
    async def page_or_json(request: Request, exc: StarletteHTTPException) -> Response:
        """A browser following a stale link (a case or study no longer there) gets a page
        with the reason and the way back, not a JSON object; a program gets JSON as ever."""
        if not wants_page(request):
            return await http_exception_handler(request, exc)
        page = await error_page(request, exc.status_code, str(exc.detail))
        page.headers.update(exc.headers or {})
        return page

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="review-static")
    cookie_secure = settings.review.cookie_secure

    @app.middleware("http")
    async def require_sign_in(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = route_path(request.scope)
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return await call_next(request)
        try:
            user = await run_in_threadpool(review.authenticate, request)
        except auth.SignInThrottled as exc:
            metrics.SIGN_INS_THROTTLED.labels("basic").inc()
            return JSONResponse(
                {"detail": str(exc)},
                status_code=429,
                headers={"Retry-After": str(math.ceil(exc.wait_s))},
            )
        if user is None:
            if path.startswith(BASIC_PREFIXES):
                return JSONResponse(
                    {"detail": "sign in required"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Basic realm="ACWI Node"'},
                )
            if request.method != "GET":  # a page's form, its session over: no Basic challenge
                # (the pages take none: a browser would ask for a password that cannot work,
                # then keep sending it to the node, sign-out or not)
                if wants_page(request):
                    return await error_page(
                        request, 401, "Your session has ended: sign in again, then resubmit."
                    )
                return JSONResponse({"detail": "sign in required"}, status_code=401)
            target = path + (f"?{request.url.query}" if request.url.query else "")
            if typed_text_error(unquote(target)) is not None:  # a 404 or a 422 once signed in:
                return _redirect(request, "/login")  # not worth coming back to
            return _redirect(request, f"/login?next={quote(target, safe='')}")
        if user.role == "sender" and not path.startswith(SENDER_PREFIXES) and path != "/logout":
            return JSONResponse({"detail": "a sender account may only store studies"}, 403)
        request.state.user = user
        return await call_next(request)

    # ---------------------------------------------------------------- sign-in
    @app.get("/", include_in_schema=False)
    def root(request: Request) -> RedirectResponse:
        return _redirect(request, "/review/worklist")

    @app.get("/login", include_in_schema=False)
    def login_form(request: Request, next: str = "/review/worklist") -> HTMLResponse:
        nonce = request.cookies.get(auth.LOGIN_COOKIE) or auth.new_token()
        response = review.page(
            "login.html",
            request,
            login_csrf=auth.csrf_token(review.key, "login", nonce),
            next=_safe_next(next),
        )
        _set_cookie(request, response, auth.LOGIN_COOKIE, nonce, 3600, cookie_secure)
        return response

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        # a user name or a password with a control character is no account's: refused below
        # as a wrong password is, nothing told
        form = _form(await request.body(), text={"username", "password"})
        nonce = request.cookies.get(auth.LOGIN_COOKIE, "")
        next_path = _safe_next(form.get("next", ""))
        if not auth.csrf_ok(review.key, "login", nonce, form.get("csrf_token")):
            return _forbidden(request, "the sign-in form expired: reload the page and try again")
        name = form.get("username", "").strip()
        password = form.get("password", "")

        def refused(status_code: int, error: str) -> Response:
            new_nonce = auth.new_token()
            failed = review.page(
                "login.html",
                request,
                status_code=status_code,
                error=error,
                login_csrf=auth.csrf_token(review.key, "login", new_nonce),
                next=next_path,
                # the name typed stays in the form; one no account can have does not
                username=name if typed_text_error(name) is None else "",
            )
            _set_cookie(request, failed, auth.LOGIN_COOKIE, new_nonce, 3600, cookie_secure)
            return failed

        user = await run_in_threadpool(review.account, name)
        devices = request.cookies.get(auth.DEVICE_COOKIE, "")
        device = auth.known_device(review.key, devices, name)
        address = _client_address(request)
        name_wait = review.wait_s(name, user, device)
        # a browser that signed in as this user before is not held back by its address either
        from_address = 0.0 if device is not None else review.addresses.wait_s(address)
        wait = max(name_wait, from_address)
        if wait > 0:  # refused before the password is looked at
            metrics.SIGN_INS_THROTTLED.labels("form").inc()
            await run_in_threadpool(
                review.store.audit,
                printable(name)[:64],
                "login_failed",
                detail="throttled",
                address=address,
            )
            whose = "this user name" if name_wait >= from_address else "this address"
            response = refused(
                429, f"Too many failed sign-ins for {whose}: try again in {math.ceil(wait)} s."
            )
            response.headers["Retry-After"] = str(math.ceil(wait))
            return response
        ok = await run_in_threadpool(
            auth.verify_password,
            password,
            user.password_hash if user is not None and not user.disabled else auth.DUMMY_HASH,
        )
        sender = user is not None and user.role == "sender"
        if user is None or user.disabled or not ok or sender:
            await run_in_threadpool(
                review.store.audit,
                printable(name)[:64],
                "login_failed",
                address=_client_address(request),
            )
            if not ok or user is None or user.disabled:
                await run_in_threadpool(
                    partial(review.sign_in_failed, name, "form", user, device, address=address)
                )
            return refused(
                403 if ok and sender else 401,
                "This account stores studies by DICOMweb; it cannot sign in."
                if ok and sender
                else "Unknown user name or wrong password.",
            )
        if device is None:
            await run_in_threadpool(review.sign_in_succeeded, user, address)
        else:  # the user name's count stands: a guesser's failures do not start over
            review.devices.succeeded(device)
            review.addresses.succeeded(address)
        token = auth.new_token()
        lifetime = settings.review.session_lifetime_s
        await run_in_threadpool(
            review.store.create_session, user.id, auth.token_hash(token), lifetime
        )
        await run_in_threadpool(
            review.store.audit, user.name, "login", address=_client_address(request)
        )
        response = _redirect(request, next_path)
        _set_cookie(request, response, auth.SESSION_COOKIE, token, lifetime, cookie_secure)
        response.delete_cookie(auth.LOGIN_COOKIE, path=cookie_path(request.scope))
        response.set_cookie(
            auth.DEVICE_COOKIE,
            auth.remember_device(review.key, devices, user.name),
            max_age=auth.DEVICE_COOKIE_MAX_AGE,
            path=cookie_path(request.scope, auth.DEVICE_COOKIE_PATH),
            secure=cookie_secure,
            httponly=True,
            samesite="strict",
        )
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        user: SessionInfo = request.state.user
        form = _form(await request.body())
        if not auth.csrf_ok(review.key, "session", user.token_hash, form.get("csrf_token")):
            return _forbidden(request, "invalid form token")
        if user.token_hash:
            await run_in_threadpool(review.store.end_session, user.token_hash)
        await run_in_threadpool(
            review.store.audit, user.user_name, "logout", address=_client_address(request)
        )
        response = _redirect(request, "/login")
        response.delete_cookie(auth.SESSION_COOKIE, path=cookie_path(request.scope))
        return response

    @app.get("/review/session", include_in_schema=False)
    def session_view(request: Request) -> Response:
        """The pages' "Stay signed in": the request itself starts the idle time again (the
        middleware); the answer is how long the session now lasts (:func:`session_left`)."""
        left = session_left(request.state.user, settings.review.idle_timeout_s)
        return JSONResponse(left, headers={"Cache-Control": "no-store"})

    # ---------------------------------------------------------------- worklist
    @app.get("/review/worklist", include_in_schema=False)
    def worklist_page_view(
        request: Request,
        modality: str = "",
        calling_ae: str = "",
        model: str = "",
        state: str = "",
        kind: str = "",
        page: int = Query(1, ge=1, le=1_000_000),
        per_page: int = Query(WORKLIST_PER_PAGE, ge=1, le=WORKLIST_MAX_PER_PAGE),
        reload: Literal["on", "off", ""] = "",
    ) -> HTMLResponse:
        """The open cases, a page of ``per_page`` at a time (a page past the last shows the
        last). It reloads itself every ``review.worklist_refresh_s`` seconds unless the
        reader stopped that (``reload=off``, kept in a cookie of their browser; ``reload=on``
        starts it again)."""
        filters = WorklistFilters(modality, calling_ae, model, state, kind)
        found = review.store.worklist(filters, claim_s=settings.review.reading_claim_s)
        shown = worklist_page(found, page, per_page)
        if shown["page"] > shown["pages"]:
            shown = worklist_page(found, shown["pages"], per_page)
        # only this page's headers are read (the header cache keeps them for the next load)
        review.add_headers(shown["items"])
        if reload:
            reloading = reload == "on"
        else:
            reloading = request.cookies.get(WORKLIST_RELOAD_COOKIE) != "off"
        refresh_s = settings.review.worklist_refresh_s

        def url(at_page: int, **extra: str) -> str:
            return root_path(request.scope) + _worklist_url(
                filters, page=at_page, per_page=shown["per_page"], **extra
            )

        first = (shown["page"] - 1) * shown["per_page"]
        response = review.page(
            "worklist.html",
            request,
            items=shown["items"],
            total=found["total"],
            shown=shown["count"],
            page=shown["page"],
            pages=shown["pages"],
            first=first + 1,
            last=first + len(shown["items"]),
            previous_url=url(shown["page"] - 1) if shown["page"] > 1 else "",
            next_url=url(shown["page"] + 1) if shown["page"] < shown["pages"] else "",
            counts=found["counts"],
            filters={
                "modality": modality,
                "calling_ae": calling_ae,
                "model": model,
                "state": state,
                "kind": kind,
            },
            filter_names=FILTER_NAMES,
            per_page=shown["per_page"],
            per_page_default=WORKLIST_PER_PAGE,
            # each case opened from this list carries its filters: "Submit and open the next
            # case" takes the next of the same list
            list_query=filters.query(),
            refresh_s=refresh_s if reloading else 0,
            refresh_off=bool(refresh_s) and not reloading,
            reload_every_s=refresh_s,
            # the page reloads itself at its own address, without the reload switch, and
            # marked: a reload is not the reader's activity, so that a worklist left open on a
            # shared workstation ends with the idle timeout
            refresh_url=url(shown["page"], **{AUTO_RELOAD: "1"}),
            stop_url=url(shown["page"], reload="off"),
            start_url=url(shown["page"], reload="on"),
            notice=WORKLIST_RELOAD_NOTICES.get(reload, "") if refresh_s else "",
            now=utcnow().isoformat(timespec="seconds"),
        )
        if reload == "off":
            response.set_cookie(
                WORKLIST_RELOAD_COOKIE,
                "off",
                max_age=WORKLIST_RELOAD_COOKIE_AGE,
                path=cookie_path(request.scope, "/review/"),
                secure=cookie_secure,
                httponly=True,
                samesite="strict",
            )
        elif reload == "on":
            response.delete_cookie(
                WORKLIST_RELOAD_COOKIE, path=cookie_path(request.scope, "/review/")
            )
        return response

    @app.get("/review/decided", include_in_schema=False)
    def decided_page(request: Request, days: int = 14, mine: bool = False) -> HTMLResponse:
        """The cases decided in the last ``days`` days (``mine``: the reader's own verdicts):
        where a radiologist finds a closed case again, to look at it or amend its verdict."""
        days = max(1, min(days, 365))
        user: SessionInfo = request.state.user
        items = review.store.decided(days=days, reader=user.user_name if mine else "")
        review.add_headers(items)
        return review.page("decided.html", request, items=items, days=days, mine=mine)

    monitor = ModelMonitor(ledger, settings.monitoring)
    arrivals = traffic_monitor(settings, ledger)
    shadow_comparison = ShadowComparison(ledger)
    turnaround_monitor = TurnaroundMonitor(ledger, settings.monitoring)

    def _dashboard(
        request: Request,
        days: int = 14,
        *,
        notice: str = "",
        error: str = "",
        status: int = 200,
        retrieval: dict[str, str] | None = None,
    ) -> HTMLResponse:
        """``retrieval``: the retrieval form as refused, shown again as typed (WCAG 3.3.7)."""
        days = max(1, min(days, 365))
        user: SessionInfo = request.state.user
        return review.page(
            "dashboard.html",
            request,
            status_code=status,
            d=review.store.dashboard(days=days, timezone=settings.monitoring.timezone),
            agreement=review.store.agreement(days=days),
            sample_percent=settings.review.quality_sample_percent,
            disk=_disk_free_percent(settings.data_dir),
            monitoring=monitor.report(),
            monitoring_days=settings.monitoring.window_days,
            traffic=arrivals.report(),
            shadows=shadow_comparison.report(days=settings.monitoring.window_days),
            turnaround=turnaround_monitor.report(),
            failed=review.store.failed_studies() if user.role == "admin" else None,
            outboxes=destination_outboxes(review.store, settings) if user.role == "admin" else None,
            sources=[src.name for src in settings.sources],
            retrievals=Retrievals(ledger).recent(10) if user.role == "admin" else None,
            retrieval=retrieval or {},
            notice=notice,
            error=error,
        )

    @app.get("/review/dashboard", include_in_schema=False)
    def dashboard_page(request: Request, days: int = 14, done: str = "") -> HTMLResponse:
        return _dashboard(request, days, notice=STUDY_ACTION_NOTICES.get(done, ""))

    def _monitoring(
        request: Request, *, notice: str = "", error: str = "", status: int = 200
    ) -> HTMLResponse:
        cfg = settings.monitoring
        return review.page(
            "monitoring.html",
            request,
            status_code=status,
            reports=monitor.report(weeks=8),
            traffic=arrivals.report(),
            shadows=[r.as_json() for r in shadow_comparison.report(days=cfg.window_days)],
            shadow_unfinished=shadow_comparison.unfinished(days=cfg.window_days),
            turnaround=turnaround_monitor.report(),
            cfg=cfg,
            notice=notice,
            error=error,
        )

    @app.get("/review/monitoring", include_in_schema=False)
    def monitoring_page(request: Request) -> HTMLResponse:
        """The studies arriving from each source and for each route against the weeks
        before, and each model version's recent studies against its baseline, signal by
        signal, with the eight windows before: whether what the model sees or says has
        changed."""
        return _monitoring(request)

    @app.post("/review/monitoring/baseline", include_in_schema=False)
    async def monitoring_baseline(request: Request) -> Response:
        """An administrator pins a model version's baseline to a period, or clears it (as
        ``acwi-node monitor baseline``)."""
        user: SessionInfo = request.state.user
        refused = await _admin_form_refused(request)
        if refused is not None:
            return refused
        form = _form(await request.body())
        name, version = form.get("model", ""), form.get("version", "")
        if form.get("clear"):
            notice = await run_in_threadpool(pinning.clear, monitor, name, version, user.user_name)
            return await run_in_threadpool(partial(_monitoring, request, notice=notice))
        try:
            notice = await run_in_threadpool(
                pinning.pin,
                monitor,
                name,
                version,
                form.get("since", ""),
                form.get("until", ""),
                user.user_name,
            )
        except BaselineRefused as exc:
            error = f"{name} {version}: {exc}"
            return await run_in_threadpool(partial(_monitoring, request, error=error, status=422))
        return await run_in_threadpool(partial(_monitoring, request, notice=notice))

    def _models(
        request: Request,
        *,
        notice: str = "",
        error: str = "",
        status: int = 200,
        recall: dict[str, str] | None = None,
    ) -> HTMLResponse:
        """``recall``: the recall form as refused, shown again as typed."""
        user: SessionInfo = request.state.user
        return review.page(
            "models.html",
            request,
            status_code=status,
            models=[m.as_json() for m in models_overview(settings, ledger)],
            admin=user.role == "admin",
            withdrawal_reasons={key: WITHDRAWAL_REASONS[key] for key in WITHDRAWAL_REASON_KEYS},
            recall=recall or {},
            notice=notice,
            error=error,
        )

    @app.get("/review/models", include_in_schema=False)
    def models_page(request: Request) -> HTMLResponse:
        """The models the routes run, each version's manifest and analyses; an
        administrator recalls a version's results from here."""
        return _models(request)

    @app.post("/review/models/recall", include_in_schema=False)
    async def models_recall(request: Request) -> Response:
        """An administrator recalls a model version: its results withdrawn from the PACS (as
        ``acwi-node models recall`` and ``POST /api/models/{name}/{version}/recall``)."""
        user: SessionInfo = request.state.user
        refused = await _admin_form_refused(request)
        if refused is not None:
            return refused
        form = _form(await request.body())
        name, version = form.get("name", ""), form.get("version", "")
        typed = {k: form.get(k, "") for k in ("name", "version", "reason", "note")}
        if not name or not version or not form.get("confirm"):
            error = "name the model version and tick the box that confirms the recall"
            return await run_in_threadpool(
                partial(_models, request, error=error, status=422, recall=typed)
            )
        problem = typed_text_error(form.get("note", ""), "the note")
        if problem is not None:
            error = f"{name} {version}: {problem}"
            return await run_in_threadpool(
                partial(_models, request, error=error, status=422, recall=typed)
            )
        try:
            report = await run_in_threadpool(
                partial(
                    withdraw_results,
                    settings,
                    ledger,
                    reason=form.get("reason", ""),
                    note=form.get("note", ""),
                    by=user.user_name,
                    address=request.client.host if request.client else "",
                    model_name=name,
                    model_version=version,
                )
            )
        except ValueError as exc:
            error = f"{name} {version}: {exc}"
            return await run_in_threadpool(
                partial(_models, request, error=error, status=422, recall=typed)
            )
        except NoSuchModel as exc:
            return await run_in_threadpool(
                partial(_models, request, error=str(exc), status=404, recall=typed)
            )
        withdrawn = [j for j in report.jobs if j.withdrawn]
        log.info("model %s %s recalled by %s", name, version, user.user_name)
        if not withdrawn:
            error = f"{name} {version}: nothing withdrawn: {report.why_nothing()}"
            return await run_in_threadpool(partial(_models, request, error=error, status=409))
        notice = (
            f"{name} {version}: the results of {len(withdrawn)} analysis(es) of"
            f" {len({j.study_uid for j in withdrawn})} study(ies) withdrawn,"
            f" {sum(j.queued for j in withdrawn)} rejection note(s) on their way to the PACS"
        )
        if report.refused:
            notice += f"; {len(report.refused)} not: " + "; ".join(
                sorted({j.error for j in report.refused})
            )
        return await run_in_threadpool(partial(_models, request, notice=notice))

    async def _admin_form_refused(request: Request) -> Response | None:
        """403 unless an administrator posted the form with a valid CSRF token; else None."""
        user: SessionInfo = request.state.user
        if user.role != "admin":
            return _forbidden(request, "administrators only")
        form = _form(await request.body())
        if not auth.csrf_ok(review.key, "session", user.token_hash, form.get("csrf_token")):
            return _forbidden(request, "invalid form token: reload the page")
        return None

    @app.get("/review/studies", include_in_schema=False)
    def studies_page(
        request: Request,
        uid: str = Query("", max_length=64),
        calling_ae: str = Query("", max_length=16),
        state: str = "",
    ) -> HTMLResponse:
        """The latest studies, found by UID, sender or state; each opens its trace."""
        counts = {k: v for k, v in ledger.counts().items() if k != "instances"}
        if state not in counts:
            state = ""
        found = ledger.list_studies(
            limit=STUDIES_SHOWN, state=state, calling_ae=calling_ae.strip(), uid=uid.strip()
        )
        for st in found:
            st["result"] = _result_line(st)
        return review.page(
            "studies.html",
            request,
            studies=found,
            counts=counts,
            limit=STUDIES_SHOWN,
            filters={"uid": uid, "calling_ae": calling_ae, "state": state},
        )

    def _withdraw(study_uid: str, *, reason: str, note: str, by: str, address: str) -> None:
        """Withdraw the study's results (the study page's form); raises ValueError or
        :class:`StudyActionRefused` with what to tell when nothing was withdrawn."""
        report = withdraw_results(
            settings, ledger, reason=reason, note=note, by=by, address=address, study_uid=study_uid
        )
        if report.refused:
            raise StudyActionRefused("; ".join(j.describe() for j in report.refused))
        if report.why_nothing():
            raise StudyActionRefused(f"nothing withdrawn: {report.why_nothing()}")

    def _study_page(
        request: Request,
        study_uid: str,
        *,
        notice: str = "",
        error: str = "",
        status: int = 200,
        withdrawal: dict[str, str] | None = None,
    ) -> HTMLResponse:
        """``withdrawal``: the withdrawal form as refused, shown again as typed."""
        trace = study_trace(ledger, study_uid)
        if trace is None:
            raise HTTPException(status_code=404, detail="no such study")
        state = trace.study["state"]
        actions = [
            (action, title)
            for action, title, states in STUDY_ACTIONS
            if state in states and not (action == "reprocess" and trace.study["images_deleted_at"])
        ]
        user: SessionInfo = request.state.user
        withdrawable = user.role == "admin" and bool(
            Withdrawals(ledger).candidates(study_uid=study_uid).jobs
        )
        return review.page(
            "study.html",
            request,
            status_code=status,
            trace=trace.as_json(),
            actions=actions,
            withdrawable=withdrawable,
            # what an administrator may give (``replaced`` is the node's own)
            withdrawal_reasons={key: WITHDRAWAL_REASONS[key] for key in WITHDRAWAL_REASON_KEYS},
            withdrawal=withdrawal or {},
            notice=notice,
            error=error,
        )

    @app.get("/review/studies/{study_uid}", include_in_schema=False)
    def study_page(request: Request, study_uid: str, done: str = "") -> HTMLResponse:
        """What happened to one study, step by step (``acwi-node studies show``)."""
        return _study_page(request, study_uid, notice=STUDY_ACTION_NOTICES.get(done, ""))

    @app.post("/review/studies/{study_uid}/{action}", include_in_schema=False)
    async def study_action(request: Request, study_uid: str, action: str) -> Response:
        """An administrator resends a failed study's results, reprocesses it or withdraws its
        results (the same actions as ``POST /api/studies/{uid}/resend|reprocess|withdraw``,
        from a form on the dashboard or the study's page, where the answer leads back)."""
        user: SessionInfo = request.state.user
        if action not in ("resend", "reprocess", "withdraw") or not is_safe_uid(study_uid):
            raise HTTPException(status_code=404, detail="no such action")
        refused = await _admin_form_refused(request)
        if refused is not None:
            return refused
        form = _form(await request.body())
        back_to_study = action == "withdraw" or form.get("next") == "study"
        typed = {"reason": form.get("reason", ""), "note": form.get("note", "")}
        typed = typed if action == "withdraw" else {}
        problem = typed_text_error(form.get("note", ""), "the note")
        if action == "withdraw" and problem is not None:  # the note goes to the RIS
            error = f"{study_uid}: {problem}"
            return await run_in_threadpool(
                partial(_study_page, request, study_uid, error=error, status=422, withdrawal=typed)
            )
        act: Callable[[str], object]
        if action == "withdraw":
            act = partial(
                _withdraw,
                reason=form.get("reason", ""),
                note=form.get("note", ""),
                by=user.user_name,
                address=request.client.host if request.client else "",
            )
        else:
            act = ledger.resend_results if action == "resend" else ledger.reprocess_study
        try:
            await run_in_threadpool(act, study_uid)
        except (StudyActionRefused, ValueError) as exc:
            error = f"{study_uid}: {exc}"
            status = 404 if isinstance(exc, NoSuchStudy) else 409
            if back_to_study:
                page = partial(
                    _study_page, request, study_uid, error=error, status=status, withdrawal=typed
                )
            else:
                page = partial(_dashboard, request, error=error, status=status)
            return await run_in_threadpool(page)
        log.info("%s: %s by %s", study_uid, action, user.user_name)
        if back_to_study:
            return _redirect(request, f"/review/studies/{quote(study_uid)}?done={action}")
        return _redirect(request, f"/review/dashboard?done={action}")

    @app.post("/review/retrievals", include_in_schema=False)
    async def retrieve(request: Request) -> Response:
        """An administrator retrieves studies from a source PACS (as ``POST
        /api/retrievals``, from a form: a study UID, an accession number or a study date)."""
        user: SessionInfo = request.state.user
        refused = await _admin_form_refused(request)
        if refused is not None:
            return refused
        form = _form(await request.body())
        source = form.get("source", "")
        typed = {k: form.get(k, "") for k in ("source", *QUERY_KEYS)}
        if source not in {src.name for src in settings.sources}:
            error = f"no source named {source!r}"
            return await run_in_threadpool(
                partial(_dashboard, request, error=error, status=422, retrieval=typed)
            )
        try:
            query = check_query({k: form.get(k) for k in QUERY_KEYS})
        except QueryError as exc:
            error = f"retrieve from {source}: {exc}"
            return await run_in_threadpool(
                partial(_dashboard, request, error=error, status=422, retrieval=typed)
            )
        rid = await run_in_threadpool(Retrievals(ledger).request, source, query, user.user_name)
        log.info("retrieval %d from %s queued by %s", rid, source, user.user_name)
        return _redirect(request, "/review/dashboard?done=retrieve")

    @app.post("/review/destinations/{name}/check", include_in_schema=False)
    async def check_destination(request: Request, name: str) -> Response:
        """An administrator C-ECHOes a destination from the dashboard (as ``acwi-node
        destinations check NAME``); the answer, or why there was none, shows on the page."""
        user: SessionInfo = request.state.user
        refused = await _admin_form_refused(request)  # first: a 404 told which names exist
        if refused is not None:
            return refused
        dest = next((d for d in settings.destinations if d.name == name), None)
        if dest is None:
            raise HTTPException(status_code=404, detail="no such destination")
        result = await run_in_threadpool(verify_destination, settings, dest)
        log.info("destination %s checked by %s: %s", name, user.user_name, result.ok)
        where = f"{dest.name} ({dest.where})"
        check = what_it_checks(dest)
        if result.ok:
            notice = f"{where}: {check} ok, {result.elapsed_ms:.0f} ms"
            return await run_in_threadpool(partial(_dashboard, request, notice=notice))
        error = f"{where}: {check} failed: {result.error}"
        return await run_in_threadpool(partial(_dashboard, request, error=error, status=502))

    @app.post("/review/destinations/{name}/retry", include_in_schema=False)
    async def retry_destination(request: Request, name: str) -> Response:
        """An administrator sends every failed delivery to a destination again (as
        ``acwi-node destinations retry NAME`` and ``POST /api/destinations/{name}/retry``)."""
        user: SessionInfo = request.state.user
        refused = await _admin_form_refused(request)
        if refused is not None:
            return refused
        retried = await run_in_threadpool(ledger.retry_failed, name)
        log.info("destination %s: %d retried by %s", name, retried.deliveries, user.user_name)
        notice = (
            f"{name}: {retried.deliveries} failed delivery(ies) of"
            f" {len(retried.study_uids)} study(ies) back in the outbox"
        )
        return await run_in_threadpool(partial(_dashboard, request, notice=notice))

    # -------------------------------------------------------------------- case
    def _case_or_404(item_id: int) -> dict[str, Any]:
        case = review.store.case(item_id)
        if case is None:
            raise HTTPException(status_code=404, detail="no such case")
        return case

    def _image_size(study_uid: str, sop: str) -> tuple[int, int] | None:
        """An instance's Rows and Columns from its header in the spool; None once gone."""
        rel = review.store.instance_path(study_uid, sop)
        if rel is None:
            return None
        try:
            path = Spool(settings.spool_dir, fsync=False).resolve(rel)
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
            return int(ds.Rows), int(ds.Columns)
        except (OSError, ValueError, AttributeError, InvalidDicomError):
            return None

    def _case_page(
        request: Request,
        item_id: int,
        *,
        error: str = "",
        notice: str = "",
        status: int = 200,
        submitted: dict[str, str] | None = None,
        amend: bool = False,
        filters: WorklistFilters | None = None,
    ) -> HTMLResponse:
        """The case page; ``submitted`` is the verdict form the node just refused, whose
        choices, reason and lesion boxes the page shows again. With ``amend`` a closed case's
        page offers the form that amends its verdict, starting from that verdict's finding and
        lesion boxes. ``filters``: those of the worklist the reader came from, where the
        next case is taken from and the reader goes back to."""
        case = _case_or_404(item_id)
        standing = current_verdict(case)
        amending = (
            amend and case["state"] == "closed" and standing is not None and not case["withdrawn"]
        )
        user: SessionInfo = request.state.user
        claim_s = settings.review.reading_claim_s
        # opened by a reader: theirs to read, unless another opened it a moment ago
        other_reader = review.store.open_for_reading(item_id, user.user_name, claim_s=claim_s)
        review.store.audit(
            user.user_name,
            "view_case",
            case["study_uid"],
            f"item {item_id}",
            address=_client_address(request),
        )
        summary = case["summary"]
        predicted = summary.get("predicted_label")
        heatmaps = {
            r["sop_instance_uid"]: r["path"] for r in case["results"] if r["kind"] == "heatmap"
        }
        results_root = Spool(settings.results_dir, fsync=False)
        model = summary.get("model") or {}
        uids = (
            result_uids(
                case["study_uid"], model["name"], model["version"], int(model.get("reissue", 0))
            )
            if model.get("name") and model.get("version")
            else None
        )
        images: list[dict[str, Any]] = []
        for im in summary.get("images") or []:
            sop = str(im.get("sop_instance_uid", ""))
            if not is_safe_uid(sop):
                continue
            frame = frame_number_of(im)
            heatmap = heatmaps.get(uids.heatmap_instance_uid(sop, frame)) if uids else None
            images.append(
                {
                    "sop": sop,
                    # how a verdict's lesion box names the image (see lesion_boxes)
                    "name": unit_name(sop, frame),
                    # a frame of a multi-frame image: its pictures are asked for by number
                    "frame": frame,
                    "query": f"?frame={frame}" if frame is not None else "",
                    "heatmap": heatmap is not None,
                    # its map kept (the colour map over any window), else the object itself
                    "overlay": heatmap is not None and _has_cam(results_root, heatmap),
                    "probability": float((im.get("probabilities") or {}).get(predicted, 0.0)),
                    "uncertainty": float(im.get("uncertainty_score", 0.0)),
                    "ood": float(im.get("ood_score", 0.0)),
                }
            )
        by_name = {im["name"]: im["sop"] for im in images}
        # the boxes the standing verdict kept, drawn over their images; a refused form's, again
        marked = marked_boxes(
            [standing] if standing is not None else [],
            set(by_name),
            lambda name: _image_size(case["study_uid"], by_name[name]),
        )
        if amending and submitted is None and standing is not None:
            # the amendment starts from the standing verdict: its boxes are the form's to edit
            submitted = {
                "action": standing["action"],
                "label": standing["label"],
                **{
                    f"box:{name}": ";".join(m["fractions"] for m in kept if m["fractions"])
                    for name, kept in marked.items()
                },
            }
        if amending:
            marked = {}
        draft = _verdict_draft(submitted or {}, set(by_name))
        for im in images:
            im["marked"] = marked.get(im["name"], [])
            im["drafted_box"] = draft["boxes"].get(im["name"], "")
        results = []
        for r in case["results"]:
            if r["kind"] not in ("sr", VERIFIED_SR_KIND):
                continue
            sr_summary: dict[str, Any] | None = None
            try:
                sr_summary = summarise_sr(dcmread(settings.results_dir / r["path"]))
            except Exception:
                sr_summary = None
            title = "AI result SR (unverified)"
            if r["kind"] == VERIFIED_SR_KIND:
                replaced = (
                    standing is None or r["sop_instance_uid"] != standing["sr_sop_instance_uid"]
                )
                title = "Verified SR, replaced by an amendment" if replaced else "Verified SR"
            results.append({**r, "title": title, "sr": sr_summary})
        probabilities = sorted(
            (summary.get("probabilities") or {}).items(), key=lambda kv: -float(kv[1])
        )
        return review.page(
            "case.html",
            request,
            status_code=status,
            case=case,
            header=review.case_header(case),
            summary=summary,
            u=summary.get("uncertainty") or {},
            probabilities=probabilities,
            images=images,
            leading=leading_images(images),
            # What the model did not read (a localizer, a colour or multi-frame image, the
            # images the route leaves out, ...), with the reason: the case's figures are the
            # other images' alone. Reasons several images share (a PET/CT's PET series left
            # out by a CT route: hundreds) are one line with their count.
            skipped=sorted(Counter((summary.get("skipped") or {}).values()).items()),
            skipped_count=len(summary.get("skipped") or {}),
            results=results,
            windows=window_choices(str(case.get("modality") or "")),
            heat_colours=settings.worker.heatmap_colours,
            heat_scale_words=LEGEND_WORDS[settings.worker.heatmap_colours],
            draft=draft,
            error=error,
            notice=notice,
            standing=standing,
            amending=amending,
            other_reader=other_reader,
            # the reader may leave an open case for the others (it is theirs while open)
            may_leave=case["state"] == "open" and claim_s > 0 and other_reader is None,
            list_query=(filters or WorklistFilters()).query(),
        )

    def _worklist_url(
        filters: WorklistFilters, *, page: int = 1, per_page: int = WORKLIST_PER_PAGE, **extra: str
    ) -> str:
        """The worklist under ``filters``, at ``page`` (``per_page`` a page), with ``extra``."""
        paging = {"page": str(page)} if page > 1 else {}
        if per_page != WORKLIST_PER_PAGE:
            paging["per_page"] = str(per_page)
        query = "&".join(q for q in (filters.query(), urlencode({**paging, **extra})) if q)
        return "/review/worklist" + (f"?{query}" if query else "")

    def _after_decision(request: Request, item_id: int, form: dict[str, str]) -> str:
        """Where a reader goes once the case is decided (or escalated, or left): with
        ``then=next`` the next case of the worklist they came from, else that worklist."""
        filters = WorklistFilters.from_query(form.get("list", ""))
        if form.get("then") == "next":
            user: SessionInfo = request.state.user
            following = review.store.next_case(
                user.user_name,
                after=item_id,
                filters=filters,
                claim_s=settings.review.reading_claim_s,
            )
            if following is not None:
                query = filters.query()
                return f"/review/cases/{following}" + (
                    f"?list={quote(query, safe='')}" if query else ""
                )
        return _worklist_url(filters)

    @app.get("/review/cases/{item_id}", include_in_schema=False)
    def case_page(
        request: Request,
        item_id: RowId,
        amend: bool = False,
        amended: bool = False,
        list: str = Query("", max_length=1000),  # noqa: A002 (the worklist's filters)
    ) -> HTMLResponse:
        notice = ""
        if amended:
            notice = AMENDED_NOTICE + (AMENDED_RIS_NOTICE if settings.hl7.ris is not None else "")
        return _case_page(
            request, item_id, amend=amend, notice=notice, filters=WorklistFilters.from_query(list)
        )

    @app.get("/review/cases/{item_id}/images/{sop}.png", include_in_schema=False)
    def case_image(
        item_id: RowId,
        sop: str,
        frame: int | None = Query(None, ge=1),
        window: str | None = Query(None, max_length=16),
    ) -> Response:
        case = _case_or_404(item_id)
        try:
            chosen = parse_window(window)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        rel = review.store.instance_path(case["study_uid"], sop) if is_safe_uid(sop) else None
        if rel is None:
            raise HTTPException(status_code=404, detail="no such image in this case")
        try:
            path = Spool(settings.spool_dir, fsync=False).resolve(rel)
            data = render_source_png(path, frame, chosen)
        except (OSError, ValueError) as exc:
            raise HTTPException(status_code=404, detail="image cannot be rendered") from exc
        return Response(data, media_type="image/png", headers=IMAGE_HEADERS)

    def _heatmap_of(case: dict[str, Any], sop: str, frame: int | None) -> tuple[Path, int, int]:
        """The heatmap object of image ``sop`` (frame ``frame``) of ``case``, and the source
        image's Rows and Columns; 404 when there is none."""
        model = case["summary"].get("model") or {}
        if not is_safe_uid(sop) or not model.get("name"):
            raise HTTPException(status_code=404, detail="no heatmap")
        wanted = result_uids(
            case["study_uid"], model["name"], model["version"], int(model.get("reissue", 0))
        )
        hm_uid = wanted.heatmap_instance_uid(sop, frame)
        paths = [
            r["path"]
            for r in case["results"]
            if r["kind"] == "heatmap" and r["sop_instance_uid"] == hm_uid
        ]
        rel = review.store.instance_path(case["study_uid"], sop)
        if not paths or rel is None:
            raise HTTPException(status_code=404, detail="no heatmap for this image")
        try:
            source = dcmread(
                Spool(settings.spool_dir, fsync=False).resolve(rel), stop_before_pixels=True
            )
            heatmap = Spool(settings.results_dir, fsync=False).resolve(paths[0])
            return heatmap, int(source.Rows), int(source.Columns)
        except (OSError, ValueError, AttributeError) as exc:
            raise HTTPException(status_code=404, detail="heatmap cannot be rendered") from exc

    @app.get("/review/cases/{item_id}/heatmaps/{sop}.png", include_in_schema=False)
    def case_heatmap(item_id: RowId, sop: str, frame: int | None = Query(None, ge=1)) -> Response:
        heatmap, rows, columns = _heatmap_of(_case_or_404(item_id), sop, frame)
        try:
            data = render_heatmap_png(heatmap, rows, columns)
        except (OSError, ValueError, AttributeError) as exc:
            raise HTTPException(status_code=404, detail="heatmap cannot be rendered") from exc
        return Response(data, media_type="image/png", headers=IMAGE_HEADERS)

    @app.get("/review/heatmap-scale.png", include_in_schema=False)
    def heatmap_scale() -> Response:
        """The heatmap's colour scale, 0 to 1 (the case page's legend), in the colour map of
        ``worker.heatmap_colours`` (the page asks with ``?map=<name>``: a browser that kept
        another map's scale asks anew)."""
        return Response(
            render_legend_png(settings.worker.heatmap_colours),
            media_type="image/png",
            headers={
                "Cache-Control": "private, max-age=86400",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @app.get("/review/cases/{item_id}/overlays/{sop}.png", include_in_schema=False)
    def case_overlay(item_id: RowId, sop: str, frame: int | None = Query(None, ge=1)) -> Response:
        """The heatmap's colour map alone, transparent elsewhere: drawn over the image in
        whatever window the reader chose."""
        heatmap, rows, columns = _heatmap_of(_case_or_404(item_id), sop, frame)
        cam = read_cam(heatmap)
        if cam is None:
            raise HTTPException(status_code=404, detail="no map kept for this heatmap")
        data = render_overlay_png(cam, rows, columns, settings.worker.heatmap_colours)
        return Response(data, media_type="image/png", headers=IMAGE_HEADERS)

    @app.post("/review/cases/{item_id}/verdict", include_in_schema=False)
    async def verdict(request: Request, item_id: RowId) -> Response:
        user: SessionInfo = request.state.user
        form = _form(await request.body())
        if not auth.csrf_ok(review.key, "session", user.token_hash, form.get("csrf_token")):
            return _forbidden(request, "invalid form token: reload the page")
        try:
            outcome = await run_in_threadpool(
                submit_verdict,
                settings,
                review.store,
                item_id,
                user,
                action=form.get("action", ""),
                label=form.get("label", ""),
                reason=form.get("reason", ""),
                marks=_marks(form),
            )
        except ReviewError as exc:
            message = str(exc)
            status = 409 if isinstance(exc, ItemClosed) else 400
            return await run_in_threadpool(
                partial(
                    _case_page,
                    request,
                    item_id,
                    error=message,
                    status=status,
                    submitted=form,
                    filters=WorklistFilters.from_query(form.get("list", "")),
                )
            )
        if outcome.action == "escalate" and form.get("then") != "next":
            return _redirect(request, f"/review/cases/{item_id}")
        where = await run_in_threadpool(_after_decision, request, item_id, form)
        return _redirect(request, where)

    @app.post("/review/cases/{item_id}/leave", include_in_schema=False)
    async def leave(request: Request, item_id: RowId) -> Response:
        """The reader leaves the open case undecided: the others see nobody reading it."""
        user: SessionInfo = request.state.user
        form = _form(await request.body())
        if not auth.csrf_ok(review.key, "session", user.token_hash, form.get("csrf_token")):
            return _forbidden(request, "invalid form token: reload the page")
        await run_in_threadpool(review.store.stop_reading, item_id, user.user_name)
        where = _worklist_url(WorklistFilters.from_query(form.get("list", "")))
        return _redirect(request, where)

    @app.post("/review/cases/{item_id}/amend", include_in_schema=False)
    async def amend(request: Request, item_id: RowId) -> Response:
        user: SessionInfo = request.state.user
        form = _form(await request.body())
        if not auth.csrf_ok(review.key, "session", user.token_hash, form.get("csrf_token")):
            return _forbidden(request, "invalid form token: reload the page")
        try:
            amends = int(form.get("amends", ""))
        except ValueError:
            amends = -1  # a form without the verdict it amends: refused below
        try:
            await run_in_threadpool(
                amend_verdict,
                settings,
                review.store,
                item_id,
                user,
                amends=amends,
                action=form.get("action", ""),
                label=form.get("label", ""),
                reason=form.get("reason", ""),
                marks=_marks(form),
            )
        except ReviewError as exc:
            stale = isinstance(exc, VerdictAmended)
            return await run_in_threadpool(
                partial(
                    _case_page,
                    request,
                    item_id,
                    error=str(exc),
                    status=409 if stale else 400,
                    # a stale form is not shown again: the page shows the verdict that stands
                    submitted=None if stale else form,
                    amend=not stale,
                )
            )
        return _redirect(request, f"/review/cases/{item_id}?amended=1")

    return review


def _disk_free_percent(path: Path) -> float | None:
    """Free space of the data directory's file system, in percent (None if unknown)."""
    try:
        return disk_space(path).free_percent
    except OSError:
        return None


#: The case page's message after an amendment.
AMENDED_NOTICE = (
    "The verdict is amended: its new verified SR is queued for the case's destinations."
)
AMENDED_RIS_NOTICE = " The RIS gets the amended verdict as a corrected result."

#: The dashboard's message after an administrator's action on a study.
#: How many studies the studies page lists at most.
STUDIES_SHOWN = 100

#: An administrator's actions on a study's page, and the states that allow each.
STUDY_ACTIONS = (
    ("resend", "Resend its results", {"delivered", "failed"}),
    ("reprocess", "Reprocess", {"delivered", "failed", "not_routed"}),
)


def _result_line(study: dict[str, Any]) -> str:
    """What the studies page says of a study's latest analysis (or why there is none)."""
    if study["reason"]:
        return str(study["reason"])
    for job in reversed(study["jobs"]):
        summary = job.get("summary") or {}
        label = summary.get("predicted_label")
        if label:
            p = (summary.get("probabilities") or {}).get(label)
            line = f"{job['route']}: {label}" + (f" (p={p:.2f})" if isinstance(p, float) else "")
            return line + ("; needs review" if summary.get("needs_review") else "")
    return ""


#: The cookie that keeps a reader's worklist from reloading itself (``reload=off``), and for
#: how long (seconds): the browser's, for a year, till ``reload=on``.
WORKLIST_RELOAD_COOKIE = "acwi_worklist_reload"
WORKLIST_RELOAD_COOKIE_AGE = 365 * 24 * 3600
WORKLIST_RELOAD_NOTICES = {
    "off": "The worklist no longer reloads itself: reload the page for new cases.",
    "on": "The worklist reloads itself again.",
}

STUDY_ACTION_NOTICES = {
    "resend": "The study's results are back in the outbox.",
    "reprocess": "The study is being routed and analysed again.",
    "withdraw": "Its results are withdrawn: the rejection notes are on their way to the PACS.",
    "retrieve": "The retrieval is queued: the study comes from the PACS and is analysed.",
}


def _marks(form: dict[str, str]) -> dict[str, str]:
    """The verdict form's ``box:<image name>`` fields: the lesion boxes drawn on each image."""
    return {k[4:]: v for k, v in form.items() if k.startswith("box:") and v.strip()}


def _verdict_draft(form: dict[str, str], images: set[str]) -> dict[str, Any]:
    """What a refused verdict form said, for the page to show again: the action, the label,
    the reason and the lesion boxes it can draw (see
    :func:`~acwi_node.review.lesion_boxes.drafted_boxes`); empty values for a fresh page."""
    return {
        "action": form.get("action", ""),
        "label": form.get("label", ""),
        "reason": form.get("reason", ""),
        "boxes": drafted_boxes(_marks(form), images),
    }


def _forbidden(request: Request, message: str) -> Response:
    """A refused form (its token expired or forged): a page in the app's language and style,
    with a heading, the reason and the way back, as the other error pages are."""
    root = _escape(root_path(request.scope))
    return HTMLResponse(
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        "<title>Forbidden - ACWI Node review</title>\n"
        f'<link rel="stylesheet" href="{root}/static/review.css">\n</head>\n<body>\n'
        f'<main>\n<h1>Forbidden</h1>\n<p role="alert">{_escape(message)}</p>\n'
        f'<p><a href="{root}/review/worklist">Back to the worklist</a></p>\n</main>\n'
        "</body>\n</html>\n",
        status_code=403,
        headers=SECURITY_HEADERS,
    )


def _escape(text: str) -> str:
    from markupsafe import escape

    return str(escape(text))


def _redirect(request: Request, path: str) -> RedirectResponse:
    """A 303 to the app's ``path`` (``/review/worklist?...``), under the root path the app is
    published at (:func:`~acwi_node.web.paths.root_path`)."""
    return RedirectResponse(root_path(request.scope) + path, status_code=303)


def _set_cookie(
    request: Request, response: Response, name: str, value: str, max_age: int, secure: bool
) -> None:
    """A cookie of the whole app (under its root path), kept from scripts and other sites."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=cookie_path(request.scope),
        secure=secure,
        httponly=True,
        samesite="strict",
    )


__all__ = ["ReviewApp", "display_size", "install_review", "render_source_png"]
