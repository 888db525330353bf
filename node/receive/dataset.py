"""A received data set checked for structure without decoding it (PS3.5 7).

The C-STORE path needs a handful of top-level values (the UIDs, Rows and
Columns) and one answer: is every element whole? :func:`walk` reads element
headers only: each defined length must fit, each undefined length (a
sequence, an item, encapsulated pixel data) must close with its delimiter,
and Pixel Data may have an undefined length only in an encapsulated
transfer syntax. Values are skipped, so a 500 MB multi-frame costs what its
headers cost. Anything else is "cannot be decoded" (0xC000), whatever the
UIDs look like.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float Pixel Data
MAX_DEPTH = 32

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_VRS = _LONG_VRS | frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())

#: The top-level elements the node reads.
STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
SOP_INSTANCE_UID = 0x00080018
SOP_CLASS_UID = 0x00080016
ROWS = 0x00280010
COLUMNS = 0x00280011
WANTED = frozenset((STUDY_UID, SERIES_UID, SOP_INSTANCE_UID, SOP_CLASS_UID, ROWS, COLUMNS))


class Undecodable(ValueError):
    """The data set's structure is broken; the message says where."""


@dataclass
class Walked:
    """What the walk found at the top level."""

    values: dict[int, bytes] = field(default_factory=dict)
    pixel_data: bool = False

    def text(self, tag: int) -> str | None:
        raw = self.values.get(tag)
        if raw is None:
            return None
        return raw.rstrip(b"\0 ").lstrip(b" ").decode("ascii", "replace")


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    def __init__(self, data: memoryview, implicit: bool, little: bool, encapsulated: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.encapsulated = encapsulated
        e = "<" if little else ">"
        self.tag_len = struct.Struct(e + "HHL")
        self.tag_vr_short = struct.Struct(e + "HH2sH")
        self.long_len = struct.Struct(e + "L")
        self.us = struct.Struct(e + "H")

    def header(self, offset: int, end: int) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, length, value offset) of the element at ``offset``."""
        if end - offset < 8:
            raise Undecodable(f"element header cut at byte {offset}")
        group, elem, length = self.tag_len.unpack_from(self.data, offset)
        tag = group << 16 | elem
        if self.implicit or group == 0xFFFE:
            return tag, None, length, offset + 8
        _, _, vr, short = self.tag_vr_short.unpack_from(self.data, offset)
        if vr not in _VRS:
            raise Undecodable(f"element {_tag(tag)} has an invalid VR {bytes(vr)!r}")
        if vr in _LONG_VRS:
            if end - offset < 12:
                raise Undecodable(f"element {_tag(tag)} header cut")
            return tag, vr, self.long_len.unpack_from(self.data, offset + 8)[0], offset + 12
        return tag, vr, short, offset + 8

    def dataset(self, offset: int, end: int, depth: int, top: Walked | None, until_item_end: bool) -> int:
        """Walk elements from ``offset``; returns the offset after the data set (or its item delimiter)."""
        if depth > MAX_DEPTH:
            raise Undecodable(f"sequences nested more than {MAX_DEPTH} deep")
        while offset < end:
            tag, vr, length, value = self.header(offset, end)
            if tag == ITEM_END:
                if not until_item_end:
                    raise Undecodable(f"item delimiter outside an item at byte {offset}")
                return value
            if tag in (ITEM, SEQUENCE_END):
                raise Undecodable(f"{_tag(tag)} outside a sequence at byte {offset}")
            if top is not None and tag in PIXEL_DATA_TAGS:
                top.pixel_data = True
            if length == UNDEFINED:
                if tag in PIXEL_DATA_TAGS:
                    if not self.encapsulated:
                        raise Undecodable(f"{_tag(tag)} has an undefined length in a native transfer syntax")
                    offset = self.fragments(value, end, tag)
                elif vr in (None, b"SQ", b"UN"):  # UN of undefined length: an Implicit VR LE sequence
                    walker = _Walker(self.data, True, True, self.encapsulated) if vr == b"UN" else self
                    offset = walker.items(value, end, depth, tag, delimited=True)
                else:
                    raise Undecodable(f"element {_tag(tag)} ({bytes(vr).decode()}) has an undefined length")
                continue
            if length > end - value:
                raise Undecodable(f"element {_tag(tag)} has {end - value} of {length} bytes")
            if vr == b"SQ":  # in Implicit VR a sequence of defined length is only bytes that fit
                self.items(value, value + length, depth, tag, delimited=False)
            if top is not None and tag in WANTED:
                top.values[tag] = bytes(self.data[value:value + length])
            offset = value + length
        if until_item_end:
            raise Undecodable("item without its delimiter")
        return offset

    def items(self, offset: int, end: int, depth: int, tag: int, delimited: bool) -> int:
        """A sequence's items: up to its delimiter (``delimited``, undefined length) or filling
        ``offset..end`` exactly (defined length); returns the offset after it."""
        while True:
            if not delimited and offset >= end:
                return offset
            if delimited and end - offset < 8:
                raise Undecodable(f"sequence {_tag(tag)} without its delimiter")
            item, _, length, value = self.header(offset, end)
            if delimited and item == SEQUENCE_END:
                return value
            if item != ITEM:
                raise Undecodable(f"sequence {_tag(tag)} holds {_tag(item)}, not an item")
            if length == UNDEFINED:
                offset = self.dataset(value, end, depth + 1, None, True)
            else:
                if length > end - value:
                    raise Undecodable(f"an item of {_tag(tag)} has {end - value} of {length} bytes")
                self.dataset(value, value + length, depth + 1, None, False)
                offset = value + length

    def fragments(self, offset: int, end: int, tag: int) -> int:
        """Encapsulated pixel data: the offset table and fragments, up to the sequence delimiter."""
        while True:
            if end - offset < 8:
                raise Undecodable(f"encapsulated {_tag(tag)} without its sequence delimiter")
            group, elem, length = self.tag_len.unpack_from(self.data, offset)
            item = group << 16 | elem
            offset += 8
            if item == SEQUENCE_END:
                return offset
            if item != ITEM or length == UNDEFINED:
                raise Undecodable(f"encapsulated {_tag(tag)} holds {_tag(item)}, not a fragment")
            if length > end - offset:
                raise Undecodable(f"a fragment of {_tag(tag)} has {end - offset} of {length} bytes")
            offset += length


def walk(data: memoryview | bytes, implicit: bool, little: bool, encapsulated: bool) -> Walked:
    """Check a data set's structure and read its top-level UIDs, Rows and Columns; Undecodable if broken."""
    view = memoryview(data)
    top = Walked()
    _Walker(view, implicit, little, encapsulated).dataset(0, len(view), 0, top, False)
    return top
