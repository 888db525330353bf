"""The audit trail: events of a real node in order, durable group commit, several
writer processes, rotation, a failed write, and syslog over real UDP and TCP sockets."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from node import audit as audit_mod
from node import config
from node.audit import Action, AuditError, AuditTrail, Outcome
from node.syslog import SyslogSender
from node.errors import ConfigError
from tests.peers import NodeProcess, echoscu, free_port, have, scu_store, short_tmp, storescu, wait_until

PATIENT_NAME = "AUDIT^SECRET^NAME"
PATIENT_ID = "PID-SECRET-4242"


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary(e: dict) -> tuple[str, str, int]:
    return e["event_id"]["code"], e["action"], e["outcome"]


# --------------------------------------------------------------------- a real node


@pytest.mark.skipif(not have("storescu"), reason="DCMTK is not installed")
def test_store_rejected_association_and_failed_send_in_order(nodes, tmp_path):
    from node.send import SendError, send_result
    from node.store import Storage
    from node.results.facts import object_uids
    from node.worker import WorkerContext, set_context
    from tests.test_tls import write_sr

    closed = free_port()  # nothing listens there: the send fails
    node = NodeProcess(short_tmp(), quiet=600, callers=[("STORESCU", None), ("PYSCU", None)], extra_config=(
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {closed}\nobjects = ["sr"]\n'))
    nodes.append(node.start())
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "ct.dcm")
    assert storescu([tmp_path / "ct.dcm"], node.port).returncode == 0
    assert echoscu(node.port, calling="INTRUDER").returncode != 0
    bad = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    bad.StudyInstanceUID = "1.2.3.x"
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    assert scu_store(node.port, [bad]) == [0xC002]

    # The send job, here in the test process: a second process appending to the same trail.
    cfg = config.load(node.config)
    storage = Storage(cfg.node.storage)
    ctx = WorkerContext(cfg, storage, node.redis(), role="send")
    set_context(ctx)
    try:
        study = str(ds.StudyInstanceUID)
        _, sr_uid = object_uids(ctx.node_uid, study, 1, "sr-comprehensive")
        sr_path = storage.result_path(study, sr_uid)
        sr_path.parent.mkdir(parents=True)
        storage.ensure_dir(storage.state / study)  # where the send state is kept (normally made by completion)
        os.replace(write_sr(tmp_path), sr_path)
        with pytest.raises(SendError):
            send_result(study, 1, "pacs")
    finally:
        ctx.audit.close()
        set_context(None)  # type: ignore[arg-type]
    node.stop()

    path = node.storage / "audit.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(node.storage.stat().st_mode) == 0o700
    events = read_events(path)
    assert [summary(e) for e in events] == [
        ("110100", "E", 0),  # Application Activity: started
        ("110113", "E", 0),  # Security Alert / Node Authentication: association accepted
        ("110104", "C", 0),  # DICOM Instances Transferred: stored
        ("110113", "E", 4),  # association rejected
        ("110113", "E", 0),  # accepted (PYSCU)
        ("110104", "C", 4),  # instance refused: its Study Instance UID is not a UID
        ("110104", "R", 8),  # the SR could not be sent: given up
        ("110100", "E", 0),  # Application Activity: stopped
    ]
    start, accepted, stored, rejected, _, refused, send, stop = events
    assert refused["outcome_description"].startswith("refused with status 0xC002: StudyInstanceUID '1.2.3.x'")
    assert refused["objects"][0]["id"] == "1.2.3.x" and refused["objects"][0]["description"]["instances"] == [
        bad.SOPInstanceUID]
    assert start["event_type"][0] == {"code": "110120", "scheme": "DCM", "meaning": "Application Start"}
    assert stop["event_type"][0]["code"] == "110121"
    assert accepted["event_type"][0]["code"] == rejected["event_type"][0]["code"] == "110126"
    assert accepted["participants"][0]["alt_user_id"] == "AETITLE=STORESCU"
    assert accepted["participants"][0]["address"] == "127.0.0.1" and accepted["participants"][0]["address_type"] == 2
    assert rejected["outcome_description"] == \
        "association rejected: calling AE title 'INTRUDER' is not an allowed caller"
    source, dest = stored["participants"]
    assert (source["user_id"], source["requestor"], source["role"]["code"]) == ("STORESCU", True, "110153")
    assert (dest["user_id"], dest["role"]["code"]) == ("AINODE", "110152")
    obj = stored["objects"][0]
    assert obj["id"] == study and obj["id_type"]["code"] == "110180" and (obj["type"], obj["role"]) == (2, 3)
    assert obj["description"] == {"sop_class": {"uid": ds.SOPClassUID, "count": 1},
                                  "series": ds.SeriesInstanceUID, "instances": [ds.SOPInstanceUID]}
    assert send["participants"][1]["alt_user_id"] == "AETITLE=PACS"
    assert send["participants"][1]["role"]["code"] == "110152"
    assert send["objects"][0]["description"]["instances"] == [sr_uid]
    assert send["outcome_description"].startswith("given up after attempt 1:")
    assert send["source"]["process"] == "worker-send" and send["source"]["pid"] == os.getpid()
    assert stored["source"]["process"] == "serve" and stored["source"]["pid"] != os.getpid()
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", e["time"]) for e in events)

    log = node.log_text()
    assert study in log and "STORESCU" in log  # operational logs carry UIDs and AE titles...
    for text in (log, path.read_text()):  # ...and neither they nor the audit trail patient names or IDs
        assert PATIENT_NAME not in text and "SECRET" not in text and PATIENT_ID not in text


# --------------------------------------------------------------------- the file


def trail(tmp_path: Path, name: str = "audit/audit.jsonl", **kw) -> AuditTrail:
    return AuditTrail(tmp_path / name, "AINODE", "test", **kw).open()


def test_file_0600_in_a_0700_folder_created_at_open(tmp_path):
    t = trail(tmp_path)
    assert t.path.exists() and t.path.stat().st_size == 0
    assert stat.S_IMODE(t.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(t.path.parent.stat().st_mode) == 0o700
    t.close()
    loose = tmp_path / "loose.jsonl"
    loose.write_text("")
    loose.chmod(0o644)
    AuditTrail(loose, "AINODE", "test").open().close()
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600


def test_concurrent_events_share_fsyncs_and_each_is_durable_on_return(tmp_path, monkeypatch):
    t = trail(tmp_path)
    synced = [0]
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        time.sleep(0.002)  # a disk that takes its time, so that threads pile up
        real(fd)
        synced[0] = os.fstat(fd).st_size

    monkeypatch.setattr(audit_mod.os, "fdatasync", fdatasync)
    failures: list[str] = []

    def writer(i: int) -> None:
        for j in range(40):
            t.job(f"1.2.3.{i}", j, Action.READ, Outcome.SUCCESS, f"thread {i} event {j}")
            line = f'"outcome_description":"thread {i} event {j}"'.encode()
            data = t.path.read_bytes()
            end = data.find(line)
            if end < 0 or data.find(b"\n", end) + 1 > synced[0]:
                failures.append(f"{i}/{j} returned before its line was synced")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t.close()
    events = read_events(t.path)
    assert len(events) == 640 and failures == []
    assert t.events == 640 and t.batches < 640 / 2, f"{t.batches} fsyncs for 640 events"
    for i in range(16):  # each thread's events in its own order
        mine = [e["objects"][0]["detail"]["revision"] for e in events if e["objects"][0]["id"] == f"1.2.3.{i}"]
        assert mine == list(range(40))


WRITER = """
import sys
from pathlib import Path
from node.audit import Action, AuditTrail, Outcome
t = AuditTrail(Path(sys.argv[1]), "AINODE", "writer-" + sys.argv[2]).open()
for j in range(100):
    t.job("1.2." + sys.argv[2], j, Action.READ, Outcome.SUCCESS, sys.argv[2] * 9000)
