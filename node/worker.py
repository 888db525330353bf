"""The worker: a long-lived process that loads the model once and runs jobs.

Two roles, two rq queues: ``analyse`` workers run :func:`analyse_study`
(load the series, preprocess, infer, write the SR, queue its delivery) and
keep one ONNX Runtime session (and CUDA context) for every job, so they use
rq's non-forking :class:`~rq.SimpleWorker`; ``send`` workers run
:func:`node.send.send_result` and never load the model.

Jobs are idempotent: a revision whose outcome is recorded is not analysed
again, and the result objects' UIDs derive from (node, study, revision, kind),
so a rerun after a crash writes the same objects, not second ones.

Every job start and end, and every worker start and stop, is audited (see
node.audit) in the same audit file as the SCP's events.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker, get_current_job
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.worker import WorkerStatus

from node import metrics
from node.audit import Action, AuditTrail, Outcome
from node.config import Config, Pipeline
from node.context import WorkerContext, context, redis_for, set_context
from node.enqueue import QUEUE_NAME
from node.errors import NoUsableSeriesError, StudyLimitError, VolumeError
from node.jobs import EXECUTION_TTL_S, HEARTBEAT_S, die_with, worker_name
from node.results.facts import Finding, KeyImage, ModelInfo, Result, SourceImage
from node.results.objects import all_kinds, ensure_object
from node.send import SEND_QUEUE, SendError, enqueue_send
from node.store import Revision, Storage

if TYPE_CHECKING:
    from node.infer import Analysis
    from node.volume import Volume

logger = logging.getLogger(__name__)

__all__ = ["WorkerContext", "analyse_study", "context", "redis_for", "run_worker", "set_context"]

ROLES = ("analyse", "send")
DEFAULT_SR_CLASS = "comprehensive"
#: Slices per inference batch: as fast as larger batches on CPU, far less memory.
ANALYSE_BATCH = 16


# --- the jobs --------------------------------------------------------------------


def analyse_study(study_uid: str, revision: int) -> str:
    """The rq job queued by completion: analyse one revision of a study in its pipeline (or, for a
    store-and-forward pipeline, record what to forward), then queue its delivery."""
    ctx = context()
    storage = ctx.storage
    audit = ctx.audit
    cfg = ctx.refresh()
    rev = storage.read_revision(study_uid, revision)
    pipeline = cfg.pipeline(rev.pipeline)
    named = rev.pipeline or (pipeline.name if pipeline else "?")
    audit.job(study_uid, revision, Action.READ, Outcome.SUCCESS, f"analysis started (pipeline {named})")
    outcome = storage.read_outcome(study_uid, revision)
    if outcome is None:
        try:
            if pipeline is None:
                logger.error("Study %s r%d: pipeline %s is no longer configured", study_uid, revision, named)
                outcome = storage.write_outcome(study_uid, revision, "failed", pipeline=named,
                                                reason=f"pipeline {named} is no longer configured")
            elif pipeline.forwards:
                outcome = _forward(ctx, rev, pipeline)
            else:
                outcome = _analyse(ctx, rev, pipeline)
        except Exception as exc:  # transient (I/O, a worker problem): rq retries; the last try records why
            job = get_current_job()
            last = job is None or not job.retries_left
            if last:
                storage.write_outcome(study_uid, revision, "failed", pipeline=named,
                                      reason=f"{type(exc).__name__}: {exc}")
            audit.job(study_uid, revision, Action.READ, Outcome.SERIOUS_FAILURE if last else Outcome.MINOR_FAILURE,
                      f"analysis failed{'' if last else ', will be retried'}: {type(exc).__name__}: {exc}")
            raise
        _audit_outcome(audit, outcome)
    else:
        logger.info("Study %s r%d: already %s, not analysed again", study_uid, revision, outcome["status"])
        audit.job(study_uid, revision, Action.READ, Outcome.SUCCESS, f"already {outcome['status']}, not analysed again")
    if outcome["status"] in ("analysed", "forwarded") and pipeline is not None:
        for dest in cfg.destinations_of(pipeline):
            enqueue_send(ctx.redis, cfg, study_uid, revision, dest.name)
    return str(outcome["status"])


def _forward(ctx: WorkerContext, rev: Revision, pipeline: Pipeline) -> dict[str, Any]:
    """Store and forward: the revision's instances that no earlier revision forwarded are to be sent on."""
    storage = ctx.storage
    study_uid, revision = rev.study_uid, rev.revision
    earlier = set()
    for r in storage.revisions(study_uid):
        if r < revision and (prior := storage.read_outcome(study_uid, r)) and prior["status"] == "forwarded":
            earlier |= set(prior.get("forward", {}))
    forward = {sop: series for sop, series in sorted(rev.instances.items()) if sop not in earlier}
    logger.info("Study %s r%d: store and forward (pipeline %s): %d instance(s) to %s", study_uid, revision,
                pipeline.name, len(forward), ", ".join(pipeline.destinations) or "no destination")
    return storage.write_outcome(study_uid, revision, "forwarded", pipeline=pipeline.name, forward=forward)


