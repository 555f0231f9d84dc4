"""Local accounts, password hashing, sessions and CSRF tokens of the review web app.

* Passwords are hashed with scrypt (``hashlib.scrypt``, N=2^14, r=8, p=1, 16-byte salt) and
  stored as ``scrypt$N$r$p$salt$hash`` (base64); verification is constant-time.
* A session is a random 256-bit token in an HttpOnly, SameSite=Strict cookie; the ledger keeps
  only its SHA-256. It ends after ``[review] session_lifetime_s``, after ``idle_timeout_s``
  without a request, on sign-out, or when the user is disabled.
* HTTP Basic credentials (the JSON API, STOW-RS) verified once are remembered for
  ``[review] basic_auth_cache_s`` (:class:`VerifiedCredentials`), so that a client sending many
  requests pays the scrypt verification (some 35 ms of CPU) once, not per request.
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

SESSION_COOKIE = "acwi_session"
LOGIN_COOKIE = "acwi_login"
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

    def verify(self, name: str, password: str, stored: str) -> bool:
        """:func:`verify_password`, answered from memory for credentials that verified
        against ``stored`` less than ``ttl_s`` ago."""
        if self.ttl_s <= 0:
            return verify_password(password, stored)
        digest = self._digest(name, password)
        now = self._clock()
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None and entry[1] > now and hmac.compare_digest(entry[0], stored):
                return True
        if not verify_password(password, stored):
            return False
        with self._lock:
            self._entries[digest] = (stored, now + self.ttl_s)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._entries)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def load_secret_key(path: Path) -> bytes:
    """The CSRF signing key, created (0600, 32 random bytes) when the file does not exist."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # never replaces a key another process just wrote
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = path.read_bytes()
    if len(key) < 16:
        raise ValueError(f"{path}: the review secret key must hold at least 16 bytes")
    return key


def csrf_token(key: bytes, purpose: str, bound_to: str) -> str:
    """The CSRF token for a form bound to a session (or pre-sign-in) token."""
    mac = hmac.new(key, f"{purpose}\0{bound_to}".encode(), hashlib.sha256)
    return mac.hexdigest()


def csrf_ok(key: bytes, purpose: str, bound_to: str, presented: str | None) -> bool:
    if not presented or not bound_to:
        return False
    return hmac.compare_digest(csrf_token(key, purpose, bound_to), presented)
