"""`ainode serve` against hostile peers: stalled and dripping connections, oversized and malformed PDUs,
a fuzzed corpus, hostile data sets. Raw sockets on 127.0.0.1 do the attacking; DCMTK echoscu and a
pynetdicom SCU are the real clients that must still get through."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import threading
import time
from contextlib import closing
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from tests.peers import NodeProcess, ct_small, echoscu, have, scu_store, short_tmp, wait_until

pytestmark = pytest.mark.skipif(not have("echoscu"), reason="DCMTK is not installed (apt-get install dcmtk)")

VERIFICATION = b"1.2.840.10008.1.1"
CT_IMAGE = b"1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = b"1.2.840.10008.1.2.1"
IMPLICIT_LE = b"1.2.840.10008.1.2"
APP_CONTEXT = b"1.2.840.10008.3.1.1.1"


# --- raw PDUs, built here by hand (independently of node.receive) ------------------------------------


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def presentation_context(cid: int, abstract: bytes | None, syntaxes: list[bytes]) -> bytes:
    body = bytes((cid, 0, 0, 0))
    if abstract is not None:
        body += _item(0x30, abstract)
    for ts in syntaxes:
        body += _item(0x40, ts)
    return _item(0x20, body)


def associate_rq(contexts: list[bytes] | None = None, calling: bytes = b"FUZZ", called: bytes = b"AINODE",
                 max_pdu: int = 16384) -> bytes:
    if contexts is None:
        contexts = [presentation_context(1, VERIFICATION, [IMPLICIT_LE]),
                    presentation_context(3, CT_IMAGE, [EXPLICIT_LE])]
    body = struct.pack(">HH16s16s32x", 1, 0, called.ljust(16), calling.ljust(16))
    body += _item(0x10, APP_CONTEXT) + b"".join(contexts) + _item(0x50, _item(0x51, struct.pack(">L", max_pdu)))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body)) + body


def pdv(cid: int, header: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, cid, header) + data


def echo_command(message_id: int = 1) -> bytes:
    def el(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value
    body = (el(0x00000002, VERIFICATION + b"\0") + el(0x00000100, struct.pack("<H", 0x0030))
            + el(0x00000110, struct.pack("<H", message_id)) + el(0x00000800, struct.pack("<H", 0x0101)))
    return el(0x00000000, struct.pack("<L", len(body))) + body


ECHO_RQ = pdu(0x04, pdv(1, 0x03, echo_command()))
RELEASE_RQ = pdu(0x05, b"\0" * 4)


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """What the node sends until it closes the connection (bounded by ``timeout``)."""
    sock.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        except socket.timeout:
            raise AssertionError(f"the node kept the connection open for {timeout} s; got {out[:40]!r}")
        if not data:
            break
        out += data
    return out


def pdu_types(data: bytes) -> list[int]:
    """The PDU types in a byte stream from the node."""
    types, offset = [], 0
    while offset + 6 <= len(data):
        kind, _, length = struct.unpack_from(">BBL", data, offset)
        types.append(kind)
        offset += 6 + length
    return types


def associated(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(associate_rq())
    kind, _, length = struct.unpack(">BBL", recv_exact(sock, 6))
    recv_exact(sock, length)
    assert kind == 0x02, f"expected an A-ASSOCIATE-AC, got PDU type {kind}"
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise AssertionError(f"closed after {len(out)} of {n} bytes")
        out += data
    return out


# --- the node's process, as the kernel sees it ---------------------------------------------------------


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def audit_events(node: NodeProcess) -> list[dict]:
    path = node.storage / "audit" / "audit.jsonl"
    if not path.exists():
        path = next(node.storage.rglob("audit*.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dropped(node: NodeProcess) -> list[str]:
    return [e["outcome_description"] for e in audit_events(node)
            if e["outcome_description"].startswith("connection dropped")]


@pytest.fixture
def workdir() -> Path:
    return short_tmp()


def start(nodes: list, workdir: Path, node_config: str = "") -> NodeProcess:
    node = NodeProcess(workdir, node_config=node_config)
    nodes.append(node)
    node.start()
    assert node.proc is not None
    return node


# --- stalled, dripping and idle peers ------------------------------------------------------------------


def test_stalled_and_dripping_peers_do_not_lock_out_a_scanner(nodes, workdir):
    node = start(nodes, workdir, "max_associations = 4\nassociate_timeout_seconds = 2\nidle_timeout_seconds = 3")
    stalled = []
    for _ in range(4 + 1):  # max_associations + 1 connections that send a PDU header and stop
        sock = connect(node.port)
        sock.sendall(struct.pack(">BBL", 0x01, 0, 200))
        stalled.append(sock)
    stop = threading.Event()

    def drip() -> None:  # one byte a second of a valid A-ASSOCIATE-RQ
        with closing(connect(node.port)) as sock:
            for byte in associate_rq()[:20]:
                if stop.wait(1.0):
                    return
                try:
                    sock.send(bytes((byte,)))
                except OSError:
                    return

    dripper = threading.Thread(target=drip)
    dripper.start()
    try:
        t = time.monotonic()
        res = echoscu(node.port)
        assert res.returncode == 0, res.stdout + res.stderr  # at once: connections waiting to associate hold no slot
        assert time.monotonic() - t < 5
        for sock in stalled:  # each is closed by the node at its deadline, without an A-ABORT (it never associated)
            assert read_all(sock, timeout=6) == b""
        wait_until(lambda: len(dropped(node)) >= 6, 10, "six dropped connections audited")
    finally:
        stop.set()
        dripper.join(10)
        for sock in stalled:
            sock.close()
    why = dropped(node)
    assert sum("A-ASSOCIATE-RQ not complete within 2 s" in w for w in why) == 5  # the stalled headers
    assert sum("no A-ASSOCIATE-RQ within 2 s" in w for w in why) == 1  # the drip, still in its PDU header
    alerts = [e for e in audit_events(node) if e["outcome_description"].startswith("connection dropped")]
    assert all(e["event_id"]["code"] == "110113" and e["participants"][0]["address"] == "127.0.0.1" for e in alerts)
    assert node.log_text().count("dropped: A-ASSOCIATE-RQ not complete within 2 s") == 5  # each logged once


def test_idle_associations_are_aborted_and_free_their_slots(nodes, workdir):
    node = start(nodes, workdir, "max_associations = 2\nidle_timeout_seconds = 2")
    idle = [associated(node.port) for _ in range(2)]
    res = echoscu(node.port)
    assert res.returncode != 0  # both slots held: A-ASSOCIATE-RJ, local limit exceeded
    assert "local limit exceeded" in node.log_text()
    for sock in idle:
        assert pdu_types(read_all(sock, timeout=5)) == [0x07]  # A-ABORT at the idle timeout
        sock.close()
    res = echoscu(node.port)
    assert res.returncode == 0, res.stdout + res.stderr
    wait_until(lambda: sum("no PDU within 2 s" in w for w in dropped(node)) == 2, 5, "both idle drops audited")


def test_one_host_cannot_take_every_connection(nodes, workdir):
    node = start(nodes, workdir, "max_connections_per_host = 3\nassociate_timeout_seconds = 5")
    held = [connect(node.port) for _ in range(3)]
    try:
        extra = connect(node.port)
        assert read_all(extra, timeout=5) == b""  # closed at once
        extra.close()
        wait_until(lambda: "more than 3 connections open from 127.0.0.1" in node.log_text(), 5, "the refusal logged")
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: echoscu(node.port).returncode == 0, 10, "echoscu once the held connections closed")


# --- memory, threads and descriptors ---------------------------------------------------------------------


def test_a_declared_2gb_pdu_costs_no_memory(nodes, workdir):
    node = start(nodes, workdir)
    pid = node.proc.pid
    before = proc_status(pid, "VmRSS")
    for kind in (0x01, 0x04, 0x09):
        sock = connect(node.port)
        sock.sendall(struct.pack(">BBL", kind, 0, 2 * 1024**3 - 1))
        try:
            for _ in range(64):  # then 64 MB of it, as fast as the node takes it
                sock.sendall(b"\0" * (1 << 20))
        except OSError:
            pass  # the node closed the connection: what it should do
        got = read_all(sock)
        assert pdu_types(got) in ([0x07], []), got[:20]
        sock.close()
    # and after an association: a P-DATA-TF above the negotiated maximum
    sock = associated(node.port)
    sock.sendall(struct.pack(">BBL", 0x04, 0, 2 * 1024**3 - 1))
    assert pdu_types(read_all(sock)) == [0x07]
    sock.close()
    grown_kb = proc_status(pid, "VmRSS") - before
    assert grown_kb < 8 * 1024, f"RSS grew by {grown_kb} kB"
    wait_until(lambda: any("more than the negotiated 131072" in w for w in dropped(node)), 5, "the drop audited")
    assert any("declared an A-ASSOCIATE-RQ of 2147483647 bytes" in w for w in dropped(node))
    assert echoscu(node.port).returncode == 0


def test_malformed_presentation_contexts_leak_no_thread_or_descriptor(nodes, workdir):
    node = start(nodes, workdir, "max_connections_per_host = 64")
    pid = node.proc.pid
    assert echoscu(node.port).returncode == 0
    threads0, fds0, rss0 = proc_status(pid, "Threads"), fds(pid), proc_status(pid, "VmRSS")
    bad = associate_rq([presentation_context(1, VERIFICATION, [])])  # no transfer syntax sub-item
    answers: set[tuple[int, ...]] = set()

    def hammer(n: int) -> None:
        for _ in range(n):
            with closing(connect(node.port)) as sock:
                sock.sendall(bad)
                answers.add(tuple(pdu_types(read_all(sock))))

    workers = [threading.Thread(target=hammer, args=(100,)) for _ in range(10)]  # 1000 connections, 10 at a time
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert answers == {(0x07,)}  # A-ABORT, every one
    wait_until(lambda: proc_status(pid, "Threads") <= threads0 and fds(pid) <= fds0, 10,
               "threads and descriptors back to their baseline")
    assert proc_status(pid, "VmRSS") - rss0 < 20 * 1024
    assert echoscu(node.port).returncode == 0


def test_control_characters_in_ae_titles_are_rejected_and_escaped(nodes, workdir):
    node = start(nodes, workdir)
    with closing(connect(node.port)) as sock:
        sock.sendall(associate_rq(calling=b"EVIL\x1b[31m\x00X"))
        got = read_all(sock)
    assert got[:1] == b"\x03" and got[7:10] == bytes((1, 1, 3))  # A-ASSOCIATE-RJ: calling AE title not recognised
    raw = node.log.read_bytes()
    assert b"\x1b" not in raw and b"\x00" not in raw
    assert "EVIL\\x1b[31m" in node.log_text()


# --- a fuzzed corpus of PDUs and items ---------------------------------------------------------------------


def fuzz_corpus(seed: int = 20261201) -> list[tuple[str, bytes, bool]]:
    """(name, bytes, after an association?) cases: at least 200 malformed PDUs and items."""
    rng = random.Random(seed)
    good = associate_rq()
    cases: list[tuple[str, bytes, bool]] = []
    for kind in [0x00, 0x08, 0x10, 0x7F, 0xFF] + rng.sample(range(0x08, 0x100), 10):
        cases.append((f"unknown PDU type 0x{kind:02X}", pdu(kind, b"\0" * rng.randrange(0, 64)), False))
    for name, data in [("A-ASSOCIATE-AC", pdu(0x02, b"\0" * 68)), ("A-ASSOCIATE-RJ", pdu(0x03, b"\0" * 4)),
                       ("P-DATA-TF", ECHO_RQ), ("A-RELEASE-RQ", RELEASE_RQ), ("A-RELEASE-RP", pdu(0x06, b"\0" * 4))]:
        cases.append((f"{name} before associating", data, False))
    for n in rng.sample(range(7, len(good) - 1), 25):
        cases.append((f"A-ASSOCIATE-RQ cut at {n}", good[:n], False))
    for declared in (0, 1, 10, 67, len(good) - 7, len(good) - 5, len(good) + 100, MAX_RQ + 1):
        cases.append((f"A-ASSOCIATE-RQ declaring {declared} bytes", struct.pack(">BBL", 1, 0, declared) + good[6:],
                      False))
    for i in range(70):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(6, len(data))] = rng.randrange(256)
        cases.append((f"A-ASSOCIATE-RQ with flipped bytes #{i}", bytes(data), False))
    items = [
        ("no presentation context", associate_rq([])),
        ("no abstract syntax", associate_rq([presentation_context(1, None, [IMPLICIT_LE])])),
        ("even context ID", associate_rq([presentation_context(2, VERIFICATION, [IMPLICIT_LE])])),
        ("context ID 0", associate_rq([presentation_context(0, VERIFICATION, [IMPLICIT_LE])])),
        ("empty abstract syntax", associate_rq([presentation_context(1, b"", [IMPLICIT_LE])])),
        ("empty transfer syntax", associate_rq([presentation_context(1, VERIFICATION, [b""])])),
        ("256 transfer syntaxes", associate_rq([presentation_context(1, VERIFICATION, [IMPLICIT_LE] * 256)])),
        ("empty called AE title", associate_rq(called=b"")),
        ("empty calling AE title", associate_rq(calling=b"")),
        ("backslash in AE title", associate_rq(calling=b"A\\B")),
    ]
    cases += [(name, data, False) for name, data in items]
    # item length fields off by a little or a lot, in every item of the request
    offsets = []
    offset = 6 + 68
    while offset + 4 <= len(good):
        offsets.append(offset)
        kind, _, length = struct.unpack_from(">BBH", good, offset)
        offset += 4 + (length if kind not in (0x20, 0x50) else 4)  # into contexts and user info: their sub-items
    for offset in offsets:
        for value in (0, 1, 0xFFFF, struct.unpack_from(">H", good, offset + 2)[0] + 1):
            data = bytearray(good)
            struct.pack_into(">H", data, offset + 2, value)
            cases.append((f"item at {offset} with length {value}", bytes(data), False))
    # after an association: the P-DATA loop
    command = echo_command()
    after = [
        ("PDV of length 0", pdu(0x04, struct.pack(">LBB", 0, 1, 3))),
        ("PDV of length 1", pdu(0x04, struct.pack(">LBBB", 1, 1, 3, 0))),
        ("PDV longer than its PDU", pdu(0x04, struct.pack(">LBB", 500, 1, 3) + command)),
        ("PDV cut in its header", pdu(0x04, b"\0\0\0")),
        ("PDV on context 5 (not proposed)", pdu(0x04, pdv(5, 3, command))),
        ("PDV on context 2 (even)", pdu(0x04, pdv(2, 3, command))),
        ("data set fragment without a command", pdu(0x04, pdv(1, 2, b"\0" * 20))),
        ("command set with an element past its end", pdu(0x04, pdv(1, 3, command[:-4] + b"\xff\xff\xff\x00"))),
        ("command set outside group 0000", pdu(0x04, pdv(1, 3, b"\x08\x00\x16\x00\x02\x00\x00\x001\x00"))),
        ("command set out of order", pdu(0x04, pdv(1, 3, command[12:] + command[:12]))),
        ("command set cut in an element header", pdu(0x04, pdv(1, 3, command[:5]))),
        ("command set of 70 kB", pdu(0x04, pdv(1, 1, b"\0" * 60000)) + pdu(0x04, pdv(1, 3, b"\0" * 10000))),
        ("command set without a Command Field", pdu(0x04, pdv(1, 3, command[:12]))),
        ("a second A-ASSOCIATE-RQ", good),
        ("an A-ASSOCIATE-AC", pdu(0x02, b"\0" * 68)),
        ("an A-RELEASE-RP", pdu(0x06, b"\0" * 4)),
        ("an A-RELEASE-RQ of 8 bytes", pdu(0x05, b"\0" * 8)),
        ("unknown PDU type 0x44", pdu(0x44, b"\0" * 8)),
        ("C-STORE command on the Verification context, then garbage",
         pdu(0x04, pdv(1, 3, command.replace(struct.pack("<H", 0x0030), struct.pack("<H", 0x0001))))
         + pdu(0x04, pdv(1, 2, b"\xff" * 40))),
    ]
    cases += [(name, data, True) for name, data in after]
    for i in range(40):
        data = bytearray(ECHO_RQ)
        for _ in range(rng.randrange(1, 3)):
            data[rng.randrange(0, len(data))] = rng.randrange(256)
        cases.append((f"P-DATA-TF echo with flipped bytes #{i}", bytes(data), True))
    return cases


MAX_RQ = 256 * 1024


def test_fuzzed_pdus_keep_the_node_up_and_leak_nothing(nodes, workdir):
    node = start(nodes, workdir, "associate_timeout_seconds = 3\nidle_timeout_seconds = 3")
    pid = node.proc.pid
    good = ct_small()
    assert scu_store(node.port, [good]) == [0]
    threads0, fds0 = proc_status(pid, "Threads"), fds(pid)
    cases = fuzz_corpus()
    assert len(cases) >= 200
    answers: dict[str, list[int]] = {}
    for i, (name, data, after) in enumerate(cases):
        sock = associated(node.port) if after else connect(node.port)
        with closing(sock):
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)  # and nothing more: the node must not wait for it
            except OSError:
                pass
            types = pdu_types(read_all(sock, timeout=8))
        answers[name] = types
        # what may come back: nothing, A-ASSOCIATE-AC or -RJ, A-ABORT, or P-DATA (a flip that left an echo valid)
        assert set(types) <= {0x02, 0x03, 0x04, 0x07}, (name, types)
        assert node.proc.poll() is None, f"the node died on {name!r}"
        if (i + 1) % 50 == 0:
            assert scu_store(node.port, [ct_small()]) == [0], f"a good C-STORE after case {i + 1}"
    assert scu_store(node.port, [ct_small()]) == [0]
    # precise answers where the standard names one
    assert answers["unknown PDU type 0xFF"] == [0x07]
    assert answers["A-ASSOCIATE-AC before associating"] == [0x07]
    assert answers["no presentation context"] == [0x03]
    assert answers["no abstract syntax"] == [0x07]
    assert answers["even context ID"] == [0x07]
    assert answers["empty calling AE title"] == [0x03]
    assert answers["backslash in AE title"] == [0x03]
    assert answers["PDV on context 5 (not proposed)"] == [0x07]
    assert answers["a second A-ASSOCIATE-RQ"] == [0x07]
    assert answers["unknown PDU type 0x44"] == [0x07]
    assert answers["command set of 70 kB"] == [0x07]
    wait_until(lambda: proc_status(pid, "Threads") <= threads0 and fds(pid) <= fds0, 15,
               "threads and descriptors back to their baseline")
    log = node.log_text()
    assert "Traceback" not in log and "unexpected error" not in log


# --- hostile data sets: the precise status for each --------------------------------------------------------


def _part10(ds: Dataset, path: Path, keep_meta: bool = False) -> bytes:
    """The file's bytes; ``keep_meta``: the file meta as it is (the request then differs from the data set)."""
    ds.save_as(path, enforce_file_format=not keep_meta)
    return path.read_bytes()


