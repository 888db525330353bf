"""DICOM TLS: the SSL contexts of the SCP and the SCU, and a TLS SCP whose
handshakes never hold up its accept loop.

Both sides use TLS 1.2 or later with Python's default cipher list (forward
secret AEAD suites, no SHA-1, no compression). The SCP presents ``[tls]
cert``/``key``; with ``require_client_cert`` it asks every client for a
certificate and refuses one that ``[tls] ca`` did not sign. The SCU checks
the destination's certificate against ``ca`` (or the system's trust store)
and presents the same certificate and key, so the node's certificate should
allow both serverAuth and clientAuth (or carry no extended key usage).

Host names: with ``check_hostname`` (the default) the destination's ``host``,
a DNS name or an IP address, must be named in its certificate's subject
alternative names (Python matches IP addresses against iPAddress entries).
Hospitals often address PACS by IP with certificates that name only a DNS
name; ``check_hostname = false`` then rests the trust on ``ca`` alone, as
DCMTK does, so ``ca`` should be a CA that signs only DICOM peers.

The SCP (node.receive) runs each TLS handshake in the connection's own
thread, bounded by :data:`HANDSHAKE_TIMEOUT_S`, so one client that connects
and sends nothing stalls no other connection; each failed one is reported.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
from typing import Any

from node.config import TLSConfig
from node.errors import ConfigError

logger = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
#: A client gets this long to complete the TLS handshake after connecting.
HANDSHAKE_TIMEOUT_S = 10.0


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    raise _EncryptedKey  # never prompt on a terminal: a service has none


def _load_chain(ctx: ssl.SSLContext, tls: TLSConfig, origin: str) -> None:
    try:
        ctx.load_cert_chain(tls.cert, tls.key, password=_no_password)
    except _EncryptedKey:
        raise ConfigError(f"{origin}: [tls] key: {tls.key} is encrypted; ainode needs an unencrypted key "
                          "readable by its user only (mode 0600)") from None
    except ssl.SSLError as exc:
        raise ConfigError(f"{origin}: [tls] key: {tls.key} does not load with cert {tls.cert} "
                          f"({exc.reason or exc.strerror or 'not a PEM certificate and matching key'})") from None
    except OSError as exc:
        raise ConfigError(f"{origin}: [tls] cert: cannot read {tls.cert} or {tls.key}: {exc.strerror}") from None
    mode = stat.S_IMODE(os.stat(tls.key).st_mode)
    if mode & 0o077:
        logger.warning("TLS key %s has mode %04o: make it readable by ainode's user only (chmod 600)", tls.key, mode)


def _load_ca(ctx: ssl.SSLContext, tls: TLSConfig, origin: str) -> None:
    try:
        ctx.load_verify_locations(cafile=tls.ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{origin}: [tls] ca: {tls.ca} holds no usable CA certificate "
                          f"({getattr(exc, 'reason', None) or exc.strerror or exc})") from None


def server_context(tls: TLSConfig, origin: str = "[tls]") -> ssl.SSLContext:
    """The SCP's context; raises ConfigError (naming the key, never showing a key's contents)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    _load_chain(ctx, tls, origin)
    if tls.require_client_cert:
        _load_ca(ctx, tls, origin)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls: TLSConfig, origin: str = "[tls]") -> ssl.SSLContext:
    """The SCU's context: verify the destination, present our certificate if we have one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MINIMUM_VERSION
    if tls.ca:
        _load_ca(ctx, tls, origin)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.cert and tls.key:
        _load_chain(ctx, tls, origin)
    ctx.check_hostname = tls.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def tls_args(tls: TLSConfig, host: str) -> tuple[ssl.SSLContext, str | None]:
    """The ``tls_args`` for ``AE.associate`` to a TLS destination at ``host``."""
    ctx = client_context(tls)
    return ctx, host if ctx.check_hostname else None


def handshake_problem(host: str, port: int, tls: tuple[ssl.SSLContext, str | None], timeout: float) -> str | None:
    """Why a TLS handshake with ``host:port`` fails, in words, or None if it succeeds.

    pynetdicom only logs why it could not connect; this asks once more.
    """
    context, hostname = tls
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            context.wrap_socket(sock, server_hostname=hostname).close()
    except ssl.SSLCertVerificationError as exc:
        why = exc.verify_message or exc.reason
        return f"TLS handshake with {host}:{port} failed: certificate verify failed: {why}"
    except ssl.SSLError as exc:
        return f"TLS handshake with {host}:{port} failed: {exc.reason or exc}"
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    return None


def peer_subject(sock: Any) -> str | None:
    """The verified peer certificate's subject as ``CN=...,O=...``, or None (no TLS or no certificate)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):
        return None
    if not cert:
        return None
    names = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C"}
    parts = [f"{names.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return ",".join(parts) or None


def describe_cert(path: str) -> str:
    """``subject, valid until DATE`` of a PEM certificate, or '' when it cannot be decoded."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)  # CPython's decoder, no extra package
    if decode is None:
        return ""
    try:
        cert = decode(path)
    except (ssl.SSLError, OSError):
        return ""
    cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), "?")
    return f"CN={cn}, valid until {cert.get('notAfter', '?')}"


def handshake_failure(exc: BaseException, timeout: float) -> str:
    """Why a TLS handshake failed, in one line for the log and the audit trail."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"TLS handshake not completed within {timeout:g} s"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc.strerror or exc}"
    return f"TLS handshake failed: {getattr(exc, 'strerror', None) or type(exc).__name__}"
