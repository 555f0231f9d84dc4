"""The web app published by a reverse proxy under a sub-path (``node.http_root_path``).

uvicorn, given the root path, hands the app ``/acwi/review/worklist`` for the proxy's
``/review/worklist`` (``scope["path"]`` starts with ``scope["root_path"]``); the test client
is asked for the same paths with the same root path. Every link, form, image, redirect and
cookie path of the review app, the STOW-RS answer's RetrieveURL and the OpenAPI document's
server must then start with it, and the sign-in and the body limits must still know the
paths within the app.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx2  # the test client's (starlette.testclient)
import pytest
from fastapi.testclient import TestClient

from acwi_node.config import ConfigError, Settings, load_settings
from acwi_node.ledger import Ledger
from acwi_node.review import views
from acwi_node.web.api import create_app
from models.data.synth import write_study
from tests.support.review_case import CSRF, PASSWORD, add_user, make_review_case, review_settings

ROOT = "/acwi"
TEMPLATES = Path(views.__file__).parent / "templates"
SCRIPT = Path(views.__file__).parent / "static" / "review.js"
#: An attribute of a template that names a URL, written as an absolute path.
ABSOLUTE_LINK = re.compile(r"""\b(?:href|src|action|data-src|formaction)\s*=\s*["']?/""")
#: ``<meta http-equiv="refresh" content="60; url=/...">``
REFRESH_URL = re.compile(r"""url=(?:["']?)/""", re.IGNORECASE)


