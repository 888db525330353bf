"""Bad nights, with real processes and real faults: a worker killed mid-job, the node killed with SIGKILL,
a send retry across a restart. ainode runs as `ainode serve` with its workers and the bundled model; the
PACS is a real Orthanc."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from tests.peers import NodeProcess, Orthanc, free_port, have, pid_alive, short_tmp, storescu, wait_until

pytestmark = pytest.mark.skipif(
    not (have("storescu") and have("Orthanc")), reason="needs DCMTK and Orthanc (apt-get install dcmtk orthanc)"
)


@pytest.fixture(scope="module")
def ct200(tmp_path_factory, lung1_image_path) -> list[Path]:
    """lung1 as a 200-slice CT series (the volume repeated along z)."""
    from node.sample import make_lung1_series

    return make_lung1_series(tmp_path_factory.mktemp("ct200"), n_slices=200, cache_dir=lung1_image_path.parent)



def start_node(nodes: list, dest_port: int, first_retry_s: float = 2.0, workdir: Path | None = None) -> NodeProcess:
    extra = (
        f"[send]\nretry_hours = 1\nretry_first_seconds = {first_retry_s}\ntimeout_seconds = 5\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {dest_port}\n'
        'objects = ["sr"]\n'
    )
    node = NodeProcess(workdir or short_tmp(), quiet=1.0, workers=1, extra_config=extra)
    nodes.append(node)
    return node.start()


def study_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def worker_pids(node: NodeProcess) -> dict[str, list[int]]:
    """The live `ainode worker` processes on this node's storage, by role, from /proc."""
    out: dict[str, list[int]] = {"analyse": [], "send": []}
    storage = str(node.storage).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in cmd and storage in cmd and b"--role" in cmd and pid_alive(int(entry)):
            out[cmd[cmd.index(b"--role") + 1].decode()].append(int(entry))
    return out


def audit_descriptions(node: NodeProcess) -> list[str]:
    path = node.storage / "audit.jsonl"
    return [json.loads(line)["outcome_description"] for line in path.read_text().splitlines() if line.strip()]


def results_show(node: NodeProcess) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "node", "--config", str(node.config), "results", "list", "--json"],
                         capture_output=True, text=True, check=True, cwd=node.workdir)
    return json.loads(out.stdout)


def test_a_worker_killed_mid_analysis_costs_seconds_not_half_an_hour(nodes, pacs, ct200):
    node = start_node(nodes, pacs.port)
    wait_until(lambda: "Worker ready" in node.log_text(), 120, "the analyse worker to load its model")
    (victim,) = worker_pids(node)["analyse"]
    assert storescu(ct200, node.port).returncode == 0
    study = study_of(ct200[0])
    r = node.redis()
    wait_until(lambda: r.zcard("rq:wip:ainode") > 0, 60, "the analysis to start", interval=0.02)
    time.sleep(0.5)  # well into loading the 200 slices
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    wait_until(lambda: pacs.instances_of_study(study, "SR"), 60, "the SR at the PACS")
    assert time.monotonic() - killed_at < 60
    time.sleep(3)
    assert len(pacs.instances_of_study(study, "SR")) == 1  # exactly one
    lost = [d for d in audit_descriptions(node) if "analysis lost" in d]
    assert len(lost) == 1 and f"worker pid {victim} was killed by SIGKILL; queued again" in lost[0]
    assert f"Worker 1 (analyse, pid {victim}) was killed by SIGKILL" in node.log_text()
    (state,) = [s for s in results_show(node) if s["study_uid"] == study]
    assert state["state"] == "sent" and "1 run(s) lost with their worker" in state["detail"]
    assert len(worker_pids(node)["analyse"]) == 1  # started again


def test_kill9_of_the_node_leaves_nothing_running_and_a_restart_runs_one_of_each(nodes, pacs):
    node = start_node(nodes, pacs.port)
    wait_until(lambda: all(worker_pids(node).values()), 60, "both workers")
    pids = [p for role in worker_pids(node).values() for p in role]
    redis_pid = node.embedded_redis_pid()
    assert redis_pid is not None
    node.kill9()
    wait_until(lambda: not any(pid_alive(p) for p in pids + [redis_pid]), 15,
               "the workers and the embedded Redis to die with their node")
    node.start()
    wait_until(lambda: all(worker_pids(node).values()), 60, "both workers again")
    time.sleep(2)
    assert {role: len(p) for role, p in worker_pids(node).items()} == {"analyse": 1, "send": 1}


