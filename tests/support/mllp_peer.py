"""A test MLLP peer (a RIS stand-in), run as a subprocess.

    python -m tests.support.mllp_peer --port N --record FILE [--ack AA|AE|AR] [--ready FILE]
        [--version V]

It records every message it receives (one JSON line {"message": ...} per message, appended and
flushed before answering) and answers each with an ACK carrying the configured code and the
message's MSH-10 in MSA-2, and ``--version`` (default 2.5; "" for none) in its MSH-12. It
writes ``--ready`` once it listens. :class:`Peer` starts one for a test and reads what it
received.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

START, END = b"\x0b", b"\x1c\x0d"


def _control_id(message: str) -> str:
    first = message.split("\r", 1)[0]
    fields = first.split("|")
    return fields[9] if len(fields) > 9 else ""


def _ack(message: str, code: str, version: str = "2.5") -> bytes:
    text = "\r".join(
        [
            f"MSH|^~\\&|RIS|HOSP|ACWI|ACWI|20240101120000||ACK^R01^ACK|PEER1|P|{version}",
            f"MSA|{code}|{_control_id(message)}|{'ok' if code == 'AA' else 'peer refused'}",
        ]
    )
    return START + text.encode() + END


def _serve(
    conn: socket.socket, record: Path, code: str, lock: threading.Lock, version: str = "2.5"
) -> None:
    buf = bytearray()
    with conn:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
            while True:
                start, end = buf.find(START), buf.find(END)
                if start < 0 or end < 0:
                    break
                message = buf[start + 1 : end].decode("utf-8", "replace")
                del buf[: end + len(END)]
                with lock, record.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"message": message}) + "\n")
                    fh.flush()
                conn.sendall(_ack(message, code, version))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--ack", default="AA", choices=["AA", "AE", "AR"])
    parser.add_argument("--ready", type=Path, default=None)
    parser.add_argument("--version", default="2.5")
    args = parser.parse_args(argv)
    lock = threading.Lock()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", args.port))
    server.listen(16)
    if args.ready is not None:
        args.ready.write_text("ready")
    while True:
        conn, _ = server.accept()
        threading.Thread(
            target=_serve, args=(conn, args.record, args.ack, lock, args.version), daemon=True
        ).start()


class Peer:
    """This peer in a subprocess on a free loopback port, answering ``ack`` in an ACK of
    HL7 ``version``."""

    def __init__(self, tmp: Path, ack: str, version: str = "2.5") -> None:
        from tests.support.ports import free_port

        self.port = free_port()
        self.record = tmp / f"peer-{self.port}.jsonl"
        ready = tmp / f"ready-{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.mllp_peer", "--port", str(self.port),
             "--record", str(self.record), "--ack", ack, "--ready", str(ready),
             "--version", version],
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert self.proc.poll() is None, "MLLP peer exited"
            assert time.monotonic() < deadline, "MLLP peer did not start"
            time.sleep(0.05)

    def messages(self) -> list[str]:
        if not self.record.exists():
            return []
        return [json.loads(line)["message"] for line in self.record.read_text().splitlines()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
