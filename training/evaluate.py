"""The check on real anatomy: the exported model over the whole lung1 volume.

lung1's nodule label (``lung1_label.nrrd``) is read here, for scoring only; the
training set never uses it, and its anatomy excludes the slices that hold the
tumour (see :mod:`training.synthetic`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from node.preprocessing import LUNG_WINDOW, prepare_slices
from training.data import read_nrrd_hu
from training.export import onnx_predict, onnx_session
from training.metrics import aggregate

logger = logging.getLogger(__name__)

#: Where lung1's labelled nodule is when the label file is not beside the image.
LUNG1_NODULE_SLICES = (32, 33, 34)


def lung1_nodule_slices(image_path: Path) -> list[int]:
    """Slices with nodule voxels in ``lung1_label.nrrd`` beside the image, else :data:`LUNG1_NODULE_SLICES`."""
    label = image_path.with_name("lung1_label.nrrd")
    if not label.is_file():
        return list(LUNG1_NODULE_SLICES)
    mask, _ = read_nrrd_hu(label)
    return [int(k) for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))]


def evaluate_lung1(onnx_path: Path, image_path: Path, *, size: int, context: int, aggregation: str,
                   threshold: float, training_slices: tuple[int, int]) -> dict[str, Any]:
    """Score every lung1 slice with the ONNX model; does the top slice fall in the labelled nodule?"""
    hu, _ = read_nrrd_hu(image_path)
    x = prepare_slices(hu, size=size, context=context, hu_window=LUNG_WINDOW)
    scores = onnx_predict(onnx_session(onnx_path), x)
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
        "slice_scores": [round(float(v), 4) for v in scores],
    }
    logger.info("lung1: top slice %d (score %.3f), nodule slices %s, best nodule slice rank %d, study score %.3f",
                top, scores[top], nodule, rank, study)
    return result
