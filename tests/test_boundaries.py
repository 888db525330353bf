"""The module boundaries of DESIGN.md, enforced."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = {"onnxruntime", "tensorflow", "tf2onnx", "highdicom", "keras", "torch"}
WEB = {"starlette", "uvicorn", "anyio"}
RECEIVE_PATH = ["node.config", "node.receive", "node.receive.process", "node.ports", "node.store", "node.completion",
                "node.enqueue", "node.serve", "node.cli"]


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included).

    ``from a import b`` counts as ``a.b``: b may be a module or a name in a.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_receive_path_loads_no_heavy_library():
    code = (
        "import json, sys\n"
        f"for m in {RECEIVE_PATH!r}: __import__(m)\n"
        "from node.cli import build_parser; build_parser()\n"
        "print(json.dumps(sorted(m for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    loaded = {m.split(".")[0] for m in json.loads(out.stdout)}
    assert loaded & HEAVY == set()
    assert loaded & WEB == set()  # the web stack runs in a process of its own
    assert "training" not in loaded


def test_the_cli_does_not_load_prometheus_client_before_serve_sets_its_mode():
    code = ("import sys\nfrom node.cli import build_parser\nbuild_parser()\n"
            "print('prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"  # else /metrics cannot sum the node's processes (node.metrics)


def test_the_web_process_loads_no_model_runtime():
    code = ("import json, sys\nimport node.web.app, node.web.pages, node.jobs\n"
            "print(json.dumps(sorted(m for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    loaded = {m.split(".")[0] for m in json.loads(out.stdout)}
    assert loaded & HEAVY == set() and "starlette" in loaded


def test_node_never_imports_training_or_tensorflow():
    for path in (REPO / "node").rglob("*.py"):
        bad = {m for m in imports_of(path) if m.split(".")[0] in {"training", "tensorflow", "tf2onnx", "keras"}}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_training_imports_only_preprocessing_from_node():
    for path in (REPO / "training").rglob("*.py"):
        from_node = {m for m in imports_of(path) if m == "node" or m.startswith("node.")}
        bad = {m for m in from_node if not m.startswith("node.preprocessing")}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)} from node"


def test_data_moves_forward_only():
    """worker -> results -> send: the sender and the result objects never import the analysis worker,
    and the result objects never import the sender (the old send <-> worker import cycle stays gone)."""
    later = {
        **{str(p.relative_to(REPO)): {"node.worker"} for p in (REPO / "node" / "send").glob("*.py")},
        **{str(p.relative_to(REPO)): {"node.worker", "node.send", "node.infer"}
           for p in (REPO / "node" / "results").glob("*.py")},
    }
    for rel, banned in later.items():
        bad = {m for m in imports_of(REPO / rel) if any(m == b or m.startswith(b + ".") for b in banned)}
        assert not bad, f"{rel} imports {sorted(bad)}"
    assert "node.send.enqueue_send" in imports_of(REPO / "node" / "worker.py")


def test_a_wheel_holds_every_module_and_the_bundled_model(tmp_path):
    """A non-editable install (the systemd instructions) must get every subpackage, not only the top ones."""
    import shutil

    had_build = (REPO / "build").exists()
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=240)
    finally:
        if not had_build:
            shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' scratch folder in the checkout
    import zipfile

    (wheel,) = tmp_path.glob("ainode-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {p.relative_to(REPO).as_posix() for top in ("node", "training") for p in (REPO / top).rglob("*.py")}
    assert wanted - names == set()
    assert {"node/models/ainode-lung-ct.onnx", "node/models/ainode-lung-ct.card.json"} <= names
