"""Review app accounts: password hashing, sessions that expire, CSRF tokens, the secret key."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest

from acwi_node.ledger import Ledger
from acwi_node.ledger.models import utcnow
from acwi_node.review import auth
from acwi_node.review.store import ReviewError, ReviewStore, UserExists


def test_hash_round_trip_and_salt() -> None:
    first = auth.hash_password("correct horse battery")
    second = auth.hash_password("correct horse battery")
    assert first != second  # random salt
    assert first.startswith("scrypt$16384$8$1$")
    assert "correct horse" not in first
    assert auth.verify_password("correct horse battery", first)
    assert auth.verify_password("correct horse battery", second)
    assert not auth.verify_password("correct horse batterY", first)
    assert not auth.verify_password("", first)


@pytest.mark.parametrize(
    "stored",
    ["", "plain", "md5$abc", "scrypt$16384$8$1$!!$??", "scrypt$x$8$1$AAAA$AAAA", auth.DUMMY_HASH],
)
def test_malformed_or_foreign_hashes_never_verify(stored: str) -> None:
    assert not auth.verify_password("correct horse battery", stored)


def test_password_and_name_policy() -> None:
    with pytest.raises(auth.PasswordError):
        auth.check_password("short")
    assert auth.check_password("long enough pass") == "long enough pass"
    assert not auth.verify_password("x" * (auth.MAX_PASSWORD_LENGTH + 1), auth.DUMMY_HASH)
    for bad in ("", "a b", "x" * 65, "<script>", "ann;drop"):
        with pytest.raises(ValueError):
            auth.check_user_name(bad)
    assert auth.check_user_name("Doe^Jane") == "Doe^Jane"


def test_csrf_tokens_are_bound() -> None:
    key = b"k" * 32
    token = auth.csrf_token(key, "session", "abc")
    assert auth.csrf_ok(key, "session", "abc", token)
    assert not auth.csrf_ok(key, "session", "abd", token)  # another session
    assert not auth.csrf_ok(key, "login", "abc", token)  # another purpose
    assert not auth.csrf_ok(b"K" * 32, "session", "abc", token)  # another key
    assert not auth.csrf_ok(key, "session", "abc", None)
    assert not auth.csrf_ok(key, "session", "", auth.csrf_token(key, "session", ""))


def test_secret_key_created_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "review-secret.key"
    key = auth.load_secret_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.load_secret_key(path) == key
    (tmp_path / "short.key").write_bytes(b"abc")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        auth.load_secret_key(tmp_path / "short.key")


def test_users(ledger: Ledger) -> None:
    store = ReviewStore(ledger)
    store.add_user("jane", auth.hash_password("correct horse battery"), "radiologist")
    with pytest.raises(UserExists):
        store.add_user("jane", auth.hash_password("another one 123"), "admin")
    with pytest.raises(ReviewError, match="role"):
        store.add_user("bob", auth.hash_password("correct horse battery"), "root")
    assert [(u.name, u.role, u.disabled) for u in store.list_users()] == [
        ("jane", "radiologist", False)
    ]
    assert store.set_disabled("jane")
    assert not store.set_disabled("nobody")
    user = store.get_user("jane")
    assert user is not None and user.disabled


def test_session_lifetime_idle_timeout_and_disable(ledger: Ledger) -> None:
    store = ReviewStore(ledger)
    user = store.add_user("jane", auth.hash_password("correct horse battery"), "radiologist")
    start = utcnow()
    lifetime_s, idle_s = 3600, 600

    token = auth.token_hash(auth.new_token())
    store.create_session(user.id, token, lifetime_s)
    live = store.session_user(token, idle_timeout_s=idle_s, now=start + dt.timedelta(seconds=5))
    assert live is not None and live.user_name == "jane" and live.role == "radiologist"
    # Kept alive by use every 9 minutes, but never past the lifetime.
    for minutes in range(9, 60, 9):
        at = start + dt.timedelta(minutes=minutes)
        assert store.session_user(token, idle_timeout_s=idle_s, now=at) is not None
    at = start + dt.timedelta(seconds=lifetime_s + 1)
    assert store.session_user(token, idle_timeout_s=idle_s, now=at) is None
    # Once expired, the session is gone for good.
    assert store.session_user(token, idle_timeout_s=idle_s, now=start) is None

    idle = auth.token_hash(auth.new_token())
    store.create_session(user.id, idle, lifetime_s)
    at = utcnow() + dt.timedelta(seconds=idle_s + 1)
    assert store.session_user(idle, idle_timeout_s=idle_s, now=at) is None

    other = auth.token_hash(auth.new_token())
    store.create_session(user.id, other, lifetime_s)
    assert store.session_user(other, idle_timeout_s=idle_s) is not None
    store.set_disabled("jane")
    assert store.session_user(other, idle_timeout_s=idle_s) is None

    assert store.session_user("unknown", idle_timeout_s=idle_s) is None
