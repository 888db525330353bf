"""Bad nights, with real processes and real faults: a worker killed mid-job, the node killed with SIGKILL,
a send retry across a restart. ainode runs as `ainode serve` with its workers and the bundled model; the
PACS is a real Orthanc."""

from __future__ import annotations

import json
import os
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


@pytest.fixture
def pacs():
    orthanc = Orthanc(short_tmp("orthanc-")).start()
    yield orthanc
    orthanc.stop()


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
    finally:
        pacs.stop()
