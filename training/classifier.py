"""The second stage: a patch CNN that scores the first stage's candidates at the source's resolution.

The first stage (``training.models``, the bundled 2.0.0 network) sees a slice
at 128 x 128, 2.3 mm per pixel on a 512 x 0.57 mm slice: enough to point at a
nodule, too coarse to read what the labelling rule reads (spicules 1.4-2.4 mm
wide, a calcified centre a few mm across, the difference between 8 and 10 mm).
The second stage looks at each of the first stage's candidates
(:func:`node.preprocessing.locate_peaks`, the node's own function) through a
patch cut from the source HU at a fixed scale in mm
(:func:`node.preprocessing.prepare_patches`), on three planes along z and in
two windows (lung, and soft tissue, where calcium and soft tissue differ), and
gives each candidate its own probability of being a malignant nodule. The
study score is the best candidate's (:func:`node.preprocessing.kept_candidates`,
:func:`node.preprocessing.slice_scores_of`), exactly as the node computes it.

Training samples, per training volume: the first stage's candidates, labelled
1 when within a malignant nodule's radius plus ``hit_slack_mm`` of its centre,
else 0 (benign nodules, vessels, anything else); plus jittered copies of every
nodule's centre (malignant ones positive, benign ones negative), so the second
stage learns the nodules the first stage ranks low too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from node.preprocessing import (
    LUNG_WINDOW,
    SOFT_TISSUE_WINDOW,
    Peak,
    kept_candidates,
    locate_peaks,
    prepare_patches,
    prepare_slices,
    search_slices,
    slice_scores_of,
)
from training.data import MALIGNANT, Case, CaseGeometry, Source
from training.errors import ExportError

logger = logging.getLogger(__name__)

INPUT_NAME = "patches"
OUTPUT_NAME = "p_candidate"
#: The planes of a patch along z, from the candidate (mm): one slice either side at 5 mm.
Z_OFFSETS_MM = (-5.0, 0.0, 5.0)
WINDOWS = (LUNG_WINDOW, SOFT_TISSUE_WINDOW)
CHANNELS = len(Z_OFFSETS_MM) * len(WINDOWS)
#: Non-maximum suppression of the candidates (the node's finding distance).
CANDIDATE_DISTANCE_MM = 15.0


def card_entry(size: int, mm_per_pixel: float, candidates: int, search_mm: float = 0.0) -> dict[str, Any]:
    """The card's ``classifier`` object (``node.model_card.Classifier``)."""
    return {"input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "size": size, "mm_per_pixel": mm_per_pixel,
            "z_offsets_mm": list(Z_OFFSETS_MM), "windows": [list(w) for w in WINDOWS], "candidates": candidates,
            "min_distance_mm": CANDIDATE_DISTANCE_MM, "search_mm": search_mm}


@dataclass
class CandidateSet:
    """Patches of one split: the first stage's candidates (and, for training, copies of the nodules)."""

    x: np.ndarray  # float32 (n, size, size, CHANNELS)
    y: np.ndarray  # float32 (n,): 1 on a malignant nodule
    case_index: np.ndarray  # (n,) index into cases
    candidate: np.ndarray  # bool (n,): a first-stage candidate (what the node scores), not a nodule copy
    peaks: list[list[Peak]]  # per case, its candidates, best first
    pairs: list[list[tuple[int, int]]]  # per case, (candidate, slice) of its candidate rows, in order
    cases: list[Case]
    geometry: list[CaseGeometry]
    depth: list[int]  # slices per case

    def __len__(self) -> int:
        return len(self.y)


def _distance_mm(centre: Sequence[float], z: float, y: float, x: float, spacing: Sequence[float]) -> float:
    return float(np.linalg.norm((np.asarray(centre, dtype=np.float64) - (z, y, x)) * np.asarray(spacing)))


