"""What happened to each study: ``ainode results list`` and ``ainode results resend``.

Read from the files (the truth) and, for jobs still in flight, from rq.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job

from node.config import Config
from node.enqueue import JobQueue, job_id
from node.results.facts import percent
from node.send import enqueue_send, read_send_state
from node.store import Revision, Storage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyState:
    study_uid: str
    instances: int
    revision: int
    state: str  # received | queued | running | analysed | sent | no_result | failed
    detail: str
    score: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _job_status(redis: Redis | None, jid: str) -> tuple[str, str]:
    if redis is None:
        return "queued", "Redis unreachable"
    try:
        job = Job.fetch(jid, connection=redis)
    except Exception:  # NoSuchJobError, or a job rq cannot read back
        return "queued", "job not in Redis (the node queues it again)"
    got = job.get_status(refresh=False)
    status = getattr(got, "value", got) or "queued"  # JobStatus is a str Enum: str() gives "JobStatus.STARTED"
    if status == "failed":
        lines = (job.latest_result().exc_string if job.latest_result() else "") or ""
        return "failed", (lines.strip().splitlines() or ["failed"])[-1]
    return ("running" if status == "started" else "queued"), f"job {status}"


def study_state(storage: Storage, cfg: Config, redis: Redis | None, study_uid: str) -> StudyState:
    """The state of one study, from disk first."""
    instances = len(storage.instances(study_uid))
    revisions = storage.revisions(study_uid)
    if not revisions:
        return StudyState(study_uid, instances, 0, "received", "waiting for the quiet period")
    rev = revisions[-1]
    outcome = storage.read_outcome(study_uid, rev)
    lost = storage.lost_runs(study_uid, rev)
    lost_note = (f"; {len(lost)} run(s) lost with their worker (last: {lost[-1].get('why')}, "
                 f"{lost[-1].get('then')})" if lost else "")
    if outcome is None:
        state, detail = _job_status(redis, job_id(study_uid, rev))
        return StudyState(study_uid, instances, rev, state, detail + lost_note)
    if outcome["status"] != "analysed":
        return StudyState(study_uid, instances, rev, outcome["status"], outcome.get("reason", "") + lost_note)
    result = outcome["result"]
    sends = []
    worst = "sent"
    for dest in cfg.destinations:
        s = read_send_state(storage, study_uid, rev, dest.name) or {"status": "queued"}
        if s["status"] == "sent":
            sends.append(f"{dest.name}: sent")
        else:
            err = f" ({s.get('last_error')})" if s.get("last_error") else ""
            sends.append(f"{dest.name}: {s['status']}{err}")
            worst = "failed" if s["status"] == "dead" else ("analysed" if worst != "failed" else worst)
    if not cfg.destinations:
        worst = "analysed"
        sends.append("no destinations configured")
    positive = result["score"] >= result["threshold"]
    located = len(result.get("findings", []))
    detail = (f"{percent(result['score'])} at threshold {percent(result['threshold'])} "
              f"({'positive' if positive else 'negative'}{f', {located} located' if located else ''}); "
              + "; ".join(sends) + lost_note)
    return StudyState(study_uid, instances, rev, worst, detail, result["score"])


def list_states(storage: Storage, cfg: Config, redis: Redis | None) -> list[StudyState]:
    if redis is not None:
        try:
            redis.ping()
        except RedisError:
            redis = None
    return [study_state(storage, cfg, redis, uid) for uid in storage.study_uids()]


def resend(storage: Storage, cfg: Config, redis: Redis, study_uid: str, destination: str | None = None) -> list[str]:
    """Queue the latest analysed result of a study again; returns the job ids."""
    for rev in reversed(storage.revisions(study_uid)):
        outcome = storage.read_outcome(study_uid, rev)
        if outcome and outcome["status"] == "analysed":
            break
    else:
        raise LookupError(f"study {study_uid} has no analysed result to send")
    names = [destination] if destination else [d.name for d in cfg.destinations]
    if not names:
        raise LookupError("no destinations configured")
    for name in names:
        if cfg.destination(name) is None:
            raise LookupError(f"unknown destination {name!r}")
    return [enqueue_send(redis, cfg, study_uid, rev, name, force=True) for name in names]


def reanalyse(storage: Storage, redis: Redis, study_uid: str) -> Revision:
    """Queue a new revision of the same instances as the latest one; its result objects supersede the last.

    For a revision that failed for good, or a result to redo with a new model or threshold.
    """
    last = storage.latest_revision(study_uid)
    if last is None:
        raise LookupError(f"study {study_uid} has no revision yet (still within its quiet period?)")
    if not storage.has_outcome(study_uid, last.revision):
        raise LookupError(f"study {study_uid} revision {last.revision} is still queued or being analysed")
    instances = {i.sop_uid: i.series_uid for i in storage.instances(study_uid)}
    number = last.revision + 1
    rev = Revision(study_uid, number, instances, time.time(), "reanalyse", job_id(study_uid, number))
    storage.write_revision(rev)  # durable before the job exists, as completion does
    JobQueue(redis).enqueue(study_uid, number)
    return rev