t.close()
"""


def test_processes_appending_at_once_never_interleave(tmp_path):
    path = tmp_path / "audit.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(n)]) for n in range(4)]
    for p in procs:
        assert p.wait(120) == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 401
    events = [json.loads(line) for line in lines[:-1]]  # every line whole: > PIPE_BUF each
    for n in range(4):
        assert [e["objects"][0]["detail"]["revision"] for e in events if e["objects"][0]["id"] == f"1.2.{n}"] == \
            list(range(100))


def test_rotated_file_is_reopened(tmp_path):
    t = trail(tmp_path)
    t.application(True, "one")
    os.rename(t.path, t.path.with_suffix(".1"))
    t.application(False, "two")
    t.close()
    assert [e["outcome_description"] for e in read_events(t.path.with_suffix(".1"))] == ["one"]
    assert [e["outcome_description"] for e in read_events(t.path)] == ["two"]
    assert stat.S_IMODE(t.path.stat().st_mode) == 0o600


def test_failed_write_raises_and_leaves_no_half_line(tmp_path, monkeypatch):
    t = trail(tmp_path)
    t.application(True, "before")
    size = t.path.stat().st_size
    real = os.write

    def disk_full(fd: int, data) -> int:
        real(fd, bytes(data[:10]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit_mod.os, "write", disk_full)
    with pytest.raises(AuditError, match="No space left on device"):
        t.application(True, "lost")
    assert t.path.stat().st_size == size
    monkeypatch.setattr(audit_mod.os, "write", real)
    t.application(False, "after")
    t.close()
    assert [e["outcome_description"] for e in read_events(t.path)] == ["before", "after"]


def test_unwritable_path_fails_at_open(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(AuditError, match="cannot open for appending"):
        audit_mod.open_trail(blocker / "audit.jsonl", "AINODE", "test")


def test_config_audit_path_and_syslog():
    cfg = config.parse_text('[node]\nstorage = "/srv/ainode"\n', "a.toml")
    assert cfg.audit_path == Path("/srv/ainode/audit.jsonl")
    cfg = config.parse_text('[audit]\npath = "log/audit.jsonl"\nsyslog = "tcp://[::1]:6514"\n', "a.toml", Path("/x"))
    assert cfg.audit_path == Path("/x/log/audit.jsonl")
    assert config.syslog_target("tcp://[::1]:6514") == ("tcp", "::1", 6514)
    assert config.syslog_target("logs.example.org:514") == ("udp", "logs.example.org", 514)
    for bad, why in (("nohostport", "must be host:port"), ("tls://h:6514", "protocol must be"),
                     ("h:99999", "port must be between")):
        with pytest.raises(ConfigError, match=f"a.toml: \\[audit\\] syslog: {why}"):
            config.parse_text(f'[audit]\nsyslog = "{bad}"\n', "a.toml")


# --------------------------------------------------------------------- syslog

RFC5424 = re.compile(rb"^<(\d+)>1 (\S+) (\S+) ainode (\d+) (\d+) - (\{.*\})$")


def test_syslog_over_udp_is_rfc5424(tmp_path):
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(5)
    t = trail(tmp_path, syslog=f"127.0.0.1:{server.getsockname()[1]}")
    t.application(True, "started")
    t.config_reloaded(tmp_path / "ainode.toml", True, Outcome.SERIOUS_FAILURE, "config not reloaded: bad")
    got = [server.recvfrom(65535)[0] for _ in range(2)]
    t.close()
    server.close()
    lines = t.path.read_bytes().splitlines()
    for datagram, line, pri in zip(got, lines, (85, 83)):  # facility 10; notice, error
        m = RFC5424.match(datagram)
        assert m, datagram[:120]
        assert int(m.group(1)) == pri and m.group(4) == str(os.getpid()).encode()
        assert m.group(6) == line  # the same JSON as the file
    assert RFC5424.match(got[0]).group(5) == b"110100" and RFC5424.match(got[1]).group(5) == b"110113"
    assert json.loads(lines[1])["event_type"][0]["code"] == "110129"  # Security Configuration


def test_syslog_over_tcp_with_octet_counting(tmp_path):
    server = socket.create_server(("127.0.0.1", 0))
    frames: list[bytes] = []

    def collect() -> None:
        conn, _ = server.accept()
        buf = b""
        with conn:
            while len(frames) < 3:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
                while b" " in buf:
                    length, rest = buf.split(b" ", 1)
                    if len(rest) < int(length):
                        break
                    frames.append(rest[: int(length)])
                    buf = rest[int(length):]

    th = threading.Thread(target=collect, daemon=True)
    th.start()
    t = trail(tmp_path, syslog=f"tcp://127.0.0.1:{server.getsockname()[1]}")
    for i in range(3):
        t.job("1.2.3", i, Action.READ, Outcome.SUCCESS, f"event {i}")
    th.join(10)
    t.close()
    server.close()
    assert [RFC5424.match(f).group(6) for f in frames] == t.path.read_bytes().splitlines()


def test_syslog_outage_drops_never_blocks(tmp_path):
    t = trail(tmp_path, syslog=f"tcp://127.0.0.1:{free_port()}")  # nothing listens
    started = time.monotonic()
    for i in range(50):
        t.job("1.2.3", i, Action.READ, Outcome.SUCCESS, "x")
    assert time.monotonic() - started < 5
    assert t.syslog is not None
    wait_until(lambda: t.syslog.dropped == 50, 10, "every message dropped")
    t.close()
    assert len(t.path.read_bytes().splitlines()) == 50  # the file has them all
    full = SyslogSender("127.0.0.1:9", queue_size=2)  # never started: its queue fills
    for i in range(5):
        full.submit({"outcome": 0, "event_id": {"code": "110100"}}, b"{}")
    assert full.dropped == 3


def test_analysis_job_start_and_end_audited(tmp_path):
    """A study the model cannot use: the job is audited as started (R, 0), then without result (R, 4)."""
    from node.config import Config, NodeConfig
    from node.enqueue import job_id
    from node.store import Revision, Storage
    from node.worker import WorkerContext, analyse_study, set_context

    storage = Storage(tmp_path / "storage")
    storage.prepare()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # one slice: fewer than [series] min_slices
    study = str(ds.StudyInstanceUID)
    storage.write_instance(study, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                           [Path(get_testdata_file("CT_small.dcm")).read_bytes()])
    storage.write_revision(Revision(study, 1, {ds.SOPInstanceUID: ds.SeriesInstanceUID}, 0.0, "quiet",
                                    job_id(study, 1)))
    ctx = WorkerContext(Config(node=NodeConfig(storage=storage.root)), storage, None)  # type: ignore[arg-type]
    set_context(ctx)
    try:
        assert analyse_study(study, 1) == "no_result"
        assert analyse_study(study, 1) == "no_result"  # a rerun: recorded, not analysed again
    finally:
        ctx.audit.close()
        set_context(None)  # type: ignore[arg-type]
    events = read_events(storage.root / "audit.jsonl")
    assert [summary(e) for e in events] == [("110103", "R", 0), ("110103", "R", 4), ("110103", "R", 0),
                                            ("110103", "R", 0)]
    assert events[0]["outcome_description"] == "analysis started (pipeline AINODE)"
    assert events[1]["outcome_description"].startswith("no result (pipeline AINODE): ")
    assert events[3]["outcome_description"] == "already no_result, not analysed again"
    assert all(e["objects"][0]["id"] == study and e["objects"][0]["detail"] == {"revision": 1} for e in events)
    assert events[0]["source"]["process"] == "worker-analyse"