def _audit_outcome(audit: AuditTrail, outcome: dict[str, Any]) -> None:
    """The end of an analysis: C (its result objects made), or why there is no result."""
    study_uid, revision, status = outcome["study_uid"], outcome["revision"], outcome["status"]
    pipeline = f" (pipeline {outcome['pipeline']})" if outcome.get("pipeline") else ""
    if status == "analysed":
        made = sorted(name.removesuffix(".dcm") for name in outcome.get("objects", {}).values())
        audit.job(study_uid, revision, Action.CREATE, Outcome.SUCCESS, f"analysed{pipeline}, {len(made)} object(s) made",
                  made)
    elif status == "forwarded":
        audit.job(study_uid, revision, Action.READ, Outcome.SUCCESS,
                  f"to be forwarded{pipeline}: {len(outcome.get('forward', {}))} instance(s)")
    elif status == "no_result":
        audit.job(study_uid, revision, Action.READ, Outcome.MINOR_FAILURE,
                  f"no result{pipeline}: {outcome.get('reason', '')}")
    else:
        audit.job(study_uid, revision, Action.READ, Outcome.SERIOUS_FAILURE,
                  f"failed{pipeline}: {outcome.get('reason', '')}")


def make_result(
    study_uid: str, revision: int, vol: "Volume", analysis: "Analysis", model: ModelInfo, threshold: float,
    max_findings: int, pipeline: str = "",
) -> Result:
    """The result of one analysis: the study score, the key slices and, when the model locates them,
    the findings at or above the threshold (at most ``max_findings``) of a positive study."""
    def image(z: int) -> SourceImage:
        number = vol.instance_numbers[z] if vol.instance_numbers else None
        return SourceImage(vol.sop_class_uids[z], vol.sop_instance_uids[z], int(z), number)

    positive = analysis.score >= threshold
    peaks = [p for p in analysis.peaks if p.probability >= threshold][:max_findings] if positive else []
    return Result(
        study_uid=study_uid,
        revision=revision,
        series_uid=vol.series_uid,
        score=float(analysis.score),
        threshold=float(threshold),
        findings=tuple(
            Finding(n, image(p.slice), round(p.row, 1), round(p.column, 1), float(p.probability))
            for n, p in enumerate(peaks, start=1)
        ),
        key_images=tuple(KeyImage(image(z), float(analysis.slice_scores[z])) for z in analysis.key_slices),
        model=model,
        extra={"pixel_spacing": [vol.spacing[1], vol.spacing[2]], **({"pipeline": pipeline} if pipeline else {})},
    )


