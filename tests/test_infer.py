"""Inference with real ONNX Runtime sessions on the hand-built test CNN (node.testmodel)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import node.infer
from node.errors import ModelError
from node.infer import Analysis, Model, aggregate, bundled_model_path, resolve_model_path, top_slices
from node.model_card import ModelCard, card_path, sha256_of
from node.preprocessing import PREPROCESSING_VERSION
from node.testmodel import CLASSIFIER, build_test_model

CUDA_AVAILABLE = "CUDAExecutionProvider" in ort.get_available_providers()
BLOB_SLICES = (20, 21, 22)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "test.onnx"
    build_test_model(path, size=64, context=1, seed=0)
    return path


@pytest.fixture(scope="module")
def model(model_path: Path) -> Model:
    return Model(model_path, "cpu")


@pytest.fixture(scope="module")
def blob_volume() -> np.ndarray:
    """40 slices of 128x128 lung (-800 HU), a +40 HU disc of radius 10 px in slices 20-22."""
    volume = np.full((40, 128, 128), -800, dtype=np.int16)
    yy, xx = np.mgrid[:128, :128]
    disc = (yy - 60) ** 2 + (xx - 70) ** 2 <= 10**2
    for z in BLOB_SLICES:
        volume[z][disc] = 40
    return volume


@pytest.fixture
def own_model(tmp_path: Path) -> Path:
    """A fresh test model a test may damage."""
    path = tmp_path / "own.onnx"
    build_test_model(path)
    return path


def rewrite_card(model_path: Path, **changes: Any) -> None:
    card = ModelCard.read(model_path)
    dataclasses.replace(card, **changes).write(model_path)


# -- the test model and its card ---------------------------------------------------------------


def test_build_test_model_writes_a_matching_card(tmp_path: Path):
    path = tmp_path / "m.onnx"
    card = build_test_model(path, size=96, context=2, seed=3, name="x")
    assert ModelCard.read(path) == card
    assert card.input_shape == [None, 96, 96, 5]
    assert card.preprocessing_version == PREPROCESSING_VERSION
    assert card.window == [-600.0, 1500.0] and card.aggregation == "top3_mean"
    assert "not a trained model" in card.training_data
    card.check(path, PREPROCESSING_VERSION)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {card.input_name: np.zeros((2, 96, 96, 5), np.float32)})[0]
    assert out.shape == (2, 1)


def test_seed_changes_the_random_filters(tmp_path: Path):
    a = build_test_model(tmp_path / "a.onnx", seed=0)
    b = build_test_model(tmp_path / "b.onnx", seed=1)
    assert a.sha256 != b.sha256


# -- loading: devices and providers ------------------------------------------------------------


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_model_loads(model_path: Path, device: str, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="node.infer"):
        model = Model(model_path, device)
    assert "CPUExecutionProvider" in model.providers
    assert model.input_name == model.card.input_name == "input"
    assert model.output_name == model.card.output_name
    assert any("providers" in r.getMessage() and "CPUExecutionProvider" in r.getMessage() for r in caplog.records)
    if device == "cpu":
        assert model.providers == ["CPUExecutionProvider"]


def test_intra_op_threads(model_path: Path, blob_volume: np.ndarray):
    one = Model(model_path, "cpu", intra_op_threads=1)
    assert np.allclose(one.score_slices(blob_volume), Model(model_path, "cpu").score_slices(blob_volume), atol=1e-6)


def test_cuda_required_but_missing(model_path: Path):
    if CUDA_AVAILABLE:
        pytest.skip("CUDA is available here")
    with pytest.raises(ModelError, match=r"model.device = cuda but CUDA is not usable: .*CPUExecutionProvider"):
        Model(model_path, "cuda")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_cuda_offered_but_not_starting(model_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """onnxruntime-gpu without a GPU or CUDA libraries: the session silently falls back to CPU."""
    if CUDA_AVAILABLE:
        pytest.skip("CUDA is available here")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ModelError, match=r"model.device = cuda but CUDA is not usable: .*did not start"):
        Model(model_path, "cuda")
    with caplog.at_level(logging.WARNING, logger="node.infer"):
        assert Model(model_path, "auto").providers == ["CPUExecutionProvider"]
    assert "running on CPU" in caplog.text


def test_bad_device_is_refused(model_path: Path):
    with pytest.raises(ValueError, match='"device"'):
        Model(model_path, "tpu")


# -- card mismatches -----------------------------------------------------------------------------


def test_preprocessing_version_differs(own_model: Path):
    rewrite_card(own_model, preprocessing_version="0")
    with pytest.raises(ModelError, match="preprocessing version '0'"):
        Model(own_model, "cpu")


def test_sha256_differs(own_model: Path):
    data = bytearray(own_model.read_bytes())
    data[-1] ^= 0x01
    own_model.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 .* does not match its card"):
        Model(own_model, "cpu")


def test_missing_card(own_model: Path):
    card_path(own_model).unlink()
    with pytest.raises(ModelError, match="model card missing"):
        Model(own_model, "cpu")


def test_input_name_differs(own_model: Path):
    rewrite_card(own_model, input_name="args_0")
    with pytest.raises(ModelError, match="input name 'input' does not match its card \\('args_0'\\)"):
        Model(own_model, "cpu")


def test_output_name_differs(own_model: Path):
    rewrite_card(own_model, output_name="dense")
    with pytest.raises(ModelError, match="output name 'probability' does not match its card"):
        Model(own_model, "cpu")


def test_input_shape_differs_from_graph(own_model: Path):
    rewrite_card(own_model, size=96, input_shape=[None, 96, 96, 3])
    with pytest.raises(ModelError, match="input shape .* does not match its card"):
        Model(own_model, "cpu")


def test_card_shape_inconsistent(own_model: Path):
    rewrite_card(own_model, context=2)
    with pytest.raises(ModelError, match="input_shape .* does not match size/context"):
        Model(own_model, "cpu")


def test_unknown_aggregation(own_model: Path):
    rewrite_card(own_model, aggregation="median")
    with pytest.raises(ModelError, match="unknown aggregation 'median'"):
        Model(own_model, "cpu")


def test_model_file_missing(tmp_path: Path):
    with pytest.raises(ModelError, match="not found"):
        Model(tmp_path / "none.onnx", "cpu")


def test_unloadable_model(own_model: Path):
    own_model.write_bytes(b"not a model")
    rewrite_card(own_model, sha256=sha256_of(own_model))
    with pytest.raises(ModelError, match="ONNX Runtime cannot load the model"):
        Model(own_model, "cpu")


# -- model paths -----------------------------------------------------------------------------------


def test_resolve_model_path(model_path: Path, tmp_path: Path):
    assert resolve_model_path(str(model_path)) == model_path
    with pytest.raises(ModelError, match=r"\[model\] path: model file .*nope.onnx not found"):
        resolve_model_path(str(tmp_path / "nope.onnx"))


def test_bundled_model_path():
    path = bundled_model_path()
    assert path.name == "ainode-lung-ct.onnx" and path.parent.name == "models"
    if path.is_file():
        assert resolve_model_path("") == path
    else:
        with pytest.raises(ModelError, match="bundled model .* is not installed"):
            resolve_model_path("")


# -- scoring -----------------------------------------------------------------------------------------


def test_blob_slices_score_highest(model: Model, blob_volume: np.ndarray):
    scores = model.score_slices(blob_volume)
    assert scores.dtype == np.float32 and scores.shape == (40,)
    others = np.delete(scores, BLOB_SLICES)
    assert scores[list(BLOB_SLICES)].min() > others.max()
    analysis = model.analyse(blob_volume)
    assert isinstance(analysis, Analysis)
    assert set(analysis.key_slices) <= set(range(19, 24)) and len(analysis.key_slices) == 3
    assert analysis.key_slices[0] == 21  # the middle slice: its neighbours (context) are bright too
    assert analysis.score == pytest.approx(float(np.sort(scores)[-3:].mean()), rel=1e-6)
    assert analysis.score > model.card.threshold > float(others.max())
    assert analysis.aggregation == "top3_mean"
    assert analysis.providers == ("CPUExecutionProvider",)
    assert analysis.seconds > 0 and analysis.slices_per_second == pytest.approx(40 / analysis.seconds)


def test_score_map_locates_the_blob(model: Model, blob_volume: np.ndarray):
    analysis = model.analyse(blob_volume, spacing=(2.5, 0.7, 0.7), max_peaks=3)
    assert analysis.located and model.map_name == "score_map"
    top = analysis.peaks[0]
    assert top.slice == 21  # the middle slice: its neighbours (context) are bright too
    assert abs(top.row - 60) <= 2 and abs(top.column - 70) <= 2  # the disc's centre, in source pixels
    assert top.probability > model.card.threshold
    assert all(p.probability < model.card.threshold for p in analysis.peaks[1:])  # nothing else reaches it
    assert [p.probability for p in analysis.peaks] == sorted((p.probability for p in analysis.peaks), reverse=True)


def test_peaks_of_one_nodule_are_one_finding(model: Model, blob_volume: np.ndarray):
    """The disc on three slices, and a second disc 30 mm away: two peaks above the threshold, not four."""
    volume = blob_volume.copy()
    yy, xx = np.mgrid[:128, :128]
    volume[8:11][:, (yy - 20) ** 2 + (xx - 100) ** 2 <= 8**2] = 40
    peaks = [p for p in model.analyse(volume, spacing=(2.5, 0.7, 0.7), max_peaks=5).peaks
             if p.probability >= model.card.threshold]
    assert sorted((p.slice, round(p.row / 10), round(p.column / 10)) for p in peaks) == [(9, 2, 10), (21, 6, 7)]


def test_model_without_map_gives_no_coordinates(tmp_path: Path, blob_volume: np.ndarray):
    path = tmp_path / "nomap.onnx"
    build_test_model(path, size=64, context=1, with_map=False)
    plain = Model(path, "cpu")
    analysis = plain.analyse(blob_volume)
    assert (plain.map_name, analysis.located, analysis.peaks) == (None, False, ())
    assert analysis.key_slices[0] == 21


def test_card_names_a_map_the_graph_lacks(tmp_path: Path):
    path = tmp_path / "nomap.onnx"
    build_test_model(path, with_map=False)
    rewrite_card(path, map_output_name="heatmap")
    with pytest.raises(ModelError, match="card names score map 'heatmap', which the graph does not output"):
        Model(path, "cpu")


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory: pytest.TempPathFactory) -> Model:
    path = tmp_path_factory.mktemp("two-stage") / "two.onnx"
    build_test_model(path, size=64, context=1, with_classifier=True)
    return Model(path, "cpu")


def test_two_stage_model_scores_the_maps_candidates_with_its_classifier(two_stage: Model, blob_volume: np.ndarray):
    """The map's candidates, each with the classifier's probability: the findings, the slice scores, the study score."""
    spacing = (2.5, 0.7, 0.7)
    analysis = two_stage.analyse(blob_volume, spacing=spacing, max_peaks=3)
    c = two_stage.classifier
    assert c is not None and (c.size, c.channels, c.candidates) == (16, 6, 8)
    candidates = node.infer.locate_peaks(two_stage.run(blob_volume)[1], source_shape=(128, 128), size=64,
                                         spacing=spacing, min_probability=0.0, max_peaks=8, min_distance_mm=15.0)
    scored = two_stage.classify(blob_volume, candidates, spacing)
    assert len(scored) == len(candidates)
    assert sorted((q.slice, q.row, q.column) for q in scored) == sorted((q.slice, q.row, q.column) for q in candidates)
    p = [q.probability for q in scored]
    assert p == sorted(p, reverse=True)
    top = analysis.peaks[0]
    assert (top.slice, top.row, top.column, top.probability) == (scored[0].slice, scored[0].row, scored[0].column, p[0])
    assert top.slice == 21 and abs(top.row - 60) <= 2 and abs(top.column - 70) <= 2  # the disc, as the map says
    assert top.probability != pytest.approx(float(two_stage.run(blob_volume)[1][21].max()), abs=1e-3)  # not the map's
    assert [q.probability for q in analysis.peaks] == p[:3]
    assert analysis.score == pytest.approx(top.probability) == pytest.approx(float(analysis.slice_scores.max()))
    on = {q.slice for q in candidates}
    assert all((analysis.slice_scores[z] > 0) == (z in on) for z in range(40))  # only slices a candidate is on score
    assert analysis.key_slices[0] == 21 and analysis.detector_score is not None
    assert analysis.aggregation == "max"


def test_a_two_stage_search_moves_a_finding_to_the_slice_its_classifier_scores_best(
        tmp_path: Path, two_stage: Model, blob_volume: np.ndarray):
    """A card's ``search_mm``: each candidate is also scored on the slices within it, and keeps the best one."""
    spacing = (2.5, 0.7, 0.7)
    volume = blob_volume.copy()
    yy, xx = np.mgrid[:128, :128]
    volume[22][(yy - 60) ** 2 + (xx - 70) ** 2 <= 4**2] = 200  # denser in the disc's last slice: the test classifier's cue
    unsearched = two_stage.analyse(volume, spacing=spacing).peaks[0]
    assert unsearched.slice == 21  # no search: where the map points
    path = tmp_path / "search.onnx"
    build_test_model(path, size=64, context=1, with_classifier=True)
    rewrite_card(path, classifier=dict(CLASSIFIER, search_mm=2.5))
    searching = Model(path, "cpu")
    assert searching.classifier is not None and searching.classifier.search_mm == 2.5
    analysis = searching.analyse(volume, spacing=spacing, max_peaks=3)
    top = analysis.peaks[0]
    assert top.slice == 22 and abs(top.row - 60) <= 2 and abs(top.column - 70) <= 2
    assert top.probability > unsearched.probability
    assert analysis.score == pytest.approx(top.probability) and analysis.key_slices[0] == 22


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"map_output_name": ""}, "a classifier needs the score map"),
        ({"aggregation": "top3_mean"}, "study score is its best candidate's"),
        ({"classifier": {"input_name": "patches"}}, "classifier lacks output_name"),
        ({"classifier": dict(CLASSIFIER, size=32)}, "classifier input shape"),
        ({"classifier": dict(CLASSIFIER, input_name="crops")}, "second input 'patches'"),
        ({"classifier": dict(CLASSIFIER, output_name="p")}, "classifier output 'p'"),
        ({"classifier": dict(CLASSIFIER, mm_per_pixel=0)}, "unusable size"),
        ({"classifier": dict(CLASSIFIER, search_mm=-1)}, "search_mm"),
        ({"classifier": {}}, "must have 1 input"),
    ],
)
def test_two_stage_card_and_graph_must_agree(tmp_path: Path, changes: dict, message: str):
    path = tmp_path / "two.onnx"
    build_test_model(path, with_classifier=True)
    rewrite_card(path, **changes)
    with pytest.raises(ModelError, match=message):
        Model(path, "cpu")