class _Urls(HTMLParser):
    """Every URL an HTML page names: links, forms, images, scripts, the refresh target."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        for name in ("href", "src", "action", "data-src", "formaction"):
            value = found.get(name)
            if value is not None:
                self.urls.append((tag, name, value))
        if tag == "meta" and (found.get("http-equiv") or "").lower() == "refresh":
            content = found.get("content") or ""
            if "url=" in content:
                self.urls.append((tag, "refresh", content.split("url=", 1)[1]))


class _Walk:
    """The pages and answers seen, and each URL among them that leaves the root path."""

    def __init__(self, client: TestClient, root: str) -> None:
        self.client = client
        self.root = root
        self.outside: list[str] = []
        self.followed: dict[str, int] = {}

    def _inside(self, url: str) -> bool:
        return url.startswith(f"{self.root}/") if self.root else url.startswith("/")

    def see(self, what: str, answer: httpx2.Response) -> httpx2.Response:
        location = answer.headers.get("location")
        if location is not None and not self._inside(location):
            self.outside.append(f"{what}: Location {location}")
        for cookie in answer.headers.get_list("set-cookie"):
            path = re.search(r"(?i)\bpath=([^;]*)", cookie)
            assert path is not None, cookie
            name = cookie.split("=", 1)[0]
            if not (path.group(1) == (self.root or "/") or self._inside(path.group(1))):
                self.outside.append(f"{what}: Set-Cookie {name} Path={path.group(1)}")
        if "text/html" in answer.headers.get("content-type", ""):
            parser = _Urls()
            parser.feed(answer.text)
            for tag, name, url in parser.urls:
                if url.startswith(("#", "?")):
                    continue
                if not self._inside(url):
                    self.outside.append(f"{what}: <{tag} {name}={url}>")
                elif name in ("href", "src", "data-src", "refresh") and url not in self.followed:
                    self.followed[url] = self.client.get(url.split("#", 1)[0]).status_code
        return answer

    def get(self, path: str) -> httpx2.Response:
        return self.see(f"GET {path}", self.client.get(self.root + path))

    def post(self, path: str, data: dict[str, str]) -> httpx2.Response:
        return self.see(f"POST {path}", self.client.post(self.root + path, data=data))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Settings, Ledger, int, int]]:
    """A node with an administrator and two analysed review cases (one to decide, one to
    leave)."""
    settings = review_settings(tmp_path)
    ledger = Ledger(settings.database_url)
    add_user(ledger, "root", role="admin")
    first, _ = make_review_case(settings, ledger, tmp_path, seed=1, accession="ACC1")
    second, _ = make_review_case(settings, ledger, tmp_path, seed=2, accession="ACC2")
    yield settings, ledger, first, second
    ledger.dispose()


def _walk(node: tuple[Settings, Ledger, int, int], root: str) -> _Walk:
    """Signed out, sign in, every page, a case, its verdict, leave a case, sign out."""
    settings, ledger, first, second = node
    client = TestClient(create_app(settings, ledger), root_path=root, follow_redirects=False)
    walk = _Walk(client, root)
    assert walk.get("/").status_code == 303
    assert walk.get("/review/worklist?modality=DX").status_code == 303
    login = walk.get("/login?next=%2Freview%2Fworklist")
    token = CSRF.search(login.text)
    assert token is not None
    signed_in = walk.post(
        "/login",
        {
            "csrf_token": token.group(1),
            "username": "root",
            "password": PASSWORD,
            "next": "/review/worklist",
        },
    )
    assert signed_in.status_code == 303, signed_in.text
    assert signed_in.headers["location"] == f"{root}/review/worklist"
    worklist = walk.get("/review/worklist")
    assert worklist.status_code == 200
    assert f'data-root="{root}"' in worklist.text  # the session warning's script reads it
    csrf = CSRF.search(worklist.text)
    assert csrf is not None
    for page in (
        "/review/worklist?reload=off",
        "/review/worklist?reload=on",
        "/review/decided",
        "/review/dashboard",
        "/review/studies",
        "/review/monitoring",
        "/review/models",
        f"/review/cases/{second}",
    ):
        assert walk.get(page).status_code == 200, page
    case = walk.get(f"/review/cases/{first}")
    assert case.status_code == 200
    decided = walk.post(
        f"/review/cases/{first}/verdict",
        {"csrf_token": csrf.group(1), "action": "confirm", "then": "next"},
    )
    assert decided.status_code == 303, decided.text
    assert walk.get(f"/review/cases/{first}").status_code == 200  # closed: the amend link
    left = walk.post(f"/review/cases/{second}/leave", {"csrf_token": csrf.group(1)})
    assert left.status_code == 303
    assert walk.post("/logout", {"csrf_token": "forged"}).status_code == 403  # its page too
    out = walk.post("/logout", {"csrf_token": csrf.group(1)})
    assert out.status_code == 303
    assert out.headers["location"] == f"{root}/login"
    return walk


@pytest.mark.parametrize("root", [ROOT, "/apps/acwi", ""])
def test_every_link_redirect_and_cookie_stays_under_the_root_path(
    node: tuple[Settings, Ledger, int, int], root: str
) -> None:
    walk = _walk(node, root)
    assert walk.outside == []
    assert len(walk.followed) > 20  # the menu, the cases, their images, the stylesheet, ...
    assert {url: code for url, code in walk.followed.items() if code >= 400} == {}


def test_no_template_writes_an_absolute_link() -> None:
    """Each URL in a page starts with ``{{ root }}`` (or comes whole from the view): a
    hard-coded ``href="/..."`` breaks behind a proxy that publishes the app under a path."""
    found = [
        f"{template.name}:{n}: {line.strip()}"
        for template in sorted(TEMPLATES.glob("*.html"))
        for n, line in enumerate(template.read_text().splitlines(), 1)
        if ABSOLUTE_LINK.search(line) or REFRESH_URL.search(line)
    ]
    assert found == []
    script = [
        f"review.js:{n}: {line.strip()}"
        for n, line in enumerate(SCRIPT.read_text().splitlines(), 1)
        if re.search(r"""(?<!root \+ )["']/(?:review|login|logout|api|static|dicomweb)\b""", line)
    ]
    assert script == []


