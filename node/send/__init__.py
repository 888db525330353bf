"""Send results to the destinations: retries with back-off, dead letter, by the destination's kind.

Sending is its own rq job per (study revision, destination), on its own queue,
so a PACS outage retries only the send. What a destination gets:

- ``dicom`` (node.send.dicom): the result objects it lists (``objects``: the
  SR in its ``sr_class``, the summary image, the key object selection) by
  C-STORE, all in one association, SR first; over DICOM TLS with ``tls``;
- ``dicomweb`` (node.send.dicomweb): the same objects by STOW-RS;
- ``hl7`` (node.send.hl7): an ORU^R01 of the result, naming the SR, over MLLP.

A revision of a store-and-forward pipeline sends the received instances
themselves instead, as they came (C-STORE or STOW-RS). A failed send is
retried with exponential back-off for ``send.retry_hours``; after that it is
dead-lettered (recorded, kept on disk) and ``ainode results resend`` sends it
again. Every attempt is audited: sent, failed (will be retried) or given up.
"""

from __future__ import annotations

import json
import logging
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from redis import Redis
from rq import Queue, Retry, get_current_job
from rq.job import Job

from node import metrics
from node.audit import Outcome
from node.config import Config, Destination
from node.errors import AinodeError
from node.send.delivery import Delivery, SendError
from node.send.dicom import c_store, file_meta
from node.store import Storage, write_atomic

if TYPE_CHECKING:
    from node.context import WorkerContext
    from node.send.hl7 import Report

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
        job_timeout=max(1800, int(cfg.send.timeout_seconds * 4 + 60)),  # forwarding a study takes a while
        result_ttl=7 * 24 * 3600,
        description=f"send study {study_uid} revision {revision} to {destination}",
    )
    return jid


@dataclass(frozen=True)
class Parcel:
    """What one delivery sends: files, the (SOP Instance UID, SOP class) of each, and how it is named."""

    paths: tuple[Path, ...]
    objects: tuple[tuple[str, str], ...]
    what: str  # in words, for the log
    recorded: dict[str, Any]  # for the delivery state file
    forwarded: bool = False  # the received instances themselves (store and forward), not result objects


def send_result(study_uid: str, revision: int, destination: str, force: bool = False) -> str:
    """The rq job: deliver one revision to one destination, by the destination's kind.

    An analysed revision sends its result objects (C-STORE, STOW-RS) or its
    ORU^R01 (HL7); a forwarded one (store and forward) sends the instances it covers.
    """
    from node.context import context

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
    parcel = _parcel(ctx, dest, study_uid, revision)
    job = get_current_job()
    attempts = int((previous or {}).get("attempts", 0)) + 1 if not force else 1
    peer_id, peer_host = _peer(dest)
    try:
        delivery = _deliver(ctx, cfg, dest, parcel, study_uid, revision, attempts)
    except (SendError, OSError, AinodeError) as exc:  # AinodeError: [tls] files that no longer load
        last = job is None or not job.retries_left
        metrics.SENDS.labels(destination, "dead" if last else "failed").inc()
        _write_state(storage, study_uid, revision, destination, status="dead" if last else "retrying",
                     attempts=attempts, last_error=str(exc), at=time.time(), kind=dest.kind, **parcel.recorded)
        if last:
            logger.error("Study %s r%d: giving up sending to %s after %d attempts: %s",
                         study_uid, revision, destination, attempts, exc)
        else:
            logger.warning("Study %s r%d: send to %s failed (attempt %d, will retry): %s",
                           study_uid, revision, destination, attempts, exc)
        words = f"{'given up after' if last else 'will be retried after'} attempt {attempts}: {exc}"
        outcome = Outcome.SERIOUS_FAILURE if last else Outcome.MINOR_FAILURE
        _audit(ctx, parcel, study_uid, revision, destination, peer_id, peer_host, outcome, [words] * len(parcel.objects))
        raise SendError(str(exc)) from None
    metrics.SENDS.labels(destination, "sent").inc()
    codes = ", ".join(f"0x{c:04X}" for c in delivery.statuses)
    _write_state(storage, study_uid, revision, destination, status="sent", attempts=attempts,
                 status_code=f"0x{delivery.status:04X}", statuses=codes, at=time.time(), kind=dest.kind,
                 **parcel.recorded)
    how = {"dicom": " over TLS" if dest.tls else "", "dicomweb": " by STOW-RS",
           "hl7": f" as HL7 ORU^R01{' over TLS' if dest.tls else ''}"}[dest.kind]
    _audit(ctx, parcel, study_uid, revision, destination, peer_id, peer_host, Outcome.SUCCESS,
           [f"sent{how}, status 0x{code:04X}, attempt {attempts}" for code in delivery.statuses])
    logger.info("Study %s r%d: %s sent to %s in %.2f s", study_uid, revision, parcel.what, destination,
                delivery.seconds)
    return "sent"


