"""Study completion: a study is complete after a quiet period, or at the latest
``max_wait_seconds`` after its first instance; then one job is queued per revision.

The quiet period is the study's pipeline's (``[[pipelines]] quiet_seconds``,
else ``[completion] quiet_seconds``); the revision names that pipeline, the
one whose called AE title received the study's latest instance.

The timers are two sorted sets in Redis (study UID -> due time). Redis may lose
them (restarted empty): the files on disk and the revision records in
``state/`` are the truth, and :meth:`Completion.reconcile` rebuilds the timers
from them at start and whenever Redis is found empty or was unreachable.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping

from redis import Redis
from redis.exceptions import RedisError

from node import metrics
from node.config import CompletionConfig, Config
from node.enqueue import JobQueue, job_id
from node.store import Revision, Storage

logger = logging.getLogger(__name__)

KEY_QUIET = "ainode:completion:quiet"
KEY_DEADLINE = "ainode:completion:deadline"
#: Set when the timers are known to be complete; its absence means Redis lost them.
KEY_EPOCH = "ainode:epoch"
#: How soon a study whose completion could not be written (disk full) is tried again.
STORAGE_RETRY_S = 5.0


def quiet_by_pipeline(cfg: Config) -> dict[str, float]:
    """Each pipeline's quiet period, by the name its studies' revisions carry ("" for ainode 0.1's)."""
    quiet = {p.name: cfg.quiet_seconds(p) for p in cfg.pipelines}
    quiet[""] = cfg.quiet_seconds(cfg.pipelines[0])
    return quiet


class Completion:
    """Arms a study's timers on each stored instance and queues complete studies."""

    def __init__(
        self,
        storage: Storage,
        redis: Redis,
        cfg: CompletionConfig,
        queue: JobQueue,
        clock: Callable[[], float] = time.time,
        quiet_by_pipeline: Mapping[str, float] | None = None,
    ) -> None:
        self.storage = storage
        self.redis = redis
        self.cfg = cfg
        self.quiet_by_pipeline = dict(quiet_by_pipeline or {})
        self.queue = queue
        self.clock = clock
        self._needs_reconcile = threading.Event()
        self._redis_down_since: float | None = None
        self._storage_down_since: float | None = None
        self._dirty: dict[str, tuple[float, float, str]] = {}  # study -> (first, last, pipeline) since the last flush
        self._dirty_lock = threading.Lock()

    def update_config(self, cfg: CompletionConfig, quiet_by_pipeline: Mapping[str, float] | None = None) -> None:
        """Apply new times; timers already armed keep their due times."""
        self.cfg = cfg
        self.quiet_by_pipeline = dict(quiet_by_pipeline or {})

    def quiet_seconds(self, pipeline: str) -> float:
        """The quiet period of a pipeline's studies (a pipeline removed since: [completion] quiet_seconds)."""
        return self.quiet_by_pipeline.get(pipeline, self.cfg.quiet_seconds)

    # --- the C-STORE path ----------------------------------------------------------

    def instance_stored(self, study_uid: str, pipeline: str = "") -> None:
        """Note that the study has a new instance, received by ``pipeline``; its timers are written at the next flush.

        Never raises and never waits on Redis: the instance is already safe on
        disk. A study arriving at hundreds of instances a second costs Redis one
        round trip per flush (each tick of the completion loop), not one per instance.
        """
        now = self.clock()
        with self._dirty_lock:
            first = self._dirty[study_uid][0] if study_uid in self._dirty else now
            self._dirty[study_uid] = (first, now, pipeline)

    def flush(self) -> None:
        """Write the timers of every study noted since the last flush."""
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, {}
        if not dirty:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(KEY_QUIET, {study: last + self.quiet_seconds(pipeline)
                                  for study, (_, last, pipeline) in dirty.items()})
            pipe.zadd(KEY_DEADLINE, {study: first + self.cfg.max_wait_seconds
                                     for study, (first, _, _) in dirty.items()}, nx=True)
            pipe.execute()
        except RedisError as exc:
            # The files are on disk; the timers are rebuilt from disk once Redis is back.
            self._needs_reconcile.set()
            logger.warning("%d stud%s stored, but Redis is unreachable (%s); will re-arm from disk",
                           len(dirty), "y" if len(dirty) == 1 else "ies", exc)

    # --- the completion loop -------------------------------------------------------

    def tick(self) -> int:
        """Queue every study whose timer is due; returns how many revisions were queued."""
        self.flush()
        try:
            if self._needs_reconcile.is_set() or not self.redis.exists(KEY_EPOCH):
                if not self._needs_reconcile.is_set():
                    logger.warning("Redis has lost ainode's timers (restarted empty?): rebuilding from disk")
                self._needs_reconcile.clear()
                self.reconcile()
            now = self.clock()
            due = set(self.redis.zrangebyscore(KEY_QUIET, "-inf", now))
            due |= set(self.redis.zrangebyscore(KEY_DEADLINE, "-inf", now))
            queued = 0
            for raw in sorted(due):
                study_uid = raw.decode() if isinstance(raw, bytes) else raw
                quiet_due = self.redis.zscore(KEY_QUIET, study_uid)
                reason = "quiet" if quiet_due is not None and quiet_due <= now else "max_wait"
                try:
                    if self.complete(study_uid, reason) is not None:
                        queued += 1
                except OSError as exc:  # disk full, I/O error: the study waits, the node goes on
                    self._storage_failed(study_uid, exc)
                    continue
                self._storage_ok()
        except OSError as exc:  # reconcile could not read or write storage
            self._storage_failed(None, exc)
            return 0
        except RedisError as exc:
            self._needs_reconcile.set()
            if self._redis_down_since is None:
                self._redis_down_since = self.clock()
                logger.error("Redis is unreachable (%s): completion paused, instances are still stored", exc)
            return 0
        if self._redis_down_since is not None:
            logger.warning("Redis is reachable again after %.0f s", self.clock() - self._redis_down_since)
            self._redis_down_since = None
        return queued

    def _storage_failed(self, study_uid: str | None, exc: OSError) -> None:
        """Log once per episode; try the study again in STORAGE_RETRY_S."""
        if self._storage_down_since is None:
            self._storage_down_since = self.clock()
            logger.error("Storage cannot be written (%s): completion paused, retried every %.0f s",
                         exc.strerror or exc, STORAGE_RETRY_S)
        if study_uid is not None:
            self.redis.zadd(KEY_QUIET, {study_uid: self.clock() + STORAGE_RETRY_S})

    def _storage_ok(self) -> None:
        if self._storage_down_since is not None:
            logger.warning("Storage can be written again after %.0f s: completion goes on",
                           self.clock() - self._storage_down_since)
            self._storage_down_since = None

    def complete(self, study_uid: str, reason: str) -> Revision | None:
        """Queue a new revision of the study if it has instances no revision covers."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(KEY_QUIET, study_uid)
        pipe.zrem(KEY_DEADLINE, study_uid)
        pipe.execute()
        # Timers go first: an instance stored from now on re-arms them.
        instances = self.storage.instances(study_uid)
        last = self.storage.latest_revision(study_uid)
        covered = last.instances if last else {}
        if not instances or all(i.sop_uid in covered for i in instances):
            logger.info("Study %s: no new instances since revision %d, nothing queued", study_uid, last.revision if last else 0)
            return None
        number = last.revision + 1 if last else 1
        rev = Revision(
            study_uid=study_uid,
            revision=number,
            instances={i.sop_uid: i.series_uid for i in instances},
            completed_at=self.clock(),
            reason=reason,
            job_id=job_id(study_uid, number),
            pipeline=self.storage.read_pipeline(study_uid),
        )
        self.storage.write_revision(rev)  # durable before the job exists: reconcile can requeue it
        self.queue.enqueue(study_uid, number, rev.pipeline)
        metrics.STUDIES.labels(reason).inc()
        series = len(set(rev.instances.values()))
        logger.info(
            "Study %s: complete (%s), %d instances in %d series, queued revision %d as job %s (pipeline %s)",
            study_uid, reason, len(instances), series, number, rev.job_id, rev.pipeline or "default",
        )
        return rev

    def reconcile(self) -> tuple[int, int]:
        """Rebuild what is pending from disk; returns (studies armed, jobs requeued).

        A study with instances that no revision covers gets its timers set
        from the file times and the current config (so a study that went
        quiet while the node was down completes at once). A recorded revision with no outcome whose job
        Redis has lost is queued again under the same job id.
        """
        armed = requeued = 0
        deadline = self.cfg.max_wait_seconds
        for study_uid in self.storage.study_uids():
            instances = self.storage.instances(study_uid)
            if not instances:
                continue
            last = self.storage.latest_revision(study_uid)
            covered = last.instances if last else {}
            new = [i for i in instances if i.sop_uid not in covered]
            if new:
                pipe = self.redis.pipeline(transaction=False)
                quiet = self.quiet_seconds(self.storage.read_pipeline(study_uid))
                pipe.zadd(KEY_QUIET, {study_uid: max(i.mtime for i in new) + quiet})
                pipe.zadd(KEY_DEADLINE, {study_uid: min(i.mtime for i in new) + deadline})
                pipe.execute()
                armed += 1
            elif last and not self.storage.has_outcome(study_uid, last.revision):
                if self.queue.enqueue(study_uid, last.revision, last.pipeline):
                    logger.warning("Study %s: revision %d had no job in Redis, queued again", study_uid, last.revision)
                    requeued += 1
        self.redis.set(KEY_EPOCH, f"{self.clock():.3f}")
        logger.info("Reconciled storage: %d studies pending completion, %d jobs queued again", armed, requeued)
        return armed, requeued
