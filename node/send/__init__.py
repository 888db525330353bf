"""Send results to the destinations: C-STORE SCU, retries with back-off, dead letter.

Sending is its own rq job per (study revision, destination), on its own queue,
so a PACS outage retries only the send. A destination gets the result objects
it lists (``objects``: the SR in its ``sr_class``, the summary image, the key
object selection), all in one association, SR first. A failed send is retried with
exponential back-off for ``send.retry_hours``; after that it is dead-lettered
(recorded, kept on disk) and ``ainode results resend`` sends it again.

A destination with ``tls = true`` is reached over DICOM TLS (node.tls). Every
attempt is audited: sent, failed (will be retried) or given up.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Queue, Retry, get_current_job
from rq.job import Job

from node import metrics
from node.audit import Outcome
from node.config import Config
from node.errors import AinodeError
from node.send.delivery import Delivery, SendError
from node.send.dicom import c_store
from node.store import Storage, write_atomic

__all__ = ["Delivery", "SendError", "c_store", "enqueue_send", "read_send_state", "send_result"]

logger = logging.getLogger(__name__)

SEND_QUEUE = "ainode-send"
SEND_RESULT = "node.send.send_result"
MAX_INTERVAL_S = 3600


def retry_intervals(retry_hours: float, first_s: float = 30.0) -> list[int]:
    """Back-off intervals: first_s, doubling, capped at an hour, until retry_hours are covered."""
    out: list[int] = []
    total, step = 0.0, max(1.0, first_s)
    while total < retry_hours * 3600:
        out.append(int(min(step, MAX_INTERVAL_S)))
        total += out[-1]
        step *= 2
    return out


def send_job_id(study_uid: str, revision: int, destination: str) -> str:
    return f"send_{study_uid.replace('.', '_')}_r{revision}_{re.sub(r'[^A-Za-z0-9_-]', '_', destination)}"


def send_state_path(storage: Storage, study_uid: str, revision: int, destination: str) -> Path:
    """Where the delivery state of one result to one destination is kept."""
    return storage.revision_path(study_uid, revision).with_name(f"rev-{revision:04d}.send-{destination}.json")


def read_send_state(storage: Storage, study_uid: str, revision: int, destination: str) -> dict[str, Any] | None:
    try:
        return json.loads(send_state_path(storage, study_uid, revision, destination).read_text())
    except FileNotFoundError:
        return None


def _write_state(storage: Storage, study_uid: str, revision: int, destination: str, **state: Any) -> None:
    path = send_state_path(storage, study_uid, revision, destination)
    write_atomic(path, json.dumps({"destination": destination, **state}, indent=1).encode(), storage.tmp)


def enqueue_send(
    redis: Redis, cfg: Config, study_uid: str, revision: int, destination: str, *, force: bool = False
) -> str:
    """Queue the delivery of a revision's result to one destination; returns the job id.

    With ``force`` an earlier job of the same id (finished or dead) is replaced.
    """
    jid = send_job_id(study_uid, revision, destination)
    if Job.exists(jid, connection=redis):
        if not force:
            return jid
        Job.fetch(jid, connection=redis).delete()
    intervals = retry_intervals(cfg.send.retry_hours, cfg.send.retry_first_seconds)
    Queue(SEND_QUEUE, connection=redis).enqueue(
        SEND_RESULT,
        kwargs={"study_uid": study_uid, "revision": revision, "destination": destination, "force": force},
        job_id=jid,
        retry=Retry(max=len(intervals), interval=intervals) if intervals else None,
        job_timeout=int(cfg.send.timeout_seconds * 4 + 60),
        result_ttl=7 * 24 * 3600,
        description=f"send study {study_uid} revision {revision} to {destination}",
    )
    return jid


def send_result(study_uid: str, revision: int, destination: str, force: bool = False) -> str:
    """The rq job: deliver the result objects of one analysed revision to one destination."""
    from node.context import context
    from node.results.objects import SOP_CLASSES, ensure_object, kinds_for

    ctx = context()
    storage, cfg = ctx.storage, ctx.refresh()
    previous = read_send_state(storage, study_uid, revision, destination)
    if previous and previous.get("status") == "sent" and not force:
        logger.info("Study %s r%d: already sent to %s, not sent again", study_uid, revision, destination)
        return "already sent"
    dest = cfg.destination(destination)
    if dest is None:
        _write_state(storage, study_uid, revision, destination, status="dropped",
                     reason="destination no longer configured", at=time.time())
        logger.warning("Study %s r%d: destination %s is no longer configured; not sent", study_uid, revision, destination)
        ctx.audit.sr_sent(study_uid, revision, None, None, destination, "?", "?", Outcome.SERIOUS_FAILURE,
                          "not sent: destination no longer configured")
        return "dropped"
    device = ctx.device()
    kinds = kinds_for(dest)
    paths = [ensure_object(storage, device, study_uid, revision, kind) for kind in kinds]
    made = [(p.stem, SOP_CLASSES[kind]) for kind, p in zip(kinds, paths)]
    job = get_current_job()
    attempts = int((previous or {}).get("attempts", 0)) + 1 if not force else 1
    sent = {kind: p.name for kind, p in zip(kinds, paths)}
    try:
        delivery = c_store(paths, dest, cfg.node.ae_title, cfg.send.timeout_seconds, cfg.tls)
    except (SendError, OSError, AinodeError) as exc:  # AinodeError: [tls] files that no longer load
        last = job is None or not job.retries_left
        metrics.SENDS.labels(destination, "dead" if last else "failed").inc()
        _write_state(storage, study_uid, revision, destination, status="dead" if last else "retrying",
                     attempts=attempts, last_error=str(exc), at=time.time(), objects=sent)
        if last:
            logger.error("Study %s r%d: giving up sending to %s after %d attempts: %s",
                         study_uid, revision, destination, attempts, exc)
        else:
            logger.warning("Study %s r%d: send to %s failed (attempt %d, will retry): %s",
                           study_uid, revision, destination, attempts, exc)
        for uid, sop_class in made:
            ctx.audit.sr_sent(study_uid, revision, uid, sop_class, destination, dest.ae_title, dest.host,
                              Outcome.SERIOUS_FAILURE if last else Outcome.MINOR_FAILURE,
                              f"{'given up after' if last else 'will be retried after'} attempt {attempts}: {exc}")
        raise SendError(str(exc)) from None
    metrics.SENDS.labels(destination, "sent").inc()
    codes = ", ".join(f"0x{c:04X}" for c in delivery.statuses)
    _write_state(storage, study_uid, revision, destination, status="sent", attempts=attempts,
                 status_code=f"0x{delivery.status:04X}", statuses=codes, at=time.time(), objects=sent)
    for (uid, sop_class), code in zip(made, delivery.statuses):
        ctx.audit.sr_sent(study_uid, revision, uid, sop_class, destination, dest.ae_title, dest.host, Outcome.SUCCESS,
                          f"sent{' over TLS' if dest.tls else ''}, status 0x{code:04X}, attempt {attempts}")
    logger.info("Study %s r%d: %s sent to %s in %.2f s", study_uid, revision, ", ".join(kinds), destination,
                delivery.seconds)
    return "sent"