def _parcel(ctx: "WorkerContext", dest: Destination, study_uid: str, revision: int) -> Parcel:
    """What the destination gets of this revision: its instances (forwarded) or its result objects."""
    from node.results.objects import SOP_CLASSES, ensure_object, kinds_for

    storage = ctx.storage
    outcome = storage.read_outcome(study_uid, revision) or {}
    if outcome.get("status") == "forwarded":
        forward = dict(outcome.get("forward", {}))
        paths = tuple(storage.instance_path(study_uid, series, sop) for sop, series in forward.items())
        classes = tuple((p.stem, _sop_class(p)) for p in paths)
        return Parcel(paths, classes, f"{len(paths)} instance(s), forwarded", {"instances": len(paths)}, True)
    kinds = kinds_for(dest)
    paths = tuple(ensure_object(storage, ctx.device(), study_uid, revision, kind) for kind in kinds)
    made = tuple((p.stem, SOP_CLASSES[kind]) for kind, p in zip(kinds, paths))
    what = "ORU^R01 of " + kinds[0] if dest.kind == "hl7" else ", ".join(kinds)
    return Parcel(paths, made, what, {"objects": {kind: p.name for kind, p in zip(kinds, paths)}})


def _sop_class(path: Path) -> str:
    """An instance's SOP class from its file meta, for the audit trail ("" if unreadable: the send says why)."""
    try:
        return file_meta(path)[0]
    except SendError:
        return ""


def _deliver(ctx: "WorkerContext", cfg: Config, dest: Destination, parcel: Parcel, study_uid: str, revision: int,
             attempt: int) -> Delivery:
    if dest.kind == "dicomweb":
        from node.send.dicomweb import stow

        return stow(parcel.paths, dest, cfg.send.timeout_seconds)
    if dest.kind == "hl7":
        from node.send.hl7 import deliver

        report = _hl7_report(ctx, study_uid, revision, parcel.paths[0])
        ssl_context, hostname = None, None
        if dest.tls:
            from node.tls import tls_args

            ssl_context, hostname = tls_args(cfg.tls, dest.host)
        control = f"{zlib.crc32(study_uid.encode()):08X}.{revision}.{attempt}"[:20]
        try:
                return deliver(report, dest.host, dest.port, control_id=control, timeout=cfg.send.timeout_seconds,
                           sending_application=cfg.node.ae_title, receiving_application=dest.application,
                           receiving_facility=dest.facility, ssl_context=ssl_context, server_hostname=hostname)
        except ValueError as exc:  # a value HL7 2.5.1 cannot carry (a facility name too long...)
            raise SendError(f"{dest.name}: cannot build the ORU^R01: {exc}") from None
    return c_store(parcel.paths, dest, cfg.node.ae_title, cfg.send.timeout_seconds, cfg.tls)


def _hl7_report(ctx: "WorkerContext", study_uid: str, revision: int, sr_path: Path) -> "Report":
    """What the ORU^R01 says: the recorded result, and the patient and order as the SR (from the PACS's
    headers) names them."""
    from pydicom import dcmread

    from node.results.objects import recorded_result
    from node.send.hl7 import Report

    result, _ = recorded_result(ctx.storage, study_uid, revision)
    outcome = ctx.storage.read_outcome(study_uid, revision) or {}
    sr = dcmread(sr_path, stop_before_pixels=True)

    def text(keyword: str) -> str:
        return str(sr.get(keyword, "") or "")

    return Report(
        study_uid=study_uid, accession_number=text("AccessionNumber"), patient_id=text("PatientID"),
        issuer_of_patient_id=text("IssuerOfPatientID"), patient_name=text("PatientName"),
        patient_birth_date=text("PatientBirthDate"), patient_sex=text("PatientSex"), score=result.score,
        threshold=result.threshold, positive=result.positive, findings=len(result.findings),
        model_name=result.model.name, model_version=result.model.version, sr_series_uid=text("SeriesInstanceUID"),
        sr_sop_uid=text("SOPInstanceUID"), sr_sop_class=text("SOPClassUID"),
        pipeline=str(outcome.get("pipeline", "")), revision=revision,
        observed_at=float(outcome.get("finished_at", time.time())),
    )


def _peer(dest: Destination) -> tuple[str, str]:
    """How the audit trail names a destination: (its AE title or application, its host)."""
    if dest.kind == "dicomweb":
        return dest.name, urlsplit(dest.url).hostname or "?"
    if dest.kind == "hl7":
        return dest.application or dest.name, dest.host
    return dest.ae_title, dest.host


def _audit(ctx: "WorkerContext", parcel: Parcel, study_uid: str, revision: int, destination: str, peer_id: str,
           peer_host: str, outcome: Outcome, words: list[str]) -> None:
    """Result objects: one event each (as always); forwarded instances: one event for all of them."""
    if parcel.forwarded:
        ctx.audit.instances_sent(study_uid, revision, parcel.objects, destination, peer_id, peer_host, outcome,
                                 f"{len(parcel.objects)} instance(s) forwarded: {words[0] if words else ''}")
        return
    for (uid, sop_class), said in zip(parcel.objects, words):
        ctx.audit.sr_sent(study_uid, revision, uid, sop_class, destination, peer_id, peer_host, outcome, said)
