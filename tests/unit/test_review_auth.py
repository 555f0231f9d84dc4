"""Review app accounts: password hashing, sessions that expire, CSRF tokens, the secret key."""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import select

from acwi_node import cli
from acwi_node.config import Settings, load_settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import WebSession, utcnow
from acwi_node.review import auth
from acwi_node.review.store import ReviewError, ReviewStore, UserExists
from acwi_node.web.api import create_app
from tests.support.asgi import post_then_hang_up
from tests.support.review_case import CSRF, PASSWORD, add_user, sign_in


def basic(name: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


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


def test_a_new_secret_key_is_on_disk_before_it_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key was linked into place unflushed: a crash just after left an empty key file,
    which the web process refused at its next start (and a new de-identification key would
    give patients other pseudonyms)."""
    done: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        done.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def link(source: str | Path, target: str | Path) -> None:
        done.append("link")
        real_link(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    auth.load_secret_key(tmp_path / "review-secret.key")
    assert done == ["fsync file", "link", "fsync dir"]


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


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passwords :func:`auth.verify_password` checks (by scrypt) from now on."""
    checked: list[str] = []
    real = auth.verify_password

    def counting(password: str, stored: str) -> bool:
        checked.append(password)
        return real(password, stored)

    monkeypatch.setattr(auth, "verify_password", counting)
    return checked


def test_verified_credentials_are_remembered_for_a_while(verifications: list[str]) -> None:
    """A verified password is answered from memory until its time is up or the stored hash
    changes; a wrong one is verified every time; the oldest entries go first."""
    stored = auth.hash_password("correct horse battery")
    verified = verifications
    now = [1000.0]
    cache = auth.VerifiedCredentials(300, max_entries=2, clock=lambda: now[0])
    assert cache.verify("jane", "correct horse battery", stored)
    assert cache.verify("jane", "correct horse battery", stored)
    assert len(verified) == 1
    for _ in range(2):  # failures are never remembered
        assert not cache.verify("jane", "wrong password 123", stored)
    assert len(verified) == 3
    assert cache.verify("bob", "correct horse battery", stored)  # another name: verified
    assert len(verified) == 4
    # A changed password: the remembered verification no longer counts.
    changed = auth.hash_password("a new password 456")
    assert not cache.verify("jane", "correct horse battery", changed)
    assert cache.verify("jane", "a new password 456", changed)
    verified.clear()
    now[0] += 299
    assert cache.verify("jane", "a new password 456", changed) and verified == []
    now[0] += 2  # past its time: verified again
    assert cache.verify("jane", "a new password 456", changed) and len(verified) == 1
    # Bounded: a third account's entry evicts the oldest.
    other = auth.hash_password("third password 789")
    assert cache.verify("ann", "third password 789", other)
    assert cache.verify("eve", "third password 789", other)
    assert len(cache) == 2
    verified.clear()
    assert cache.verify("jane", "a new password 456", changed) and len(verified) == 1
    # No password is kept in memory, only keyed digests and the stored hashes.
    assert "a new password 456" not in repr(cache._entries)
    # Off: every request verifies.
    off = auth.VerifiedCredentials(0)
    verified.clear()
    assert off.verify("jane", "a new password 456", changed)
    assert off.verify("jane", "a new password 456", changed)
    assert len(verified) == 2 and len(off) == 0


def test_basic_credentials_verified_once(
    verifications: list[str], ledger_node: tuple[Settings, Ledger]
) -> None:
    """The API with HTTP Basic: one scrypt verification for a client's requests; a password
    set with ``users passwd`` (store.set_password) refuses the old one at once, and a disabled
    account is refused even though its credentials were remembered."""
    settings, ledger = ledger_node
    add_user(ledger, "script", role="admin")
    client = TestClient(create_app(settings, ledger), base_url="https://node.example")
    calls = verifications

    def get(password: str) -> int:
        return client.get("/api/studies", headers=basic("script", password)).status_code

    assert [get(PASSWORD) for _ in range(5)] == [200] * 5
    assert len(calls) == 1
    store = ReviewStore(ledger)
    assert store.set_password("script", auth.hash_password("the new password 1"))
    assert get(PASSWORD) == 401
    assert get("the new password 1") == 200
    assert store.set_disabled("script")
    assert get("the new password 1") == 401


def test_users_passwd_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "acwi-node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    monkeypatch.setattr("sys.stdin", io.StringIO("first password 1\n"))
    assert cli.main(["--config", str(config), "users", "add", "jane", "--password-stdin"]) == 0
    ledger = Ledger(load_settings(config).database_url)
    store = ReviewStore(ledger)
    user = store.get_user("jane")
    assert user is not None
    session = auth.token_hash(auth.new_token())
    store.create_session(user.id, session, 3600)

    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert cli.main(["--config", str(config), "users", "passwd", "jane", "--password-stdin"]) == 1
    assert "at least" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("second password 2\n"))
    assert cli.main(["--config", str(config), "users", "passwd", "jane", "--password-stdin"]) == 0
    changed = store.get_user("jane")
    assert changed is not None
    assert auth.verify_password("second password 2", changed.password_hash)
    assert not auth.verify_password("first password 1", changed.password_hash)
    assert store.session_user(session, idle_timeout_s=600) is None  # signed out
    assert "user_password_set" in [e["action"] for e in store.audit_events()]
    # an unknown user is said at once, before a password is asked for (one line, exit 1)
    typed = io.StringIO("second password 2\n")
    monkeypatch.setattr("sys.stdin", typed)
    assert cli.main(["--config", str(config), "users", "passwd", "nobody", "--password-stdin"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "acwi-node users passwd: no user 'nobody'"
    assert typed.read() == "second password 2\n"  # nothing read
    ledger.dispose()


def test_sign_in_throttle_delays_grow_and_clear() -> None:
    now = [0.0]
    throttle = auth.SignInThrottle(3, 8, max_names=2, clock=lambda: now[0])
    for failures in (1, 2):
        assert throttle.failed("jane") == failures
        assert throttle.wait_s("jane") == 0  # the first failures cost nothing
    waits = []
    for _ in range(6):
        throttle.failed("jane")
        waits.append(throttle.wait_s("jane"))
        now[0] += waits[-1]  # the next attempt comes when it may, and fails again
        assert throttle.wait_s("jane") == 0
    assert waits == [1, 2, 4, 8, 8, 8]  # doubling, up to the most
    throttle.failed("jane")
    now[0] += 3
    assert throttle.wait_s("jane") == 5
    assert throttle.wait_s("bob") == 0  # per user name
    for name in ("a", "b", "c"):  # bounded: the longest quiet name goes first
        throttle.failed(name)
    assert len(throttle._failures) == 2 and "a" not in throttle._failures
    off = auth.SignInThrottle(3, 0, clock=lambda: now[0])
    for _ in range(10):
        off.failed("jane")
    assert off.wait_s("jane") == 0


def test_a_clock_set_back_does_not_lengthen_the_sign_in_delay() -> None:
    """NTP steps the wall clock back an hour after failed sign-ins (the ledger keeps when the
    last one was, in wall time): the account is not shut until the clock catches up; the next
    failure is delayed as before. A clock a few seconds behind waits the delay, no longer."""
    now = [10_000.0]
    throttle = auth.SignInThrottle(3, 60, clock=lambda: now[0])
    for _ in range(10):
        throttle.failed("jane")
    assert throttle.wait_s("jane") == 60
    assert throttle.wait_after(10, last=now[0] + 5) == 60  # another host's clock, ahead
    now[0] -= 3600
    assert throttle.wait_s("jane") == 0
    assert throttle.wait_after(10, last=now[0] + 3600) == 0  # an account's, from the ledger
    throttle.failed("jane")
    assert throttle.wait_s("jane") == 60  # timed on the clock as it is now


def test_failed_sign_ins_slow_the_next_down(
    ledger_node: tuple[Settings, Ledger], caplog: pytest.LogCaptureFixture
) -> None:
    """The sign-in form and HTTP Basic: after five failures for a user name, an attempt before
    its delay is over gets 429 with Retry-After and its password is not looked at (not even
    the right one); once the delay is over the right password signs in and clears the count.
    A client whose credentials verified a moment ago keeps working meanwhile."""
    settings, ledger = ledger_node
    add_user(ledger, "jane.doe", role="radiologist")
    add_user(ledger, "pacs", role="sender")
    app = create_app(settings, ledger)
    now = [1000.0]
    app.state.review.throttle.clock = lambda: now[0]
    client = TestClient(app, base_url="https://node.example")

    def form(password: str) -> Any:
        page = client.get("/login")
        token = CSRF.search(page.text)
        assert token is not None
        return client.post(
            "/login",
            data={"csrf_token": token.group(1), "username": "jane.doe", "password": password},
            follow_redirects=False,
        )

    def counted(name: str, method: str) -> float:
        return REGISTRY.get_sample_value(f"acwi_web_{name}_total", {"method": method}) or 0.0

    failed_before = counted("sign_in_failures", "form")
    throttled_before = counted("sign_ins_throttled", "basic")
    assert [form(f"wrong password {i}").status_code for i in range(5)] == [401] * 5
    assert counted("sign_in_failures", "form") == failed_before + 5
    assert "5 failed sign-ins in a row for user name 'jane.doe'" in caplog.text
    throttled = form(PASSWORD)
    assert throttled.status_code == 429
    assert throttled.headers["retry-after"] == "1"
    assert "try again in 1 s" in throttled.text
    actions = [(e["action"], e["detail"]) for e in ReviewStore(ledger).audit_events()]
    assert actions[0] == ("login_failed", "throttled")
    now[0] += 1
    assert form(PASSWORD).status_code == 303  # the delay is over: signed in, count cleared
    jane = ReviewStore(ledger).get_user("jane.doe")
    assert jane is not None and (jane.failed_sign_ins, jane.last_failed_sign_in_at) == (0, None)

    # HTTP Basic: the PACS's client has verified; then someone guesses at its account.
    pacs = TestClient(app, base_url="https://node.example")
    guesser = TestClient(app, base_url="https://node.example")
    body = b"--b--\r\n"
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    stored = pacs.post("/dicomweb/studies", content=body, headers=headers | basic("pacs", PASSWORD))
    assert stored.status_code == 400  # authenticated (an empty body)
    statuses = [
        guesser.get("/api/studies", headers=basic("pacs", f"guess number {i}")).status_code
        for i in range(7)
    ]
    assert statuses == [401] * 5 + [429] * 2
    assert counted("sign_ins_throttled", "basic") == throttled_before + 2
    failures = [e for e in ReviewStore(ledger).audit_events() if e["detail"] == "HTTP Basic"]
    assert [(e["action"], e["user"]) for e in failures] == [("login_failed", "pacs")] * 5
    again = pacs.post("/dicomweb/studies", content=body, headers=headers | basic("pacs", PASSWORD))
    assert again.status_code == 400  # remembered credentials pass while the name waits
    late = TestClient(app, base_url="https://node.example")
    app.state.review.credentials = auth.VerifiedCredentials(300)  # as after a restart
    answer = late.get("/api/studies", headers=basic("pacs", PASSWORD))
    assert answer.status_code == 429 and int(answer.headers["retry-after"]) >= 1


def test_a_device_cookie_remembers_the_latest_names() -> None:
    """A shared workstation's browser is remembered for its last 8 user names, each token
    bound to its name by the key; signing in again replaces that name's token."""
    key = b"k" * 32
    cookie = ""
    for i in range(9):
        cookie = auth.remember_device(key, cookie, f"user{i}")
    assert auth.known_device(key, cookie, "user0") is None  # the oldest dropped
    assert all(auth.known_device(key, cookie, f"user{i}") for i in range(1, 9))
    again = auth.remember_device(key, cookie, "user5")
    assert len(again.split("~")) == 8
    assert auth.known_device(key, again, "user5") not in (
        None,
        auth.known_device(key, cookie, "user5"),
    )
    assert auth.known_device(b"another key....." * 2, cookie, "user1") is None
    assert auth.known_device(key, cookie, "") is None


def test_a_guesser_cannot_shut_a_reader_out_of_their_own_browser(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """Someone who tries a wrong password for a reader's user name each time its delay ends
    kept the reader from signing in at all (every try of theirs 429, for as long as the
    guessing went on). A browser that signed in as that user before holds a device cookie
    and is held to its own failures: it signs in while the name waits for everyone else. The
    cookie is the sign-in page's alone, HttpOnly and SameSite=Strict, bound by the node's key
    to the name (it does nothing for another name, nor forged), and a browser that guesses
    with it is slowed down like anyone."""
    settings, ledger = ledger_node
    add_user(ledger, "jane.doe", role="radiologist")
    add_user(ledger, "ada", role="admin")
    app = create_app(settings, ledger)
    now = [1000.0]
    app.state.review.throttle.clock = lambda: now[0]
    reader = TestClient(app, base_url="https://node.example")
    guesser = TestClient(app, base_url="https://node.example")

    def form(client: TestClient, password: str, name: str = "jane.doe") -> Any:
        page = client.get("/login")
        token = CSRF.search(page.text)
        assert token is not None
        return client.post(
            "/login",
            data={"csrf_token": token.group(1), "username": name, "password": password},
            follow_redirects=False,
        )

    signed_in = form(reader, PASSWORD)
    assert signed_in.status_code == 303
    cookie = next(c for c in signed_in.headers.get_list("set-cookie") if "acwi_device=" in c)
    assert "Path=/login" in cookie and "HttpOnly" in cookie and "Secure" in cookie
    assert "samesite=strict" in cookie.lower()
    reader.cookies.delete("acwi_session")  # signed out; the browser remembers the device

    for second in range(120):  # a wrong guess every second, for two minutes
        now[0] += 1
        assert form(guesser, f"guess {second}").status_code in (401, 429)
    assert form(guesser, PASSWORD).status_code == 429  # the name waits for the guesser
    assert form(TestClient(app, base_url="https://node.example"), PASSWORD).status_code == 429
    assert form(reader, PASSWORD).status_code == 303  # but not in the reader's browser

    forged = TestClient(app, base_url="https://node.example")
    forged.cookies.set("acwi_device", "nonce.bm90LXRoZS1tYWM", path="/login")
    assert form(forged, PASSWORD).status_code == 429
    for _ in range(5):  # ada's sign-ins wait too; jane's device cookie does nothing for them
        form(guesser, "wrong for ada", "ada")
    assert form(reader, PASSWORD, "ada").status_code == 429

    statuses = [form(reader, f"mistyped {i}").status_code for i in range(7)]
    assert statuses == [401] * 5 + [429] * 2  # guessing with the cookie is slowed down


def test_many_names_from_one_address_slow_that_address_down(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """The delay counted per user name alone: one client trying a new made-up name each
    time never waited, and each try cost the node a password check (scrypt, some 35 ms of
    CPU) and an audit record, without end. After ``review.sign_in_address_free_failures``
    failures in a row from one address, whatever the names, its next attempts wait as a
    name's do (429, unchecked, by HTTP Basic and the form alike); other addresses do not, and
    neither does a browser that signed in as that user before; a success from the address,
    once its delay is over, clears its count."""
    base, ledger = ledger_node
    settings = load_settings(
        None,
        node={"data_dir": base.data_dir, "database_url": base.database_url},
        review={"sign_in_address_free_failures": 10},
    )
    add_user(ledger)
    app = create_app(settings, ledger)
    now = [1000.0]
    app.state.review.throttle.clock = lambda: now[0]
    guesser = TestClient(app, base_url="https://node.example", client=("10.1.2.3", 40000))
    elsewhere = TestClient(app, base_url="https://node.example", client=("10.9.9.9", 40000))
    reader = TestClient(app, base_url="https://node.example", client=("10.1.2.3", 40001))

    def form(client: TestClient) -> Any:
        page = client.get("/login")
        token = CSRF.search(page.text)
        assert token is not None
        return client.post(
            "/login",
            data={"csrf_token": token.group(1), "username": "jane.doe", "password": PASSWORD},
            follow_redirects=False,
        )

    assert form(reader).status_code == 303  # the reader's browser, on the same address
    statuses = [
        guesser.get("/api/worklist", headers=basic(f"made-up-{i}", "guess")).status_code
        for i in range(12)
    ]
    assert statuses == [401] * 10 + [429] * 2
    assert guesser.get("/api/worklist", headers=basic("jane.doe", PASSWORD)).status_code == 429
    refused = form(guesser)
    assert refused.status_code == 429 and "for this address" in refused.text
    assert elsewhere.get("/api/worklist", headers=basic("jane.doe", PASSWORD)).status_code == 200
    now[0] += 1
    assert guesser.get("/api/worklist", headers=basic("jane.doe", PASSWORD)).status_code == 200
    assert guesser.get("/api/worklist", headers=basic("made-up", "guess")).status_code == 401
    for i in range(10):
        guesser.get("/api/worklist", headers=basic(f"made-up-again-{i}", "guess"))
    assert form(guesser).status_code == 429
    assert form(reader).status_code == 303  # it signed in as jane.doe before: not held back


def test_a_worklist_left_open_does_not_keep_its_session_alive(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """The worklist reloads itself every minute (``review.worklist_refresh_s``), and each
    reload counted as the reader's activity: a worklist left open on a reading room's shared
    workstation stayed signed in, the patients' names on the screen, for the whole session
    lifetime (8 h), never the idle timeout (30 min). The reload is now marked (``auto=1``,
    with the list's filters) and does not count; a reader's own request still does."""
    settings, ledger = ledger_node
    add_user(ledger)
    idle = settings.review.idle_timeout_s
    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        sign_in(client)
        page = client.get("/review/worklist?modality=CR").text
        found = re.search(r'<meta http-equiv="refresh" content="60; url=([^"]+)">', page)
        assert found is not None, "the worklist's reload names its URL"
        reload_url = html.unescape(found.group(1))
        assert reload_url == "/review/worklist?modality=CR&auto=1"

        def last_seen(ago_s: float | None = None) -> dt.datetime:
            with ledger.session() as s:
                row = s.scalars(select(WebSession)).one()
                if ago_s is not None:
                    row.last_seen_at = utcnow() - dt.timedelta(seconds=ago_s)
                return row.last_seen_at

        quiet_since = last_seen(idle - 120)  # the reader left 28 minutes ago
        for _ in range(3):  # the page reloads itself meanwhile
            assert client.get(reload_url, follow_redirects=False).status_code == 200
        assert last_seen() == quiet_since  # not the reader's doing
        last_seen(idle + 1)
        ended = client.get(reload_url, follow_redirects=False)
        assert ended.status_code == 303 and ended.headers["location"].startswith("/login")

        sign_in(client)
        quiet_since = last_seen(idle - 120)
        assert client.get("/review/worklist", follow_redirects=False).status_code == 200
        assert last_seen() > quiet_since  # a click counts


def test_a_form_cut_short_is_a_line_not_a_traceback(
    ledger_node: tuple[Settings, Ledger], caplog: pytest.LogCaptureFixture
) -> None:
    """A browser that closes the connection in the middle of a form: one line in the log, no
    traceback, and the node answers the next request."""
    settings, ledger = ledger_node
    app = create_app(settings, ledger)
    body = b"username=jane.doe&password=" + b"x" * 100
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Content-Length": str(len(body)),
    }
    with caplog.at_level(logging.INFO):
        assert post_then_hang_up(app, "/login", headers, body[:20]) == 400
    assert "POST /login: the client closed the connection" in caplog.text
    assert "Traceback" not in caplog.text
    assert TestClient(app).get("/login").status_code == 200


def test_every_web_process_sees_an_accounts_failures(ledger_node: tuple[Settings, Ledger]) -> None:
    """An account's failed sign-ins are kept in the ledger: a second web process (or the same
    after a restart) makes the next attempt wait as the first would; ``users passwd`` clears
    them. Names that are no account are counted by each process."""
    settings, ledger = ledger_node
    add_user(ledger, "pacs", role="admin")
    now = [5000.0]
    apps = [create_app(settings, ledger) for _ in range(2)]
    for app in apps:
        app.state.review.throttle.clock = lambda: now[0]
    first, second = (TestClient(app, base_url="https://node.example") for app in apps)

    def get(client: TestClient, name: str, password: str) -> int:
        return client.get("/api/studies", headers=basic(name, password)).status_code

    assert [get(first, "pacs", f"guess number {i}") for i in range(5)] == [401] * 5
    assert get(second, "pacs", PASSWORD) == 429  # the other process knows
    pacs = ReviewStore(ledger).get_user("pacs")
    assert pacs is not None and pacs.failed_sign_ins == 5
    now[0] += 1
    assert get(second, "pacs", "guess number 6") == 401  # after the delay, checked again
    assert get(first, "pacs", PASSWORD) == 429  # and the delay doubled, for both
    assert ReviewStore(ledger).set_password("pacs", auth.hash_password("a new password 2"))
    assert get(first, "pacs", "a new password 2") == 200  # a new password starts afresh
    for _ in range(5):
        assert get(first, "nobody", "a guess of no use") == 401
    assert get(first, "nobody", "a guess of no use") == 429
    assert get(second, "nobody", "a guess of no use") == 401  # counted per process
