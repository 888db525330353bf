"""The node's HTTP side with real parts: `ainode serve` with its workers and web process, a real Orthanc
as the PACS, a real Prometheus (Debian `prometheus`) scraping /metrics, and promtool on the shipped rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pydicom
import pytest

from tests.peers import (NodeProcess, RedisServer, free_port, have, short_tmp, stop_process, storescu,
                         wait_until)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (have("storescu") and have("Orthanc")), reason="needs DCMTK and Orthanc")


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())




@pytest.fixture
def prometheus():
    """A Prometheus that scrapes whatever ``targets`` it is given, every second."""
    if not have("prometheus"):
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not installed (apt-get install prometheus)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    procs = []

    def start(target: str) -> str:
        where = short_tmp("ainode-prom-")
        port = free_port()
        (where / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{REPO / 'config' / 'ainode-alerts.yml'}']\n"
            f"scrape_configs:\n  - job_name: ainode\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        log = open(where / "prometheus.log", "wb")
        proc = subprocess.Popen(["prometheus", f"--config.file={where / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={where / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(base + "/-/ready"), 30, "Prometheus to be ready")
        return base

    yield start
    for proc in procs:
        stop_process(proc)


def _dataset_offset(path: Path) -> int:
    """Where a Part 10 file's data set begins: after the preamble, DICM and the file meta group."""
    import struct

    head = path.read_bytes()[:200]
    return 132 + 12 + struct.unpack_from("<L", head, 140)[0]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def query(base: str, expr: str) -> float | None:
    status, body = get(f"{base}/api/v1/query?query={urllib.parse.quote(expr)}")
    result = body["data"]["result"] if status == 200 else []
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_what_the_node_did_and_readyz_follows_its_parts(nodes, pacs, prometheus, test_model,
                                                                         lung1_series):
    web_port = free_port()
    extra = (f'[model]\npath = "{test_model}"\ndevice = "cpu"\n'
             f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
             'objects = ["sr"]\n')
    redis = RedisServer().start()  # its own, so the test can stop it (the node restarts an embedded one at once)
    node = NodeProcess(short_tmp(), quiet=1.0, workers=1, extra_config=extra, web_port=web_port, redis_url=redis.url)
    nodes.append(node)
    try:
        _scrape_and_follow(node, pacs, prometheus, lung1_series, web_port, redis)
    finally:
        node.stop()
        redis.stop()


def _scrape_and_follow(node, pacs, prometheus, lung1_series, web_port, redis) -> None:
    node.start()
    web = f"http://127.0.0.1:{web_port}"
    wait_until(lambda: _answers(web + "/healthz"), 30, "the web process")
    wait_until(lambda: get(web + "/readyz")[0] == 200, 60, "the node to be ready (workers with their model)")

    assert storescu(lung1_series, node.port).returncode == 0
    study = str(pydicom.dcmread(lung1_series[0], stop_before_pixels=True).StudyInstanceUID)
    wait_until(lambda: pacs.instances_of_study(study, "SR"), 90, "the SR at the PACS")

    base = prometheus(f"127.0.0.1:{web_port}")
    wanted = {
        'ainode_instances_total{status="0x0000"}': 48,
        'ainode_studies_completed_total{reason="quiet"}': 1,
        'ainode_jobs_total{queue="ainode",outcome="finished"}': 1,
        'ainode_sends_total{destination="pacs",outcome="sent"}': 1,
        'sum(ainode_associations_total{outcome="accepted"})': 1,
        'ainode_workers_up{role="analyse"}': 1,
        'ainode_workers_up{role="send"}': 1,
        'ainode_queue_depth{queue="ainode"}': 0,
        'ainode_inference_slices_total{provider="CPUExecutionProvider"}': 48,
        'up{job="ainode"}': 1,
    }
    try:
        wait_until(lambda: all(query(base, e) is not None for e in wanted), 30, "Prometheus to scrape the node")
    except AssertionError:
        missing = [e for e in wanted if query(base, e) is None]
        targets = get(f"{base}/api/v1/targets")[1]["data"]["activeTargets"]
        raise AssertionError(f"not scraped: {missing}; targets: {[(t['health'], t['lastError']) for t in targets]}")
    got = {expr: query(base, expr) for expr in wanted}
    assert got == {expr: float(v) for expr, v in wanted.items()}
    datasets = sum(p.stat().st_size - _dataset_offset(p) for p in lung1_series)  # sent as they are in the files
    assert query(base, "ainode_received_bytes_total") == float(datasets)
    assert query(base, 'ainode_job_seconds_count{queue="ainode",outcome="finished"}') == 1.0
    assert query(base, "ainode_storage_free_bytes") > 0
    loose = [str(p) for p in node.storage.rglob("*") if not p.is_socket() and p.stat().st_mode & 0o077]
    assert loose == []  # every file and folder the node's processes made is 0600/0700, metrics included

    # readyz follows the parts: a killed analysis worker, then the embedded Redis
    (worker_pid,) = [int(line.split("pid ")[1]) for line in node.log_text().splitlines()
                     if "Worker 1 (analyse) started, pid" in line][-1:]
    os.kill(worker_pid, signal.SIGKILL)
    status, body = wait_until(lambda: (r := get(web + "/readyz"))[0] == 503 and r, 10, "readyz to turn not ready")
    assert body["failing"] == ["analyse_worker"] and body["checks"]["analyse_worker"]["detail"].startswith("no live")
    wait_until(lambda: get(web + "/readyz")[0] == 200, 90, "readyz to be ready again with the restarted worker")
    port = redis.port
    redis.stop(kill=True)
    status, body = wait_until(lambda: (r := get(web + "/readyz"))[0] == 503 and r, 10, "readyz without Redis")
    assert "redis" in body["failing"]
    redis.__init__(port)  # the same server, started again on its port
    redis.start()
    wait_until(lambda: get(web + "/readyz")[0] == 200, 90, "readyz once Redis is back")
    # probes and scrapes open no DICOM connection: the node's log has no association attempt from them
    assert "closed before an association" not in node.log_text()


def test_the_shipped_alert_rules_pass_promtool():
    if not have("promtool"):
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    res = subprocess.run(["promtool", "check", "rules", str(REPO / "config" / "ainode-alerts.yml")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 7 rules found" in res.stdout


def test_healthz_answers_alone_and_metrics_say_redis_is_down(tmp_path):
    """`ainode web` alone against storage whose Redis is not running: alive, not ready, metrics still served."""
    import sys

    from tests.peers import write_config

    port = free_port()
    cfg = write_config(tmp_path / "ainode.toml", port=free_port(), storage=short_tmp() / "storage", web_port=port)
    proc = subprocess.Popen([sys.executable, "-m", "node", "--config", str(cfg), "web"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        web = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(web + "/healthz"), 30, "ainode web")
        status, body = get(web + "/readyz")
        assert status == 503 and {"scp", "redis"} <= set(body["failing"])
        with urllib.request.urlopen(web + "/metrics", timeout=10) as rsp:
            text = rsp.read().decode()
        assert "ainode_redis_up 0.0" in text and "ainode_build_info" in text
    finally:
        stop_process(proc)
    assert proc.returncode in (0, -signal.SIGTERM)  # stopped by its SIGTERM (uvicorn re-raises it), not killed


def test_listening_ports_are_read_from_the_kernel():
    import socket

    from node.ports import listening_ports

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        ports = listening_ports()
        assert ports is not None and port not in ports  # bound, not listening
        sock.listen()
        assert port in listening_ports()
    assert port not in listening_ports()
