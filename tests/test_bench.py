"""The benchmarks still run: each once, tiny, so a change to the code they drive cannot leave them broken.

They measure nothing here (timings are never asserted); they must only finish and print their table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import have

REPO = Path(__file__).resolve().parent.parent


def run_bench(*argv: str, timeout: float = 240) -> str:
    out = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert out.returncode == 0, f"{' '.join(argv)} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_bench_infer_stages_run(test_model, lung1_image_path):
    row = json.loads(run_bench("bench.infer", "--stage-run", "12", "--model", str(test_model)).splitlines()[-1])
    assert row["slices"] == 12 and row["job_s"] > 0 and row["providers"]


@pytest.mark.skipif(not have("storescu"), reason="needs DCMTK")
def test_bench_ingest_runs_every_ainode_row(tmp_path, lung1_image_path):
    out = run_bench("bench.ingest", "--receivers", "ainode,ainode-r2,ainode+web,storescp", "--senders", "1",
                    "--repeat", "1", "--slices", "5", "--wait-idle", "0", "--json", str(tmp_path / "ingest.json"))
    rows = {(r["receiver"], r["senders"]) for r in json.loads((tmp_path / "ingest.json").read_text())["median"]}
    assert rows >= {("ainode", 1), ("ainode-r2", 1), ("ainode+web", 1), ("storescp", 1)}, out


def test_bench_web_runs():
    out = run_bench("bench.web", "--studies", "20", "--repeat", "1")
    assert "GET /   " in out and "GET /metrics" in out


def test_bench_audit_runs(lung1_image_path):
    out = run_bench("bench.audit", "--instances", "5", "--threads", "1,2", "--repeat", "1")
    assert out.strip()
