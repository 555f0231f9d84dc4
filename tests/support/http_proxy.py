"""An HTTP proxy on loopback for tests (:class:`FakeProxy`)."""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
from urllib.parse import urlsplit


class FakeProxy:
    """An HTTP proxy on loopback: CONNECT tunnels, and requests in absolute form passed on in
    origin form (without ``Proxy-Authorization``); it records each request line it got. With
    ``credentials`` (user, password) it answers 407 to a request without them."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.seen: list[tuple[str, str]] = []
        self.refused = 0
        self.expected = (
            None
            if credentials is None
            else "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        )
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(65536)
            if not chunk:
                client.close()
                return
            head += chunk
        line, _, rest = head.partition(b"\r\n")
        method, target, version = line.decode().split(" ")
        self.seen.append((method, target))
        fields, _, body = rest.partition(b"\r\n\r\n")
        kept = [f for f in fields.split(b"\r\n") if not f.lower().startswith(b"proxy-auth")]
        given = [
            f.split(b":", 1)[1].strip().decode()
            for f in fields.split(b"\r\n")
            if f.lower().startswith(b"proxy-authorization:")
        ]
        if self.expected is not None and given != [self.expected]:
            self.refused += 1
            client.sendall(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b'Proxy-Authenticate: Basic realm="proxy"\r\nContent-Length: 0\r\n'
                b"Connection: close\r\n\r\n"
            )
            client.close()
            return
        rest = b"\r\n".join(kept) + b"\r\n\r\n" + body
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            parts = urlsplit(target)
            upstream = socket.create_connection((parts.hostname, parts.port))
            origin = f"{method} {parts.path}{'?' + parts.query if parts.query else ''} {version}"
            upstream.sendall(origin.encode() + b"\r\n" + rest)

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    b.shutdown(socket.SHUT_WR)

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self) -> None:
        self.listener.close()
