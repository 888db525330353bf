"""Ingest throughput: ainode against DCMTK storescp, with 1..N concurrent senders.

Each sender is one DCMTK ``storescu`` pushing its own 300-slice CT series
(distinct Study/Series/SOP UIDs, like several scanners at once) in one
association. For every receiver and sender count the receiver is started fresh
on a free 127.0.0.1 port with empty storage, the senders start together, and
the wall time runs from the first sender's start to the last sender's exit.
Every sender must exit 0 and every instance must be on disk.

Receivers:

- ``ainode``: ``python -m node serve`` (tests.peers.NodeProcess), embedded Redis,
  quiet period 600 s so no completion work runs; writes + fsyncs every file.
- ``storescp``: ``TCP_NODELAY=1 storescp -aet PACS -od DIR PORT`` (no fsync; one
  association at a time, so concurrent senders queue).
- ``storescp+B``: the same with ``+B`` (bit-preserving: no dataset decode).
- ``orthanc``: Orthanc with its defaults (files plus a SQLite index), the peer a site would run.
- ``storescp-fork`` (not in the default list): ``--fork``, one process per association.
- ``ainode-x2`` (not in the default list): two ainode processes, senders spread over them
  round-robin: an upper bound for several receiver processes behind one port (SO_REUSEPORT).
- ``ainode-r2``, ``ainode-r4`` (not in the default list): one ainode with ``[node] receivers`` 2 or 4:
  that many receiving processes behind its port (SO_REUSEPORT), one storage, Redis and audit trail.
- ``ainode+web`` (not in the default list): ``ainode`` with its web process on and ``/metrics``
  and ``/readyz`` scraped every second while it ingests (a Prometheus far more eager than the
  usual 15 s): what the results page and the metrics cost the front door.

Usage::

    .venv/bin/python -m bench.ingest [--slices 300] [--senders 1,4] [--repeat 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Sequence

from tests.peers import NodeProcess, dcmtk_env, free_port, kill_pid, pid_alive, short_tmp, stop_process

RECEIVERS = ("ainode", "storescp", "storescp+B", "orthanc", "storescp-fork", "ainode-x2", "ainode+web", "ainode-r2",
             "ainode-r4")
DEFAULT_RECEIVERS = ("ainode", "storescp", "storescp+B", "orthanc")
READY_TIMEOUT_S = 30.0
SENDER_TIMEOUT_S = 600.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1e6
#: A run during which the rest of the machine used more than this share of one CPU is run again.
DISTURBED_SHARE = 0.2


class BenchError(RuntimeError):
    """A run that cannot be counted: a sender failed, files are missing, a receiver died."""


# --------------------------------------------------------------------------- data


def make_series(data_dir: Path, senders: int, slices: int) -> list[list[Path]]:
    """One distinct CT series per sender under ``data_dir/sN``; reused when already complete."""
    from node.sample import make_lung1_series

    out: list[list[Path]] = []
    for i in range(senders):
        d = data_dir / f"s{i}"
        files = sorted(d.glob("*.dcm")) if d.is_dir() else []
        if len(files) != slices:
            shutil.rmtree(d, ignore_errors=True)
            t = time.perf_counter()
            files = make_lung1_series(
                d, n_slices=slices, patient_id=f"AINODE-BENCH-{i + 1}", patient_name=f"BENCH^SCANNER{i + 1}",
                series_description=f"AINODE BENCH SENDER {i + 1}",
            )
            print(f"  wrote series {i + 1}/{senders}: {len(files)} slices in {time.perf_counter() - t:.1f} s",
                  flush=True)
        out.append(files)
    return out


# --------------------------------------------------------------------------- CPU from /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [0] is field 3 (state)


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f is not None and f[1] == str(pid):  # field 4: ppid
                kids.append(int(entry))
    return kids


def tree_cpu_s(pid: int, exclude: Sequence[int] = ()) -> float:
    """CPU seconds (user + system) of ``pid``, its reaped children and its live descendants not in ``exclude``."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    own = sum(int(f[i]) for i in (11, 12, 13, 14)) / CLK_TCK  # utime stime cutime cstime
    return own + sum(tree_cpu_s(k, exclude) for k in _children(pid) if k not in exclude)


def system_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, /proc/stat, not idle or iowait)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(f) - f[3] - f[4]) / CLK_TCK


