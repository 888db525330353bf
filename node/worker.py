"""The worker: a long-lived process that loads the model once and runs jobs.

Two roles, two rq queues: ``analyse`` workers run :func:`analyse_study`
(load the series, preprocess, infer, write the SR, queue its delivery) and
keep one ONNX Runtime session (and CUDA context) for every job, so they use
rq's non-forking :class:`~rq.SimpleWorker`; ``send`` workers run
:func:`node.send.send_result` and never load the model.

Jobs are idempotent: a revision whose outcome is recorded is not analysed
again, and the SR's UIDs derive from (device, study, revision, SR class), so a
rerun after a crash writes the same SR, not a second one.

Every job start and end, and every worker start and stop, is audited (see
node.audit) in the same audit file as the SCP's events.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field, replace
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.uid import generate_uid
from redis import Redis
from rq import Queue, SimpleWorker, get_current_job

from node import __version__
from node.audit import Action, AuditTrail, Outcome, open_trail
from node.config import Config
from node.enqueue import QUEUE_NAME, redis_client
from node.errors import AinodeError, NoUsableSeriesError, VolumeError
from node.store import Storage, write_atomic

if TYPE_CHECKING:
    from node.infer import Model
    from node.report import DeviceInfo

logger = logging.getLogger(__name__)

ROLES = ("analyse", "send")
DEFAULT_SR_CLASS = "comprehensive"
SR_SERIES_NUMBER = 9001
#: Slices per inference batch: as fast as larger batches on CPU, far less memory.
ANALYSE_BATCH = 16


@dataclass
class WorkerContext:
    """What jobs in this process share: config, storage, Redis, and the model once loaded."""

    cfg: Config
    storage: Storage
    redis: Redis
    _model: Any = field(default=None, repr=False)
    _mtime: float = 0.0
    _audit: AuditTrail | None = field(default=None, repr=False)
    role: str = "analyse"

    @property
    def audit(self) -> AuditTrail:
        """This process's audit trail, opened on first use."""
        if self._audit is None:
            self._audit = open_trail(self.cfg.audit_path, self.cfg.node.ae_title, f"worker-{self.role}",
                                     self.cfg.audit.syslog)
        return self._audit

    def refresh(self) -> Config:
        """The config, re-read if its file changed (destinations added or fixed by an admin).

        Storage, Redis and model stay as started; a file that no longer
        validates is logged and the running config kept.
        """
        source = self.cfg.source
        if source is None:
            return self.cfg
        try:
            mtime = source.stat().st_mtime
            if mtime != self._mtime:
                from node import config

                new = config.load(source)
                self.cfg = replace(new, node=self.cfg.node, redis=self.cfg.redis, model=self.cfg.model)
                self._mtime = mtime
        except (OSError, AinodeError) as exc:
            logger.error("Config %s not re-read, keeping the running one: %s", source, exc)
        return self.cfg

    @property
    def model(self) -> "Model":
        if self._model is None:
            from node.infer import Model, resolve_model_path

            self._model = Model(resolve_model_path(self.cfg.model.path), self.cfg.model.device)
        return self._model

    @property
    def device_uid(self) -> str:
        """A UID for this node: the same for the same host and storage, across restarts."""
        return generate_uid(entropy_srcs=["ainode-device", socket.gethostname(), str(self.storage.root)])

    def device(self) -> "DeviceInfo":
        from node.report import DeviceInfo

        return DeviceInfo(uid=self.device_uid, software_version=__version__)


_CONTEXT: WorkerContext | None = None


def redis_for(cfg: Config) -> Redis:
    """The configured Redis; with an empty URL, the node's embedded server (which must be running)."""
    if cfg.redis.url:
        return redis_client(cfg.redis.url)
    from node.embedded_redis import EmbeddedRedis

    return redis_client(EmbeddedRedis(cfg.node.storage).url)


def context() -> WorkerContext:
    """This process's context; made from the default config when a job runs outside ``ainode worker``."""
    global _CONTEXT
    if _CONTEXT is None:
        from node import config

        cfg = config.load()
        _CONTEXT = WorkerContext(cfg, Storage(cfg.node.storage), redis_for(cfg))
    return _CONTEXT


def set_context(ctx: WorkerContext) -> None:
    global _CONTEXT
    _CONTEXT = ctx


# --- outcomes --------------------------------------------------------------------


def read_outcome(storage: Storage, study_uid: str, revision: int) -> dict[str, Any] | None:
    try:
        return json.loads(storage.outcome_path(study_uid, revision).read_text())
    except FileNotFoundError:
        return None


def _write_outcome(storage: Storage, study_uid: str, revision: int, status: str, **fields: Any) -> dict[str, Any]:
    outcome = {"study_uid": study_uid, "revision": revision, "status": status, "finished_at": time.time(), **fields}
    write_atomic(storage.outcome_path(study_uid, revision), json.dumps(outcome, indent=1).encode(), storage.tmp)
    return outcome


