"""The bundled model's findings on real anatomy: where it points, and what the SR then says.

The real lung1 chest CT (its nodule label is used here for checking, never by
training); lung1's lower slices (the training anatomy) with no nodule, and with
two nodules drawn in by training.synthetic (the generator training uses).
Each goes through the worker's own steps: the bundled model in a real ONNX
Runtime session, node.worker.make_result and the TID 1500 SR.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from node.infer import Model, bundled_model_path
from node.model_card import ModelCard

pytestmark = pytest.mark.skipif(
    not bundled_model_path().exists() or not ModelCard.read(bundled_model_path()).map_output_name,
    reason="the bundled model (with a score map) is not installed",
)


@pytest.fixture(scope="module")
def model() -> Model:
    return Model(bundled_model_path(), "cpu")


def result_and_sr(model: Model, files: list[Path], tmp: Path):
    """The worker's result and SR for a series on disk."""
    from node import volume
    from node.config import SeriesRules
    from node.results.facts import ModelInfo, NodeDevice
    from node.results.sr import build_sr
    from node.results.sr_read import sr_summary
    from node.worker import make_result

    _, vol = volume.load_study(files, SeriesRules(min_slices=5))
    analysis = model.analyse(vol.hu, spacing=vol.spacing, max_peaks=3)
    card = model.card
    info = ModelInfo(card.name, card.version, card.sha256, "model card", card.aggregation, analysis.located)
    result = make_result(vol.study_uid, 1, vol, analysis, info, card.threshold, 3)
    sources = [dcmread(p, stop_before_pixels=True) for p in files]
    sr = build_sr(result, sources, NodeDevice("2.25.7"), series_uid="2.25.8", sop_instance_uid="2.25.9")
    path = tmp / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return vol, analysis, result, sr_summary(path)


def test_lung1_top_finding_lies_in_its_labelled_nodule(model, lung1_series, tmp_path):
    from node.sample import load_lung1_label

    label = load_lung1_label()
    vol, analysis, result, summary = result_and_sr(model, lung1_series, tmp_path)
    assert result.positive and result.findings, result.summary()
    top = result.findings[0]
    z, row, col = top.image.slice_index, int(round(top.row)), int(round(top.column))
    assert label[z, row, col] > 0, f"top finding at slice {z} ({row}, {col}) is outside the label"
    # the SR draws it there: a POINT on that image, (column, row) with the pixel's top-left corner at 0.0
    first = summary["findings"][0]
    assert first["graphic_type"] == "POINT" and first["image_uid"] == top.image.sop_instance_uid
    assert first["graphic_data"][0] == pytest.approx([top.column + 0.5, top.row + 0.5], abs=0.06)
    # the volume's ends no longer score high (their context is their own slice repeated)
    scores = analysis.slice_scores
    assert scores[0] < model.card.threshold and scores[-1] < model.card.threshold, (scores[0], scores[-1])


def anatomy_series(tmp: Path, nodules: list[tuple[int, int, int]], name: str) -> list[Path]:
    """lung1 slices 4-19 (training anatomy, no real nodule), with malignant nodules drawn at (z, y, x)."""
    from node.sample import load_lung1, write_ct_series
    from training.synthetic import NoduleTraits, insert_nodule

    volume, spacing, origin, _ = load_lung1(None)
    block = volume[4:20].astype(np.float32)
    rng = np.random.default_rng(5)
    for z, y, x in nodules:
        insert_nodule(block, spacing, (float(z), float(y), float(x)), NoduleTraits(16.0, "solid", "spiculated", "none"),
                      rng)
    hu = np.clip(np.rint(block), -1024, 3071).astype(np.int16)
    return write_ct_series(hu, spacing, tmp / name, first_position=origin)


def lung_points(count: int) -> list[tuple[int, int, int]]:
    """Places well inside lung1's lungs (slices 4-19), far apart."""
    from node.sample import load_lung1
    from training.synthetic import lung_mask

    volume, _, _, _ = load_lung1(None)
    lung = lung_mask(volume[4:20].astype(np.float32), 4, outside_air=True)
    deep = lung.copy()
    for _ in range(3):  # well inside: three coarse voxels (12 px) from any edge
        deep[:, 1:-1, 1:-1] &= lung[:, :-2, 1:-1] & lung[:, 2:, 1:-1] & lung[:, 1:-1, :-2] & lung[:, 1:-1, 2:]
        lung = deep.copy()
    points: list[tuple[int, int, int]] = []
    for z in (5, 11):
        zz, yy, xx = np.nonzero(deep[z : z + 1])
        order = np.argsort(xx) if not points else np.argsort(-xx)  # one in each lung
        j = order[len(order) // 10]
        points.append((z, int(yy[j]) * 4 + 2, int(xx[j]) * 4 + 2))
    return points[:count]


def test_no_nodule_gives_a_negative_sr_without_coordinates(model, tmp_path):
    files = anatomy_series(tmp_path, [], "none")
    _, _, result, summary = result_and_sr(model, files, tmp_path)
    assert not result.positive, result.summary()
    assert (summary["qualitative"], summary["nodule"], summary["findings"]) == ("negative", "absent", [])


def test_two_nodules_give_two_findings(model, tmp_path):
    points = lung_points(2)
    files = anatomy_series(tmp_path, points, "two")
    vol, _, result, summary = result_and_sr(model, files, tmp_path)
    assert result.positive and len(result.findings) == 2, result.summary()
    dz, dy, dx = vol.spacing
    for z, y, x in points:  # each inserted nodule is found within its radius (8 mm), once
        dist = [np.sqrt(((f.image.slice_index - z) * dz) ** 2 + ((f.row - y) * dy) ** 2 + ((f.column - x) * dx) ** 2)
                for f in result.findings]
        assert min(dist) <= 8.0, (points, [(f.image.slice_index, f.row, f.column) for f in result.findings])
    assert len(summary["findings"]) == 2
