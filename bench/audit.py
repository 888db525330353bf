"""The cost of the durable audit trail on the C-STORE path, without the DICOM protocol.

Each "instance" is what the C-STORE handler does to disk: ``Storage.write_instance``
of a real 512x512 CT file (write, fsync, rename, fsync the folder), then, with
the audit on, ``AuditTrail.instance_stored`` (one JSON line, group-committed
fdatasync). 1 and N threads stand for 1 and N concurrent associations. Printed:
instances/s with and without the audit, the added milliseconds per instance,
and how many events shared one fdatasync.

Usage::

    .venv/bin/python -m bench.audit [--instances 300] [--threads 1,4] [--repeat 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from pydicom.uid import generate_uid

from node.audit import AuditTrail
from node.store import Storage


def make_file(directory: Path) -> bytes:
    """One real CT slice (lung1, 512x512) as Part 10 bytes."""
    from node.sample import make_lung1_series

    return make_lung1_series(directory, n_slices=1)[0].read_bytes()


def run(data: bytes, instances: int, threads: int, audited: bool) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="ainode-bench-audit-"))
    try:
        storage = Storage(root / "storage")
        storage.prepare()
        trail = AuditTrail(root / "storage" / "audit.jsonl", "AINODE", "bench").open() if audited else None
        study = generate_uid()
        per_thread = instances // threads

        def work(series: str) -> None:
            for _ in range(per_thread):
                sop = generate_uid()
                storage.write_instance(study, series, sop, [data])
                if trail is not None:
                    trail.instance_stored("SCANNER", "127.0.0.1", study, series, sop, "1.2.840.10008.5.1.4.1.1.2",
                                          False)

        pool = [threading.Thread(target=work, args=(generate_uid(),)) for _ in range(threads)]
        t0 = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        wall = time.perf_counter() - t0
        done = per_thread * threads
        out = {"threads": threads, "audit": audited, "instances": done, "wall_s": wall, "per_s": done / wall,
               "ms_per_instance": wall / done * 1000}
        if trail is not None:
            out["events_per_fdatasync"] = trail.events / max(1, trail.batches)
            trail.close()
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--threads", default="1,4")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.threads.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="ainode-bench-audit-data-"))
    try:
        data = make_file(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    runs = []
    for rep in range(args.repeat):  # alternate, so drift on a shared machine hits both alike
        for n in counts:
            for audited in (False, True):
                r = run(data, args.instances, n, audited)
                runs.append(r)
                print(f"  run {rep + 1} threads {n} audit {'on ' if audited else 'off'}: {r['per_s']:6.0f} inst/s "
                      f"{r['ms_per_instance']:.2f} ms/inst", flush=True)
    print(f"\n{len(data) / 1e6:.2f} MB per instance, {args.instances} instances, median of {args.repeat}")
    rows = []
    for n in counts:
        off = statistics.median(r["ms_per_instance"] for r in runs if r["threads"] == n and not r["audit"])
        on = statistics.median(r["ms_per_instance"] for r in runs if r["threads"] == n and r["audit"])
        share = statistics.median(r["events_per_fdatasync"] for r in runs if r["threads"] == n and r["audit"])
        rows.append({"threads": n, "ms_off": off, "ms_on": on, "added_ms": on - off, "per_s_off": 1000 / off,
                     "per_s_on": 1000 / on, "events_per_fdatasync": share})
        print(f"threads {n}: {1000 / off:6.0f} inst/s without audit, {1000 / on:6.0f} with; "
              f"+{on - off:.2f} ms per instance ({(on - off) / off * 100:+.0f}%), {share:.1f} events per fdatasync")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