def sr_uids(device_uid: str, study_uid: str, revision: int, sr_class: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of a revision's SR: deterministic, so reruns agree."""
    series = generate_uid(entropy_srcs=[device_uid, study_uid, str(revision), "series"])
    sop = generate_uid(entropy_srcs=[device_uid, study_uid, str(revision), sr_class, "sop"])
    return series, sop


# --- the jobs --------------------------------------------------------------------


def analyse_study(study_uid: str, revision: int) -> str:
    """The rq job queued by completion: analyse one revision of a study."""
    ctx = context()
    storage = ctx.storage
    audit = ctx.audit
    audit.job(study_uid, revision, Action.READ, Outcome.SUCCESS, "analysis started")
    outcome = read_outcome(storage, study_uid, revision)
    if outcome is None:
        try:
            outcome = _analyse(ctx, study_uid, revision)
        except Exception as exc:  # transient (I/O, a worker problem): rq retries; the last try records why
            job = get_current_job()
            last = job is None or not job.retries_left
            if last:
                _write_outcome(storage, study_uid, revision, "failed", reason=f"{type(exc).__name__}: {exc}")
            audit.job(study_uid, revision, Action.READ, Outcome.SERIOUS_FAILURE if last else Outcome.MINOR_FAILURE,
                      f"analysis failed{'' if last else ', will be retried'}: {type(exc).__name__}: {exc}")
            raise
        _audit_outcome(audit, outcome)
    else:
        logger.info("Study %s r%d: already %s, not analysed again", study_uid, revision, outcome["status"])
        audit.job(study_uid, revision, Action.READ, Outcome.SUCCESS, f"already {outcome['status']}, not analysed again")
    if outcome["status"] == "analysed":
        from node.send import enqueue_send

        cfg = ctx.refresh()
        for dest in cfg.destinations:
            enqueue_send(ctx.redis, cfg, study_uid, revision, dest.name)
    return str(outcome["status"])


def _audit_outcome(audit: AuditTrail, outcome: dict[str, Any]) -> None:
    """The end of an analysis: C (its SRs made), or why there is no result."""
    study_uid, revision, status = outcome["study_uid"], outcome["revision"], outcome["status"]
    if status == "analysed":
        srs = sorted(name.removesuffix(".dcm") for name in outcome.get("sr", {}).values())
        audit.job(study_uid, revision, Action.CREATE, Outcome.SUCCESS, f"analysed, {len(srs)} SR(s) made", srs)
    elif status == "no_result":
        audit.job(study_uid, revision, Action.READ, Outcome.MINOR_FAILURE, f"no result: {outcome.get('reason', '')}")
    else:
        audit.job(study_uid, revision, Action.READ, Outcome.SERIOUS_FAILURE, f"failed: {outcome.get('reason', '')}")


def _analyse(ctx: WorkerContext, study_uid: str, revision: int) -> dict[str, Any]:
    from node import volume

    storage = ctx.storage
    started = time.monotonic()
    rev = storage.read_revision(study_uid, revision)
    paths = [storage.instance_path(study_uid, series, sop) for sop, series in sorted(rev.instances.items())]
    paths = [p for p in paths if p.exists()]
    try:
        choice, vol = volume.load_study(paths, ctx.cfg.series)
    except NoUsableSeriesError as exc:
        logger.warning("Study %s r%d: no result: %s", study_uid, revision, exc)
        return _write_outcome(storage, study_uid, revision, "no_result", reason=str(exc))
    except VolumeError as exc:
        logger.error("Study %s r%d: failed: %s", study_uid, revision, exc)
        return _write_outcome(storage, study_uid, revision, "failed", reason=str(exc))
    loaded = time.monotonic()
    model = ctx.model
    analysis = model.analyse(vol.hu, batch_size=ANALYSE_BATCH)
    threshold = ctx.cfg.model.threshold
    key = [
        {
            "sop_class_uid": vol.sop_class_uids[i],
            "sop_instance_uid": vol.sop_instance_uids[i],
            "slice_index": int(i),
            "score": float(analysis.slice_scores[i]),
        }
        for i in analysis.key_slices
    ]
    result = {
        "series_uid": vol.series_uid,
        "series_why": choice.why,
        "instances_used": list(vol.sop_instance_uids),
        "slices": int(vol.hu.shape[0]),
        "missing_slices": int(vol.missing_slices),
        "score": float(analysis.score),
        "threshold": threshold,
        "positive": bool(analysis.score >= threshold),
        "aggregation": analysis.aggregation,
        "key_images": key,
        "model": {"name": model.card.name, "version": model.card.version, "sha256": model.card.sha256},
        "providers": list(analysis.providers),
        "seconds": {"load": round(loaded - started, 3), "infer": round(analysis.seconds, 3)},
    }
    srs = {}
    for sr_class in sorted({DEFAULT_SR_CLASS, *(d.sr_class for d in ctx.cfg.destinations)}):
        srs[sr_class] = ensure_sr(ctx, study_uid, revision, sr_class, result).name
    result["seconds"]["total"] = round(time.monotonic() - started, 3)
    logger.info(
        "Study %s r%d: score %.3f (%s at %.2f), %d slices of series %s, key slices %s, %.1f s on %s",
        study_uid, revision, result["score"], "positive" if result["positive"] else "negative", threshold,
        result["slices"], vol.series_uid, [k["slice_index"] for k in key], result["seconds"]["total"],
        analysis.providers[0] if analysis.providers else "?",
    )
    return _write_outcome(storage, study_uid, revision, "analysed", result=result, sr=srs)


def ensure_sr(
    ctx: WorkerContext, study_uid: str, revision: int, sr_class: str, result: dict[str, Any] | None = None
) -> Path:
    """The SR file of a revision in one SR class, built if missing (from ``result`` or the outcome)."""
    from node.report import AlgorithmInfo, Finding, KeyImage, SRClass, build_sr

    storage = ctx.storage
    series_uid, sop_uid = sr_uids(ctx.device_uid, study_uid, revision, sr_class)
    path = storage.results / study_uid / f"{sop_uid}.dcm"
    if path.exists():
        return path
    if result is None:
        outcome = read_outcome(storage, study_uid, revision)
        if outcome is None or outcome["status"] != "analysed":
            raise VolumeError(f"study {study_uid} revision {revision} has no analysis to report")
        result = outcome["result"]
    rev = storage.read_revision(study_uid, revision)
    used = set(result["instances_used"])
    sources = [
        dcmread(storage.instance_path(study_uid, rev.instances[sop], sop), stop_before_pixels=True)
        for sop in sorted(used)
    ]
    predecessor = None
    for earlier in reversed([r for r in storage.revisions(study_uid) if r < revision]):
        prior = read_outcome(storage, study_uid, earlier)
        if prior and prior["status"] == "analysed":
            predecessor = dcmread(ensure_sr(ctx, study_uid, earlier, sr_class), stop_before_pixels=True)
            break
    m = result["model"]
    sr = build_sr(
        sources,
        Finding(probability=result["score"], threshold=result["threshold"]),
        [KeyImage(k["sop_class_uid"], k["sop_instance_uid"], k["slice_index"], k["score"]) for k in result["key_images"]],
        AlgorithmInfo(
            name=m["name"], version=m["version"], sha256=m["sha256"],
            parameters=f"threshold={result['threshold']}; aggregation={result['aggregation']}; sha256={m['sha256']}",
        ),
        ctx.device(),
        series_uid=series_uid,
        sop_instance_uid=sop_uid,
        series_number=SR_SERIES_NUMBER,
        instance_number=revision,
        predecessor=predecessor,
        sr_class=SRClass(sr_class),
    )
    storage.ensure_dir(path.parent)
    buf = BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    write_atomic(path, buf.getvalue(), storage.tmp)
    logger.info("Study %s r%d: SR %s written (%s)", study_uid, revision, sop_uid, sr_class)
    return path


# --- the process -----------------------------------------------------------------


def queues_for(role: str, redis: Redis) -> list[Queue]:
    from node.send import SEND_QUEUE

    name = {"analyse": QUEUE_NAME, "send": SEND_QUEUE}[role]
    return [Queue(name, connection=redis)]


def run_worker(cfg: Config, role: str = "analyse", *, burst: bool = False) -> int:
    """Run one worker until SIGTERM/SIGINT (or, with ``burst``, until its queue is empty)."""
    storage = Storage(cfg.node.storage)
    storage.prepare(clear_tmp=False)  # the node may be writing there right now
    redis = redis_for(cfg)
    ctx = WorkerContext(cfg, storage, redis, role=role)
    set_context(ctx)
    audit = ctx.audit  # opened now: a bad audit path stops the worker at start
    if role == "analyse":
        model = ctx.model  # load once, now: a bad model stops the worker at start, not at the first job
        logger.info("Worker ready: model %s %s on %s", model.card.name, model.card.version, ", ".join(model.providers))
        if abs(model.card.threshold - cfg.model.threshold) > 1e-9:
            logger.warning(
                "[model] threshold %.3g is used; the model card suggests %.3g (%s)",
                cfg.model.threshold, model.card.threshold, model.card.threshold_method,
            )
    name = f"ainode-{role}-{socket.gethostname()}-{os.getpid()}"
    worker = SimpleWorker(queues_for(role, redis), connection=redis, name=name)
    audit.application(True, f"worker {name} started")
    try:
        worker.work(burst=burst, with_scheduler=True, logging_level=logging.getLevelName(logging.getLogger().level))
    finally:
        audit.application(False, f"worker {name} stopped")
        audit.close()
    return 0