def test_batching_gives_the_same_scores(model: Model, blob_volume: np.ndarray):
    reference = model.score_slices(blob_volume, batch_size=64)
    for batch_size in (1, 7):
        assert np.allclose(model.score_slices(blob_volume, batch_size=batch_size), reference, atol=1e-6)


def test_batches_are_bounded(model: Model, blob_volume: np.ndarray, monkeypatch: pytest.MonkeyPatch):
    seen: list[int] = []
    real = node.infer.prepare_slices

    def spy(volume, indices, **kwargs):
        seen.append(len(indices))
        return real(volume, indices, **kwargs)

    monkeypatch.setattr(node.infer, "prepare_slices", spy)
    model.score_slices(blob_volume, batch_size=16)
    assert seen == [16, 16, 8]


def test_top_k(model: Model, blob_volume: np.ndarray):
    assert len(model.analyse(blob_volume, top_k=1).key_slices) == 1
    assert len(model.analyse(blob_volume[:2], top_k=5).key_slices) == 2
    with pytest.raises(ValueError, match='"top_k"'):
        model.analyse(blob_volume, top_k=0)


def test_bad_volume_or_batch(model: Model):
    with pytest.raises(ValueError, match='"volume_hu"'):
        model.score_slices(np.zeros((64, 64), np.int16))
    with pytest.raises(ValueError, match='"volume_hu"'):
        model.score_slices(np.zeros((0, 64, 64), np.int16))
    with pytest.raises(ValueError, match='"batch_size"'):
        model.score_slices(np.zeros((2, 64, 64), np.int16), batch_size=0)


