"""The systemd units: `systemd-analyze verify` accepts them and their exposure scores stay low."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = ["ainode.service", "ainode-worker@.service", "ainode.target"]
INSTALLED_BINARY = "/opt/ainode/venv/bin/ainode"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units as installed, with ExecStart pointing at this checkout's ainode (verify checks it exists)."""
    ainode = Path(sys.executable).parent / "ainode"
    assert ainode.exists(), "install the package (pip install -e .) first"
    for name in UNITS:
        text = (REPO / "systemd" / name).read_text()
        assert INSTALLED_BINARY in text or name.endswith(".target")
        (tmp_path / name).write_text(text.replace(INSTALLED_BINARY, str(ainode)))
    (tmp_path / "ainode-worker@0.service").write_text((tmp_path / "ainode-worker@.service").read_text())
    return tmp_path


def test_units_verify(units: Path):
    names = UNITS + ["ainode-worker@0.service"]
    out = subprocess.run(["systemd-analyze", "verify", *[f"./{n}" for n in names]],
                         capture_output=True, text=True, cwd=units, timeout=60)
    ours = [l for l in (out.stdout + out.stderr).splitlines() if "ainode" in l]
    assert out.returncode == 0 and ours == [], out.stdout + out.stderr


@pytest.mark.parametrize("unit, ceiling", [("ainode.service", 2.0), ("ainode-worker@0.service", 2.5)])
def test_exposure_scores_stay_low(units: Path, unit: str, ceiling: float):
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"./{unit}"],
                         capture_output=True, text=True, cwd=units, timeout=60)
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout + out.stderr)
    assert score, out.stdout + out.stderr
    assert float(score.group(1)) <= ceiling


def test_serve_unit_runs_the_sender_and_reloads_with_sighup():
    text = (REPO / "systemd" / "ainode.service").read_text()
    assert "serve --workers 0" in text and "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in text and "User=ainode" in text
    worker = (REPO / "systemd" / "ainode-worker@.service").read_text()
    assert "Environment=CUDA_VISIBLE_DEVICES=%i" in worker
