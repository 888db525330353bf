"""The SCP's listening sockets and the bounds on what peers may hold open.

One accept thread per listening socket (plain and TLS) and one thread per
connection (node.receive.association). A connection costs a thread and a
small buffer until its association is accepted, so the bounds are on
connections, not only associations:

- ``max_associations``: associations open at once; one more gets
  A-ASSOCIATE-RJ "local limit exceeded" (audited).
- ``max_connections_per_host``: connections open from one address,
  associated or not; more are closed at once (logged once a minute per
  address, each audited), so one host cannot take every slot.
- All connections not yet associated together: at most
  ``2 * max_associations + 16``; their A-ASSOCIATE-RQ must arrive within
  ``associate_timeout_seconds`` (after the TLS handshake's own 10 s).
- An association that sends nothing, or takes longer than
  ``idle_timeout_seconds`` over one PDU, is aborted.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, HTJ2K, HTJ2KLossless,
    HTJ2KLosslessRPCL, ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit,
    JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless,
)

from node import metrics
from node.audit import AuditError
from node.config import Config
from node.errors import ConfigError
from node.receive.association import Association
from node.receive.instance import Peer, Receiver
from node.tls import HANDSHAKE_TIMEOUT_S

logger = logging.getLogger(__name__)

#: The transfer syntaxes accepted for every storage SOP class.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K, RLELossless,
]
REFUSAL_LOG_EVERY_S = 60.0


def supported_contexts() -> list[PresentationContext]:
    """Every storage SOP class with TRANSFER_SYNTAXES, and Verification."""
    contexts = []
    for abstract in [cx.abstract_syntax for cx in AllStoragePresentationContexts] + [Verification]:
        cx = PresentationContext()
        cx.abstract_syntax = abstract
        cx.transfer_syntax = (TRANSFER_SYNTAXES if abstract != Verification
                              else [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        contexts.append(cx)
    return contexts


@dataclass(frozen=True)
class Limits:
    """The bounds of [node], replaced as a whole on SIGHUP."""

    max_associations: int = 32
    max_pdu: int = 131072
    associate_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_per_host: int = 16

    @classmethod
    def of(cls, cfg: Config) -> "Limits":
        node = cfg.node
        return cls(node.max_associations, node.max_pdu, node.associate_timeout_seconds, node.idle_timeout_seconds,
                   node.max_connections_per_host)

    @property
    def max_pending(self) -> int:
        return 2 * self.max_associations + 16


class Server:
    """The SCP: listening sockets, their connections and the bounds on them."""

    handshake_timeout = HANDSHAKE_TIMEOUT_S

    def __init__(self, receiver: Receiver, limits: Limits) -> None:
        self.receiver = receiver
        self.limits = limits
        self.contexts = supported_contexts()
        self._lock = threading.Lock()
        self._connections: set[Association] = set()
        self._established: set[Association] = set()
        self._per_host: dict[str, int] = {}
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._refusals_logged: dict[str, float] = {}
        self.tls_context: ssl.SSLContext | None = None

    # --- listening -----------------------------------------------------------------------

    def listen(self, host: str, port: int, tls: bool = False, reuse_port: bool = False) -> int:
        """Listen on (host, port) (TLS with ``self.tls_context``); returns the port bound.

        ``reuse_port``: SO_REUSEPORT, so that several receiving processes share the port (the kernel
        spreads new connections over them). Raises ConfigError naming the key and the address when it
        cannot (in use, not this host's).
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            key = "[tls] port" if tls else "[node] port"
            raise ConfigError(f"{key}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._listeners.append(sock)
        thread = threading.Thread(target=self._accept_loop, args=(sock, tls), daemon=True,
                                  name=f"scp-accept@{sock.getsockname()[1]}{'-tls' if tls else ''}")
        thread.start()
        self._threads.append(thread)
        return int(sock.getsockname()[1])

    def _accept_loop(self, listener: socket.socket, tls: bool) -> None:
        while not self._stopping.is_set():
            try:
                sock, address = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # EMFILE and the like: do not spin
                continue
            self._admit(sock, address, tls)

    def _admit(self, sock: socket.socket, address: Any, tls: bool) -> None:
        host = str(address[0])
        limits = self.limits
        with self._lock:
            pending = len(self._connections) - len(self._established)
            if self._per_host.get(host, 0) >= limits.max_per_host:
                why = f"more than {limits.max_per_host} connections open from {host} (max_connections_per_host)"
            elif pending >= limits.max_pending:
                why = f"more than {limits.max_pending} connections waiting to associate"
            else:
                why = None
                assoc = Association(self, sock, address, self.tls_context if tls else None)
                self._connections.add(assoc)
                self._per_host[host] = self._per_host.get(host, 0) + 1
        if why is not None:
            sock.close()
            self._refused(host, int(address[1]), why)
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # DIMSE is request/response
        except OSError as exc:
            logger.debug("TCP_NODELAY not set: %s", exc)
        threading.Thread(target=assoc.run, daemon=True, name=f"scp-{host}:{address[1]}").start()

    def _refused(self, host: str, port: int, why: str) -> None:
        now = time.monotonic()
        if now - self._refusals_logged.get(host, -REFUSAL_LOG_EVERY_S) >= REFUSAL_LOG_EVERY_S:
            self._refusals_logged[host] = now
            logger.warning("Connection from %s:%d closed at once: %s (logged once a minute per host)", host, port, why)
        metrics.DROPPED.labels("connection_limit").inc()
        self.audit_dropped(Peer("", host, port), f"closed at once: {why}")

    # --- the connections' bookkeeping ---------------------------------------------------

    def try_establish(self, assoc: Association) -> bool:
        with self._lock:
            if len(self._established) >= self.limits.max_associations:
                return False
            self._established.add(assoc)
            return True

    def closed(self, assoc: Association) -> None:
        with self._lock:
            self._connections.discard(assoc)
            self._established.discard(assoc)
            left = self._per_host.get(assoc.address, 1) - 1
            if left:
                self._per_host[assoc.address] = left
            else:
                self._per_host.pop(assoc.address, None)

    @property
    def active_associations(self) -> int:
        with self._lock:
            return len(self._established)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    # --- audit ---------------------------------------------------------------------------

    def audit_association(self, calling: str, address: str, port: int, called: str, refusal: str | None,
                          tls_subject: str | None) -> None:
        try:
            self.receiver.audit.association(calling, address, port, called, refusal, tls_subject)
        except AuditError as exc:  # its stores will be refused for the same reason
            logger.error("Association from %s@%s: not audited: %s", calling or "?", address, exc)

    def audit_dropped(self, peer: Peer, why: str) -> None:
        try:
            self.receiver.audit.connection_dropped(peer.ae_title, peer.address, peer.port, why)
        except AuditError as exc:
            logger.error("Dropped connection from %s: not audited: %s", peer, exc)

    def audit_tls_refused(self, address: str, port: int, reason: str) -> None:
        try:
            self.receiver.audit.tls_refused(address, port, reason)
        except AuditError as exc:
            logger.error("Refused TLS connection from %s: not audited: %s", address, exc)

    # --- stop ----------------------------------------------------------------------------

    def stop_listening(self) -> None:
        self._stopping.set()
        for sock in self._listeners:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(2.0)
        self._listeners.clear()

    def abort_all(self) -> int:
        """Abort every open connection (their threads see the socket closed); returns how many."""
        with self._lock:
            connections = list(self._connections)
        for assoc in connections:
            assoc.abort()
        return len(connections)