def test_a_send_retry_runs_on_time_after_a_node_restart(nodes, lung1_series, tmp_path):
    port = free_port()  # nobody listens yet: the first send fails and is retried with back-off
    node = start_node(nodes, port, first_retry_s=20.0)
    assert storescu(lung1_series, node.port).returncode == 0
    study = study_of(lung1_series[0])
    state = node.storage / "state" / study / "rev-0001.send-pacs.json"
    wait_until(lambda: state.exists() and json.loads(state.read_text())["status"] == "retrying", 120,
               "the first send to fail")
    failed_at = time.monotonic()
    assert node.stop() == 0
    pacs = Orthanc(short_tmp("orthanc-"))
    pacs.port = port
    pacs.start()
    try:
        node.start()
        wait_until(lambda: pacs.instances_of_study(study, "SR"), 60, "the retried send")
        late = time.monotonic() - failed_at - 20.0
        assert late < 8, f"the retry ran {late:.1f} s after it was due"
        log = node.log_text()
        assert "will retry" in log  # the failed try, in one line
        assert "Traceback" not in log and "exception raised while executing" not in log
    finally:
        pacs.stop()


# --- a full disk -----------------------------------------------------------------------------------------


@pytest.fixture
def small_disk():
    """A 48 MB tmpfs, mounted for the test (needs root; skipped with the reason otherwise).

    Ask for it before ``nodes``: it is unmounted after the node on it has stopped."""
    where = short_tmp("ainode-tmpfs-")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    yield where
    subprocess.run(["umount", str(where)], check=False)
    shutil.rmtree(where, ignore_errors=True)


def fill(disk: Path) -> Path:
    """Fill the file system to its last byte; returns the filler."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def ct_small_series(n: int, tmp: Path) -> list[Path]:
    """``n`` small CT files of one new study, in a new folder under ``tmp``."""
    import tempfile

    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    tmp = Path(tempfile.mkdtemp(dir=tmp))
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        out.append(tmp / f"{i:03d}.dcm")
        ds.save_as(out[-1])
    return out


def test_a_disk_that_fills_between_store_and_completion_pauses_the_node_not_stops_it(small_disk, nodes, tmp_path):
    from tests.peers import echoscu, scu_store

    node = NodeProcess(short_tmp(), quiet=3.0, workers=-1, storage=small_disk / "storage")
    nodes.append(node)
    node.start()
    files = ct_small_series(5, tmp_path)
    assert storescu(files, node.port).returncode == 0
    filler = fill(small_disk)  # before the 3 s quiet period ends: the revision cannot be written
    study = study_of(files[0])
    wait_until(lambda: "Storage cannot be written" in node.log_text(), 15, "the completion to hit the full disk")
    time.sleep(6)  # two retries later
    assert node.proc is not None and node.proc.poll() is None  # still up
    assert echoscu(node.port).returncode == 0
    assert scu_store(node.port, ct_small_series(1, tmp_path)) == [0xA700]
    assert node.log_text().count("Storage cannot be written") == 1  # once per episode
    assert not node.revisions(study)
    filler.unlink()
    wait_until(lambda: node.revisions(study), 20, "the study to complete once space is back")
    # said once the revision is written and queued: a moment after its file appears
    wait_until(lambda: "Storage can be written again" in node.log_text(), 10, "the node to say space is back")
    studies = node.storage / "studies"
    assert all(any(d.iterdir()) for d in studies.iterdir())  # the refused instance left no empty folder


def test_the_node_starts_on_a_full_disk_and_answers(small_disk, nodes, tmp_path):
    from tests.peers import echoscu, scu_store

    node = NodeProcess(short_tmp(), quiet=3.0, workers=-1, storage=small_disk / "storage")
    nodes.append(node)
    node.start()
    assert node.stop() == 0
    filler = fill(small_disk)
    node.start()  # starts, and says why stores will be refused
    assert "below min_free_mb" in node.log_text()
    assert echoscu(node.port).returncode == 0
    assert scu_store(node.port, ct_small_series(1, tmp_path)) == [0xA700]
    filler.unlink()
    assert scu_store(node.port, ct_small_series(1, tmp_path)) == [0]


def test_the_embedded_redis_files_are_private(nodes, tmp_path):
    node = NodeProcess(short_tmp(), workers=-1)
    nodes.append(node)
    node.start()
    assert storescu(ct_small_series(2, tmp_path), node.port).returncode == 0
    node.redis().set("ainode:test", "x")  # something in the append-only file
    files = [p for p in (node.storage / "redis").rglob("*") if p.is_file()]
    assert any("appendonly" in p.name or p.parent.name.startswith("appendonly") for p in files)
    loose = {str(p.relative_to(node.storage)): oct(p.stat().st_mode & 0o777) for p in files
             if p.stat().st_mode & 0o077}
    assert loose == {}
