"""Queue analysis jobs in Redis with rq: by dotted name, with deterministic job ids."""

from __future__ import annotations

import logging

from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry as RedisRetry
from rq import Queue, Retry
from rq.job import Job

logger = logging.getLogger(__name__)

QUEUE_NAME = "ainode"
#: The job function, by dotted name: the receive path never imports the worker.
ANALYSE_STUDY = "node.worker.analyse_study"
JOB_TIMEOUT_S = 1800
RESULT_TTL_S = 7 * 24 * 3600
#: Transient failures (a worker killed, storage briefly unreachable) are retried.
RETRY = Retry(max=3, interval=[30, 120, 600])


def redis_client(url: str, timeout: float = 5.0, retries: int = 2) -> Redis:
    """A Redis client that fails fast: the C-STORE path must not wait long on Redis.

    redis-py's default retries with back-off for several seconds per call;
    here a call gives up after ``retries`` quick tries (the caller re-arms from disk).
    """
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=RedisRetry(ExponentialBackoff(cap=0.5, base=0.05), retries),
    )


def job_id(study_uid: str, revision: int) -> str:
    """The job id of one revision of a study: the same inputs give the same id.

    rq allows letters, digits, '_' and '-' only, so the UID's dots become '_'.
    """
    return f"study_{study_uid.replace('.', '_')}_r{revision}"


class JobQueue:
    """The ``ainode`` rq queue."""

    def __init__(self, connection: Redis) -> None:
        self.connection = connection
        self.queue = Queue(QUEUE_NAME, connection=connection)

    def exists(self, study_uid: str, revision: int) -> bool:
        """True if the job of that revision is known to Redis (queued, running, done or failed)."""
        return Job.exists(job_id(study_uid, revision), connection=self.connection)

    def enqueue(self, study_uid: str, revision: int, pipeline: str = "") -> bool:
        """Queue the analysis of one revision; False if that job already exists.

        The arguments are JSON-safe (a UID and an int); the worker reads the
        revision's instance list and pipeline from storage (``pipeline`` only
        names it in the job's description).
        """
        jid = job_id(study_uid, revision)
        if Job.exists(jid, connection=self.connection):
            logger.info("Study %s: job %s already exists, not queued again", study_uid, jid)
            return False
        self.queue.enqueue(
            ANALYSE_STUDY,
            kwargs={"study_uid": study_uid, "revision": revision},
            job_id=jid,
            retry=RETRY,
            job_timeout=JOB_TIMEOUT_S,
            result_ttl=RESULT_TTL_S,
            description=f"analyse study {study_uid} revision {revision}"
                        + (f" in pipeline {pipeline}" if pipeline else ""),
        )
        return True
