"""The worker's jobs in-process: idempotent analysis, one model for every job, predecessors."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from rq import Queue, SimpleWorker

from node.config import Config, Destination, ModelConfig, NodeConfig
from node.enqueue import QUEUE_NAME, JobQueue
from node.send import SEND_QUEUE
from node.store import Storage
from node.worker import WorkerContext, analyse_study, set_context
from tests.peers import store_series


@pytest.fixture
def ctx(redis_server, tmp_path, lung1_series):
    from node.testmodel import build_test_model

    model = tmp_path / "model" / "m.onnx"
    model.parent.mkdir()
    build_test_model(model, size=64, context=1)
    r = redis_server.client()
    r.flushall()
    storage = Storage(tmp_path / "storage")
    storage.prepare()
    cfg = Config(
        node=NodeConfig(storage=storage.root),
        model=ModelConfig(path=str(model), device="cpu"),
        destinations=(Destination("pacs", "PACS", "127.0.0.1", 9, objects=("sr",)),),
    )
    context = WorkerContext(cfg, storage, r)
    set_context(context)
    yield context
    set_context(None)  # type: ignore[arg-type]


def test_analysis_twice_gives_one_result(ctx, lung1_series):
    study = store_series(ctx.storage, lung1_series, 1)
    assert analyse_study(study, 1) == "analysed"
    first = ctx.storage.read_outcome(study, 1)
    srs = list((ctx.storage.results / study).glob("*.dcm"))
    assert len(srs) == 1
    assert analyse_study(study, 1) == "analysed"  # a rerun (a retried job, a requeue after Redis loss)
    assert ctx.storage.read_outcome(study, 1) == first
    assert list((ctx.storage.results / study).glob("*.dcm")) == srs
    sends = ctx.redis.lrange(f"rq:queue:{SEND_QUEUE}", 0, -1)
    assert len(sends) == 1  # one delivery job per destination, not one per run
    result = first["result"]
    assert first["slices"] == 48 and 0.0 <= result["score"] <= 1.0
    assert len(result["key_images"]) == 3 and first["providers"][0] == "CPUExecutionProvider"
    assert list(first["objects"]) == ["sr-comprehensive"]
    # the threshold has one owner: an empty [model] threshold means the card's
    assert (result["threshold"], result["model"]["threshold_source"]) == (ctx.model.card.threshold, "model card")


def test_config_threshold_overrides_the_card(ctx, lung1_series):
    from dataclasses import replace

    ctx.cfg = replace(ctx.cfg, model=replace(ctx.cfg.model, threshold=1.0))
    study = store_series(ctx.storage, lung1_series, 1)
    analyse_study(study, 1)
    result = ctx.storage.read_outcome(study, 1)["result"]
    assert (result["threshold"], result["model"]["threshold_source"]) == (1.0, "config")
    assert result["score"] < 1.0 and result["findings"] == []  # negative at 1.0: nothing located is reported


def test_second_revision_names_the_first_sr(ctx, lung1_series):
    study = store_series(ctx.storage, lung1_series[:40], 1)
    analyse_study(study, 1)
    store_series(ctx.storage, lung1_series[40:], 2)
    analyse_study(study, 2)
    sr1_name = json.loads(ctx.storage.outcome_path(study, 1).read_text())["objects"]["sr-comprehensive"]
    sr2_name = json.loads(ctx.storage.outcome_path(study, 2).read_text())["objects"]["sr-comprehensive"]
    sr1 = pydicom.dcmread(ctx.storage.results / study / sr1_name)
    sr2 = pydicom.dcmread(ctx.storage.results / study / sr2_name)
    refs = [i.ReferencedSOPInstanceUID for s in sr2.PredecessorDocumentsSequence
            for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert refs == [Path(sr1_name).stem]
    # one SR series for the study: a viewer lists the newest last
    assert sr1.SeriesInstanceUID == sr2.SeriesInstanceUID and (sr1.InstanceNumber, sr2.InstanceNumber) == (1, 2)
    assert len(json.loads(ctx.storage.outcome_path(study, 2).read_text())["instances_used"]) == 48


def test_simple_worker_runs_jobs_with_one_model(ctx, lung1_series, tmp_path):
    study_a = store_series(ctx.storage, lung1_series[:20], 1)
    from node.sample import load_lung1, write_ct_series

    volume, spacing, origin, _ = load_lung1(None)
    study_b = store_series(ctx.storage, write_ct_series(volume[:15], spacing, tmp_path / "b", first_position=origin), 1)
    queue = JobQueue(ctx.redis)
    assert queue.enqueue(study_a, 1) and queue.enqueue(study_b, 1)
    assert not queue.enqueue(study_a, 1)  # same job id: not queued twice
    model = ctx.model
    worker = SimpleWorker([Queue(QUEUE_NAME, connection=ctx.redis)], connection=ctx.redis)
    assert worker.work(burst=True)
    assert ctx.model is model  # loaded once, kept for every job
    for study in (study_a, study_b):
        assert ctx.storage.read_outcome(study, 1)["status"] == "analysed"


def test_an_outcome_of_ainode_0_1_can_still_be_sent(ctx, lung1_series):
    """After an upgrade, `results resend` of a study analysed by 0.1 builds its objects from the old outcome."""
    from node.results.objects import ensure_object
    from node.results.sr_read import sr_summary

    study = store_series(ctx.storage, lung1_series[:20], 1)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in lung1_series[:20]]
    key = headers[5]
    ctx.storage.write_outcome(study, 1, "analysed", result={
        "series_uid": str(key.SeriesInstanceUID), "instances_used": [str(h.SOPInstanceUID) for h in headers],
        "slices": 20, "score": 0.8, "threshold": 0.5, "positive": True, "aggregation": "top3_mean",
        "key_images": [{"sop_class_uid": str(key.SOPClassUID), "sop_instance_uid": str(key.SOPInstanceUID),
                        "slice_index": 5, "score": 0.8}],
        "model": {"name": "ainode-lung-ct", "version": "1.0.0", "sha256": "ab" * 32}}, sr={})
    device = ctx.device()
    summary = sr_summary(ensure_object(ctx.storage, device, study, 1, "sr-comprehensive"))
    assert (summary["qualitative"], summary["findings"], summary["key_image_uids"]) == (
        "positive", [], [str(key.SOPInstanceUID)])
    for kind in ("sc", "ko"):
        assert ensure_object(ctx.storage, device, study, 1, kind).exists()
