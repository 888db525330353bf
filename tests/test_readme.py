"""The README's first command, run as written by a newcomer: in a fresh copy of the repository, with a
fresh venv, as whoever runs the tests (root without sudo, in CI); then `ainode demo` from that venv.

Minutes of installing: it runs in CI (CI=true) or with AINODE_README_TEST=1, and is skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import closing
from pathlib import Path

import pytest

from tests.peers import echoscu, have, short_tmp

REPO = Path(__file__).resolve().parent.parent
PORT = 11112  # the embedded default the command runs on

pytestmark = pytest.mark.skipif(
    os.environ.get("CI") != "true" and os.environ.get("AINODE_README_TEST") != "1",
    reason="installs a fresh venv (minutes): runs in CI or with AINODE_README_TEST=1",
)


def readme_command(number: int) -> str:
    lines = (REPO / "README.md").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"# {number}. "))
    return lines[at + 1]


def fresh_copy() -> Path:
    """The repository's tracked files (as a clean clone has them) in a new folder."""
    dest = short_tmp("ainode-readme-")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def port_free(port: int) -> bool:
    with closing(socket.socket()) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.timeout(1500)
def test_readme_command_1_installs_and_serves_and_the_demo_runs():
    if not port_free(PORT):
        pytest.skip(f"port {PORT} is in use here; command 1 serves on it")
    command = readme_command(1)
    assert command.endswith(".venv/bin/ainode serve")
    where = fresh_copy()
    log = where / "command1.log"
    env = {k: v for k, v in os.environ.items() if k not in ("AINODE_CONFIG", "VIRTUAL_ENV")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-c", command], cwd=where, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 1200
        while "ainode listening" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"command 1 exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "command 1 did not start the node within 20 minutes"
            time.sleep(1)
        if have("echoscu"):
            assert echoscu(PORT).returncode == 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert "ainode stopped" in log.read_text()
    # the demo, right after command 1, from that venv, with an empty sample cache (it must fetch lung1)
    cache = short_tmp("ainode-readme-cache-")
    demo = subprocess.run([str(where / ".venv/bin/ainode"), "demo"], cwd=where, capture_output=True, text=True,
                          timeout=900, env={**env, "AINODE_CACHE": str(cache)})
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-3000:]
    assert "Traceback" not in demo.stderr