def wait_idle(timeout: float) -> float:
    """Wait up to ``timeout`` s until the machine is >= 90 % idle over 2 s; returns the last idle share."""
    deadline = time.monotonic() + timeout
    while True:
        b0, t0 = system_busy_s(), time.monotonic()
        time.sleep(2)
        idle = 1 - (system_busy_s() - b0) / ((time.monotonic() - t0) * (os.cpu_count() or 1))
        if idle >= 0.9 or time.monotonic() > deadline:
            return idle


def children_rusage_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------- receivers


def wait_ready(aet: str, port: int, proc: subprocess.Popen[Any], what: str) -> None:
    """Poll echoscu every 50 ms until the receiver answers; fail early if it died."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    cmd = ["echoscu", "-q", "-to", "2", "-ta", "2", "-td", "2", "-aec", aet, "127.0.0.1", str(port)]
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} before it answered C-ECHO")
        if subprocess.run(cmd, capture_output=True, timeout=15, env=dcmtk_env()).returncode == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not answer C-ECHO within {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


class Receiver:
    """A receiver under test: start, where its files land, its PIDs, stop, clean up."""

    name = ""
    aet = ""

    def __init__(self) -> None:
        self.workdir = short_tmp("ainode-bench-")
        self.port = 0

    @property
    def pids(self) -> list[int]:
        """The receiving processes (their live children count too, except the helpers)."""
        raise NotImplementedError

    def helper_pids(self) -> list[int]:
        """Child processes reported separately (ainode's embedded Redis)."""
        return []

    def port_for(self, sender: int) -> int:
        """The port sender number ``sender`` connects to."""
        return self.port

    def start(self) -> None:
        raise NotImplementedError

    def stored_count(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


class Ainode(Receiver):
    name, aet = "ainode", "AINODE"

    def __init__(self, receivers: int = 1) -> None:
        super().__init__()
        self.receivers = receivers
        if receivers > 1:
            self.name = f"ainode-r{receivers}"

    web_port = 0  # [web] off

    def start(self) -> None:
        self.node = NodeProcess(self.workdir, quiet=600, max_wait=1200, workers=-1,  # no analysis workers
                                node_config=f"receivers = {self.receivers}", web_port=self.web_port)
        self.port = self.node.port
        self.node.start()
        assert self.node.proc is not None
        wait_ready(self.aet, self.port, self.node.proc, "ainode")

    @property
    def pids(self) -> list[int]:
        assert self.node.proc is not None
        return [self.node.proc.pid]  # its receiving processes are its children: counted with it

    def helper_pids(self) -> list[int]:
        pid = self.node.embedded_redis_pid()
        return [pid] if pid else []

    def stored_count(self) -> int:
        return len(self.node.stored_files())

    def stop(self) -> None:
        if not hasattr(self, "node"):
            return
        redis_pid = self.node.embedded_redis_pid()
        self.node.stop()
        if redis_pid and pid_alive(redis_pid):  # the node stops it; make sure
            kill_pid(redis_pid)


class AinodeWeb(Ainode):
    """ainode with [web] on, its /metrics and /readyz scraped every second from a thread."""

    name = "ainode+web"
    SCRAPE_S = 1.0

    def start(self) -> None:
        import threading
        import urllib.request

        self.web_port = free_port()
        super().start()
        base = f"http://127.0.0.1:{self.web_port}"
        self.scrapes, self._stop = 0, threading.Event()

        def get(path: str) -> bool:
            try:
                with urllib.request.urlopen(base + path, timeout=5) as rsp:
                    rsp.read()
                return True
            except OSError as exc:  # /readyz answers 503 here (no analysis worker): still a scrape
                return getattr(exc, "code", None) == 503

        deadline = time.monotonic() + READY_TIMEOUT_S
        while not get("/metrics"):
            if time.monotonic() > deadline:
                raise BenchError("ainode's web process did not answer /metrics")
            time.sleep(0.1)

        def scrape() -> None:
            while not self._stop.wait(self.SCRAPE_S):
                self.scrapes += get("/metrics") + get("/readyz")

        self._scraper = threading.Thread(target=scrape, daemon=True)
        self._scraper.start()

    def stop(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()
            self._scraper.join(10)
        super().stop()


class AinodeGroup(Receiver):
    """Several ainode processes, senders spread round-robin: what SO_REUSEPORT would give.

    Each process has its own storage and Redis here (a real deployment would share both).
    """

    aet = "AINODE"

    def __init__(self, count: int) -> None:
        super().__init__()
        self.name = f"ainode-x{count}"
        self.nodes = [Ainode() for _ in range(count)]

    @property
    def pids(self) -> list[int]:
        return [p for n in self.nodes for p in n.pids]

    def helper_pids(self) -> list[int]:
        return [p for n in self.nodes for p in n.helper_pids()]

    def port_for(self, sender: int) -> int:
        return self.nodes[sender % len(self.nodes)].port

    def start(self) -> None:
        for n in self.nodes:
            n.start()

    def stored_count(self) -> int:
        return sum(n.stored_count() for n in self.nodes)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()
        super().cleanup()


class Storescp(Receiver):
    aet = "PACS"

    def __init__(self, name: str, extra: Sequence[str]) -> None:
        super().__init__()
        self.name, self.extra = name, list(extra)
        self.out = self.workdir / "out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.out.mkdir()
        self.port = free_port()  # storescp listens on 0.0.0.0; we only send to 127.0.0.1
        with open(self.workdir / "storescp.log", "wb") as log:
            self.proc = subprocess.Popen(
                ["storescp", "-aet", self.aet, "-od", str(self.out), *self.extra, str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dcmtk_env(),
            )
        wait_ready(self.aet, self.port, self.proc, self.name)

    @property
    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid]

    def stored_count(self) -> int:
        return sum(1 for e in os.scandir(self.out) if e.is_file())

    def stop(self) -> None:
        if self.proc is not None:
            kids = _children(self.proc.pid)  # --fork children, normally gone by now
            stop_process(self.proc, timeout=10)
            for k in kids:
                if pid_alive(k):
                    kill_pid(k)
            self.proc = None


class OrthancReceiver(Receiver):
    """Orthanc (the Debian package) with its defaults: what a site would run as its DICOM store."""

    name, aet = "orthanc", "ORTHANC"

    def start(self) -> None:
        from tests.peers import Orthanc

        self.orthanc = Orthanc(self.workdir / "orthanc", check_called_aet=False)
        self.port = self.orthanc.port
        self.orthanc.start()
        assert self.orthanc.proc is not None
        wait_ready(self.aet, self.port, self.orthanc.proc, "Orthanc")

    @property
    def pids(self) -> list[int]:
        assert self.orthanc.proc is not None
        return [self.orthanc.proc.pid]

    def stored_count(self) -> int:
        return int(self.orthanc.get("/statistics")["CountInstances"])

    def stop(self) -> None:
        if hasattr(self, "orthanc"):
            self.orthanc.stop()


def make_receiver(name: str) -> Receiver:
    if name == "ainode":
        return Ainode()
    if name == "storescp":
        return Storescp(name, [])
    if name == "storescp+B":
        return Storescp(name, ["+B"])
    if name == "storescp-fork":
        return Storescp(name, ["--fork"])
    if name == "ainode-x2":
        return AinodeGroup(2)
    if name == "ainode+web":
        return AinodeWeb()
    if name in ("ainode-r2", "ainode-r4"):
        return Ainode(receivers=int(name[-1]))
    if name == "orthanc":
        return OrthancReceiver()
    raise ValueError(f'unknown receiver "{name}"; choose from {", ".join(RECEIVERS)}')


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    receiver: str
    senders: int
    repeat: int
    images: int
    bytes: int
    wall_s: float
    images_per_s: float
    mb_per_s: float
    receiver_cpu_s: float
    helper_cpu_s: float  # ainode's embedded Redis
    senders_cpu_s: float
    others_cpu_s: float  # CPU the rest of the machine used during the run: noise from other work
    idle_before: float | None  # share of the machine idle just before the run (None: not measured)
    disturbed: bool = False  # others used more than DISTURBED_SHARE of a CPU during the run


def run_once(name: str, series: list[list[Path]], repeat: int, logdir: Path, idle_wait: float) -> Run:
    """Start a fresh receiver, push every series at once, stop it; one measured run."""
    n = len(series)
    images = sum(len(s) for s in series)
    nbytes = sum(p.stat().st_size for s in series for p in s)
    rx = make_receiver(name)
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        rx.start()
        helpers = rx.helper_pids()
        idle = wait_idle(idle_wait) if idle_wait > 0 else None
        cpu0 = sum(tree_cpu_s(p, exclude=helpers) for p in rx.pids)
        hcpu0 = sum(tree_cpu_s(h) for h in helpers)
        scpu0 = children_rusage_cpu_s()
        busy0 = system_busy_s()
        t0 = time.perf_counter()
        for i, files in enumerate(series):
            log = open(logdir / f"{name}-{n}-{repeat}-sender{i}.log", "wb")
            logs.append(log)
            procs.append(subprocess.Popen(
                ["storescu", "-aet", f"SCANNER{i + 1}", "-aec", rx.aet, "-to", "30", "-ta", "30", "-td", "60",
                 "127.0.0.1", str(rx.port_for(i)), *map(str, files)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dcmtk_env(),
            ))
        deadline = time.monotonic() + SENDER_TIMEOUT_S
        for p in procs:
            try:
                p.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise BenchError(f"{name}: a sender ran past {SENDER_TIMEOUT_S:.0f} s") from None
        wall = time.perf_counter() - t0
        busy = system_busy_s() - busy0
        scpu = children_rusage_cpu_s() - scpu0
        cpu = sum(tree_cpu_s(p, exclude=helpers) for p in rx.pids) - cpu0
        hcpu = sum(tree_cpu_s(h) for h in helpers) - hcpu0
        others = max(0.0, busy - cpu - hcpu - scpu)
        for i, p in enumerate(procs):
            if p.returncode != 0:
                tail = (logdir / f"{name}-{n}-{repeat}-sender{i}.log").read_text(errors="replace")[-2000:]
                raise BenchError(f"{name}: sender {i + 1} exited with {p.returncode}:\n{tail}")
        stored = rx.stored_count()
        if stored != images:
            raise BenchError(f"{name}: {stored} files on disk after sending {images}")
        return Run(name, n, repeat, images, nbytes, wall, images / wall, nbytes / MB / wall,
                   cpu, hcpu, scpu, others, idle, others > DISTURBED_SHARE * wall)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for log in logs:
            log.close()
        try:
            rx.stop()
        finally:
            rx.cleanup()
        os.sync()  # the next run must not pay for this run's dirty pages


# --------------------------------------------------------------------------- report


def medians(runs: list[Run]) -> list[dict[str, Any]]:
    keys: list[tuple[str, int]] = []
    for r in runs:
        if (r.receiver, r.senders) not in keys:
            keys.append((r.receiver, r.senders))
    out = []
    for rec, n in keys:
        every = [r for r in runs if r.receiver == rec and r.senders == n]
        group = [r for r in every if not r.disturbed] or every  # disturbed runs only when nothing else
        row: dict[str, Any] = {"receiver": rec, "senders": n, "runs": len(group), "images": group[0].images,
                               "bytes": group[0].bytes}
        for f in ("wall_s", "images_per_s", "mb_per_s", "receiver_cpu_s", "helper_cpu_s", "senders_cpu_s",
                  "others_cpu_s"):
            row[f] = statistics.median(getattr(r, f) for r in group)
        row["images_per_s_range"] = [min(r.images_per_s for r in group), max(r.images_per_s for r in group)]
        row["disturbed_runs"] = sum(r.disturbed for r in group)  # counted in the median
        out.append(row)
    return out


def ratios(rows: list[dict[str, Any]], base: str = "storescp") -> dict[str, float]:
    by = {(r["receiver"], r["senders"]): r for r in rows}
    out = {}
    for (rec, n), row in by.items():
        if rec.startswith("ainode") and (base, n) in by:
            out[f"{rec}/{base} images/s, {n} sender(s)"] = row["images_per_s"] / by[(base, n)]["images_per_s"]
    return out


def print_table(rows: list[dict[str, Any]], rat: dict[str, float]) -> None:
    head = f"{'receiver':<14} {'senders':>7} {'images':>6} {'images/s':>9} {'(min-max)':>11} {'MB/s':>7} " \
           f"{'wall s':>7} {'recv CPU s':>10} {'redis CPU s':>11} {'senders CPU s':>13} {'others CPU s':>12} " \
           f"{'disturbed':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        lo, hi = r["images_per_s_range"]
        redis = f"{r['helper_cpu_s']:.2f}" if r["receiver"].startswith("ainode") else "-"
        print(f"{r['receiver']:<14} {r['senders']:>7} {r['images']:>6} {r['images_per_s']:>9.0f} "
              f"{f'{lo:.0f}-{hi:.0f}':>11} {r['mb_per_s']:>7.1f} {r['wall_s']:>7.2f} {r['receiver_cpu_s']:>10.2f} "
              f"{redis:>11} {r['senders_cpu_s']:>13.2f} {r['others_cpu_s']:>12.2f} {r['disturbed_runs']:>9}")
    for k, v in rat.items():
        print(f"{k}: {v:.2f}")


NOTES = [
    "median of the undisturbed runs (see below); MB = 10^6 bytes of the sent files;",
    "  wall = first sender start to last sender exit",
    "ainode writes each file to tmp/, fsyncs it, renames it and fsyncs the folder; storescp does not fsync",
    "storescp (without --fork) serves one association at a time: concurrent senders queue",
    "receiver CPU excludes ainode's embedded Redis (own column); senders CPU = all storescu processes",
    "others CPU = what the rest of the machine used during the run (other people's work, kernel flush threads):",
    f"  a run where that exceeded {DISTURBED_SHARE:.0%} of one CPU is disturbed and is run again (--retry-disturbed);",
    "  the median leaves disturbed runs out unless all were; the disturbed column counts those it kept",
]


# --------------------------------------------------------------------------- main


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: everything is stopped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="slices per series (default 300)")
    parser.add_argument("--senders", default="1,4", help="comma-separated sender counts (default 1,4)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per receiver and sender count (default 3)")
    parser.add_argument("--receivers", default=",".join(DEFAULT_RECEIVERS),
                        help=f"comma-separated, from {', '.join(RECEIVERS)} (default {','.join(DEFAULT_RECEIVERS)})")
    parser.add_argument("--data", type=Path, default=None,
                        help="keep the series in this folder and reuse them (default: a temp folder, removed)")
    parser.add_argument("--wait-idle", type=float, default=30.0, metavar="S",
                        help="before each run wait up to S s for the machine to be >= 90%% idle "
                             "(default 30; 0: no wait)")
    parser.add_argument("--retry-disturbed", type=int, default=2, metavar="N",
                        help=f"run again, up to N times, a run during which other work used more than "
                             f"{DISTURBED_SHARE * 100:.0f}%% of a CPU (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    try:
        counts = sorted({int(x) for x in args.senders.split(",") if x.strip()})
    except ValueError:
        parser.error(f'--senders must be comma-separated integers, got "{args.senders}"')
    receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
    for r in receivers:
        if r not in RECEIVERS:
            parser.error(f'--receivers: unknown receiver "{r}"; choose from {", ".join(RECEIVERS)}')
    if not counts or min(counts) < 1 or args.slices < 1 or args.repeat < 1:
        parser.error("--senders, --slices and --repeat must be at least 1")
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found: install dcmtk", file=sys.stderr)
            return 1

    signal.signal(signal.SIGTERM, _on_term)
    runs: list[Run] = []
    discarded: list[Run] = []  # disturbed runs that were run again
    with ExitStack() as stack:
        if args.data is None:
            data = Path(tempfile.mkdtemp(prefix="ainode-bench-data-"))
            stack.callback(shutil.rmtree, data, True)
        else:
            data = args.data
            data.mkdir(parents=True, exist_ok=True)
        logdir = Path(tempfile.mkdtemp(prefix="ainode-bench-logs-"))
        stack.callback(shutil.rmtree, logdir, True)
        print(f"making {max(counts)} series of {args.slices} slices in {data}", flush=True)
        series = make_series(data, max(counts), args.slices)
        try:
            for rep in range(args.repeat):  # repeats outermost, so drift hits every receiver alike
                for name in receivers:
                    for n in counts:
                        for attempt in range(args.retry_disturbed + 1):
                            r = run_once(name, series[:n], rep, logdir, args.wait_idle)
                            print(f"  run {rep + 1}/{args.repeat} {name:<13} {n} sender(s): {r.images_per_s:6.0f} "
                                  f"img/s {r.mb_per_s:6.1f} MB/s  wall {r.wall_s:5.2f} s  CPU {r.receiver_cpu_s:5.2f} s"
                                  f"  others' CPU {r.others_cpu_s:5.2f} s{'  (disturbed)' if r.disturbed else ''}",
                                  flush=True)
                            if not r.disturbed:
                                break
                            if attempt < args.retry_disturbed:
                                discarded.append(r)
                        runs.append(r)
        except (BenchError, AssertionError) as exc:  # AssertionError: tests.peers timed out
            print(f"error: {exc}", file=sys.stderr)
            return 1

    rows = medians(runs)
    rat = ratios(rows)
    print()
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{args.slices} slices per sender, median of {args.repeat}")
    print_table(rows, rat)
    for note in NOTES:
        print(f"  note: {note}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "params": {"slices": args.slices, "senders": counts, "repeat": args.repeat, "receivers": receivers},
            "median": rows, "ratios": rat, "runs": [asdict(r) for r in runs],
            "discarded_runs": [asdict(r) for r in discarded], "notes": NOTES,
        }, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
