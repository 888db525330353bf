"""Benchmark ``seed`` vs ``default``: training time, export time and peak memory, ONNX Runtime speed.

``python -m training.bench [--sizes 128 224] [--json docs/bench.json]``

Each export runs in a child process so its peak memory (ru_maxrss) is its own.
Weights are freshly initialised: cost does not depend on training.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_export(arch: str, size: int, channels: int, out: Path, opset: int) -> dict[str, Any]:
    """Build, export and report time and memory (runs in the child)."""
    from training.export import export_onnx
    from training.models import build_model

    model = build_model(arch, size, channels)
    before = _rss_mb()
    result = export_onnx(model, out, size=size, channels=channels, opset=opset)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"export_s": result["seconds"], "onnx_mb": round(result["bytes"] / 1e6, 1),
            "rss_before_export_mb": round(before), "peak_rss_mb": round(peak), "params": int(model.count_params())}


def train_speed(arch: str, size: int, channels: int, n: int = 256, batch: int = 32) -> float:
    """Training slices per second (Adam, BCE) on random inputs, after one warm-up step."""
    import keras

    from training.models import build_model

    model = build_model(arch, size, channels)
    model = keras.Model(model.inputs, model.outputs[0])  # the slice output (the map adds no weights)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.random((n, size, size, channels), dtype=np.float32)
    y = (rng.random(n) > 0.5).astype(np.float32)
    model.fit(x[:batch], y[:batch], batch_size=batch, verbose=0)
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, verbose=0)
    return n / (time.perf_counter() - start)


def ort_speed(path: Path, size: int, channels: int, n: int = 256, batch: int = 32) -> float:
    """ONNX Runtime (CPU) slices per second."""
    from training.export import onnx_predict, onnx_session

    session = onnx_session(path)
    x = np.random.default_rng(1).random((n, size, size, channels), dtype=np.float32)
    onnx_predict(session, x[:batch], batch)
    start = time.perf_counter()
    onnx_predict(session, x, batch)
    return n / (time.perf_counter() - start)


def bench(arch: str, size: int, channels: int, opset: int, slices_per_epoch: int) -> dict[str, Any]:
    """All figures for one architecture and input size."""
    with tempfile.TemporaryDirectory(prefix="ainode-bench-") as tmp:
        out = Path(tmp) / "model.onnx"
        cmd = [sys.executable, "-m", "training.bench", "--child", arch, str(size), str(channels), str(out), str(opset)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.splitlines()[-5:])
            return {"arch": arch, "size": size, "error": f"export child exited {proc.returncode} "
                    f"(killed for memory if -9): {tail}"}
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["ort_slices_per_s"] = round(ort_speed(out, size, channels), 1)
    speed = train_speed(arch, size, channels)
    row.update(arch=arch, size=size, channels=channels, train_slices_per_s=round(speed, 1),
               train_s_per_epoch=round(slices_per_epoch / speed, 1), slices_per_epoch=slices_per_epoch)
    logger.info("%s", row)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        arch, size, channels, out, opset = argv[1:6]
        print(json.dumps(child_export(arch, int(size), int(channels), Path(out), int(opset))))
        return 0
    p = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__)
    p.add_argument("--archs", nargs="+", default=["seed", "default"])
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 224])
    p.add_argument("--context", type=int, default=1)
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--slices-per-epoch", type=int, default=2500, help="to turn slices/s into s/epoch")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = [bench(a, s, 2 * args.context + 1, args.opset, args.slices_per_epoch) for s in args.sizes for a in args.archs]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print("| arch | input | params | train s/epoch | export s | export peak RSS MB | .onnx MB | ORT slices/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['arch']} | {r['size']} | - | - | {r['error']} | | | |")
            continue
        print(f"| {r['arch']} | {r['size']}x{r['size']}x{r['channels']} | {r['params']:,} | {r['train_s_per_epoch']} | "
              f"{r['export_s']} | {r['peak_rss_mb']} | {r['onnx_mb']} | {r['ort_slices_per_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
