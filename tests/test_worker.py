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
        destinations=(Destination("pacs", ae_title="PACS", host="127.0.0.1", port=9, objects=("sr",)),),
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


def _bomb_series(out: Path, n: int = 60) -> list[Path]:
    """``n`` CT slices of 4096x4096 zeros as JPEG 2000 Lossless: 162 bytes of pixel data each."""
    import numpy as np
    from pydicom.data import get_testdata_file
    from pydicom.uid import JPEG2000Lossless, generate_uid

    out.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 4096
    ds.compress(JPEG2000Lossless, np.zeros((4096, 4096), dtype=np.int16))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    files = []
    for i in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0, 0, 2.5 * i]
        ds.SliceThickness = 2.5
        files.append(out / f"{i:03d}.dcm")
        ds.save_as(files[-1])
    return files


def test_a_jpeg2000_bomb_is_refused_before_it_is_decoded(redis_server, tmp_path):
    """60 slices of 162-byte JPEG 2000 that decode to 4096x4096 each (2 GB of int16): a worker
    process with [series] max_volume_mb = 512 records why and stays small."""
    import subprocess
    import sys
    import time

    from node.testmodel import build_test_model

    r = redis_server.client()
    r.flushall()
    model = tmp_path / "m.onnx"
    build_test_model(model, size=64, context=1)
    storage = Storage(tmp_path / "storage")
    storage.prepare()
    files = _bomb_series(tmp_path / "bomb")
    assert sum(f.stat().st_size for f in files) < 512 * 1024  # tiny on disk (headers, mostly)
    study = store_series(storage, files, 1)
    cfg = tmp_path / "ainode.toml"
    cfg.write_text(f'[node]\nstorage = "{storage.root}"\n[redis]\nurl = "{redis_server.url}"\n'
                   f'[model]\npath = "{model}"\ndevice = "cpu"\n[series]\nmax_volume_mb = 512\n')
    JobQueue(r).enqueue(study, 1)
    proc = subprocess.Popen([sys.executable, "-m", "node", "--config", str(cfg), "worker", "--burst"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_kb = 0  # VmHWM: the high-water mark of the worker's own memory (ru_maxrss would count this
    while proc.poll() is None:  # test process's, as it was at the fork)
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    assert proc.returncode == 0
    outcome = storage.read_outcome(study, 1)
    assert outcome is not None and outcome["status"] == "no_result"
    assert "60 slices of 4096x4096 would take 2176 MB decoded, more than [series] max_volume_mb = 512" \
        in outcome["reason"]
    assert 0 < peak_kb < 900 * 1024, f"the worker peaked at {peak_kb // 1024} MB"
    assert not (storage.results / study).exists()  # no result object


def test_a_rescale_that_clips_every_value_gives_no_result(ctx, lung1_series, tmp_path):
    out = tmp_path / "slope"
    out.mkdir()
    files = []
    for f in lung1_series:
        ds = pydicom.dcmread(f)
        ds.RescaleSlope = "1e300"
        files.append(out / f.name)
        ds.save_as(files[-1])
    study = store_series(ctx.storage, files, 1)
    assert analyse_study(study, 1) == "no_result"
    outcome = ctx.storage.read_outcome(study, 1)
    assert "fall outside the int16 HU range after RescaleSlope/RescaleIntercept" in outcome["reason"]
    assert not (ctx.storage.results / study).exists()
    assert ctx.redis.llen(f"rq:queue:{SEND_QUEUE}") == 0  # nothing to send


def test_reanalyse_queues_a_new_revision_whose_sr_supersedes_the_last(ctx, lung1_series, tmp_path):
    import subprocess
    import sys

    from node.history import reanalyse

    study = store_series(ctx.storage, lung1_series, 1)
    with pytest.raises(LookupError, match="still queued or being analysed"):
        reanalyse(ctx.storage, ctx.redis, study)  # nothing to redo before the first analysis ends
    assert analyse_study(study, 1) == "analysed"
    # the CLI, as an admin types it (real Redis, real storage, audited)
    cfg = tmp_path / "ainode.toml"
    cfg.write_text(f'[node]\nstorage = "{ctx.storage.root}"\n[redis]\nurl = "redis://127.0.0.1:'
                   f'{ctx.redis.connection_pool.connection_kwargs["port"]}/0"\n')
    out = subprocess.run([sys.executable, "-m", "node", "results", "reanalyse", study, "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"queued revision 2 of {study} (48 instances)" in out.stdout
    rev = ctx.storage.read_revision(study, 2)
    assert rev.reason == "reanalyse" and rev.instances == ctx.storage.read_revision(study, 1).instances
    assert ctx.redis.lrange(f"rq:queue:{QUEUE_NAME}", 0, -1) == [rev.job_id.encode()]
    assert analyse_study(study, 2) == "analysed"
    sr1 = ctx.storage.read_outcome(study, 1)["objects"]["sr-comprehensive"]
    sr2 = pydicom.dcmread(ctx.storage.results / study / ctx.storage.read_outcome(study, 2)["objects"]["sr-comprehensive"])
    refs = [i.ReferencedSOPInstanceUID for s in sr2.PredecessorDocumentsSequence
            for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert refs == [Path(sr1).stem] and sr2.InstanceNumber == 2
    audit = (ctx.storage.root / "audit.jsonl").read_text()
    assert "re-analysis requested by" in audit


def test_the_web_page_shows_the_summary_image_when_one_was_made(ctx, lung1_series):
    import io
    from dataclasses import replace

    import pydicom
    from PIL import Image

    from node.web.pages import result_png

    ctx.cfg = replace(ctx.cfg, destinations=(replace(ctx.cfg.destinations[0], objects=("sr", "sc")),))
    study = store_series(ctx.storage, lung1_series, 1)
    assert analyse_study(study, 1) == "analysed"
    outcome = ctx.storage.read_outcome(study, 1)
    sc = pydicom.dcmread(ctx.storage.results / study / outcome["objects"]["sc"])
    shown = Image.open(io.BytesIO(result_png(ctx.storage, study, 1, outcome)))
    assert shown.size == (sc.Columns, sc.Rows) and shown.mode == "RGB"
    assert shown.tobytes() == sc.pixel_array.tobytes()  # the very summary image the PACS got
    without = {**outcome, "objects": {"sr-comprehensive": outcome["objects"]["sr-comprehensive"]}}
    key = Image.open(io.BytesIO(result_png(ctx.storage, study, 1, without)))
    assert key.size == (512, 512)  # else the top slice itself, in a lung window
