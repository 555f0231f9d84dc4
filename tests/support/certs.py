"""Throw-away X.509 certificates for DICOM TLS tests, made with the ``openssl`` command.

:func:`make_pki` writes a trusted CA with a server certificate (for ``localhost`` and
``127.0.0.1``) and a client certificate, and a second, untrusted CA with a client and a server
certificate of its own: everything a test needs to show who gets in and who does not.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = DNS:localhost, IP:127.0.0.1
"""


@dataclass(frozen=True)
class Pair:
    """A certificate and its unencrypted private key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Pair
    client: Pair
    rogue_ca: Path
    rogue_client: Pair
    rogue_server: Pair


def _openssl(*args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.skip("the openssl command is not installed")
    subprocess.run([binary, *args], check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
        "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    return cert, key


def _make_leaf(folder: Path, name: str, ca: tuple[Path, Path]) -> Pair:
    cert, key, csr = folder / f"{name}.crt", folder / f"{name}.key", folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(_LEAF_EXTENSIONS)
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-sha256",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    return Pair(cert=cert, key=key)


def make_pki(folder: Path) -> Pki:
    """Write the trusted and the untrusted certificates into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(folder, "hospital-ca")
    rogue = _make_ca(folder, "rogue-ca")
    return Pki(
        ca=ca[0],
        server=_make_leaf(folder, "acwi-node", ca),
        client=_make_leaf(folder, "ct-scanner", ca),
        rogue_ca=rogue[0],
        rogue_client=_make_leaf(folder, "intruder", rogue),
        rogue_server=_make_leaf(folder, "impostor-pacs", rogue),
    )
