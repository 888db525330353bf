"""Benchmark of the analysis path: load + preprocess + inference + findings + SR/SC/KO, and end to end.

    python -m bench.infer [--slices 300,1000] [--model PATH] [--json OUT]

Part 1, per stage, each study size in a fresh process (so its peak RSS is its
own): a real CT series (the lung1 volume, tiled) is stored, a revision recorded
and the worker's own job function run on it; prints seconds per stage,
slices/s and the process's peak RSS.

Part 2, end to end: DCMTK storescu sends the series to ``ainode serve
--workers 1`` whose destination is DCMTK storescp; prints the time from the
last instance acknowledged to the SR stored at storescp (and to all three result
objects: SR, summary image, key objects), minus quiet_seconds.

Without --model the bundled model is used, or a small test graph (node.testmodel)
when none is bundled; the output says which.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

QUIET_S = 2.0


def _model_path(arg: str | None, work: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), "given"
    from node.infer import bundled_model_path

    bundled = bundled_model_path()
    if bundled.exists():
        return bundled, "bundled"
    from node.testmodel import build_test_model

    path = work / "test-cnn.onnx"
    build_test_model(path, size=224, context=1)
    return path, "test graph (no bundled model yet)"


def stage_run(slices: int, model: str, device: str = "auto") -> dict[str, Any]:
    """One study through the worker's stages, in this process."""
    from node.config import Config, Destination, ModelConfig, NodeConfig
    from node.enqueue import redis_client
    from node.sample import make_lung1_series
    from node.store import Storage
    from node.worker import WorkerContext, set_context
    from tests.peers import store_series

    work = Path(tempfile.mkdtemp(prefix="ainode-bench-", dir="/tmp"))
    try:
        files = make_lung1_series(work / "ct", n_slices=slices)
        storage = Storage(work / "storage")
        storage.prepare()
        study = store_series(storage, files, 1)
        cfg = Config(node=NodeConfig(storage=storage.root), model=ModelConfig(path=model, device=device),
                     destinations=(Destination("pacs", ae_title="PACS", host="127.0.0.1", port=104),))  # all three objects
        ctx = WorkerContext(cfg, storage, redis_client("redis://127.0.0.1:1/0", timeout=0.1, retries=0))
        set_context(ctx)
        t0 = time.monotonic()
        ctx.model  # loaded once per worker process, as run_worker does
        from node.results.sr import warm_up

        warm_up()
        t_model = time.monotonic() - t0
        rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        from node.worker import _analyse  # the job's own code path, SR included

        t0 = time.monotonic()
        outcome = _analyse(ctx, storage.read_revision(study, 1), cfg.pipelines[0])
        job_s = time.monotonic() - t0
        sec = outcome["seconds"]
        objects = sec["objects"]
        return {
            "slices": slices,
            "model_load_s": round(t_model, 2),
            "load_s": sec["load"],
            "infer_s": round(sec["infer"] - sec["locate"], 3),
            "locate_s": sec["locate"],
            "sr_s": round(sum(v for k, v in objects.items() if k.startswith("sr-")), 3),
            "sc_s": objects.get("sc", 0.0),
            "ko_s": objects.get("ko", 0.0),
            "job_s": round(job_s, 2),
            "slices_per_s": round(slices / sec["infer"], 1),
            "findings": len(outcome["result"]["findings"]),
            "providers": outcome["providers"],
            "rss_after_model_mb": round(rss_model),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def end_to_end(slices: int, model: Path, device: str = "auto") -> dict[str, Any]:
    from tests.peers import NodeProcess, dcmtk_env, free_port, short_tmp, storescu, wait_until
    from node.sample import make_lung1_series

    work = short_tmp("ainode-e2e-")
    pacs_dir = work / "pacs"
    pacs_dir.mkdir()
    pacs_port = free_port()
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env())
    extra = (f'[model]\npath = "{model}"\ndevice = "{device}"\n'
             f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n')
    (work / "node").mkdir()
    node = NodeProcess(work / "node", quiet=QUIET_S, workers=1, extra_config=extra)
    try:
        files = make_lung1_series(work / "ct", n_slices=slices)
        node.start()
        wait_until(lambda: "Worker ready" in node.log_text(), 120, "the analysis worker")
        t0 = time.monotonic()
        assert storescu(files, node.port).returncode == 0
        acked = time.monotonic()
        wait_until(lambda: any(pacs_dir.glob("SR*")), 600, "the SR at storescp", interval=0.02)
        done = time.monotonic()
        wait_until(lambda: len(list(pacs_dir.iterdir())) >= 3, 60, "the three result objects at storescp",
                   interval=0.02)
        all_done = time.monotonic()
        return {"slices": slices, "send_s": round(acked - t0, 2), "quiet_s": QUIET_S,
                "after_quiet_s": round(done - acked - QUIET_S, 2),
                "all_objects_after_quiet_s": round(all_done - acked - QUIET_S, 2)}
    finally:
        node.stop()
        pacs.kill()
        pacs.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", default="300,1000")
    p.add_argument("--model")
    p.add_argument("--json")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--stage-run", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage_run:
        print(json.dumps(stage_run(args.stage_run, args.model, args.device)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="ainode-bench-model-", dir="/tmp"))
    model, which = _model_path(args.model, work)
    print(f"model: {model} ({which})")
    rows = []
    for n in [int(x) for x in args.slices.split(",")]:
        out = subprocess.run([sys.executable, "-m", "bench.infer", "--stage-run", str(n), "--model", str(model),
                              "--device", args.device],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'slices':>6} {'load s':>7} {'infer s':>8} {'find s':>7} {'SR s':>6} {'SC s':>6} {'KO s':>6} {'job s':>6} "
          f"{'slices/s':>9} {'findings':>8} {'peak RSS MB':>12}  provider")
    for r in rows:
        print(f"{r['slices']:>6} {r['load_s']:>7} {r['infer_s']:>8} {r['locate_s']:>7} {r['sr_s']:>6} {r['sc_s']:>6} "
              f"{r['ko_s']:>6} {r['job_s']:>6} {r['slices_per_s']:>9} {r['findings']:>8} {r['peak_rss_mb']:>12}  "
              f"{r['providers'][0]}")
    e2e = end_to_end(300, model, args.device)
    print(f"end to end, {e2e['slices']} slices: storescu {e2e['send_s']} s; last ack -> SR at storescp "
          f"{e2e['after_quiet_s']} s, all three objects {e2e['all_objects_after_quiet_s']} s, after the "
          f"{e2e['quiet_s']:.0f} s quiet period")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model), "which": which, "stages": rows, "end_to_end": e2e}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