def _analyse(ctx: WorkerContext, rev: Revision, pipeline: Pipeline) -> dict[str, Any]:
    from node import volume

    storage = ctx.storage
    study_uid, revision = rev.study_uid, rev.revision
    started = time.monotonic()
    paths = [storage.instance_path(study_uid, series, sop) for sop, series in sorted(rev.instances.items())]
    paths = [p for p in paths if p.exists()]
    try:
        choice, vol = volume.load_study(paths, ctx.cfg.rules(pipeline))
    except (NoUsableSeriesError, StudyLimitError) as exc:
        logger.warning("Study %s r%d: no result: %s", study_uid, revision, exc)
        return storage.write_outcome(study_uid, revision, "no_result", pipeline=pipeline.name, reason=str(exc))
    except VolumeError as exc:
        logger.error("Study %s r%d: failed: %s", study_uid, revision, exc)
        return storage.write_outcome(study_uid, revision, "failed", pipeline=pipeline.name, reason=str(exc))
    loaded = time.monotonic()
    model = ctx.model_for(pipeline)
    threshold, threshold_source = ctx.threshold(pipeline)
    dz, dy, dx = (s if s > 0 else 1.0 for s in vol.spacing)  # a missing Pixel Spacing: 1 mm, for suppression only
    spacing = (dz, dy, dx)
    analysis = model.analyse(vol.hu, spacing=spacing, max_peaks=ctx.cfg.model.max_findings, batch_size=ANALYSE_BATCH)
    provider = analysis.providers[0] if analysis.providers else "unknown"
    metrics.INFERENCE_SECONDS.labels(provider).observe(analysis.seconds)
    metrics.INFERENCE_SLICES.labels(provider).inc(int(vol.hu.shape[0]))
    card = model.card
    info = ModelInfo(card.name, card.version, card.sha256, threshold_source, analysis.aggregation, analysis.located)
    result = make_result(study_uid, revision, vol, analysis, info, threshold, ctx.cfg.model.max_findings,
                         pipeline.name if ctx.cfg.declared_pipelines else "")
    device = ctx.device()
    used = list(vol.sop_instance_uids)
    objects, object_seconds = {}, {}
    for kind in all_kinds(ctx.cfg.destinations_of(pipeline), DEFAULT_SR_CLASS):
        t0 = time.monotonic()
        objects[kind] = ensure_object(storage, device, study_uid, revision, kind, result, used).name
        object_seconds[kind] = round(time.monotonic() - t0, 3)
    seconds = {"load": round(loaded - started, 3), "infer": round(analysis.seconds, 3),
               "locate": round(analysis.locate_seconds, 3), "objects": object_seconds,
               "total": round(time.monotonic() - started, 3)}
    logger.info(
        "Study %s r%d (pipeline %s): probability %.3f (%s at %.2f, %s), %d finding(s)%s, %d slices of series %s, "
        "key images %s, %.1f s on %s",
        study_uid, revision, pipeline.name, result.score, "positive" if result.positive else "negative", threshold,
        threshold_source, len(result.findings),
        "".join(f" [image {f.image.label} ({f.row:.0f}, {f.column:.0f}) {f.probability:.2f}]" for f in result.findings),
        vol.hu.shape[0], vol.series_uid, [k.image.label for k in result.key_images], seconds["total"],
        analysis.providers[0] if analysis.providers else "?",
    )
    return storage.write_outcome(
        study_uid, revision, "analysed", pipeline=pipeline.name, result=result.to_json(), objects=objects,
        series_why=choice.why, instances_used=used, slices=int(vol.hu.shape[0]),
        missing_slices=int(vol.missing_slices), providers=list(analysis.providers), seconds=seconds,
    )


# --- the process -----------------------------------------------------------------


#: Job failures that the job itself has logged in one line (a PACS down): rq need not add a traceback.
EXPECTED_FAILURES = (SendError,)


class AinodeWorker(SimpleWorker):
    """rq's non-forking worker that keeps beating while a job runs (see node.jobs).

    The job's entry in the StartedJobRegistry stays EXECUTION_TTL_S ahead of
    the last beat, so a worker killed mid-job is noticed in under a minute,
    not when the job timeout runs out.
    """

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return EXECUTION_TTL_S

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        done = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, done), daemon=True, name="job-heartbeat")
        beat.start()
        started = time.monotonic()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join(5)
            status = job.get_status(refresh=True)
            outcome = getattr(status, "value", status) or "unknown"  # finished, failed, scheduled (a retry)
            metrics.JOBS.labels(job.origin, outcome).inc()
            metrics.JOB_SECONDS.labels(job.origin, outcome).observe(time.monotonic() - started)
        self.set_state(WorkerStatus.IDLE)

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """A job that failed in an expected way (a destination down) has logged why in one line: rq's
        traceback of it is left out; its exception handlers still run. Every other failure keeps it."""
        if len(exc_info) > 1 and isinstance(exc_info[1], EXPECTED_FAILURES):
            logger.debug("Job %s: %s", job.id, exc_info[1])
            for handler in self._exc_handlers:  # as rq's own handle_exception runs them
                went_on = handler(job, *exc_info)
                if went_on is not None and not went_on:
                    break
            return
        super().handle_exception(job, *exc_info)

    def _beat(self, job: Job, execution: Any, done: threading.Event) -> None:
        registry = StartedJobRegistry(job.origin, connection=self.connection)
        while not done.wait(HEARTBEAT_S):
            try:
                with self.connection.pipeline() as pipe:
                    execution.heartbeat(registry, EXECUTION_TTL_S, pipe)
                    pipe.expire(self.key, EXECUTION_TTL_S + 60)
                    pipe.execute()
            except RedisError as exc:
                logger.warning("Job %s: heartbeat not written: %s", job.id, exc)