def test_the_sign_in_and_the_body_limits_see_the_path_within_the_app(
    node: tuple[Settings, Ledger, int, int],
) -> None:
    """Under the root path: /login needs no session, /api/ answers 401 with a Basic challenge
    (no redirect), and a JSON body over the forms' 64 KiB is the API's to judge (1 MiB)."""
    settings, ledger, first, _ = node
    client = TestClient(create_app(settings, ledger), root_path=ROOT, follow_redirects=False)
    assert client.get(f"{ROOT}/login").status_code == 200
    assert client.get(f"{ROOT}/healthz").status_code == 200
    assert client.get(f"{ROOT}/static/review.css").status_code == 200
    api = client.get(f"{ROOT}/api/studies")
    assert api.status_code == 401
    assert api.headers["www-authenticate"].startswith("Basic")
    signed = client.post(
        f"{ROOT}/api/review/cases/{first}/verdict",
        auth=("root", PASSWORD),
        json={"action": "escalate", "reason": "x" * 100_000},
    )
    assert signed.status_code != 413, signed.text
    assert signed.headers["cache-control"]  # the API's headers on an /api/ answer


def test_stow_rs_and_the_openapi_document_name_the_root_path(
    tmp_path: Path, node: tuple[Settings, Ledger, int, int]
) -> None:
    settings, ledger, _, _ = node
    add_user(ledger, "pacs", role="sender")
    client = TestClient(
        create_app(settings, ledger), root_path=ROOT, base_url="https://apps.hospital.local"
    )
    boundary = "root-path-test"
    body = b""
    for f in write_study(tmp_path / "stow", n_images=1, seed=9):
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += f.read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    stored = client.post(
        f"{ROOT}/dicomweb/studies",
        content=body,
        auth=("pacs", PASSWORD),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
    )
    assert stored.status_code == 200, stored.text
    assert stored.json()["00081190"]["Value"] == [
        "https://apps.hospital.local/acwi/dicomweb/studies"
    ]
    document = client.get(f"{ROOT}/api/openapi.json", auth=("root", PASSWORD))
    assert document.status_code == 200
    assert document.json()["servers"] == [{"url": ROOT}]


@pytest.mark.parametrize("value", ["/acwi", "/apps/acwi", "/a.b_c~d-1", ""])
def test_root_paths_taken(tmp_path: Path, value: str) -> None:
    settings = load_settings(None, node={"data_dir": tmp_path, "http_root_path": value})
    assert settings.node.http_root_path == value


@pytest.mark.parametrize(
    "value",
    [
        "acwi",
        "/acwi/",
        "/",
        "//acwi",
        "/a/../b",
        "/..",
        "/a/./b",
        "/a b",
        "/a;b",
        "/a%2fb",
        "/a?b",
        "/ä",
    ],
)
def test_root_paths_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="http_root_path"):
        load_settings(None, node={"data_dir": tmp_path, "http_root_path": value})


@pytest.mark.parametrize(
    ("public_url", "root", "taken"),
    [
        ("https://apps.hospital.local/acwi", "/acwi", True),
        ("https://apps.hospital.local/acwi/", "/acwi", True),
        ("https://ai-node.hospital", "", True),
        ("https://ai-node.hospital/", "", True),
        # as before the setting existed: taken (a proxy that rewrites the pages, say)
        ("https://apps.hospital.local/acwi", "", True),
        ("https://apps.hospital.local/other", "/acwi", False),
        ("https://ai-node.hospital", "/acwi", False),
    ],
)
def test_the_notifications_address_is_under_the_same_path(
    tmp_path: Path, public_url: str, root: str, taken: bool
) -> None:
    """``review.public_url`` (the notifications' links) and the app's own links agree."""
    node = {"data_dir": tmp_path, "http_root_path": root}
    if taken:
        load_settings(None, node=node, review={"public_url": public_url})
    else:
        with pytest.raises(ConfigError, match="http_root_path"):
            load_settings(None, node=node, review={"public_url": public_url})
