"""Several receiving processes behind one port ([node] receivers = 2, SO_REUSEPORT).

Real peers (DCMTK storescu/echoscu) against ``ainode serve``: every instance
stored once, byte-identical, and audited by the process that took it; both
processes take connections; one killed is started again while the other goes
on; SIGHUP reaches both; a port someone else listens on is refused at start;
the node's stop leaves no receiving process behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.peers import NodeProcess, dcmtk_env, echoscu, have, pid_alive, short_tmp, wait_until

pytestmark = pytest.mark.skipif(not have("storescu"), reason="needs DCMTK (apt-get install dcmtk)")


def receivers_node(nodes: list, **kw) -> NodeProcess:
    node = NodeProcess(short_tmp(), quiet=1.0, workers=-1, node_config="receivers = 2", **kw)
    nodes.append(node)
    return node


def audit_events(node: NodeProcess) -> list[dict]:
    return [json.loads(line) for line in (node.storage / "audit.jsonl").read_text().splitlines()]


def receiving_pids(node: NodeProcess) -> dict[int, int]:
    """index -> pid of the receiving processes, from their latest "listening" lines."""
    out = {}
    for line in node.log_text().splitlines():
        if "Receiving process" in line and "listening on" in line:
            words = line.split("Receiving process ")[1].split()
            out[int(words[0])] = int(words[2].rstrip(")"))
    return out


def series_copies(files: list[Path], folder: Path, count: int) -> list[list[Path]]:
    """``count`` copies of a series, each a study of its own."""
    out = []
    for n in range(count):
        study, series = generate_uid(), generate_uid()
        (folder / str(n)).mkdir(parents=True)
        copies = []
        for f in files:
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = folder / str(n) / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path)
            copies.append(path)
        out.append(copies)
    return out


def test_two_receiving_processes_store_every_instance_once(nodes, lung1_series, tmp_path):
    node = receivers_node(nodes).start()
    studies = series_copies(lung1_series[:12], tmp_path, 4)
    senders = [subprocess.Popen(["storescu", "-aet", f"CT{n}", "-aec", "AINODE", "127.0.0.1", str(node.port),
                                 *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=dcmtk_env()) for n, files in enumerate(studies)]
    assert [p.wait(120) for p in senders] == [0, 0, 0, 0]
    for files in studies:
        study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            stored = node.storage / "studies" / study / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
            assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(f).PixelData
        wait_until(lambda: len(node.revisions(study)) == 1, 30, "one revision per study (the node's completion)")
    for _ in range(16):  # more associations, so both processes are seen to take some (the kernel spreads them)
        assert echoscu(node.port).returncode == 0
    events = audit_events(node)
    stored = [e for e in events if e["outcome_description"] == "stored"]
    assert len(stored) == 48 and len({e["objects"][0]["description"]["instances"][0] for e in stored}) == 48
    takers = {e["source"]["process"] for e in events if e["outcome_description"].startswith("association accepted")}
    assert takers == {"receive-0", "receive-1"}
    pids = receiving_pids(node)
    node.stop()
    assert pids and not any(pid_alive(pid) for pid in pids.values())  # none left behind


def test_a_killed_receiving_process_is_replaced_while_the_other_answers(nodes):
    node = receivers_node(nodes).start()
    before = receiving_pids(node)
    node_pid = node.proc.pid
    os.kill(before[0], signal.SIGKILL)
    wait_until(lambda: not pid_alive(before[0]), 10, "the receiving process to die")
    assert all(echoscu(node.port).returncode == 0 for _ in range(5))  # the other one takes every connection
    wait_until(lambda: receiving_pids(node).get(0) not in (None, before[0]), 30, "a new receiving process 0")
    assert pid_alive(node_pid) and "was killed by SIGKILL" in node.log_text()
    assert all(echoscu(node.port).returncode == 0 for _ in range(5))


def test_sighup_reaches_every_receiving_process(nodes):
    node = receivers_node(nodes).start()
    assert echoscu(node.port, calling="ANYONE").returncode == 0
    node.config.write_text(node.config.read_text() + '[[callers]]\nae_title = "CT01"\n')
    node.signal(signal.SIGHUP)
    wait_until(lambda: node.log_text().count("config reloaded (1 pipelines, 1 callers)") == 2, 20,
               "both receiving processes to reload")
    assert all(echoscu(node.port, calling="ANYONE").returncode != 0 for _ in range(8))  # refused by both
    assert all(echoscu(node.port, calling="CT01").returncode == 0 for _ in range(8))


def test_a_port_someone_else_listens_on_is_refused(nodes):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        node = receivers_node(nodes, port=port)
        with pytest.raises(AssertionError) as exited:
            node.start()
        assert f"[node] port: cannot listen on 127.0.0.1:{port}: something already listens there" in str(exited.value)
        node.proc = None  # it exited
