"""The check on real anatomy: the exported model over the whole lung1 volume.

lung1's nodule label (``lung1_label.nrrd``) is read here, for scoring only; the
training set never uses it, and its anatomy excludes the slices that hold the
tumour (see :mod:`training.synthetic`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from node.preprocessing import LUNG_WINDOW, Peak, locate_peaks, prepare_slices, score_candidates, slice_scores_of
from training.data import read_nrrd_hu
from training.detection import MIN_DISTANCE_MM
from training.export import onnx_outputs, onnx_session
from training.metrics import aggregate

logger = logging.getLogger(__name__)

#: Where lung1's labelled nodule is when the label file is not beside the image.
LUNG1_NODULE_SLICES = (32, 33, 34)


def lung1_label(image_path: Path) -> np.ndarray | None:
    """``lung1_label.nrrd`` beside the image as a bool mask (z, y, x), or None when it is not there."""
    label = image_path.with_name("lung1_label.nrrd")
    if not label.is_file():
        return None
    mask, _ = read_nrrd_hu(label)
    return mask > 0


def lung1_nodule_slices(image_path: Path) -> list[int]:
    """Slices with nodule voxels in ``lung1_label.nrrd`` beside the image, else :data:`LUNG1_NODULE_SLICES`."""
    mask = lung1_label(image_path)
    if mask is None:
        return list(LUNG1_NODULE_SLICES)
    return [int(k) for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))]


def top_finding(maps: np.ndarray, mask: np.ndarray | None, source_shape: tuple[int, int],
                spacing: tuple[float, float, float], size: int, threshold: float) -> dict[str, Any]:
    """The volume's best finding by :func:`locate_peaks` (as the node), and where it lies against the label."""
    peaks = locate_peaks(maps, source_shape=source_shape, size=size, spacing=spacing,
                         min_probability=0.0, max_peaks=5, min_distance_mm=MIN_DISTANCE_MM)
    return finding_report(peaks, mask, spacing, threshold)


def finding_report(peaks: Sequence[Peak], mask: np.ndarray | None, spacing: tuple[float, float, float],
                   threshold: float) -> dict[str, Any]:
    """The best of ``peaks`` (best first), the next four, and where the best lies against the label."""
    peaks = list(peaks)[:5]
    if not peaks:
        return {"found": False}
    p = peaks[0]
    out: dict[str, Any] = {
        "found": True,
        "slice": p.slice,
        "row": round(p.row, 1),
        "column": round(p.column, 1),
        "probability": round(p.probability, 4),
        "above_threshold": bool(p.probability >= threshold),
        "next_findings": [{"slice": q.slice, "row": round(q.row, 1), "column": round(q.column, 1),
                           "probability": round(q.probability, 4)} for q in peaks[1:]],
    }
    if mask is not None:
        r, c = int(round(p.row)), int(round(p.column))
        inside = bool(0 <= r < mask.shape[1] and 0 <= c < mask.shape[2] and mask[p.slice, r, c])
        zz, yy, xx = np.nonzero(mask)
        centroid = np.array([zz.mean(), yy.mean(), xx.mean()])
        sp = np.asarray(spacing)
        out.update(
            inside_label=inside,
            label_centroid=[round(float(v), 1) for v in centroid],
            distance_to_label_centroid_mm=round(float(np.linalg.norm((np.array([p.slice, p.row, p.column])
                                                                       - centroid) * sp)), 1),
        )
    return out


def evaluate_lung1(onnx_path: Path, image_path: Path, *, size: int, context: int, aggregation: str,
                   threshold: float, training_slices: tuple[int, int],
                   classifier: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every lung1 slice with the ONNX model: top slice, end slices, and (with a map) the top finding.

    With a ``classifier`` (the card's entry) the model is two-stage: its
    candidates are scored by the classifier, and slice scores and the top
    finding are the node's (:func:`node.preprocessing.slice_scores_of`).
    """
    hu, spacing = read_nrrd_hu(image_path)
    x = prepare_slices(hu, size=size, context=context, hu_window=LUNG_WINDOW)
    session = onnx_session(onnx_path)
    outputs = onnx_outputs(session, x, input_name=session.get_inputs()[0].name,
                           output_names=[o.name for o in session.get_outputs()][:2])
    scores = outputs[0][:, 0]
    peaks: list[Peak] | None = None
    if classifier:
        c = classifier
        found = locate_peaks(outputs[1][..., 0], source_shape=hu.shape[1:], size=size, spacing=spacing,
                             min_probability=0.0, max_peaks=c["candidates"], min_distance_mm=c["min_distance_mm"])
        peaks = score_candidates(
            hu, found, lambda x: onnx_outputs(session, x, input_name=c["input_name"], output_names=[c["output_name"]])[0],
            spacing=spacing, size=c["size"], mm_per_pixel=c["mm_per_pixel"], z_offsets_mm=c["z_offsets_mm"],
            windows=c["windows"], search_mm=c.get("search_mm", 0.0), min_distance_mm=c["min_distance_mm"])
        scores = slice_scores_of(peaks, hu.shape[0])
    nodule = lung1_nodule_slices(image_path)
    order = np.argsort(-scores, kind="stable")
    top = int(order[0])
    rank = int(min(np.flatnonzero(np.isin(order, nodule)))) + 1
    study = aggregate(scores, aggregation)
    result = {
        "volume": "pyradiomics lung1 (real chest CT, NSCLC; 48 slices, 0.57 x 0.57 x 5 mm)",
        "nodule_slices": nodule,
        "nodule_label_used_in_training": False,
        "anatomy_slices_used_in_training": f"{training_slices[0]}-{training_slices[1] - 1}",
        "top_slice": top,
        "top_slice_in_nodule": top in nodule,
        "top_slice_score": round(float(scores[top]), 4),
        "best_nodule_slice_rank": rank,
        "nodule_slice_scores": {str(k): round(float(scores[k]), 4) for k in nodule},
        "study_score": round(study, 4),
        "study_positive_at_threshold": bool(study >= threshold),
        "top5_slices": [int(k) for k in order[:5]],
        "end_slice_scores": {"0": round(float(scores[0]), 4), str(len(scores) - 1): round(float(scores[-1]), 4)},
        "end_slices_below_threshold": bool(max(scores[0], scores[-1]) < threshold),
        "threshold": round(float(threshold), 6),
        "slice_scores": [round(float(v), 4) for v in scores],
    }
    logger.info("lung1: top slice %d (score %.3f), nodule slices %s, best nodule slice rank %d, study score %.3f; "
                "end slices %.3f / %.3f (threshold %.3f)", top, scores[top], nodule, rank, study, scores[0],
                scores[-1], threshold)
    if peaks is not None:
        detector = outputs[0][:, 0]
        result["two_stage"] = ("slice scores are the classifier's best candidate on each slice (0 where the "
                               "detector pointed at nothing)")
        result["detector_end_slice_scores"] = {"0": round(float(detector[0]), 4),
                                               str(len(detector) - 1): round(float(detector[-1]), 4)}
        result["detector_slice_scores"] = [round(float(v), 4) for v in detector]
        finding = finding_report(peaks, lung1_label(image_path), spacing, threshold)
    elif len(outputs) > 1:
        finding = top_finding(outputs[1][..., 0], lung1_label(image_path), hu.shape[1:], spacing, size, threshold)
    if len(outputs) > 1:
        finding["label_used_in_training"] = False
        result["top_finding"] = finding
        logger.info("lung1 top finding: %s", {k: v for k, v in finding.items() if k != "next_findings"})
    return result
