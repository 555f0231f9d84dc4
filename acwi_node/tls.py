"""DICOM TLS (PS3.15 Annex B, BCP 195 profile): SSL contexts for the storage SCP and the SCU.

Both sides use TLS 1.2 or newer with the standard library's default cipher suites (forward
secret AEAD suites, the intersection with DCMTK's non-downgrading BCP 195 profile). The SCP can
require a client certificate signed by a configured CA; the SCU verifies the destination's
certificate (and by default its host name) and can present a client certificate of its own.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TlsConfigError(ValueError):
    """A certificate, key or CA file cannot be used; the message says which and why."""


def _load_chain(ctx: ssl.SSLContext, cert_file: Path, key_file: Path | None) -> None:
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except FileNotFoundError as exc:
        # The ssl module's error names no file (its filename is None): say which is missing.
        missing = [str(p) for p in (cert_file, key_file) if p is not None and not p.exists()]
        raise TlsConfigError(
            f"certificate or key file not found: {', '.join(missing) or cert_file}"
        ) from exc
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            f"cannot load the certificate {cert_file} with key {key_file}: {exc}"
        ) from exc


def _load_cas(ctx: ssl.SSLContext, ca_file: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except FileNotFoundError as exc:
        raise TlsConfigError(f"CA file not found: {ca_file}") from exc
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"cannot load the CA certificates in {ca_file}: {exc}") from exc


def server_context(
    *,
    cert_file: Path,
    key_file: Path,
    ca_file: Path | None,
    require_client_cert: bool,
) -> ssl.SSLContext:
    """The storage SCP's context: its own certificate, and the CAs its clients must chain to.

    With ``require_client_cert`` a client without a certificate, or with one no configured CA
    signed, fails the handshake. Without it a presented certificate is still verified.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION
    _load_chain(ctx, cert_file, key_file)
    if ca_file is not None:
        _load_cas(ctx, ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise TlsConfigError("require_client_cert needs ca_file: the CAs that sign client certs")
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(
    *,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    verify_hostname: bool,
) -> ssl.SSLContext:
    """The SCU's context for one destination.

    The destination's certificate must chain to ``ca_file`` (the system's trust store when not
    given); with ``verify_hostname`` it must also name the host connected to. A client
    certificate is presented when ``cert_file`` is given.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.check_hostname = verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if ca_file is not None:
        _load_cas(ctx, ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None:
        _load_chain(ctx, cert_file, key_file)
    elif key_file is not None:
        raise TlsConfigError("key_file is set without cert_file")
    return ctx


def peer_subject(sock: Any) -> str:
    """The common name (else the whole subject) of a TLS peer's certificate; "" when none."""
    getpeercert = getattr(sock, "getpeercert", None)
    if getpeercert is None:
        return ""
    try:
        cert = getpeercert()
    except (ValueError, OSError):
        return ""
    if not cert:
        return ""
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    if names:
        return str(names[0])
    return ", ".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
