"""The results page and /metrics with many studies on disk: median response times.

Writes ``--studies`` studies (one small CT instance each, a revision, an outcome
and a delivery, as the node leaves them) into a fresh storage, starts
``ainode web`` alone on it (and an embedded-style Redis for its state), logs in
and times ``GET /`` (the first page of 50), ``GET /api/studies`` and
``GET /metrics``; median of ``--repeat``.

Usage::

    .venv/bin/python -m bench.web [--studies 10000] [--repeat 15]
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tests.peers import RedisServer, free_port, short_tmp, stop_process, wait_until, write_config


def populate(storage_root: Path, n: int) -> None:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from node.store import Revision, Storage

    storage = Storage(storage_root)
    storage.prepare()
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for i in range(n):
        study, series, sop = generate_uid(), generate_uid(), generate_uid()
        template.StudyInstanceUID, template.SeriesInstanceUID = study, series
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = sop
        path = storage.instance_path(study, series, sop)
        path.parent.mkdir(parents=True, exist_ok=True)
        template.save_as(path)
        storage.revision_path(study, 1).parent.mkdir(parents=True, exist_ok=True)
        storage.revision_path(study, 1).write_text(json.dumps(Revision(study, 1, {sop: series}, time.time(), "quiet",
                                                                       f"study_{i}_r1").to_json()))
        result = {"score": 0.1 + 0.8 * (i % 7) / 7, "threshold": 0.366, "findings": []}
        storage.outcome_path(study, 1).write_text(json.dumps({"study_uid": study, "revision": 1,
                                                              "status": "analysed", "result": result}))
        storage.outcome_path(study, 1).with_name("rev-0001.send-pacs.json").write_text(
            json.dumps({"destination": "pacs", "status": "sent", "at": time.time()}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    work = short_tmp("ainode-bench-web-")
    redis = RedisServer().start()
    proc = None
    try:
        t = time.perf_counter()
        populate(work / "storage", args.studies)
        print(f"wrote {args.studies} studies in {time.perf_counter() - t:.0f} s")
        port = free_port()
        cfg = write_config(work / "ainode.toml", port=free_port(), storage=work / "storage", redis_url=redis.url,
                           web_port=port)
        subprocess.run([sys.executable, "-m", "node", "user", "add", "bench", "--role", "viewer", "--config",
                        str(cfg)], input="a bench passphrase\n", text=True, check=True, capture_output=True)
        proc = subprocess.Popen([sys.executable, "-m", "node", "--config", str(cfg), "web"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

        def get(path: str, data: bytes | None = None) -> float:
            t0 = time.perf_counter()
            with opener.open(base + path, data=data, timeout=120) as rsp:
                rsp.read()
            return time.perf_counter() - t0

        wait_until(lambda: _up(base), 30, "ainode web")
        get("/login", urllib.parse.urlencode({"user": "bench", "password": "a bench passphrase"}).encode())
        for path in ("/", "/api/studies", "/metrics"):
            get(path)  # warm
            times = [get(path) for _ in range(args.repeat)]
            print(f"GET {path:14s} median {statistics.median(times) * 1000:7.1f} ms  "
                  f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}), {args.studies} studies")
    finally:
        if proc is not None:
            stop_process(proc)
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _up(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=2):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
