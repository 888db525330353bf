"""`ainode serve` against real peers on 127.0.0.1: DCMTK storescu/echoscu and a pynetdicom SCU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless
from pynetdicom import AE

from node.enqueue import job_id
from tests.peers import NodeProcess, ct_small, scu_store as send, RedisServer, echoscu, have, pid_alive, short_tmp, storescu, wait_until

pytestmark = pytest.mark.skipif(not have("storescu"), reason="DCMTK is not installed (apt-get install dcmtk)")


@pytest.fixture
def workdir() -> Path:
    return short_tmp()


def start_node(nodes: list, workdir: Path, **kw) -> NodeProcess:
    node = NodeProcess(workdir, **kw)
    nodes.append(node)
    return node.start()


def study_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def queued_jobs(node: NodeProcess) -> list[str]:
    r = node.redis()
    return sorted(x.decode() for x in r.lrange("rq:queue:ainode", 0, -1))


def test_lung1_series_stored_byte_identical_and_queued_once(nodes, workdir, lung1_series):
    node = start_node(nodes, workdir, quiet=1.0)
    result = storescu(lung1_series, node.port)
    assert result.returncode == 0, result.stderr
    stored = node.stored_files()
    assert len(stored) == 48
    by_sop = {p.stem: p for p in stored}
    for src in lung1_series:
        a = pydicom.dcmread(src)
        b = pydicom.dcmread(by_sop[a.SOPInstanceUID])
        assert a.PixelData == b.PixelData
        assert b.file_meta.SourceApplicationEntityTitle == "STORESCU"
        assert (by_sop[a.SOPInstanceUID].stat().st_mode & 0o777) == 0o600
    study = study_of(lung1_series[0])
    wait_until(lambda: node.revisions(study), 15, "the study to complete")
    time.sleep(1.5)  # a second quiet period passes: still one revision, one job
    assert [p.name for p in node.revisions(study)] == ["rev-0001.json"]
    rev = json.loads(node.revisions(study)[0].read_text())
    assert len(rev["instances"]) == 48 and rev["reason"] == "quiet"
    assert queued_jobs(node) == [job_id(study, 1)]
    assert "Study %s: complete (quiet), 48 instances in 1 series" % study in node.log_text()
    assert "DEMO^LUNG1" not in node.log_text()  # logs carry UIDs, never patient names


def test_echo_and_called_ae_mismatch(nodes, workdir):
    node = start_node(nodes, workdir)
    assert echoscu(node.port).returncode == 0
    bad = echoscu(node.port, called="NOTAINODE")
    assert bad.returncode != 0
    assert "Called AE Title Not Recognized" in bad.stderr + bad.stdout
    assert "rejected, called AE title 'NOTAINODE'" in node.log_text()


def test_unknown_calling_ae_and_wrong_host_rejected(nodes, workdir):
    node = start_node(nodes, workdir, callers=[("CT01", None), ("CT02", "10.0.0.21")])
    assert echoscu(node.port, calling="CT01").returncode == 0
    for calling in ("INTRUDER", "CT02"):  # unknown; known but bound to another host
        res = echoscu(node.port, calling=calling)
        assert res.returncode != 0
        assert "Calling AE Title Not Recognized" in res.stderr + res.stdout
    log = node.log_text()
    assert "calling AE title 'INTRUDER' is not an allowed caller" in log
    assert "calling AE title 'CT02' is not allowed from this host" in log


def test_uid_traversal_and_long_uid_refused(nodes, workdir):
    node = start_node(nodes, workdir)
    bad_study = ct_small(StudyInstanceUID="../../../../tmp/x")
    long_series = ct_small(SeriesInstanceUID="1." + "2" * 70)
    good = ct_small()
    statuses = send(node.port, [bad_study, long_series, good])
    assert statuses == [0xC002, 0xC002, 0x0000]  # the association goes on after a refusal
    assert [p.stem for p in node.stored_files()] == [good.SOPInstanceUID]
    assert not (workdir / "tmp" / "x").exists() and not Path("/tmp/x").exists()
    assert [p for p in workdir.rglob("*.dcm") if node.storage not in p.parents] == []


def test_broken_datasets_get_failure_status_and_association_goes_on(nodes, workdir, tmp_path):
    node = start_node(nodes, workdir)
    no_study = ct_small(StudyInstanceUID=None)
    wrong_class = tmp_path / "wrong_class.dcm"  # meta says CT (the request), data set says MR
    ds = ct_small()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.save_as(wrong_class)  # keeps the CT meta as it is
    assert pydicom.dcmread(wrong_class).file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    # A truncated Part 10 file: valid meta, the data set cut in the middle of an element.
    truncated = tmp_path / "truncated.dcm"
    full = ct_small()
    full.save_as(truncated, enforce_file_format=True)
    raw = truncated.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    good = ct_small()
    statuses = send(node.port, [no_study, wrong_class, truncated, good])
    assert statuses[0] == 0xC001
    assert statuses[1] == 0xA900
    assert statuses[2] == 0xC000
    assert statuses[3] == 0x0000
    assert [p.stem for p in node.stored_files()] == [good.SOPInstanceUID]
    log = node.log_text()
    assert "StudyInstanceUID missing" in log and "cannot be decoded" in log


def test_repeated_instance_replaces_and_counts_once(nodes, workdir):
    node = start_node(nodes, workdir, quiet=1.0)
    ds = ct_small()
    assert send(node.port, [ds, ds]) == [0, 0]
    assert len(node.stored_files()) == 1
    wait_until(lambda: node.revisions(ds.StudyInstanceUID), 15, "completion")
    rev = json.loads(node.revisions(ds.StudyInstanceUID)[0].read_text())
    assert list(rev["instances"]) == [ds.SOPInstanceUID]


def test_compressed_transfer_syntaxes_stored_as_sent(nodes, workdir, tmp_path, lung1_image_path):
    from node.sample import load_lung1, write_ct_series

    volume, spacing, origin, _ = load_lung1(lung1_image_path.parent)
    files = [get_testdata_file(n) for n in (
        "SC_rgb_jpeg_dcmtk.dcm", "JPEG-lossy.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm",
        "image_dfl.dcm", "MR_small_bigendian.dcm",
    )]
    for i, ts in enumerate((RLELossless, JPEG2000Lossless)):  # real CT slices, compressed
        files += write_ct_series(volume[30:32], spacing, tmp_path / str(i), transfer_syntax=ts, first_position=origin)
    node = start_node(nodes, workdir)
    assert send(node.port, [Path(f) for f in files]) == [0] * len(files)
    stored = {p.stem: p for p in node.stored_files()}
    for f in files:
        src = pydicom.dcmread(f)
        got = pydicom.dcmread(stored[src.SOPInstanceUID])
        assert got.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert got.PixelData == src.PixelData


def test_low_disk_refused_with_out_of_resources(nodes, workdir):
    node = start_node(nodes, workdir, min_free_mb=10**9)
    assert send(node.port, [ct_small()]) == [0xA700]
    assert node.stored_files() == []
    assert "below min_free_mb" in node.log_text()


def test_kill9_mid_series_loses_no_acknowledged_instance(nodes, workdir, lung1_series):
    node = start_node(nodes, workdir, quiet=1.0)
    redis_pid = node.embedded_redis_pid()
    acked: list[str] = []
    stop = threading.Event()

    def sender() -> None:
        ae = AE(ae_title="PYSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
        for path in lung1_series:
            if stop.is_set() or not assoc.is_established:
                break
            status = assoc.send_c_store(path)
            if status and int(status.Status) == 0:
                acked.append(path.stem)
        assoc.abort()

    t = threading.Thread(target=sender)
    t.start()
    wait_until(lambda: len(acked) >= 20, 60, "20 acknowledged instances")
    node.kill9()
    stop.set()
    t.join(30)
    assert 20 <= len(acked) < 48
    on_disk = {p.stem for p in node.stored_files()}
    assert set(acked) <= on_disk
    for p in node.stored_files():
        pydicom.dcmread(p)  # every file under its final name is complete
    assert redis_pid is not None
    wait_until(lambda: not pid_alive(redis_pid), 15, "the embedded Redis to die with its node")

    node.start()  # a new Redis, from the append-only file the old one wrote as it stopped
    assert node.embedded_redis_pid() != redis_pid
    study = study_of(lung1_series[0])
    wait_until(lambda: node.revisions(study), 15, "the study to complete after restart")
    time.sleep(1.5)
    assert len(node.revisions(study)) == 1
    assert queued_jobs(node) == [job_id(study, 1)]
    rev = json.loads(node.revisions(study)[0].read_text())
    assert set(acked) <= set(rev["instances"])


def test_stale_embedded_redis_pid_and_socket_do_not_block_start(nodes, workdir):
    redis_dir = workdir / "storage" / "redis"
    redis_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (redis_dir / "redis.pid").write_text(f"{dead.pid}\n")
    (redis_dir / "redis.sock").write_text("stale")
    node = start_node(nodes, workdir)
    assert node.embedded_redis_pid() != dead.pid
    assert echoscu(node.port).returncode == 0
    pid = node.embedded_redis_pid()
    node.stop()
    assert pid is not None and not pid_alive(pid)  # a clean stop leaves no orphan Redis
    assert not (redis_dir / "redis.pid").exists()


def test_restart_requeues_study_received_before_stop(nodes, workdir, lung1_series):
    node = start_node(nodes, workdir, quiet=30.0)
    assert storescu(lung1_series[:5], node.port).returncode == 0
    node.stop()  # stopped inside the quiet period: nothing queued yet
    study = study_of(lung1_series[0])
    assert node.revisions(study) == []
    node.config.write_text(node.config.read_text().replace("quiet_seconds = 30.0", "quiet_seconds = 1.0"))
    node.start()
    wait_until(lambda: node.revisions(study), 15, "the study to complete after restart")
    # the revision is durable before its job is queued (a crash between the two is reconciled): wait for both
    wait_until(lambda: queued_jobs(node) == [job_id(study, 1)], 10, "its job in the queue")


def test_redis_restarted_empty_loses_no_study(nodes, workdir, lung1_series):
    redis = RedisServer().start()
    try:
        node = start_node(nodes, workdir, redis_url=redis.url, quiet=2.0)
        assert storescu(lung1_series[:10], node.port).returncode == 0
        port = redis.port
        redis.stop(kill=True)  # the timers are gone with it
        assert storescu(lung1_series[10:12], node.port).returncode == 0  # stored while Redis is down
        redis = RedisServer(port).start()  # empty
        study = study_of(lung1_series[0])
        wait_until(lambda: node.revisions(study), 20, "the study to complete after the Redis restart")
        wait_until(lambda: queued_jobs(node) == [job_id(study, 1)], 10, "the job in the new Redis")
        rev = json.loads(node.revisions(study)[0].read_text())
        assert len(rev["instances"]) == 12
        # Lost again after queueing: the job is queued again under the same id, once.
        redis.stop(kill=True)
        redis = RedisServer(port).start()
        wait_until(lambda: queued_jobs(node) == [job_id(study, 1)], 20, "the job requeued")
        assert len(node.revisions(study)) == 1
        assert "Redis has lost ainode's timers" in node.log_text()
    finally:
        for n in nodes:
            n.stop()
        redis.stop()


def test_late_instance_starts_a_new_revision(nodes, workdir, lung1_series):
    node = start_node(nodes, workdir, quiet=1.0)
    study = study_of(lung1_series[0])
    assert storescu(lung1_series[:40], node.port).returncode == 0
    wait_until(lambda: node.revisions(study), 15, "revision 1")
    assert storescu(lung1_series[40:], node.port).returncode == 0
    wait_until(lambda: len(node.revisions(study)) == 2, 15, "revision 2")
    rev2 = json.loads(node.revisions(study)[1].read_text())
    assert len(rev2["instances"]) == 48 and rev2["revision"] == 2
    assert queued_jobs(node) == sorted([job_id(study, 1), job_id(study, 2)])


def test_max_wait_completes_a_study_that_never_goes_quiet(nodes, workdir, lung1_series):
    node = start_node(nodes, workdir, quiet=2.0, max_wait=2.0)
    study = study_of(lung1_series[0])
    for path in lung1_series[:8]:  # one instance every 0.5 s: never 2 s quiet
        assert storescu([path], node.port).returncode == 0
        time.sleep(0.5)
    wait_until(lambda: node.revisions(study), 10, "a revision")
    first = json.loads(node.revisions(study)[0].read_text())
    assert first["reason"] == "max_wait"
    assert len(first["instances"]) < 8
    wait_until(lambda: len(node.revisions(study)) == 2, 15, "the late instances' revision")


def test_sighup_reload_adds_caller_without_dropping_open_association(nodes, workdir):
    node = start_node(nodes, workdir, callers=[("CT01", None)])
    assert echoscu(node.port, calling="CT02").returncode != 0
    ae = AE(ae_title="CT01")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(ct_small()).Status) == 0
        from node.cli import main

        assert main(["--config", str(node.config), "ae", "allow", "CT02"]) == 0
        node.signal(signal.SIGHUP)
        wait_until(lambda: "config reloaded" in node.log_text(), 10, "the reload")
        assert echoscu(node.port, calling="CT02").returncode == 0
        assert assoc.is_established
        assert int(assoc.send_c_store(ct_small()).Status) == 0  # the open association still works
    finally:
        assoc.release()
    assert len(node.stored_files()) == 2


def test_invalid_config_on_sighup_keeps_running_config(nodes, workdir):
    node = start_node(nodes, workdir, callers=[("CT01", None)])
    node.config.write_text(node.config.read_text() + '\n[[callers]]\nae_title = "' + "X" * 17 + '"\n')
    node.signal(signal.SIGHUP)
    wait_until(lambda: "config not reloaded" in node.log_text(), 10, "the refused reload")
    assert echoscu(node.port, calling="CT01").returncode == 0
    assert node.proc is not None and node.proc.poll() is None


def test_clean_stop_exits_zero(nodes, workdir):
    node = start_node(nodes, workdir)
    assert node.stop() == 0
    assert "ainode stopped" in node.log_text()
    assert os.path.isdir(workdir / "storage" / "studies")