def on_malignant(centre: Sequence[float], geometry: CaseGeometry, slack_mm: float) -> bool:
    """Whether a place (slice, row, column) lies within a malignant nodule's radius + ``slack_mm`` of its centre."""
    return any(n.label == MALIGNANT and _distance_mm(centre, n.z, n.y, n.x, geometry.spacing) <= n.diameter_mm / 2 + slack_mm
               for n in geometry.nodules)


def detector_outputs(session: Any, hu: np.ndarray, size: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    """The first stage's slice scores (z,) and score maps (z, h, w) of one volume, through ONNX Runtime."""
    from training.export import onnx_outputs

    out = onnx_outputs(session, prepare_slices(hu, size=size, context=context, hu_window=LUNG_WINDOW))
    if len(out) < 2:
        raise ExportError("the first stage has no score map: a classifier needs its candidates")
    return out[0][:, 0], out[1][..., 0]


def candidates_of(maps: np.ndarray, shape: tuple[int, int], spacing: tuple[float, float, float], size: int,
                  count: int) -> list[Peak]:
    """The first stage's ``count`` best candidates of a volume, as the node takes them."""
    return locate_peaks(maps, source_shape=shape, size=size, spacing=spacing, min_probability=0.0, max_peaks=count,
                        min_distance_mm=CANDIDATE_DISTANCE_MM)


def build_candidates(source: Source, cases: Sequence[Case], session: Any, *, size: int, context: int,
                     patch: int, mm_per_pixel: float, count: int, slack_mm: float, copies: int = 0,
                     search_mm: float = 0.0, seed: int = 0) -> CandidateSet:
    """Every case's candidates as patches; ``copies`` > 0 (training) adds jittered copies of its nodules.

    Each candidate is cut on its own slice and on those within ``search_mm``
    of it (:func:`node.preprocessing.search_slices`, as the node scores it).

    A malignant nodule gets ``copies`` patches, a benign one half as many (at
    least one): centred within a quarter of its diameter (at most 4 mm) of its
    centre in-plane, on the slice nearest a point within 0.4 slice of its
    centre along z.
    """
    rng = np.random.default_rng([seed, 31])
    xs, ys, owner, is_cand, peaks, pairs, geometry, depth = [], [], [], [], [], [], [], []
    for i, case in enumerate(cases):
        vol = source.load(case)
        g = CaseGeometry(vol.hu.shape[1:], vol.spacing, tuple(vol.nodules))
        _, maps = detector_outputs(session, vol.hu, size, context)
        found = candidates_of(maps, vol.hu.shape[1:], vol.spacing, size, count)
        searched = search_slices(found, vol.hu.shape[0], vol.spacing[0], search_mm)
        centres = [(float(k), found[j].row, found[j].column) for j, k in searched]
        labels = [on_malignant(c, g, slack_mm) for c in centres]
        n_found = len(centres)
        for n in vol.nodules if copies else ():
            for _ in range(copies if n.label == MALIGNANT else max(1, copies // 2)):
                reach = min(n.diameter_mm / 4, 4.0)
                dy, dx = rng.uniform(-reach, reach, 2) / np.asarray(vol.spacing[1:])
                z = float(np.clip(round(n.z + rng.uniform(-0.4, 0.4)), 0, vol.hu.shape[0] - 1))
                centres.append((z, n.y + dy, n.x + dx))
                labels.append(on_malignant(centres[-1], g, slack_mm))
        xs.append(prepare_patches(vol.hu, centres, spacing=vol.spacing, size=patch, mm_per_pixel=mm_per_pixel,
                                  z_offsets_mm=Z_OFFSETS_MM, windows=WINDOWS))
        ys.append(np.asarray(labels, dtype=np.float32))
        owner.append(np.full(len(centres), i))
        is_cand.append(np.arange(len(centres)) < n_found)
        peaks.append(found)
        pairs.append(searched)
        geometry.append(g)
        depth.append(int(vol.hu.shape[0]))
    x = np.concatenate(xs) if xs else np.zeros((0, patch, patch, CHANNELS), np.float32)
    return CandidateSet(x, np.concatenate(ys) if ys else np.zeros(0, np.float32),
                        np.concatenate(owner) if owner else np.zeros(0, int),
                        np.concatenate(is_cand) if is_cand else np.zeros(0, bool), peaks, pairs, list(cases),
                        geometry, depth)


def refined(s: CandidateSet, probabilities: np.ndarray) -> list[list[Peak]]:
    """Per case, its candidates with the second stage's probabilities, best first (as the node reports them)."""
    out = []
    for i, found in enumerate(s.peaks):
        rows = np.flatnonzero((s.case_index == i) & s.candidate)
        out.append(kept_candidates(found, s.pairs[i], probabilities[rows], s.geometry[i].spacing, CANDIDATE_DISTANCE_MM))
    return out


def study_scores(per_case: Sequence[Sequence[Peak]]) -> np.ndarray:
    """A two-stage study score: its best candidate's probability (0 with none), as the node's ``max``."""
    return np.array([max((p.probability for p in peaks), default=0.0) for peaks in per_case])


def slice_scores(s: CandidateSet, per_case: Sequence[Sequence[Peak]], case_index: np.ndarray,
                 slice_index: np.ndarray) -> np.ndarray:
    """The two-stage slice score of every row of a slice set (its case and slice), as the node computes it."""
    by_case = [slice_scores_of(peaks, d) for peaks, d in zip(per_case, s.depth)]
    return np.array([by_case[c][k] for c, k in zip(case_index, slice_index)], dtype=np.float32)


def build_classifier(patch: int, channels: int = CHANNELS) -> Any:
    """Four double-conv blocks (24/48/96/128, BatchNorm, ReLU, 2x2 max-pool between), average and max pooled,
    Dense 64, Dense 1 sigmoid: about 0.44 M parameters at 64 x 64 x 6."""
    import keras

    L = keras.layers

    def block(x: Any, filters: int) -> Any:
        for _ in range(2):
            x = L.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = L.ReLU()(L.BatchNormalization()(x))
        return x

    inp = keras.Input((patch, patch, channels), name=INPUT_NAME)
    x = inp
    for i, filters in enumerate((24, 48, 96, 128)):
        x = block(x, filters)
        if i < 3:
            x = L.MaxPool2D()(x)
    x = L.Concatenate()([L.GlobalAveragePooling2D()(x), L.GlobalMaxPooling2D()(x)])
    x = L.Dense(64, activation="relu")(L.Dropout(0.3)(x))
    out = L.Dense(1, activation="sigmoid", name=OUTPUT_NAME)(x)
    return keras.Model(inp, out, name="classifier")


def _dataset(s: CandidateSet, batch: int, seed: int) -> Any:
    """Shuffled, class-weighted, augmented: rotations by 90 degrees, flips in-plane and along z, contrast."""
    import tensorflow as tf

    pos = float(s.y.sum())
    w_pos, w_neg = len(s.y) / (2 * max(pos, 1.0)), len(s.y) / (2 * max(len(s.y) - pos, 1.0))
    k = len(WINDOWS)

    def augment(x: Any, y: Any) -> Any:
        x = tf.image.rot90(x, tf.random.uniform([], 0, 4, tf.int32))
        x = tf.image.random_flip_left_right(x)
        planes = [x[..., i * k : (i + 1) * k] for i in range(len(Z_OFFSETS_MM))]
        x = tf.where(tf.random.uniform([]) < 0.5, tf.concat(planes[::-1], -1), x)
        x = x * tf.random.uniform([], 0.95, 1.05) + tf.random.uniform([], -0.03, 0.03)
        return tf.clip_by_value(x, 0.0, 1.0), y, tf.where(y > 0.5, w_pos, w_neg)

    ds = tf.data.Dataset.from_tensor_slices((s.x, s.y)).shuffle(len(s.y), seed=seed, reshuffle_each_iteration=True)
    return ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(tf.data.AUTOTUNE)


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=256, verbose=0))[:, 0] if len(x) else np.zeros(0, np.float32)


def train_classifier(train: CandidateSet, val: CandidateSet, *, patch: int, epochs: int, learning_rate: float,
                     lr_drop_epoch: int, batch_size: int, seed: int) -> tuple[Any, list[dict[str, float]], int]:
    """Train; keep the epoch with the best validation study AUC (ties: candidate AUC). Returns (model, history, best)."""
    import keras

    from training.metrics import roc_auc

    model = build_classifier(patch)
    model.compile(keras.optimizers.Adam(learning_rate), "binary_crossentropy")
    ds = _dataset(train, batch_size, seed)
    val_y = np.array([c.label for c in val.cases])
    history: list[dict[str, float]] = []
    best, best_key, best_weights = 0, (-1.0, -1.0), None
    for epoch in range(1, epochs + 1):
        if epoch == lr_drop_epoch:
            model.optimizer.learning_rate.assign(learning_rate / 3)
        t0 = time.perf_counter()
        loss = float(model.fit(ds, epochs=1, verbose=0).history["loss"][0])
        p = predict(model, val.x)
        study_auc = roc_auc(val_y, study_scores(refined(val, p)))
        cand_auc = roc_auc(val.y[val.candidate], p[val.candidate]) if val.candidate.any() else float("nan")
        logs = {"epoch": epoch, "loss": loss, "val_study_auc": study_auc, "val_candidate_auc": cand_auc,
                "seconds": round(time.perf_counter() - t0, 1)}
        history.append(logs)
        logger.info("classifier epoch %d/%d: loss %.4f val study AUC %.4f candidate AUC %.4f (%.0f s)", epoch, epochs,
                    loss, study_auc, cand_auc, logs["seconds"])
        key = (study_auc, cand_auc if np.isfinite(cand_auc) else -1.0)
        if key > best_key:
            best, best_key, best_weights = epoch, key, model.get_weights()
    if best_weights is not None:
        model.set_weights(best_weights)
        logger.info("classifier: kept the weights of epoch %d (validation study AUC %.4f)", best, best_key[0])
    return model, history, best


def export_classifier(model: Any, path: Path, *, patch: int, opset: int) -> dict[str, Any]:
    """The classifier alone as ONNX: input ``patches`` [N, patch, patch, CHANNELS], output ``p_candidate`` [N, 1]."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec([None, patch, patch, CHANNELS], tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def serve(patches: Any) -> dict[str, Any]:
        return {OUTPUT_NAME: model(patches, training=False)}

    start = time.perf_counter()
    try:
        tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset, output_path=str(path))
    except Exception as exc:  # tf2onnx raises many kinds; name the step
        raise ExportError(f"tf2onnx conversion of the classifier to {path} failed: {exc}") from exc
    return {"seconds": round(time.perf_counter() - start, 2), "bytes": path.stat().st_size}


def merge(detector: Path, classifier: Path, out: Path) -> dict[str, Any]:
    """One graph holding both stages side by side: inputs (slices, patches), outputs (p_malignant, score_map,
    p_candidate). The classifier's internal names get a prefix so nothing collides."""
    import onnx
    from onnx import compose

    first, second = onnx.load(str(detector)), onnx.load(str(classifier))
    second = compose.add_prefix(second, "classifier/", rename_inputs=False, rename_outputs=False)
    merged = compose.merge_models(first, second, io_map=[], producer_name="ainode training",
                                  doc_string="ainode lung CT: detector (slices -> p_malignant, score_map) and "
                                             "classifier (patches -> p_candidate)")
    onnx.checker.check_model(merged)
    onnx.save(merged, str(out))
    inputs = [i.name for i in merged.graph.input]
    outputs = [o.name for o in merged.graph.output]
    logger.info("merged %s and %s into %s: inputs %s, outputs %s", detector.name, classifier.name, out, inputs, outputs)
    return {"inputs": inputs, "outputs": outputs, "bytes": out.stat().st_size}
