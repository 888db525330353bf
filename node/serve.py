"""``ainode serve``: the receiving node — SCP, storage, completion loop, Redis.

The SCP (node.receive) receives on the plain port, the TLS port or both: in
this process, or with ``[node] receivers`` N > 1 in N receiving processes
sharing the ports (node.receive.process). The main thread runs the completion
loop and handles signals (SIGHUP reload, passed on to the receiving processes;
SIGTERM/SIGINT stop). Start, stop and every reload are audited.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Callable

from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job
from rq.worker import Worker as RQWorker

from node import config as config_mod
from node import metrics
from node.audit import Action, AuditError, AuditTrail, Outcome, open_trail
from node.completion import Completion, quiet_by_pipeline
from node.config import Config
from node.embedded_redis import EmbeddedRedis, pid_alive
from node.enqueue import QUEUE_NAME, JobQueue, redis_client
from node.errors import AinodeError, ConfigError
from node.jobs import Scheduling, recover_worker, requeue_abandoned, worker_name
from node.ports import listening_ports
from node.receive.process import DRAIN_S, ROLE as RECEIVE, TICK_S, Receiving
from node.store import Storage, write_atomic
from node.tls import server_context

logger = logging.getLogger(__name__)

PURGE_EVERY_S = 3600.0
WORKER_STOP_S = 60.0
WORKER_RESTART_S = 5.0  # the first restart delay; doubles while a worker keeps dying at start
WORKER_RESTART_MAX_S = 300.0
WORKER_QUICK_EXIT_S = 60.0
SCHEDULE_EVERY_S = 1.0
RECEIVERS_READY_S = 30.0
ABANDONED_EVERY_S = 10.0


class WorkerPool:
    """The worker processes ``ainode serve`` runs beside the SCP: one sender, N analysers.

    Each worker dies with the node (node.jobs.die_with: the kernel kills it
    when the node dies, even by SIGKILL); their pids are kept in
    ``<storage>/run/workers.json`` so that a node starting on the same storage
    stops any still running (from a node that could not tie them). A worker
    that dies is started again, after a delay that doubles (up to
    WORKER_RESTART_MAX_S) while it keeps dying soon after its start (a bad
    model, say), and the job it was running is recovered at once
    (``on_death``, node.jobs.recover_worker); at stop each gets SIGTERM (rq
    finishes the job in hand) and then SIGKILL.
    """

    def __init__(self, cfg: Config, analysers: int, log_level: str,
                 on_death: Callable[[str, int, str], None] | None = None) -> None:
        self.cfg = cfg
        self.on_death = on_death
        self.pidfile = Path(cfg.node.storage) / "run" / "workers.json"
        # analysers -1: no workers here at all (they run elsewhere); the web process still runs beside the SCP
        workers = ["send"] + ["analyse"] * analysers if analysers >= 0 else []
        receivers = [RECEIVE] * cfg.node.receivers if cfg.node.receivers > 1 else []
        self.roles = receivers + workers + (["web"] if cfg.web.enabled else [])
        self.log_level = log_level
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * len(self.roles)
        self.started_at = [0.0] * len(self.roles)
        self.retry_at = [0.0] * len(self.roles)
        self.failures = [0] * len(self.roles)  # exits soon after a start, in a row

    def _command(self, role: str, index: int) -> list[str]:
        cmd = [sys.executable, "-m", "node", "--log-level", self.log_level]
        if self.cfg.source is not None:
            cmd += ["--config", str(self.cfg.source)]
        if role == RECEIVE:  # the host and port this node was started with (serve --host/--port included)
            return cmd + ["receive", "--index", str(index), "--host", self.cfg.node.host, "--port",
                          str(self.cfg.node.port), "--storage", str(self.cfg.node.storage),
                          "--supervised-by", str(os.getpid())]
        if role == "web":
            return cmd + ["web", "--storage", str(self.cfg.node.storage), "--supervised-by", str(os.getpid())]
        return cmd + ["worker", "--role", role, "--storage", str(self.cfg.node.storage),
                      "--supervised-by", str(os.getpid())]

    def stop_leftovers(self) -> int:
        """Stop workers an earlier node on this storage left running; returns how many."""
        try:
            pids = [int(p) for p in json.loads(self.pidfile.read_text()).get("pids", [])]
        except (OSError, ValueError, AttributeError):
            return 0
        storage = str(self.cfg.node.storage).encode()
        stopped = 0
        for pid in pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"--supervised-by" not in cmdline or storage not in cmdline or not pid_alive(pid):
                continue  # gone, or the pid now belongs to something else
            logger.warning("Stopping pid %d (a worker or web process) left running by an earlier node on this storage",
                           pid)
            _stop_pid(pid)
            stopped += 1
        self.pidfile.unlink(missing_ok=True)
        return stopped

    def _record(self) -> None:
        pids = [p.pid for p in self.procs if p is not None and p.poll() is None]
        try:
            self.pidfile.parent.mkdir(mode=0o700, exist_ok=True)
            write_atomic(self.pidfile, json.dumps({"node": os.getpid(), "pids": pids}).encode())
        except OSError as exc:
            logger.warning("Cannot record the worker pids in %s: %s", self.pidfile, exc)

    def check(self) -> None:
        """Start workers that are not running (again)."""
        now = time.monotonic()
        for i, role in enumerate(self.roles):
            proc = self.procs[i]
            if proc is not None and proc.poll() is None:
                continue
            if proc is not None:
                quick = now - self.started_at[i] < WORKER_QUICK_EXIT_S
                self.failures[i] = self.failures[i] + 1 if quick else 0
                self.retry_at[i] = now + min(WORKER_RESTART_S * 2 ** self.failures[i], WORKER_RESTART_MAX_S)
                code = proc.returncode
                how = (f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
                       else f"exited with code {code}")
                logger.error("Worker %d (%s, pid %d) %s; starting it again in %.0f s",
                             i, role, proc.pid, how, self.retry_at[i] - now)
                self.procs[i] = None
                self._record()
                if self.on_death is not None:
                    self.on_death(role, proc.pid, f"worker pid {proc.pid} {how}")
            if now < self.retry_at[i]:
                continue
            self.procs[i] = subprocess.Popen(self._command(role, i), stdin=subprocess.DEVNULL)
            self.started_at[i] = now
            self._record()
            logger.info("Worker %d (%s) started, pid %d", i, role, self.procs[i].pid)  # type: ignore[union-attr]

    def running(self, role: str) -> list[subprocess.Popen[bytes]]:
        return [p for r, p in zip(self.roles, self.procs) if r == role and p is not None and p.poll() is None]

    def signal(self, role: str, sig: int) -> None:
        for p in self.running(role):
            p.send_signal(sig)

    def stop(self) -> None:
        # the receiving processes first: they drain their associations while the workers still run
        receivers = self.running(RECEIVE)
        for p in receivers:
            p.send_signal(signal.SIGTERM)
        for p in receivers:
            try:
                p.wait(DRAIN_S + 10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_S
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("Worker pid %d did not stop in %.0f s: killing it", p.pid, WORKER_STOP_S)
                p.kill()
                p.wait()
        self.procs = [None] * len(self.roles)
        self.pidfile.unlink(missing_ok=True)


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``, a process that is not our child."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def connect_redis(cfg: Config) -> tuple[Redis, EmbeddedRedis | None]:
    """A client for the configured Redis; with an empty URL, start our own server first."""
    if cfg.redis.url:
        return redis_client(cfg.redis.url), None
    embedded = EmbeddedRedis(cfg.node.storage)
    embedded.start()
    return embedded.client(), embedded


class Node:
    """The receiving node, from start to a clean stop."""

    def __init__(self, cfg: Config, workers: int = 1, log_level: str = "INFO") -> None:
        self.cfg = cfg
        self.pool = (WorkerPool(cfg, workers, log_level, self._worker_died)
                     if workers >= 0 or cfg.web.enabled or cfg.node.receivers > 1 else None)
        self.scheduling: Scheduling | None = None
        self.next_schedule = 0.0
        self.next_abandoned = 0.0
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.next_purge = 0.0  # at the first tick, then hourly
        self.storage = Storage(cfg.node.storage)
        self.embedded: EmbeddedRedis | None = None
        self.receiving: Receiving | None = None  # None when receiving processes of their own receive
        self.audit: AuditTrail | None = None

    def start(self) -> None:
        cfg = self.cfg
        # The SCP uses pynetdicom only to decode A-ASSOCIATE-RQs; a hostile one makes it log tracebacks
        # that say less than the one line node.receive writes for the same connection.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        if self.pool is not None:
            self.pool.stop_leftovers()  # before tmp/ is cleared: such a worker may be writing there
        self.storage.prepare()
        self.audit = open_trail(cfg.audit_path, cfg.node.ae_title, "serve", cfg.audit.syslog)
        tls_context = server_context(cfg.tls, str(cfg.source or "config")) if cfg.tls.enabled else None
        self.redis, self.embedded = connect_redis(cfg)
        self.completion = Completion(self.storage, self.redis, cfg.completion, JobQueue(self.redis),
                                     quiet_by_pipeline=quiet_by_pipeline(cfg))
        try:
            self.completion.reconcile()
        except OSError as exc:  # the completion loop tries again
            logger.error("Storage cannot be written (%s): completion resumes once it can", exc.strerror or exc)
        # With the embedded Redis every rq worker and scheduler it knows belonged to this storage's
        # earlier nodes, all gone now (their workers died with them or were stopped above).
        self.scheduling = Scheduling(self.redis, clear_stale_locks=self.embedded is not None)
        self._recover_dead_workers()
        if cfg.node.receivers == 1:
            self.receiving = Receiving(cfg, self.storage, self.completion, self.audit)
            ports = self.receiving.listen(cfg, tls_context)
        else:
            ports = self._start_receivers(tls_context is not None)
        if not cfg.callers:
            logger.warning("No [[callers]] configured: any calling AE title is accepted")
        if self.pool is not None and cfg.node.receivers == 1:
            self.pool.check()
        free = self.storage.free_mb()
        if free < cfg.node.min_free_mb:
            logger.error("Storage has %.0f MB free, below min_free_mb (%d): C-STORE is refused with 0xA700 "
                         "(Out of Resources) until space is freed; C-ECHO answers", free, cfg.node.min_free_mb)
        try:
            self.audit.application(True, f"ainode {_version()} serving on {', '.join(ports)}")
        except AuditError as exc:  # disk full: start anyway; stores are refused while the trail cannot be written
            logger.error("The start is not audited: %s; C-STORE is refused with 0xA700 while the audit trail "
                         "cannot be written", exc)
        logger.info(
            "ainode listening as %s on %s, storage %s, audit %s%s, Redis %s",
            "; ".join(cfg.describe(p) for p in cfg.pipelines) if cfg.declared_pipelines else cfg.node.ae_title,
            " and ".join(ports), cfg.node.storage, cfg.audit_path,
            f" and syslog {self.audit.syslog.target}" if self.audit.syslog else "",
            "embedded" if self.embedded else _mask(cfg.redis.url),
        )

    def _start_receivers(self, tls: bool) -> list[str]:
        """Start ``[node] receivers`` receiving processes on the ports and wait until each listens."""
        cfg = self.cfg
        assert self.pool is not None
        wanted = [("[node] port", cfg.node.port, False)] if cfg.node.port else []
        if tls:
            wanted.append(("[tls] port", cfg.tls.port, True))
        listening = listening_ports() or set()
        for key, port, _ in wanted:  # SO_REUSEPORT would share a port someone else listens on, silently
            if port in listening:
                raise ConfigError(f"{key}: cannot listen on {cfg.node.host}:{port}: something already listens there")
        before = set(self.storage.ready_workers())
        self.pool.check()  # every process: the receiving ones first
        receivers = self.pool.running(RECEIVE)
        deadline = time.monotonic() + RECEIVERS_READY_S
        while True:
            ready = [n for n in self.storage.ready_workers() if n.startswith(f"ainode-{RECEIVE}-") and n not in before]
            if len(ready) >= len(receivers):
                break
            dead = [p for p in receivers if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = (f"exited with code {dead[0].returncode} (its reason is logged above)" if dead
                       else f"did not listen within {RECEIVERS_READY_S:.0f} s")
                raise AinodeError(f"a receiving process {why}")
            time.sleep(0.05)
        words = [f"{cfg.node.host}:{port}{' (TLS)' if is_tls else ''}" for _, port, is_tls in wanted]
        return [f"{w}, {len(receivers)} receiving processes" for w in words[:1]] + words[1:]

    def run(self) -> None:
        """The completion loop, until a stop is requested."""
        while not self.stop_requested.is_set():
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            if self.embedded is not None:
                self.embedded.ensure_running()
            if self.pool is not None:
                self.pool.check()
            self.completion.tick()
            now = time.monotonic()
            if self.scheduling is not None and now >= self.next_schedule:
                self.next_schedule = now + SCHEDULE_EVERY_S
                self.scheduling.tick()
            if now >= self.next_abandoned:
                self.next_abandoned = now + ABANDONED_EVERY_S
                self._requeue_abandoned()
            if time.monotonic() >= self.next_purge:
                self.next_purge = time.monotonic() + PURGE_EVERY_S
                self.purge()
            self.stop_requested.wait(TICK_S)

    # --- jobs whose worker died -----------------------------------------------------------

    def _worker_died(self, role: str, pid: int, why: str) -> None:
        """A worker this node started died: recover its job now, not when rq would notice."""
        metrics.WORKER_DEATHS.labels(role).inc()
        if role in (RECEIVE, "web"):
            return  # no job to recover: the instances it acknowledged are on disk, the rest its peers send again
        try:
            recover_worker(self.redis, worker_name(role, pid), why, self._lost_run)
        except RedisError as exc:
            logger.error("Worker pid %d died; its job is recovered once Redis answers (%s)", pid, exc)

    def _recover_dead_workers(self) -> None:
        """Jobs left "started" by this host's ainode workers that are no longer running."""
        host = socket.gethostname()
        try:
            workers = RQWorker.all(connection=self.redis)
        except RedisError as exc:
            logger.error("Cannot list rq workers: %s", exc)
            return
        for w in workers:
            if w.name.startswith("ainode-") and w.hostname == host and w.pid and not pid_alive(w.pid):
                recover_worker(self.redis, w.name, f"worker pid {w.pid} was gone when the node started",
                               self._lost_run)

    def _requeue_abandoned(self) -> None:
        try:
            requeue_abandoned(self.redis, self._lost_run)
        except RedisError as exc:
            logger.debug("Abandoned jobs not checked: %s", exc)

    def _lost_run(self, job: Job, why: str, then: str) -> None:
        """Record a run lost with its worker: the audit trail and the study's revision state."""
        kwargs = job.kwargs or {}
        study_uid, revision = kwargs.get("study_uid"), kwargs.get("revision")
        if not isinstance(study_uid, str) or not isinstance(revision, int):
            return
        analysis = job.origin == QUEUE_NAME
        what = "analysis" if analysis else f"sending to {kwargs.get('destination')}"
        failed = then.startswith("failed")
        try:
            self.storage.note_lost_run(study_uid, revision, {"job": job.id, "why": why, "then": then})
            if failed and analysis and not self.storage.has_outcome(study_uid, revision):
                self.storage.write_outcome(study_uid, revision, "failed", reason=f"{what} lost: {then[8:]}")
        except OSError as exc:
            logger.error("Study %s r%d: lost run not recorded: %s", study_uid, revision, exc)
        try:
            assert self.audit is not None
            self.audit.job(study_uid, revision, Action.READ, Outcome.SERIOUS_FAILURE if failed else Outcome.MINOR_FAILURE,
                           f"{what} lost: {why}; {then}")
        except AuditError as exc:
            logger.error("Study %s r%d: lost run not audited: %s", study_uid, revision, exc)

    def purge(self) -> None:
        """Apply [storage] keep_days; an error is logged, the node goes on."""
        from node.retention import purge

        try:
            purge(self.storage, self.cfg, self.audit)
        except (OSError, ValueError, AinodeError) as exc:
            logger.error("Retention: %s", exc)

    def reload(self) -> None:
        """Re-read the config file; apply what can change live, keep the rest."""
        if self.cfg.source is None:
            logger.warning("SIGHUP: no config file to reload (built-in defaults)")
            return
        old = self.cfg
        try:
            new = config_mod.load(self.cfg.source)
            tls_context = (server_context(new.tls, str(new.source))
                           if self.receiving and self.receiving.server.tls_context and new.tls.enabled else None)
        except ConfigError as exc:
            logger.error("SIGHUP: config not reloaded, keeping the running one: %s", exc)
            self._audit_reload(True, Outcome.SERIOUS_FAILURE, f"config not reloaded: {exc}")
            return
        for key in ("host", "port", "storage"):
            if getattr(new.node, key) != getattr(old.node, key):
                logger.warning("SIGHUP: [node] %s changed; it takes effect at the next restart", key)
        if new.redis != old.redis:
            logger.warning("SIGHUP: [redis] changed; it takes effect at the next restart")
        for key in ("enabled", "port"):
            if getattr(new.tls, key) != getattr(old.tls, key):
                logger.warning("SIGHUP: [tls] %s changed; it takes effect at the next restart", key)
        if new.audit != old.audit:
            logger.warning("SIGHUP: [audit] changed; it takes effect at the next restart")
        if new.node.receivers != old.node.receivers:
            logger.warning("SIGHUP: [node] receivers changed; it takes effect at the next restart")
        if self.receiving is not None:
            self.receiving.apply(new, tls_context)  # new connections get the new certificate, key and CA
        elif self.pool is not None:
            self.pool.signal(RECEIVE, signal.SIGHUP)  # each receiving process reloads the same file
        self.completion.update_config(new.completion, quiet_by_pipeline(new))
        self.cfg = config_mod.kept_for_restart(old, new)
        security = ((new.pipelines, new.callers, new.tls) != (old.pipelines, old.callers, old.tls))
        what = (f"{len(new.pipelines)} pipeline{'s' if len(new.pipelines) > 1 else ''} "
                f"({', '.join(p.name for p in new.pipelines)}), {len(new.callers)} callers, "
                f"{len(new.destinations)} destinations")
        self._audit_reload(security, Outcome.SUCCESS, f"config reloaded: {what}")
        logger.info("SIGHUP: config reloaded from %s: %s", new.source, what)

    def _audit_reload(self, security: bool, outcome: Outcome, description: str) -> None:
        assert self.audit is not None
        try:
            self.audit.config_reloaded(self.cfg.source, security, outcome, description)
        except AuditError as exc:
            logger.error("SIGHUP: reload not audited: %s", exc)

    def stop(self) -> None:
        """Stop accepting, let open associations finish (bounded), stop Redis, audit the stop."""
        if self.receiving is not None:
            self.receiving.stop(DRAIN_S)
            self.receiving = None
        if self.pool is not None:
            self.pool.stop()
        if self.scheduling is not None:
            self.scheduling.stop()
        if self.embedded is not None:
            self.embedded.stop()
        if self.audit is not None:
            try:
                self.audit.application(False, "ainode stopped")
            except AuditError as exc:
                logger.error("Stop not audited: %s", exc)
            self.audit.close()
            self.audit = None
        logger.info("ainode stopped")

    def install_signal_handlers(self) -> None:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            logger.info("Signal %s: stopping", signal.Signals(signum).name)
            self.stop_requested.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.reload_requested.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)


def _version() -> str:
    from node import __version__

    return __version__


def _mask(url: str) -> str:
    """A Redis URL with any password replaced by ***."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return f"{scheme}://{user}:***@{host}"


def serve(cfg: Config, workers: int = 1, log_level: str = "INFO") -> int:
    """Run the node until SIGTERM/SIGINT; returns the exit code.

    ``workers``: analysis worker processes to run beside the SCP (plus one
    sender); -1 runs none at all (workers run elsewhere).
    """
    node = Node(cfg, workers, log_level)
    node.install_signal_handlers()
    try:
        node.start()
        node.run()
    finally:
        node.stop()
    return 0