def test_real_ct_end_to_end(model: Model, lung1: tuple):
    volume = lung1[0]
    analysis = model.analyse(volume)
    assert analysis.slice_scores.shape == (volume.shape[0],) == (48,)
    assert np.all((analysis.slice_scores >= 0) & (analysis.slice_scores <= 1))
    assert 0.0 <= analysis.score <= 1.0
    assert all(0 <= z < 48 for z in analysis.key_slices)


# -- aggregation ---------------------------------------------------------------------------------------


def test_aggregate_methods():
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.0], dtype=np.float32)
    assert aggregate(scores, "max") == pytest.approx(0.9)
    assert aggregate(scores, "top3_mean") == pytest.approx(0.8)
    assert aggregate(scores, "top1_mean") == pytest.approx(0.9)
    assert aggregate(scores, "top2_mean") == pytest.approx(0.85)
    assert aggregate(scores, "mean") == pytest.approx(scores.mean())
    assert aggregate(np.array([0.4, 0.6]), "top3_mean") == pytest.approx(0.5)  # fewer slices than k
    assert aggregate(np.array([0.3]), "max") == pytest.approx(0.3)


def test_aggregate_dilution():
    """Why top3_mean: a 3-slice finding in a 300-slice study survives it but not a plain mean."""
    scores = np.full(300, 0.05)
    scores[150:153] = 0.95
    assert aggregate(scores, "top3_mean") == pytest.approx(0.95)
    assert aggregate(scores, "mean") < 0.1


@pytest.mark.parametrize("method", ["median", "top0_mean", "topk_mean", ""])
def test_aggregate_unknown_method(method: str):
    with pytest.raises(ValueError, match='"method"'):
        aggregate(np.array([0.5]), method)


def test_aggregate_empty():
    with pytest.raises(ValueError, match='"slice_scores"'):
        aggregate(np.array([]), "max")


def test_top_slices_order_and_ties():
    assert top_slices(np.array([0.2, 0.9, 0.5, 0.9]), 3) == (1, 3, 2)
    assert top_slices(np.array([0.2]), 3) == (0,)


def test_card_json_is_plain(model_path: Path):
    data = json.loads(card_path(model_path).read_text())
    assert data["input_shape"][0] is None and data["threshold_method"] == "fixed (test model)"
