"""Audit events to a syslog collector: RFC 5424 messages over UDP (RFC 5426) or
TCP with octet-counting framing (RFC 6587), sent by a background thread.

Best effort by design: a full queue or an unreachable collector drops the
message (counted, logged at most once a minute) and never delays the caller,
a C-STORE handler; the audit file (node.audit) is the record of truth.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any

from node.config import syslog_target

logger = logging.getLogger(__name__)

SYSLOG_FACILITY = 10  # RFC 5424 Table 1: security/authorization messages
SYSLOG_QUEUE = 10000
SYSLOG_RETRY_S = 5.0
SYSLOG_WARN_EVERY_S = 60.0
_SEVERITY = {0: 5, 4: 4, 8: 3, 12: 2}  # outcome -> notice, warning, error, critical


def syslog_message(event: dict[str, Any], msg: bytes, hostname: str, app: str = "ainode") -> bytes:
    """One RFC 5424 message: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG``.

    MSGID is the event's DICOM event ID code; MSG the event's JSON line (ASCII).
    """
    pri = SYSLOG_FACILITY * 8 + _SEVERITY.get(int(event.get("outcome", 0)), 5)
    msgid = str(event.get("event_id", {}).get("code", "-")) or "-"
    procid = str(event.get("source", {}).get("pid", os.getpid()))
    host = "".join(c for c in hostname if 33 <= ord(c) <= 126)[:255] or "-"
    stamp = event.get("time") or datetime.now(timezone.utc).isoformat()
    header = f"<{pri}>1 {stamp} {host} {app} {procid} {msgid[:32]} -"
    return header.encode("ascii") + b" " + msg


class SyslogSender:
    """Sends audit events to a syslog collector from a background thread; never blocks the caller."""

    def __init__(self, target: str, queue_size: int = SYSLOG_QUEUE) -> None:
        self.proto, self.host, self.port = syslog_target(target)
        self.hostname = socket.gethostname()
        self.queue: queue.Queue[bytes | None] = queue.Queue(queue_size)
        self.sent = 0
        self.dropped = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._down_until = 0.0
        self._warned_at = 0.0
        self._dropped_reported = 0

    @property
    def target(self) -> str:
        return f"{self.proto}://{self.host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def submit(self, event: dict[str, Any], msg: bytes) -> None:
        try:
            self.queue.put_nowait(syslog_message(event, msg, self.hostname))
        except queue.Full:
            self._drop("queue full")

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (for at most ``timeout`` seconds), then stop."""
        if self._thread is None:
            return
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._thread = None
        self._disconnect()
        if self.dropped:
            logger.warning("Audit syslog %s: %d message(s) dropped in all", self.target, self.dropped)

    def _drop(self, why: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._warned_at >= SYSLOG_WARN_EVERY_S:
            self._warned_at = now
            logger.warning("Audit syslog %s: message dropped (%s); %d dropped so far, the audit file has them all",
                           self.target, why, self.dropped)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if time.monotonic() < self._down_until:
                self._drop("collector unreachable")
                continue
            try:
                self._send(item)
                self.sent += 1
            except OSError as exc:
                self._disconnect()
                self._down_until = time.monotonic() + SYSLOG_RETRY_S
                self._drop(f"{exc.strerror or exc}")

    def _send(self, message: bytes) -> None:
        if self.proto == "udp":
            if self._sock is None:
                family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
                self._sock = socket.socket(family, socket.SOCK_DGRAM)
            self._sock.sendto(message, (self.host, self.port))
            return
        if self._sock is None:
            self._sock = socket.create_connection((self.host, self.port), timeout=SYSLOG_RETRY_S)
        self._sock.sendall(str(len(message)).encode("ascii") + b" " + message)  # RFC 6587 octet counting

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
