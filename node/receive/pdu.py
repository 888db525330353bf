"""Upper-layer framing (PS3.8 9.3): PDUs read with deadlines and size caps.

Every read has a deadline: the whole A-ASSOCIATE-RQ must arrive within the
association deadline of the connection's start, and inside an association
each PDU within the idle timeout of the moment the node began waiting for
it, so a peer that stalls or drips a byte a second is dropped, never waited
on. A declared length above its cap ends the connection before a byte of
the body is read. Bytes come through one reusable buffer per connection
(large ``recv_into`` reads); a P-DATA value is handed on as views of that
buffer, never reassembled.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Callable

# PDU types (PS3.8 Table 9-11).
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_NAMES = {
    A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ", A_ASSOCIATE_AC: "A-ASSOCIATE-AC", A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF", A_RELEASE_RQ: "A-RELEASE-RQ", A_RELEASE_RP: "A-RELEASE-RP", A_ABORT: "A-ABORT",
}

#: The largest A-ASSOCIATE-RQ accepted. DCMTK's storescu proposing every storage
#: SOP class with every transfer syntax sends ~40 KB; nothing real comes near this.
MAX_ASSOCIATE_RQ = 256 * 1024
#: A connection starts with a small buffer (a flood of connections that never
#: associate costs little) and gets the large one once its association is accepted.
FIRST_BUFFER_SIZE = 16 * 1024
BUFFER_SIZE = 256 * 1024

# A-ABORT reasons, source "service provider" (PS3.8 Table 9-26).
ABORT_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_UNRECOGNIZED_PARAMETER = 0x04
ABORT_UNEXPECTED_PARAMETER = 0x05
ABORT_INVALID_PARAMETER = 0x06

_HEADER = struct.Struct(">BBL")


class Dropped(Exception):
    """The node ends this connection: ``why`` in one line for the log and the audit trail.

    ``abort``: the A-ABORT reason to send first (None: close without one, the
    peer has gone or never spoke DICOM). ``kind``: ``malformed``, ``timeout``
    or ``oversized``, the label of the dropped-connections metric.
    """

    def __init__(self, why: str, abort: int | None = ABORT_NOT_SPECIFIED, kind: str = "malformed") -> None:
        super().__init__(why)
        self.why = why
        self.abort = abort
        self.kind = kind


class PeerClosed(Exception):
    """The peer closed the TCP connection (or reset it)."""


def abort_pdu(reason: int = ABORT_NOT_SPECIFIED, source: int = 0x02) -> bytes:
    """An A-ABORT PDU (source 2: service provider; 0: service user)."""
    return bytes((A_ABORT, 0, 0, 0, 0, 4, 0, 0, source, reason))


RELEASE_RP = bytes((A_RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0))


class Reader:
    """Buffered, deadline-bound reads from one connection's socket (plain or TLS)."""

    def __init__(self, sock: socket.socket, size: int = FIRST_BUFFER_SIZE) -> None:
        self.sock = sock
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def grow(self, size: int) -> None:
        """A larger buffer (a new one: views of the old stay valid), keeping unread bytes."""
        if size <= len(self.buf):
            return
        kept = bytes(self.view[self.start:self.end])
        self.buf = bytearray(size)
        self.buf[:len(kept)] = kept
        self.view = memoryview(self.buf)
        self.start, self.end = 0, len(kept)

    def _fill(self, deadline: float) -> None:
        if self.end == len(self.buf):
            self._compact()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        try:
            n = self.sock.recv_into(self.view[self.end:])
        except (socket.timeout, TimeoutError):
            raise TimeoutError from None
        except OSError as exc:  # reset, or a TLS error after the handshake
            raise PeerClosed(exc.strerror or type(exc).__name__) from None
        if n == 0:
            raise PeerClosed("connection closed")
        self.end += n

    def _compact(self) -> None:
        kept = self.end - self.start
        if kept:
            self.buf[:kept] = bytes(self.view[self.start:self.end])
        self.start, self.end = 0, kept

    def exact(self, n: int, deadline: float) -> memoryview:
        """The next ``n`` bytes; a view valid until the next read."""
        if n > len(self.buf):
            self.grow(n)  # only for an A-ASSOCIATE-RQ under its cap
        if len(self.buf) - self.start < n:
            self._compact()
        while self.end - self.start < n:
            self._fill(deadline)
        out = self.view[self.start:self.start + n]
        self.start += n
        return out

    def stream(self, n: int, deadline: float, sink: Callable[[memoryview], object]) -> None:
        """Pass the next ``n`` bytes to ``sink`` in as few pieces as the buffer allows."""
        while n:
            if self.start == self.end:
                self.start = self.end = 0
                self._fill(deadline)
            take = min(n, self.end - self.start)
            sink(self.view[self.start:self.start + take])
            self.start += take
            n -= take

    def header(self, deadline: float) -> tuple[int, int]:
        """The next PDU's (type, length)."""
        pdu_type, _, length = _HEADER.unpack(self.exact(6, deadline))
        return pdu_type, length


def pdu_header(pdu_type: int, length: int) -> bytes:
    return _HEADER.pack(pdu_type, 0, length)
