"""What ``/readyz`` checks and what ``/metrics`` reads at scrape time: the node's state, not its counts.

Each check returns (ok, detail). Workers are rq's registered workers named
``ainode-<role>-<host>-<pid>`` (node.jobs.worker_name): on this host, those
that marked themselves ready in storage (an analysis worker once its model is
loaded) while their pid runs; on others, rq's registered workers.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.worker import Worker

from node import __version__
from node.config import Config
from node.embedded_redis import pid_alive
from node.jobs import QUEUES
from node.ports import listening_ports
from node.store import Storage

logger = logging.getLogger(__name__)

ROLES = ("analyse", "send")


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


def live_workers(redis: Redis | None, storage: Storage) -> dict[str, list[str]]:
    """The names of the live ainode workers, by role.

    This host's: those that marked themselves ready in storage (an analysis
    worker does once its model is loaded) and whose pid runs, whatever Redis
    remembers (a Redis restarted empty forgets every worker). Other hosts':
    rq's registered workers (they expire a few minutes after they stop beating).
    """
    host = socket.gethostname()
    out: dict[str, list[str]] = {role: [] for role in ROLES}

    def add(name: str) -> None:
        parts = name.split("-")
        if len(parts) >= 4 and parts[0] == "ainode" and parts[1] in out and name not in out[parts[1]]:
            out[parts[1]].append(name)

    for name in storage.ready_workers():
        pid = name.rsplit("-", 1)[-1]
        if name.startswith("ainode-") and pid.isdigit() and f"-{host}-" in name and pid_alive(int(pid)):
            add(name)
    if redis is not None:
        for w in Worker.all(connection=redis):
            if w.hostname != host:
                add(w.name)
    return out


class Health:
    """The checks of one node, from its config (the same storage and Redis as its other processes)."""

    def __init__(self, cfg: Config, redis: Redis) -> None:
        self.cfg = cfg
        self.redis = redis
        self.storage = Storage(cfg.node.storage)

    def scp(self) -> Check:
        """Whether the SCP's port is in the kernel's LISTEN state: read from /proc, so a probe every few
        seconds opens no connection (each would be an association attempt in the node's log); where
        /proc is not there, one TCP connection says it."""
        host = "127.0.0.1" if self.cfg.node.host in ("0.0.0.0", "") else self.cfg.node.host
        host = "::1" if host == "::" else host
        port = self.cfg.node.port or self.cfg.tls.port
        listening = listening_ports()
        if listening is not None:
            if port in listening:
                return Check(True, f"listening on {host}:{port}")
            return Check(False, f"nothing listens on port {port}")
        try:
            with socket.create_connection((host, port), timeout=2.0):
                return Check(True, f"listening on {host}:{port}")
        except OSError as exc:
            return Check(False, f"nothing listens on {host}:{port}: {exc.strerror or exc}")

    def redis_check(self) -> Check:
        try:
            self.redis.ping()
            return Check(True, "answers")
        except (RedisError, OSError) as exc:
            return Check(False, f"does not answer: {exc}")

    def storage_check(self) -> Check:
        try:
            free = self.storage.free_mb()
            fd, probe = tempfile.mkstemp(dir=self.storage.tmp, prefix=".readyz-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            return Check(False, f"{self.storage.root} cannot be written: {exc.strerror or exc}")
        if free < self.cfg.node.min_free_mb:
            return Check(False, f"{free:.0f} MB free, below min_free_mb ({self.cfg.node.min_free_mb})")
        return Check(True, f"{free:.0f} MB free")

    def workers(self) -> dict[str, Check]:
        try:
            live = live_workers(self.redis, self.storage)
        except (RedisError, OSError):
            live = live_workers(None, self.storage)  # this host's, without Redis
        what = {"analyse": "analysis worker with its model loaded", "send": "sender"}
        return {role: Check(bool(names), f"{len(names)} live" if names else f"no live {what[role]}")
                for role, names in live.items()}

    def readiness(self) -> dict[str, Check]:
        workers = self.workers()
        return {"scp": self.scp(), "redis": self.redis_check(), "storage": self.storage_check(),
                "analyse_worker": workers["analyse"], "sender": workers["send"]}


class StateCollector:
    """Gauges read when Prometheus scrapes: queues, dead letters, free disk, live workers, build."""

    def __init__(self, health: Health) -> None:
        self.health = health
        self._model: tuple[str, str] | None = None

    def _model_info(self) -> tuple[str, str]:
        if self._model is None:
            from node.model_card import ModelCard, resolve_model_path

            try:
                card = ModelCard.read(resolve_model_path(self.health.cfg.model.path))
                self._model = (card.name, card.version)
            except Exception:  # noqa: BLE001 - a bad model is /readyz's business; metrics go on
                self._model = ("unknown", "unknown")
        return self._model

    def collect(self) -> Iterator[Any]:
        redis = self.health.redis
        build = InfoMetricFamily("ainode_build", "The node's version and model")
        model, model_version = self._model_info()
        build.add_metric([], {"version": __version__, "model": model, "model_version": model_version})
        yield build
        try:
            free = self.health.storage.free_mb() * 2**20
            yield GaugeMetricFamily("ainode_storage_free_bytes", "Free space on the storage file system", value=free)
        except OSError:
            pass
        up = GaugeMetricFamily("ainode_redis_up", "1 if the node's Redis answers")
        depth = GaugeMetricFamily("ainode_queue_depth", "Jobs waiting, by queue", labels=["queue"])
        oldest = GaugeMetricFamily("ainode_queue_oldest_job_seconds", "Age of the oldest waiting job, by queue",
                                   labels=["queue"])
        failed = GaugeMetricFamily("ainode_failed_jobs", "Jobs failed for good (the send queue's: dead letters)",
                                   labels=["queue"])
        workers = GaugeMetricFamily("ainode_workers_up", "Live workers, by role", labels=["role"])
        try:
            for name in QUEUES:
                queue = Queue(name, connection=redis)
                depth.add_metric([name], queue.count)
                head = queue.get_job_ids(0, 0)
                age = 0.0
                if head:
                    job = Job.fetch(head[0], connection=redis)
                    if job.enqueued_at is not None:
                        age = max(0.0, time.time() - job.enqueued_at.timestamp())
                oldest.add_metric([name], age)
                failed.add_metric([name], FailedJobRegistry(name, connection=redis).count)
            for role, names in live_workers(redis, self.health.storage).items():
                workers.add_metric([role], len(names))
            up.add_metric([], 1)
        except (RedisError, OSError) as exc:
            logger.debug("Metrics without Redis: %s", exc)
            up.add_metric([], 0)
            workers = GaugeMetricFamily("ainode_workers_up", "Live workers, by role", labels=["role"])
            for role, names in live_workers(None, self.health.storage).items():
                workers.add_metric([role], len(names))
            yield from (up, workers)
            return
        yield from (up, depth, oldest, failed, workers)
