"""The RIS's acknowledgement of a result is read within ``hl7.max_message_bytes``."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from acwi_node.config import load_settings
from acwi_node.hl7.client import SendError, send_message
from acwi_node.hl7.er7 import Limits
from acwi_node.hl7.mllp import frame

ORU = "MSH|^~\\&|ACWI|ACWI|RIS|HOSP|20261207120000||ORU^R01^ORU_R01|MSG1|P|2.5\r"


def long_ack(text_bytes: int) -> bytes:
    """An AA whose MSA-3 (text message) makes the ACK about ``text_bytes`` long."""
    ack = "\r".join(
        [
            "MSH|^~\\&|RIS|HOSP|ACWI|ACWI|20261207120001||ACK^R01^ACK|ACK1|P|2.5",
            "MSA|AA|MSG1|" + "x" * text_bytes,
        ]
    )
    return frame(ack.encode())


def test_an_ack_longer_than_the_limit_is_refused_and_one_within_it_read() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    acks = [long_ack(3000), long_ack(3000)]

    def serve() -> None:
        for ack in acks:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(ack)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(SendError, match="larger than 2048 bytes"):
            send_message("127.0.0.1", port, ORU, timeout_s=5, limits=Limits(message_bytes=2048))
        info = send_message("127.0.0.1", port, ORU, timeout_s=5, limits=Limits(message_bytes=8192))
        assert info.code == "AA"
    finally:
        thread.join(timeout=5)
        server.close()


def test_the_limit_is_the_hl7_max_message_bytes_setting(tmp_path: Path) -> None:
    config = tmp_path / "acwi-node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path}"\n[hl7]\nmax_message_bytes = 4096\n')
    assert Limits.of(load_settings(config).hl7).message_bytes == 4096
    assert Limits().message_bytes == 1_048_576