def _quiet_rq(level: str) -> str:
    """rq's INFO chatter (every job dequeued, every heartbeat) goes to DEBUG; returns the level to give rq."""
    rq_level = "DEBUG" if level == "DEBUG" else "WARNING"
    for name in ("rq.worker", "rq.queue", "rq.scheduler", "rq.job", "rq.registry"):
        logging.getLogger(name).setLevel(rq_level)
    return rq_level


def _load_models(ctx: WorkerContext) -> None:
    """Load every analysing pipeline's model now: a bad model stops the worker at start, not at the first job."""
    from node.results.sr import warm_up

    analysing = [p for p in ctx.cfg.pipelines if not p.forwards]
    if not analysing:
        logger.info("Worker ready: every pipeline stores and forwards, no model loaded")
        return
    warm_up()
    for pipeline in analysing:
        model = ctx.model_for(pipeline)
        threshold, source = ctx.threshold(pipeline)
        where = f"pipeline {pipeline.name}: " if ctx.cfg.declared_pipelines else ""
        logger.info("Worker ready: %smodel %s %s on %s", where, model.card.name, model.card.version,
                    ", ".join(model.providers))
        if source == "config":
            logger.warning("%sthreshold %.3g overrides the model card's %.3g (%s)", where or "[model] ", threshold,
                           model.card.threshold, model.card.threshold_method)
        else:
            logger.info("%sThreshold %.3g, the model card's (%s)", where, threshold, model.card.threshold_method)
        if not model.map_name:
            logger.warning("Model %s has no score map: results will give a study score and key images, "
                           "no located findings", model.card.name)
        elif model.classifier:
            c = model.classifier
            logger.info("%sTwo stages: the map's %d best candidates per study, scored by the classifier on %d-pixel "
                        "patches of %.2g mm", where, c.candidates, c.size, c.mm_per_pixel)


def queues_for(role: str, redis: Redis) -> list[Queue]:
    name = {"analyse": QUEUE_NAME, "send": SEND_QUEUE}[role]
    return [Queue(name, connection=redis)]


def run_worker(cfg: Config, role: str = "analyse", *, burst: bool = False, supervisor: int | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT (or, with ``burst``, until its queue is empty).

    ``supervisor``: the pid of the ``ainode serve`` that started it: the worker
    dies with that node, and leaves scheduling to it (node.jobs.Scheduling).
    """
    if supervisor is not None:
        die_with(supervisor)
    storage = Storage(cfg.node.storage)
    storage.prepare(clear_tmp=False)  # the node may be writing there right now
    redis = redis_for(cfg)
    ctx = WorkerContext(cfg, storage, redis, role=role)
    set_context(ctx)
    audit = ctx.audit  # opened now: a bad audit path stops the worker at start
    if role == "analyse":
        _load_models(ctx)
    name = worker_name(role, os.getpid())
    worker = AinodeWorker(queues_for(role, redis), connection=redis, name=name)
    audit.application(True, f"worker {name} started")
    ready = storage.worker_ready(name)  # for /readyz: ready (its model loaded) whatever Redis remembers
    try:
        rq_level = _quiet_rq(logging.getLevelName(logging.getLogger().level))
        worker.work(burst=burst, with_scheduler=supervisor is None, logging_level=rq_level)
    finally:
        ready.unlink(missing_ok=True)
        audit.application(False, f"worker {name} stopped")
        audit.close()
    return 0
