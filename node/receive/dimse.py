"""DIMSE command sets and Part 10 file meta, encoded and decoded directly.

A command set is a handful of group 0000 elements in Implicit VR Little
Endian (PS3.7 E.1); decoding one is a loop over (tag, length, value), and
the responses an SCP sends are fixed shapes. The file meta of a stored
instance is built the same way (PS3.10 7.1), without a round trip through
pydicom. Both are checked against DCMTK and pydicom in the tests.
"""

from __future__ import annotations

import struct
import uuid

from node import __version__

# Command Field values (PS3.7 E.1-1).
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
RESPONSE_BIT = 0x8000
NO_DATA_SET = 0x0101

# Tags of the command elements read or written.
AFFECTED_SOP_CLASS = 0x00000002
COMMAND_FIELD = 0x00000100
MESSAGE_ID = 0x00000110
MESSAGE_ID_RESPONDED = 0x00000120
DATA_SET_TYPE = 0x00000800
STATUS = 0x00000900
ERROR_COMMENT = 0x00000902
AFFECTED_SOP_INSTANCE = 0x00001000

#: The most a command set may hold: real ones are a few hundred bytes.
MAX_COMMAND = 64 * 1024

#: ainode's Implementation Class UID and Version Name (PS3.7 D.3.3.2), in the A-ASSOCIATE-AC and the file meta.
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, 'ainode implementation class').int}"
IMPLEMENTATION_VERSION_NAME = f"AINODE_{__version__}"[:16]

_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")


class CommandError(ValueError):
    """A command set that cannot be decoded."""


class Command:
    """A decoded command set: its elements by tag, the values as bytes."""

    def __init__(self, elements: dict[int, bytes]) -> None:
        self.elements = elements

    def us(self, tag: int) -> int | None:
        value = self.elements.get(tag)
        if value is None:
            return None
        if len(value) != 2:
            raise CommandError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is {len(value)} bytes, not 2")
        return int(_US.unpack(value)[0])

    def uid(self, tag: int) -> str | None:
        value = self.elements.get(tag)
        if value is None:
            return None
        return value.rstrip(b"\0 ").decode("ascii", "replace")

    @property
    def field(self) -> int:
        field = self.us(COMMAND_FIELD)
        if field is None:
            raise CommandError("no Command Field")
        return field

    @property
    def message_id(self) -> int:
        return self.us(MESSAGE_ID) or 0

    @property
    def has_data_set(self) -> bool:
        return self.us(DATA_SET_TYPE) != NO_DATA_SET


def decode_command(data: bytes | memoryview) -> Command:
    """A command set from its Implicit VR Little Endian bytes; CommandError if it is malformed."""
    elements: dict[int, bytes] = {}
    view = memoryview(data)
    offset = 0
    last = -1
    while offset < len(view):
        if len(view) - offset < 8:
            raise CommandError("truncated element header")
        group, element, length = _ELEMENT.unpack_from(view, offset)
        offset += 8
        tag = group << 16 | element
        if group != 0x0000:
            raise CommandError(f"element ({group:04X},{element:04X}) outside group 0000")
        if tag <= last:
            raise CommandError("elements out of order")
        if length > len(view) - offset:
            raise CommandError(f"({group:04X},{element:04X}) runs past the end")
        elements[tag] = bytes(view[offset:offset + length])
        offset += length
        last = tag
    return Command(elements)


def _element(tag: int, value: bytes) -> bytes:
    return _ELEMENT.pack(tag >> 16, tag & 0xFFFF, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _even(raw: bytes) -> bytes:
    return raw + b"\0" if len(raw) % 2 else raw


def _text(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def response(request: Command, status: int, comment: str | None = None) -> bytes:
    """The response command set to ``request`` (C-STORE-RSP, C-ECHO-RSP or another -RSP)."""
    body = b""
    sop_class = request.elements.get(AFFECTED_SOP_CLASS)  # echoed as the request had them, byte for byte
    if sop_class is not None:
        body += _element(AFFECTED_SOP_CLASS, _even(sop_class))
    body += _element(COMMAND_FIELD, _US.pack((request.field | RESPONSE_BIT) & 0xFFFF))
    body += _element(MESSAGE_ID_RESPONDED, _US.pack(request.message_id))
    body += _element(DATA_SET_TYPE, _US.pack(NO_DATA_SET))
    body += _element(STATUS, _US.pack(status))
    if comment:
        body += _element(ERROR_COMMENT, _text(comment[:64]))
    sop_instance = request.elements.get(AFFECTED_SOP_INSTANCE)
    if sop_instance is not None:
        body += _element(AFFECTED_SOP_INSTANCE, _even(sop_instance))
    return _element(0x00000000, struct.pack("<L", len(body))) + body


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xL", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information of a received instance (PS3.10 7.1)."""
    elements = (
        _explicit(0x00020001, b"OB", b"\x00\x01")
        + _explicit(0x00020002, b"UI", _ui(sop_class))
        + _explicit(0x00020003, b"UI", _ui(sop_instance))
        + _explicit(0x00020010, b"UI", _ui(transfer_syntax))
        + _explicit(0x00020012, b"UI", _ui(IMPLEMENTATION_CLASS_UID))
        + _explicit(0x00020013, b"SH", _text(IMPLEMENTATION_VERSION_NAME))
    )
    if source_ae:
        elements += _explicit(0x00020016, b"AE", _text(source_ae))
    return b"\0" * 128 + b"DICM" + _explicit(0x00020000, b"UL", struct.pack("<L", len(elements))) + elements
