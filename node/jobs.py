"""The rq jobs around a worker's death: heartbeats, recovery, and scheduling that needs no worker.

rq's SimpleWorker writes no heartbeat while a job runs, so a worker killed
mid-job (the OOM killer, a GPU fault) leaves its job "started" until the
execution's entry in the StartedJobRegistry expires: the job timeout plus a
minute, half an hour here. ainode's workers (node.worker.AinodeWorker) beat
every HEARTBEAT_S, keeping that entry EXECUTION_TTL_S ahead; then

- the node that started a worker and saw it die calls :func:`recover_worker`
  at once: the job goes back to the front of its queue (or, the second time a
  job kills its worker, is failed with that reason), and the lost run is
  audited and noted in the study's revision state;
- for workers on other machines, :func:`requeue_abandoned` (every tick of
  the node, or of any worker) finds executions whose heartbeat stopped and
  gives them the same treatment, within about a minute.

Retries of the sender are scheduled jobs (rq's ScheduledJobRegistry). rq
moves them to their queue only while some worker's scheduler holds the
queue's lock; a scheduler killed with its worker keeps that lock for a
minute and the others look again only every ten minutes. :class:`Scheduling`
runs that duty in the node's own loop instead: it takes the locks (clearing
those left by workers of an earlier node on the same embedded Redis) and
moves due jobs every tick.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.scheduler import RQScheduler
from rq.worker import Worker

from node.enqueue import QUEUE_NAME

logger = logging.getLogger(__name__)

SEND_QUEUE = "ainode-send"  # node.send.SEND_QUEUE, named here so the receive side need not import node.send
QUEUES = (QUEUE_NAME, SEND_QUEUE)
HEARTBEAT_S = 10
EXECUTION_TTL_S = 45
#: A job whose worker died this many times is failed, not run again.
MAX_WORKER_DEATHS = 2

#: (job, why it was lost, what happens now) -> None: the audit trail and the study's state.
LostRun = Callable[[Job, str, str], None]


def worker_name(role: str, pid: int, host: str | None = None) -> str:
    """The rq name of an ainode worker: the node finds a dead worker's job by it."""
    return f"ainode-{role}-{host or socket.gethostname()}-{pid}"


def _executions_of(redis: Redis, name: str) -> list[Execution]:
    worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection=redis)
    if worker is None:
        return []
    return list(worker.get_current_executions(refresh=True))


def recover_worker(redis: Redis, name: str, why: str, on_lost: LostRun) -> list[str]:
    """Requeue (or fail) the job a dead worker was running; returns the job ids handled."""
    handled = []
    for execution in _executions_of(redis, name):
        try:
            job = Job.fetch(execution.job_id, connection=redis)
        except Exception:  # NoSuchJobError, or unreadable
            continue
        if job.get_status(refresh=True) != JobStatus.STARTED:
            continue
        _requeue(redis, job, execution, why, on_lost)
        handled.append(job.id)
    redis.delete(Worker.redis_worker_namespace_prefix + name)  # a dead worker is not "busy" in rq's listings
    return handled


def requeue_abandoned(redis: Redis, on_lost: LostRun, queues: tuple[str, ...] = QUEUES) -> list[str]:
    """Requeue (or fail) every started job whose worker stopped beating; returns the job ids."""
    handled = []
    for name in queues:
        registry = StartedJobRegistry(name, connection=redis)
        for raw in redis.zrangebyscore(registry.key, 0, time.time()):  # entries past their heartbeat's expiry
            entry = raw.decode() if isinstance(raw, bytes) else str(raw)
            job_id, _, execution_id = entry.partition(":")
            try:
                job = Job.fetch(job_id, connection=redis)
            except Exception:  # NoSuchJobError, or unreadable: nothing to run again
                redis.zrem(registry.key, entry)
                continue
            if job.get_status(refresh=True) != JobStatus.STARTED:
                redis.zrem(registry.key, entry)  # finished after all: a leftover entry
                continue
            _requeue(redis, job, Execution(execution_id, job_id, connection=redis),
                     "its worker stopped sending heartbeats", on_lost)
            handled.append(job_id)
    return handled


def _requeue(redis: Redis, job: Job, execution: Execution, why: str, on_lost: LostRun) -> None:
    deaths = int(job.meta.get("worker_deaths", 0)) + 1
    job.meta["worker_deaths"] = deaths
    job.save_meta()
    with redis.pipeline() as pipe:
        execution.delete(job, pipe)
        pipe.execute()
    queue = Queue(job.origin, connection=redis)
    if deaths >= MAX_WORKER_DEATHS:
        reason = f"its worker died {deaths} times while running it (last: {why})"
        with redis.pipeline() as pipe:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            FailedJobRegistry(job.origin, connection=redis).add(job, ttl=job.failure_ttl, exc_string=reason,
                                                              pipeline=pipe)
            pipe.execute()
        logger.error("Job %s: %s; marked failed", job.id, reason)
        on_lost(job, why, f"failed: {reason}")
    else:
        queue.enqueue_job(job, at_front=True)
        logger.warning("Job %s: lost (%s); queued again at the front of %s", job.id, why, job.origin)
        on_lost(job, why, "queued again")


class Scheduling:
    """rq's scheduler duty for ainode's queues, run in the node's loop (no process of its own)."""

    def __init__(self, redis: Redis, clear_stale_locks: bool) -> None:
        self.redis = redis
        self.scheduler = RQScheduler([Queue(q, connection=redis) for q in QUEUES], connection=redis,
                                     logging_level=logging.WARNING,
                                     name=f"ainode-node-{socket.gethostname()}-{os.getpid()}")
        if clear_stale_locks:  # the workers of an earlier node on this Redis are gone: so are their schedulers
            redis.delete(*[RQScheduler.get_locking_key(q) for q in QUEUES])
        self._held: set[str] = set()

    def tick(self) -> int:
        """Take (or keep) the locks and move the due scheduled jobs to their queues; how many were due."""
        try:
            held = self.scheduler.acquire_locks()
            if held != self._held:
                if held:
                    logger.info("Scheduling retries for %s", ", ".join(sorted(held)))
                self._held = set(held)
            if not held:
                return 0
            self.scheduler.prepare_registries(held)
            return len(self.scheduler.enqueue_scheduled_jobs() or [])
        except RedisError as exc:
            logger.debug("Scheduling paused: %s", exc)
            return 0

    def stop(self) -> None:
        try:
            self.scheduler.release_locks()
        except RedisError:
            pass


def die_with(supervisor: int) -> None:
    """Make the kernel kill this process when its supervising node dies (Linux), even by SIGKILL."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        logger.warning("Cannot tie this process to its node (no prctl): it may outlive a killed node")
    if os.getppid() != supervisor:  # the node died before the tie was made
        logger.error("The node (pid %d) that started this process is gone: exiting", supervisor)
        os._exit(1)
