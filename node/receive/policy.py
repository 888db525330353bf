"""Who may associate: the called AE title (one per pipeline), the allowed callers, their hosts, and who may call which pipeline."""

from __future__ import annotations

import threading

from node.config import Caller, Pipeline

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 Table 9-21.
REJECT_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service user, no reason given
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)  # permanent, service user, application context name not supported
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)  # permanent, service provider (ACSE), protocol version not supported
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded

Reason = tuple[int, int, int]


def escaped(text: str | bytes) -> str:
    """Peer-supplied text safe for one log line: control and non-ASCII characters as \\xNN."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in text)


def ae_title_problem(raw: bytes) -> str | None:
    """Why 16 bytes from an A-ASSOCIATE-RQ are not an AE title (PS3.5 6.2, VR AE), or None."""
    if any(b < 0x20 or b > 0x7E or b == 0x5C for b in raw.rstrip(b"\0")):
        return "has control, non-ASCII or backslash characters"
    if not raw.strip(b" \0"):
        return "is empty"
    return None


class Policy:
    """The called AE titles (one per pipeline) and the allowed callers.

    Replaced as a whole on SIGHUP; readers take one consistent snapshot, so an
    association keeps the pipeline it was accepted for.
    """

    def __init__(self, pipelines: tuple[Pipeline, ...], callers: tuple[Caller, ...]) -> None:
        self._lock = threading.Lock()
        self._snapshot = (pipelines, callers)

    def update(self, pipelines: tuple[Pipeline, ...], callers: tuple[Caller, ...]) -> None:
        with self._lock:
            self._snapshot = (pipelines, callers)

    @property
    def ae_titles(self) -> list[str]:
        with self._lock:
            return [p.name for p in self._snapshot[0]]

    def check(self, calling: str, called: str, address: str) -> tuple[Reason, str] | None:
        """None if the peer may associate, else (reject reason, why in words)."""
        with self._lock:
            pipelines, callers = self._snapshot
        pipeline = next((p for p in pipelines if p.name == called.strip()), None)
        if pipeline is None:
            titles = ", ".join(repr(p.name) for p in pipelines)
            return REJECT_CALLED_AE, f"called AE title {called.strip()!r} is not {'one of ' if len(pipelines) > 1 else ''}{titles}"
        if callers and not any(c.admits(calling, address) for c in callers):
            known = any(c.ae_title.strip() == calling.strip() for c in callers)
            why = "is not allowed from this host" if known else "is not an allowed caller"
            return REJECT_CALLING_AE, f"calling AE title {calling.strip()!r} {why}"
        if not pipeline.admits(calling):
            return REJECT_CALLING_AE, f"calling AE title {calling.strip()!r} may not call {pipeline.name!r}"
        return None