def _data_offset(raw: bytes) -> int:
    group_length = struct.unpack_from("<L", raw, 132 + 8)[0]
    return 132 + 12 + group_length


def hostile_datasets(tmp: Path) -> list[tuple[str, Path, int]]:
    """(name, Part 10 file, the status it must get): at least 50."""
    out: list[tuple[str, Path, int]] = []

    def add(name: str, data: bytes, status: int) -> None:
        path = tmp / f"{len(out):03d}.dcm"
        path.write_bytes(data)
        out.append((name, path, status))

    raw = _part10(ct_small(), tmp / "base.dcm")
    pixel = raw.rfind(b"\xe0\x7f\x10\x00OW")
    value = pixel + 12
    rng = random.Random(7)
    for cut in sorted(rng.sample(range(value + 1, len(raw) - 1), 20)):
        add(f"cut at byte {cut} of the pixel data", raw[:cut], 0xC000)
    for cut in sorted(rng.sample(range(_data_offset(raw) + 200, pixel), 6)):
        add(f"cut at byte {cut} before the pixel data", raw[:cut], 0xC000)
    undefined = raw[:pixel + 8] + b"\xff\xff\xff\xff" + raw[pixel + 12:]
    add("native pixel data of undefined length", undefined, 0xC000)
    add("native pixel data of undefined length, delimited", undefined + b"\xfe\xff\xdd\xe0\0\0\0\0", 0xC000)
    encapsulated = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    encapsulated.SOPInstanceUID = encapsulated.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    enc = _part10(encapsulated, tmp / "enc.dcm")
    delimiter = enc.rfind(b"\xfe\xff\xdd\xe0")
    for cut in (delimiter, delimiter - 1, delimiter - 100, delimiter + 4):
        add(f"encapsulated pixel data cut at {cut}", enc[:cut], 0xC000)
    add("encapsulated pixel data, fragment of undefined length",
        enc[:delimiter - 8] + b"\xfe\xff\x00\xe0\xff\xff\xff\xff", 0xC000)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        add(f"no {key}", _part10(ct_small(**{key: None}), tmp / "x.dcm"), 0xC001)
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        add(f"{key} 1.02.003", _part10(ct_small(**{key: "1.02.003"}), tmp / "x.dcm"), 0xC002)
        add(f"{key} with a letter", _part10(ct_small(**{key: "1.2.x"}), tmp / "x.dcm"), 0xC002)
        add(f"{key} of 65 characters", _part10(ct_small(**{key: "1." + "2" * 63}), tmp / "x.dcm"), 0xC002)
    add("SOPClassUID 1.2.840.010008", _part10(ct_small(SOPClassUID="1.2.840.010008"), tmp / "x.dcm", keep_meta=True), 0xC002)
    mismatch = ct_small()
    mismatch.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    add("SOP Class differs from the request's", _part10(mismatch, tmp / "x.dcm", keep_meta=True), 0xA900)
    other = ct_small()
    other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    add("SOP Instance differs from the request's", _part10(other, tmp / "x.dcm", keep_meta=True), 0xC003)
    leading = ct_small()
    leading.SOPInstanceUID = leading.file_meta.MediaStorageSOPInstanceUID = "1.2.03.4"
    add("SOPInstanceUID 1.2.03.4", _part10(leading, tmp / "x.dcm"), 0xC002)
    name_at = raw.find(b"\x10\x00\x10\x00PN")
    add("an element longer than the data set",
        raw[:name_at + 6] + struct.pack("<H", 0xFFF0) + raw[name_at + 8:], 0xC000)
    add("an invalid VR", raw[:name_at + 4] + b"Z?" + raw[name_at + 6:], 0xC000)
    no_pixels = ct_small(PixelData=None)
    add("image without pixel data", _part10(no_pixels, tmp / "x.dcm"), 0xC000)
    deep = ct_small()
    inner = Dataset()
    inner.CodeValue = "1"
    for _ in range(40):
        outer = Dataset()
        outer.ConceptNameCodeSequence = Sequence([inner])
        inner = outer
    deep.ContentSequence = Sequence([inner])
    add("sequences nested 40 deep", _part10(deep, tmp / "x.dcm"), 0xC000)
    seq = ct_small()
    seq.ReferencedImageSequence = Sequence([Dataset()])
    seq.ReferencedImageSequence[0].ReferencedSOPInstanceUID = generate_uid()
    seq_raw = _part10(seq, tmp / "x.dcm")
    at = seq_raw.find(b"\x08\x00\x40\x11SQ")
    end = seq_raw.find(b"\xfe\xff\xdd\xe0\0\0\0\0", at)
    add("a sequence without its delimiter", seq_raw[:end] + seq_raw[end + 8:], 0xC000)
    item_end = seq_raw.find(b"\xfe\xff\x0d\xe0\0\0\0\0", at)
    add("an item without its delimiter", seq_raw[:item_end] + seq_raw[item_end + 8:], 0xC000)
    add("an item delimiter outside a sequence", seq_raw[:at] + b"\xfe\xff\x0d\xe0\0\0\0\0" + seq_raw[at:], 0xC000)
    private = ct_small()
    private.add(DataElement(0x00091001, "UN", b"\0" * 7))
    add("an odd-length UN value (still whole)", _part10(private, tmp / "x.dcm"), 0x0000)
    return out


def test_hostile_datasets_get_their_precise_status(nodes, workdir, tmp_path):
    node = start(nodes, workdir)
    cases = hostile_datasets(tmp_path)
    assert len(cases) >= 50
    statuses = scu_store(node.port, [path for _, path, _ in cases] + [ct_small()])
    got = {name: f"0x{s:04X}" for (name, _, _), s in zip(cases, statuses)}
    expected = {name: f"0x{status:04X}" for name, _, status in cases}
    assert got == expected
    assert statuses[-1] == 0  # the association went on through all of them
    assert len(node.stored_files()) == 2  # the whole UN one and the good one
    log = node.log_text()
    assert "has an undefined length in a native transfer syntax" in log
    assert "without its sequence delimiter" in log
    assert "has a component with a leading zero" in log
    assert "SOPClassUID missing" in log
    studies = node.storage / "studies"
    assert all(any(d.iterdir()) for d in studies.iterdir())  # no empty folder left by a refused instance
