"""Local accounts, password hashing, sessions and CSRF tokens of the review web app.

* Passwords are hashed with scrypt (``hashlib.scrypt``, N=2^14, r=8, p=1, 16-byte salt) and
  stored as ``scrypt$N$r$p$salt$hash`` (base64); verification is constant-time.
* A session is a random 256-bit token in an HttpOnly, SameSite=Strict cookie; the ledger keeps
  only its SHA-256. It ends after ``[review] session_lifetime_s``, after ``idle_timeout_s``
  without a request, on sign-out, or when the user is disabled.
* HTTP Basic credentials (the JSON API, STOW-RS) verified once are remembered for
  ``[review] basic_auth_cache_s`` (:class:`VerifiedCredentials`), so that a client sending many
  requests pays the scrypt verification (some 35 ms of CPU) once, not per request.
* Failed sign-ins (form or HTTP Basic) slow the next attempts for the same user name down
  (:class:`SignInThrottle`): after ``[review] sign_in_free_failures`` in a row, each further
  attempt waits twice as long as the one before, up to ``sign_in_max_delay_s``, and one made
  sooner is refused unchecked (429). A browser that signed in as that user before holds a
  device cookie (:func:`remember_device`) and is held to its own count instead, so that
  someone guessing at a user name cannot keep its owner from signing in at their workstation.
* Every POST carries a CSRF token: an HMAC (key from ``[review] secret_key_file``) of the
  session token, or of a random pre-sign-in cookie for the sign-in form itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from acwi_node.ingest.spool import fsync_dir

SESSION_COOKIE = "acwi_session"
LOGIN_COOKIE = "acwi_login"
#: The cookie a browser that signed in keeps (sent to ``/login`` alone): its sign-ins are
#: throttled on their own, not by the failures of whoever guesses at the same user name.
DEVICE_COOKIE = "acwi_device"
DEVICE_COOKIE_PATH = "/login"
#: How long a browser is remembered after its last sign-in, in seconds (a year).
DEVICE_COOKIE_MAX_AGE = 365 * 86_400
#: How many user names one browser is remembered for (a reading room's shared workstation).
DEVICE_NAMES = 8
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-^")


class PasswordError(ValueError):
    """A password that does not meet the policy."""


def check_user_name(name: str) -> str:
    """A user name: 1-64 of letters, digits and ``. _ - ^`` (``^`` separates DICOM name parts)."""
    if not 1 <= len(name) <= 64 or not set(name) <= _NAME_CHARS:
        raise ValueError("user name: 1-64 characters, letters, digits and . _ - ^ only")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise PasswordError(f"password: at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise PasswordError(f"password: at most {MAX_PASSWORD_LENGTH} characters")
    return password


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The storable scrypt hash of ``password``."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored``; False for any malformed hash."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(digest_b64, validate=True)
        actual = hashlib.scrypt(
            password.encode("utf-8"),
            salt=salt,
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=64 * 1024 * 1024,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


#: Checked against when the user does not exist, so timing does not reveal valid names.
DUMMY_HASH = hash_password("not-a-real-password", salt=b"\0" * 16)


class VerifiedCredentials:
    """HTTP Basic credentials that verified recently, each for ``ttl_s`` seconds.

    An entry is keyed by an HMAC of the user name and password under a key made at random for
    this process (the password is never kept, nor anything that could be checked against it
    elsewhere) and holds the stored hash it verified against: it counts only while the
    account's hash is still that one, so a changed password ends it at once; the caller still
    looks the account up for every request (disabled, role). Failures are never remembered:
    every wrong guess costs a full verification. At most ``max_entries``, the oldest evicted
    first; ``ttl_s`` 0 remembers nothing."""

    def __init__(
        self,
        ttl_s: float,
        *,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._key = os.urandom(32)
        self._entries: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _digest(self, name: str, password: str) -> bytes:
        message = name.encode("utf-8") + b"\0" + password.encode("utf-8")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def known(self, name: str, password: str, stored: str) -> bool:
        """Whether these credentials verified against ``stored`` less than ``ttl_s`` ago."""
        if self.ttl_s <= 0:
            return False
        digest = self._digest(name, password)
        with self._lock:
            entry = self._entries.get(digest)
            return (
                entry is not None
                and entry[1] > self._clock()
                and hmac.compare_digest(entry[0], stored)
            )

    def verify(self, name: str, password: str, stored: str) -> bool:
        """:func:`verify_password`, answered from memory for credentials that verified
        against ``stored`` less than ``ttl_s`` ago."""
        if self.known(name, password, stored):
            return True
        if not verify_password(password, stored):
            return False
        if self.ttl_s <= 0:
            return True
        digest = self._digest(name, password)
        with self._lock:
            self._entries[digest] = (stored, self._clock() + self.ttl_s)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._entries)


class SignInThrottle:
    """Failed sign-ins slow down the next attempts for the same user name.

    The first ``free_failures`` failures in a row cost nothing; after them, an attempt must
    wait ``2 ** (failures - free_failures)`` seconds from the last failure, at most
    ``max_delay_s`` (0: no throttling); an attempt made sooner is refused without checking its
    password, so that guessing is held to about one password per ``max_delay_s``. A success
    clears an account's count (in the ledger). A delay, not a lockout: the account opens
    again ``max_delay_s`` after its last failure, and sessions already open are not touched.

    An account's failures are kept in the ledger (shared by every web process, kept across
    restarts: the review app calls :meth:`wait_after` with them); names that are no account
    are counted here, in memory, per process, for at most ``max_names`` of them (the longest
    quiet first out), and delayed alike, so the answers do not tell which names exist.
    ``clock``: seconds since the epoch (the ledger keeps when a failure was)."""

    def __init__(
        self,
        free_failures: int,
        max_delay_s: float,
        *,
        max_names: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.free_failures = free_failures
        self.max_delay_s = max_delay_s
        self.max_names = max_names
        self.clock = clock
        #: name -> (failures in a row, time of the last one)
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def delay_s(self, failures: int) -> float:
        """How long after the last of ``failures`` failures in a row the next attempt waits."""
        if self.max_delay_s <= 0 or failures < self.free_failures:
            return 0.0
        return float(min(2 ** min(failures - self.free_failures, 30), self.max_delay_s))

    def wait_after(self, failures: int, last: float) -> float:
        """Seconds left to wait after ``failures`` in a row, the last at ``last`` (0: none).

        Never more than the delay: a clock a little behind (another web host's) waits the
        delay. A last failure further ahead of now than any delay was timed on a wall clock
        since set back (NTP stepping a clock that ran fast): its delay is taken as over, rather
        than shutting the account until the clock catches up; the next failure is timed anew.
        """
        if not failures:
            return 0.0
        now = self.clock()
        if last - now > self.max_delay_s:
            return 0.0
        delay = self.delay_s(failures)
        return min(delay, max(0.0, last + delay - now))

    def wait_s(self, name: str) -> float:
        """Seconds before ``name`` (counted here) may try again (0: now)."""
        with self._lock:
            found = self._failures.get(name)
        return 0.0 if found is None else self.wait_after(*found)

    def succeeded(self, name: str) -> None:
        """Clear ``name``'s count (counted here)."""
        with self._lock:
            self._failures.pop(name, None)

    def failed(self, name: str) -> int:
        """Count a failure for ``name``; the failures in a row so far."""
        with self._lock:
            failures = self._failures.get(name, (0, 0.0))[0] + 1
            self._failures[name] = (failures, self.clock())
            self._failures.move_to_end(name)
            while len(self._failures) > self.max_names:
                self._failures.popitem(last=False)
        return failures


class SignInThrottled(Exception):
    """An attempt to sign in that came before its user name's delay was over."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"too many failed sign-ins: try again in {wait_s:.0f} s")
        self.wait_s = wait_s


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def load_secret_key(path: Path, what: str = "the review secret key") -> bytes:
    """A secret key (the CSRF signing key, the feedback export's de-identification key),
    created (0600, 32 random bytes) when the file does not exist."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
            fh.flush()
            # on disk before it is named: a crash after the link left an empty key, which
            # stopped the web process from starting (and a de-identification key that changed
            # would give the same patient another pseudonym in the next feedback export)
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # never replaces a key another process just wrote
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        fsync_dir(path.parent)  # the name too
    key = path.read_bytes()
    if len(key) < 16:
        raise ValueError(f"{path}: {what} must hold at least 16 bytes")
    return key


def _device_mac(key: bytes, name: str, nonce: str) -> str:
    mac = hmac.new(key, f"device\0{name}\0{nonce}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode("ascii").rstrip("=")


def known_device(key: bytes, cookie: str, name: str) -> str | None:
    """The device id (its nonce) of the :data:`DEVICE_COOKIE` token in ``cookie`` that a
    sign-in as ``name`` gave this browser; None when it holds none (or a forged one).

    A device cookie proves no identity: it only says that this browser signed in as ``name``
    before, so that its attempts are throttled by their own failures
    (:class:`SignInThrottle` keyed by the device id) rather than by the user name's, which
    anyone may drive up by guessing."""
    if not name:
        return None
    for token in cookie.split("~")[:DEVICE_NAMES]:
        nonce, _, mac = token.partition(".")
        if nonce and hmac.compare_digest(
            _device_mac(key, name, nonce).encode("ascii"), mac.encode("utf-8", "replace")
        ):
            return nonce
    return None


def remember_device(key: bytes, cookie: str, name: str) -> str:
    """The :data:`DEVICE_COOKIE` value after a sign-in as ``name`` from a browser that sent
    ``cookie``: a fresh token for ``name`` first, the tokens of the other names it held after
    it (at most :data:`DEVICE_NAMES` in all, the oldest dropped)."""
    nonce = secrets.token_urlsafe(16)
    kept = [
        token
        for token in cookie.split("~")[:DEVICE_NAMES]
        if token and known_device(key, token, name) is None
    ]
    return "~".join([f"{nonce}.{_device_mac(key, name, nonce)}", *kept][:DEVICE_NAMES])


def csrf_token(key: bytes, purpose: str, bound_to: str) -> str:
    """The CSRF token for a form bound to a session (or pre-sign-in) token."""
    mac = hmac.new(key, f"{purpose}\0{bound_to}".encode(), hashlib.sha256)
    return mac.hexdigest()


def csrf_ok(key: bytes, purpose: str, bound_to: str, presented: str | None) -> bool:
    """Whether ``presented`` is the form's token; False for any other text (compared as
    bytes: ``hmac.compare_digest`` refuses a string with a character beyond ASCII)."""
    if not presented or not bound_to:
        return False
    expected = csrf_token(key, purpose, bound_to).encode("ascii")
    return hmac.compare_digest(expected, presented.encode("utf-8", "replace"))
