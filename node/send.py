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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from redis import Redis
from rq import Queue, Retry, get_current_job
from rq.job import Job

from node import metrics
from node.audit import Outcome
from node.config import Config, Destination, TLSConfig
from node.errors import AinodeError
from node.store import Storage, write_atomic

logger = logging.getLogger(__name__)

SEND_QUEUE = "ainode-send"
SEND_RESULT = "node.send.send_result"
SUCCESS = 0x0000
MAX_INTERVAL_S = 3600


class SendError(AinodeError):
    """A result could not be delivered to a destination (this attempt)."""


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


@dataclass(frozen=True)
class Delivery:
    status: int  # the last object's status (Success, or a warning 0xBxxx)
    seconds: float
    statuses: tuple[int, ...] = ()  # per object sent, in order


def c_store(
    paths: Path | Sequence[Path], dest: Destination, calling_ae: str, timeout: float, tls: TLSConfig | None = None
) -> Delivery:
    """Send Part 10 files by C-STORE in one association; returns the peer's statuses or raises SendError.

    A destination with ``tls`` is reached over TLS with the ``tls`` settings.
    """
    from pynetdicom import AE

    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not files:
        raise ValueError('Argument "paths" must name at least one file.')
    datasets = [dcmread(p) for p in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    where = f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}{', TLS' if dest.tls else ''})"
    tls_args = None
    if dest.tls:
        from node.tls import tls_args as make_tls_args

        tls_args = make_tls_args(tls or TLSConfig(), dest.host)
    started = time.monotonic()
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        reason = getattr(rsp, "reason_str", None) or f"result 0x{getattr(rsp, 'result', 0):02X}"
        raise SendError(f"{where}: association rejected: {reason}")
    if not assoc.is_established:
        if tls_args is not None and assoc.acceptor.primitive is None:
            from node.tls import handshake_problem

            if (problem := handshake_problem(dest.host, dest.port, tls_args, timeout)) is not None:
                raise SendError(f"{where}: no association: {problem}")
        raise SendError(f"{where}: no association (refused, aborted or timed out)")
    codes: list[int] = []
    try:
        for ds in datasets:
            codes.append(_store_one(assoc, ds, where))
    finally:
        if assoc.is_established:
            assoc.release()
    return Delivery(codes[-1], time.monotonic() - started, tuple(codes))


def _store_one(assoc: Any, ds: Any, where: str) -> int:
    """One C-STORE on an open association: the status, or SendError for a failure."""
    what = f"{where}: C-STORE of {ds.SOPInstanceUID}"
    if not any(c.abstract_syntax == ds.SOPClassUID for c in assoc.accepted_contexts):
        raise SendError(f"{what}: the peer accepts no presentation context for SOP class {ds.SOPClassUID}")
    status = assoc.send_c_store(ds)
    if not status or "Status" not in status:
        raise SendError(f"{what}: no response (connection lost or timed out)")
    code = int(status.Status)
    if code != SUCCESS and not 0xB000 <= code <= 0xBFFF:
        comment = status.get("ErrorComment", "")
        raise SendError(f"{what} failed with status 0x{code:04X} {comment}".rstrip())
    if code != SUCCESS:
        logger.warning("%s: stored with warning status 0x%04X", what, code)
    return code


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
