"""One training run: data -> split -> train -> metrics -> ONNX -> parity -> card (-> install).

Artefacts in ``out_dir``: ``metrics.json``, ``roc.png``, ``confusion.png``,
``history.json``, ``<name>.keras``, ``<name>.onnx`` and ``<name>.card.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from node.preprocessing import LUNG_WINDOW, PREPROCESSING_VERSION
from training import export as ex
from training.config import AGGREGATIONS, RunConfig
from training.data import (
    IGNORE,
    MALIGNANT,
    CachedSource,
    DicomFolderSource,
    SliceSet,
    Source,
    build_patches,
    build_slices,
    default_lung1_path,
    split_cases,
)
from training.errors import ConfigError
from training.detection import detection_metrics
from training.export import tf_outputs
from training.metrics import binary_metrics, plot_confusion, plot_roc, roc_auc, study_scores, youden_threshold
from training.models import INPUT_NAME, MAP_OUTPUT_NAME, OUTPUT_NAME, build_model, has_map, logit_view
from training.synthetic import RULE, SyntheticSource

logger = logging.getLogger(__name__)

DEMO_USE = "semi-synthetic, demo only, not for clinical use"
DEMO_MODEL = "demo model, not for clinical use"


@dataclass
class RunResult:
    """Where the artefacts went and the headline numbers."""

    out_dir: Path
    onnx_path: Path
    card_path: Path
    metrics_path: Path
    plots: list[Path]
    installed: Path | None
    metrics: dict[str, Any]
    evaluation: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def make_source(cfg: RunConfig, lung1: Path | None = None, **synthetic: Any) -> Source:
    """The configured data source; ``synthetic``: more :class:`SyntheticSource` options."""
    d = cfg.data
    if d.source == "synthetic":
        return SyntheticSource(volumes=d.volumes, slices_per_volume=d.slices_per_volume, seed=cfg.seed,
                               lung1_path=lung1 or (Path(d.lung1) if d.lung1 else default_lung1_path()),
                               lung1_slices=d.lung1_slices, pydicom_ct_share=d.pydicom_ct_share,
                               thin_slices=d.thin_slices, **synthetic)
    if d.source == "dicom":
        if not d.root or not d.labels:
            raise ConfigError("data.root and data.labels are required for source 'dicom'")
        return DicomFolderSource(d.root, d.labels)
    if not d.lidc_images:
        raise ConfigError("data.lidc_images is required for source 'lidc'")
    from training.lidc import LidcSource

    return LidcSource(d.lidc_images, d.lidc_max_scans)


class EpochLog:
    """One record per epoch (train loss, validation AUCs and CPM); keeps the weights of the best epoch.

    The best epoch has the highest mean of the validation figures it has:
    study AUC, slice AUC and (with a map) CPM.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.history: list[dict[str, float]] = []
        self.best_score, self.best_epoch, self.best_weights = -1.0, 0, None

    def record(self, model: Any, logs: dict[str, float]) -> None:
        epoch = len(self.history) + 1  # running count across training stages
        logs = dict(logs, epoch=epoch)
        figures = [logs[k] for k in ("val_study_auc", "val_slice_auc", "val_cpm") if np.isfinite(logs.get(k, np.nan))]
        logs["val_selection"] = float(np.mean(figures)) if figures else float("nan")
        self.history.append(logs)
        logger.info("epoch %d/%d: loss %.4f (slice %.4f, map %.4f) val study AUC %.4f slice AUC %.4f CPM %.4f "
                    "(%.1f s)", epoch, self.epochs, logs["loss"], logs["slice_loss"], logs["map_loss"],
                    logs["val_study_auc"], logs["val_slice_auc"], logs.get("val_cpm", float("nan")), logs["seconds"])
        if logs["val_selection"] > self.best_score:
            self.best_score, self.best_epoch = logs["val_selection"], epoch
            self.best_weights = model.get_weights()

    def restore(self, model: Any) -> None:
        if self.best_weights is not None:
            model.set_weights(self.best_weights)
            logger.info("kept the weights of epoch %d (validation selection figure %.4f)", self.best_epoch,
                        self.best_score)


def _class_weights(y: np.ndarray, enabled: bool) -> dict[str, float]:
    n_pos, n_neg = float((y == 1).sum()), float((y == 0).sum())
    if enabled and n_pos and n_neg:
        return {"benign": len(y) / (2 * n_neg), "malignant": len(y) / (2 * n_pos)}
    return {"benign": 1.0, "malignant": 1.0}


def _train_dataset(s: SliceSet, cfg: RunConfig, patch: int, with_target: bool) -> tuple[Any, dict[str, float]]:
    """tf.data pipeline of (x, y, weight, target): shuffle, class weights, augmentation, batching.

    The map target travels with the image through flips and crops. Volume-end
    augmentation: with probability ``train.volume_end_p`` a sample's context
    channels are clipped as ``prepare_slices`` clips them at a volume's first
    or last slices (the neighbour beyond the end repeats the last one there),
    so repeated context is never a cue. ``patch``
    > 0: ``s`` holds patches with a jitter margin, cropped here to ``patch`` pixels.
    """
    import tensorflow as tf

    y = s.y
    weights = _class_weights(y, cfg.train.class_weights)
    w = np.where(y == 1, weights["malignant"], weights["benign"]).astype(np.float32)
    target = s.target if with_target and s.target is not None else np.zeros(s.x.shape[:3] + (1,), np.float32)
    ds = tf.data.Dataset.from_tensor_slices((s.x, y, w, target))
    ds = ds.shuffle(len(y), seed=cfg.seed, reshuffle_each_iteration=True)
    pad, channels = cfg.train.jitter, s.x.shape[-1]
    out = patch or cfg.model.size  # patches arrive with the jitter margin already around them

    context = (channels - 1) // 2
    end_p = cfg.train.volume_end_p

    def volume_end(x: Any) -> Any:
        """With probability ``end_p``, show the slice as if it were near a volume's end (as prepare_slices does)."""
        if not context or not end_p:
            return x
        offsets = tf.range(-context, context + 1)
        edge = tf.random.uniform([], 0, context, dtype=tf.int32)  # slices between this one and the end
        clipped = tf.where(tf.random.uniform([]) < 0.5, tf.maximum(offsets, -edge), tf.minimum(offsets, edge))
        ended = tf.gather(x, clipped + context, axis=-1)
        return tf.where(tf.random.uniform([]) < end_p, ended, x)

    def augment(x: Any, label: Any, weight: Any, t: Any) -> Any:
        x = volume_end(x)
        both = tf.image.random_flip_left_right(tf.concat([x, t], axis=-1))
        if not patch:
            both = tf.pad(both, [[pad, pad], [pad, pad], [0, 0]], mode="SYMMETRIC")
        both = tf.image.random_crop(both, [out, out, channels + 1])
        x, t = both[..., :channels], both[..., channels:]
        x = x * tf.random.uniform([], 0.95, 1.05) + tf.random.uniform([], -0.03, 0.03)
        return tf.clip_by_value(x, 0.0, 1.0), label, weight, t

    def centre(x: Any, label: Any, weight: Any, t: Any) -> Any:
        return x[pad : pad + out, pad : pad + out], label, weight, t[pad : pad + out, pad : pad + out]

    if cfg.train.augment:
        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    elif patch:
        ds = ds.map(centre, num_parallel_calls=tf.data.AUTOTUNE)
    if cfg.train.steps_per_epoch:
        ds = ds.repeat()
    ds = ds.batch(cfg.train.batch_size).prefetch(tf.data.AUTOTUNE)
    return ds, weights


def focal_map_loss(cells: Any, logits: Any) -> Any:
    """CenterNet's penalty-reduced focal loss on the map, normalised by the number of nodule centres.

    A centre cell is a local (3 x 3) maximum of the pooled target above 0.5
    (the cell holding a malignant nodule's centre); it is pushed to 1 with
    weight (1 - p)^2. Every other cell is pushed to 0 with weight
    p^2 (1 - target)^4, so cells next to a centre are hardly punished and easy
    background costs almost nothing.
    """
    import tensorflow as tf

    centre = tf.cast((cells >= tf.nn.max_pool2d(cells, 3, 1, "SAME")) & (cells > 0.5), tf.float32)
    p = tf.sigmoid(logits)
    log_p, log_not_p = tf.math.log_sigmoid(logits), tf.math.log_sigmoid(-logits)
    pos = -centre * tf.square(1 - p) * log_p
    neg = -(1 - centre) * tf.pow(1 - cells, 4) * tf.square(p) * log_not_p
    return (tf.reduce_sum(pos) + tf.reduce_sum(neg)) / tf.maximum(tf.reduce_sum(centre), 1.0)


def _make_step(model: Any, optimizer: Any, cfg: RunConfig, use_map: bool) -> Any:
    """One optimisation step: weighted slice BCE (+ the map loss for a model with a map, when ``use_map``)."""
    import tensorflow as tf

    logits_model = logit_view(model)
    stride, pos_w = cfg.model.map_stride, cfg.train.map_pos_weight
    map_w = cfg.train.map_loss_weight if use_map else 0.0
    focal = cfg.train.map_loss == "focal"

    @tf.function
    def step(x: Any, y: Any, w: Any, t: Any) -> Any:
        with tf.GradientTape() as tape:
            if logits_model is not None:
                logits = logits_model(x, training=True)  # (b, h, w, 1)
                slice_logit = tf.reduce_max(logits, axis=[1, 2, 3])
                slice_loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=slice_logit)
                cells = tf.nn.max_pool2d(t, ksize=stride, strides=stride, padding="VALID")
                if focal:
                    map_loss = focal_map_loss(cells, logits)
                else:
                    per_cell = tf.nn.sigmoid_cross_entropy_with_logits(labels=cells, logits=logits)
                    map_loss = tf.reduce_mean(per_cell * (1.0 + (pos_w - 1.0) * cells))
            else:
                p = tf.clip_by_value(model(x, training=True)[:, 0], 1e-7, 1 - 1e-7)
                slice_loss = -(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p))
                map_loss = tf.constant(0.0)
            slice_loss = tf.reduce_mean(w * slice_loss)
            loss = slice_loss + map_w * map_loss
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss, slice_loss, map_loss

    return step


def predict(model: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(slice probabilities (n,), score maps (n, h, w, 1) or None) from the Keras model."""
    out = tf_outputs(model, x, batch=128)
    return out[0][:, 0], (out[1] if len(out) > 1 else None)


def _knows_positions(s: SliceSet) -> bool:
    """Whether the set's source gave malignant nodule positions (the map's target, the FROC's targets)."""
    return any(n.label == MALIGNANT for g in s.geometry for n in g.nodules)


def _validate(model: Any, val: SliceSet, cfg: RunConfig) -> dict[str, float]:
    scores, maps = predict(model, val.x)
    keep = val.y != IGNORE
    val_y = np.array([c.label for c in val.cases])
    study = study_scores(scores, val.case_index, len(val.cases), cfg.export.aggregation)
    out = {"val_study_auc": roc_auc(val_y, study), "val_slice_auc": roc_auc(val.y[keep], scores[keep])}
    if maps is not None and _knows_positions(val):
        out["val_cpm"] = detection_metrics(val, maps, cfg.model.size)["cpm"]
    return out


def _fit(model: Any, stages: list[tuple[SliceSet, int, int, float]], cfg: RunConfig, val: SliceSet,
         log: EpochLog) -> dict[str, float]:
    """Train through ``stages`` of (data, patch size or 0, epochs, learning rate); keep the best epoch."""
    import keras

    class_weights: dict[str, float] = {}
    with_target = has_map(model) and _knows_positions(stages[-1][0])
    if has_map(model) and not with_target:
        logger.warning("the source gives no nodule positions: the score map is trained through the slice loss only")
    for data, patch, epochs, lr in stages:
        logger.info("training %d epochs on %s, learning rate %.1e", epochs,
                    f"{patch}-pixel patches" if patch else "whole slices", lr)
        optimizer = keras.optimizers.Adam(lr)
        step = _make_step(model, optimizer, cfg, with_target)
        ds, class_weights = _train_dataset(data, cfg, patch, with_target)
        if cfg.train.steps_per_epoch:
            ds = ds.take(cfg.train.steps_per_epoch)
        for _ in range(epochs):
            t0 = time.perf_counter()
            sums, n = np.zeros(3), 0
            for x, y, w, t in ds:
                sums += [float(v) for v in step(x, y, w, t)]
                n += 1
            logs = dict(zip(("loss", "slice_loss", "map_loss"), (sums / max(n, 1)).tolist()))
            logs.update(_validate(model, val, cfg))
            logs["seconds"] = round(time.perf_counter() - t0, 2)
            log.record(model, logs)
    log.restore(model)
    return class_weights


def _card_detection(d: dict[str, Any], stride: int) -> dict[str, Any]:
    """The card's detection figures: FROC per FP rate, CPM, localisation error and how they were counted."""
    return {
        "froc_sensitivity_at_fp_per_scan": d["sensitivity_at_fp_per_scan"],
        "froc_cpm": d["cpm"],
        "localisation_error_mm": d["localisation_error_mm"],
        "detection": {
            "targets": f"{d['targets']} malignant nodules in {d['scans']} test scans",
            "hit_rule": d["hit_rule"],
            "benign_hits_ignored": d["benign_hits_ignored"],
            "candidates": d["candidates"],
            "map_stride": stride,
        },
    }


def _extra_volumes_described(cfg: RunConfig) -> str:
    """What the card's training data says of the second stage's extra volumes (none: nothing)."""
    c = cfg.classifier
    if not c.extra_volumes:
        return ""
    first, last = cfg.data.volumes, cfg.data.volumes + c.extra_volumes - 1
    return (f" The second stage also trained on volumes {first}-{last} of the same generator (no split holds them)"
            + (f", {c.extra_irregular:.0%} of their nodules drawn irregular (angular, uneven, air inside, strands, "
               "some against the pleura; same traits, same label)" if c.extra_irregular else "") + ".")


def _card_first_stage(d: dict[str, Any], stride: int) -> dict[str, Any]:
    """A two-stage card's figures of its first stage alone: as a one-stage card has them (no FROC curve)."""
    out = {k: v for k, v in d.items() if k != "detection"}
    return dict(out, **(_card_detection(d["detection"], stride) if "detection" in d else {}))


def run(cfg: RunConfig, *, lung1: Path | None = None) -> RunResult:
    """Run the whole pipeline for ``cfg``; ``lung1`` overrides the lung1 NRRD path."""
    import keras
    import tensorflow as tf

    start = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)
    try:
        tf.config.experimental.enable_op_determinism()
    except (RuntimeError, AttributeError) as exc:  # pragma: no cover - depends on TF build
        logger.warning("op determinism not available: %s", exc)
    channels = 2 * cfg.model.context + 1

    # data
    source = make_source(cfg, lung1)
    parts = split_cases(source.cases(), cfg.split.val, cfg.split.test, cfg.seed)
    counts = {k: {"cases": len(v), "malignant": sum(c.label for c in v)} for k, v in parts.items()}
    logger.info("split by patient: %s", counts)
    t0 = time.perf_counter()
    common = dict(size=cfg.model.size, context=cfg.model.context, seed=cfg.seed, hu_window=LUNG_WINDOW)
    patches = None
    reuse = cfg.classifier.detector
    if cfg.train.patch and not reuse:
        cached = CachedSource(source, parts["train"])  # the training volumes serve patches and whole slices
        patches = build_patches(cached, parts["train"], patch=cfg.train.patch, jitter=cfg.train.jitter, **common)
        logger.info("%d training patches (%d malignant)", len(patches), int((patches.y == 1).sum()))
        train = build_slices(cached, parts["train"], max_negative_slices=cfg.data.max_negative_slices, **common)
        cached.clear()
    else:
        train = build_slices(source, parts["train"], max_negative_slices=cfg.data.max_negative_slices, **common)
    val = build_slices(source, parts["val"], keep_ignored=True, **common)
    test = build_slices(source, parts["test"], keep_ignored=True, **common)
    data_seconds = time.perf_counter() - t0
    for name, s in (("train", train), ("val", val), ("test", test)):
        counts[name].update(slices=len(s), malignant_slices=int((s.y == 1).sum()), ignored_slices=int((s.y == IGNORE).sum()))
    logger.info("slices ready in %.1f s: %s", data_seconds, counts)

    # train: optionally on patches first (the fully convolutional default only), then on whole slices
    two_stage = cfg.classifier.epochs > 0
    onnx_path = out_dir / f"{cfg.name}.onnx"
    detector_path = out_dir / f"{cfg.name}.detector.onnx" if two_stage else onnx_path
    log = EpochLog(0 if reuse else cfg.train.patch_epochs + cfg.train.epochs)
    t0 = time.perf_counter()
    reused_card: dict[str, Any] = {}
    if reuse:
        model, class_weights = None, {}
        reused_card = _reuse_detector(Path(reuse), detector_path, cfg)
    else:
        model = build_model(cfg.model.arch, None if cfg.train.patch else cfg.model.size, channels, cfg.model.map_stride)
        logger.info("model %s: %d parameters, input %s, outputs %s", cfg.model.arch, model.count_params(),
                    model.input_shape, [tuple(o.shape) for o in model.outputs])
        stages = ([(patches, cfg.train.patch, cfg.train.patch_epochs, cfg.train.learning_rate)] if patches else []) + [
            (train, 0, cfg.train.epochs, cfg.train.learning_rate / (3 if patches else 1))]
        class_weights = _fit(model, stages, cfg, val, log)
        del patches, stages
        model.save(out_dir / f"{cfg.name}.keras")
    train_seconds = time.perf_counter() - t0

    # the first stage's export (its parity against TensorFlow) and its scores, from the exported graph
    export_info = {"reused": reuse} if reuse else ex.export_onnx(model, detector_path, size=cfg.model.size,
                                                                 channels=channels, opset=cfg.export.opset)
    parity_info = ({"max_abs_diff": float(reused_card.get("metrics", {}).get("onnx_vs_tensorflow_max_abs_diff", 0.0)),
                    "reused": reuse, "passed": True, "measured": "when the reused first stage was exported (its card)"}
                   if reuse
                   else ex.parity(model, detector_path, test.x[:256], cfg.export.parity_tolerance))
    session = ex.onnx_session(detector_path)
    with_map = len(session.get_outputs()) > 1
    val_scores, val_maps = _detector_predict(session, val.x)
    test_scores, test_maps = _detector_predict(session, test.x)

    # threshold on validation study scores, metrics on test
    agg = cfg.export.aggregation
    val_y = np.array([c.label for c in val.cases])
    test_y = np.array([c.label for c in test.cases])
    val_study = study_scores(val_scores, val.case_index, len(val.cases), agg)
    test_study = study_scores(test_scores, test.case_index, len(test.cases), agg)
    threshold = youden_threshold(val_y, val_study)
    keep_v, keep_t = val.y != IGNORE, test.y != IGNORE
    slice_threshold = youden_threshold(val.y[keep_v], val_scores[keep_v])
    parameters = _parameters(detector_path)
    metrics: dict[str, Any] = {
        "split": counts,
        "study": binary_metrics(test_y, test_study, threshold),
        "slice": binary_metrics(test.y[keep_t], test_scores[keep_t], slice_threshold),
        "val_study": binary_metrics(val_y, val_study, threshold),
        "threshold": threshold,
        "threshold_method": f"Youden's J on the validation split's study scores ({agg} of slice scores)",
        "aggregation": agg,
        "study_auc_by_aggregation": {
            m: {"val": roc_auc(val_y, study_scores(val_scores, val.case_index, len(val.cases), m)),
                "test": roc_auc(test_y, study_scores(test_scores, test.case_index, len(test.cases), m))}
            for m in AGGREGATIONS},
        "class_weights": class_weights,
        "model": {"arch": cfg.model.arch, "parameters": parameters, "size": cfg.model.size,
                  "context": cfg.model.context, "outputs": [OUTPUT_NAME] + ([MAP_OUTPUT_NAME] if with_map else []),
                  "map_stride": cfg.model.map_stride if with_map else None,
                  "loss": ("slice BCE (class-weighted) + " f"{cfg.train.map_loss_weight:g} x " +
                           ("score-map focal loss (CenterNet, normalised by nodule centres)" if cfg.train.map_loss == "focal"
                            else f"score-map BCE per cell (cell weight 1 + {cfg.train.map_pos_weight - 1:g} x target)"))
                  if with_map
                  else "slice BCE (class-weighted)",
                  "schedule": (f"{cfg.train.patch_epochs} epochs on {cfg.train.patch}-pixel patches, then "
                               if cfg.train.patch else "") + f"{cfg.train.epochs} epochs on whole slices"
                  + (f" (reused: {reuse}, not trained in this run)" if reuse else "")},
        "best_epoch": log.best_epoch,
        "selection": "the epoch with the highest mean of validation study AUC, slice AUC and CPM (those it has)",
        "timing": {"data_s": round(data_seconds, 1), "train_s": round(train_seconds, 1),
                   "epoch_s": [h["seconds"] for h in log.history]},
    }
    logger.info("test (study, %d cases): AUC %.3f acc %.3f F1 %.3f at threshold %.3f", len(test.cases),
                metrics["study"]["roc_auc"], metrics["study"]["accuracy"], metrics["study"]["f1"], threshold)
    if test_maps is not None and _knows_positions(test) and _knows_positions(val):
        metrics["detection"] = detection_metrics(test, test_maps, cfg.model.size)
        metrics["val_detection_cpm"] = detection_metrics(val, val_maps, cfg.model.size)["cpm"]
        d = metrics["detection"]
        logger.info("test detection (%d malignant nodules, %d scans): FROC %s CPM %.3f; localisation error median "
                    "%.1f mm mean %.1f mm", d["targets"], d["scans"], d["sensitivity_at_fp_per_scan"], d["cpm"],
                    d["localisation_error_mm"]["median"], d["localisation_error_mm"]["mean"])
    metrics["export"] = dict(export_info, opset=cfg.export.opset, outputs=ex.output_shapes(detector_path))
    metrics["parity"] = parity_info

    # the second stage: candidates of the exported first stage, scored by a patch classifier
    classifier_entry: dict[str, Any] = {}
    history: Any = log.history
    if two_stage:
        classifier_entry, threshold, test_study, test_scores = _second_stage(
            cfg, source, parts, session, onnx_path, val, test, metrics)
        history = {"detector": log.history, "classifier": metrics["classifier"]["history"]}
    plots = [
        plot_roc({"study": (test_y, test_study), "slice": (test.y[keep_t], test_scores[keep_t])},
                 out_dir / "roc.png", f"{cfg.name} {cfg.version}: test ROC"),
        plot_confusion(metrics["study"]["confusion_matrix"], out_dir / "confusion.png",
                       f"test studies, threshold {threshold:.3f}"),
    ]
    (out_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n")

    # real-anatomy check
    evaluation: dict[str, Any] = {}
    if cfg.evaluate.lung1:
        from training.evaluate import evaluate_lung1

        image = lung1 or (Path(cfg.data.lung1) if cfg.data.lung1 else default_lung1_path())
        if image.is_file():
            evaluation["lung1"] = evaluate_lung1(onnx_path, image, size=cfg.model.size, context=cfg.model.context,
                                                 aggregation=agg, threshold=threshold,
                                                 training_slices=cfg.data.lung1_slices,
                                                 classifier=classifier_entry or None)
        else:
            logger.warning("lung1 not found at %s: real-anatomy check skipped", image)
    if "lung1" in evaluation:
        metrics["lung1"] = {k: v for k, v in evaluation["lung1"].items() if k != "slice_scores"}
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    synthetic = cfg.data.source == "synthetic"
    card = {
        "name": cfg.name,
        "version": cfg.version,
        "input_name": INPUT_NAME,
        "input_shape": [None, cfg.model.size, cfg.model.size, channels],
        "output_name": OUTPUT_NAME,
        "map_output_name": MAP_OUTPUT_NAME if with_map else "",
        "classifier": classifier_entry,
        "preprocessing_version": PREPROCESSING_VERSION,
        "size": cfg.model.size,
        "context": cfg.model.context,
        "window": [float(LUNG_WINDOW[0]), float(LUNG_WINDOW[1])],
        "threshold": round(threshold, 6),
        "threshold_method": metrics["threshold_method"],
        "aggregation": agg,
        "classes": ["benign", "malignant"],
        "input_dtype": "float32",
        "intended_use": cfg.intended_use or (f"{DEMO_MODEL}: {DEMO_USE}; exercises the ainode pipeline end to end" if synthetic else ""),
        "training_data": source.describe() + (_extra_volumes_described(cfg) if two_stage else ""),
        "metrics": {
            "split": "test",
            "study": metrics["study"],
            "slice": metrics["slice"],
            "onnx_vs_tensorflow_max_abs_diff": metrics["parity"]["max_abs_diff"],
            "architecture": f"{cfg.model.arch} ({metrics['model']['parameters']} parameters)",
            "outputs": ex.output_shapes(onnx_path),
            **(_card_detection(metrics["detection"], cfg.model.map_stride) if "detection" in metrics else {}),
            **({"detector": _card_first_stage(metrics["detector"], cfg.model.map_stride),
                "classifier": {k: v for k, v in metrics["classifier"].items() if k != "history"}} if two_stage else {}),
            **({"labelling_rule": RULE} if synthetic else {}),
        },
        "evaluation": evaluation,
        "seed": cfg.seed,
        "created": _dt.date.today().isoformat(),
        "versions": ex.library_versions(),
    }
    card_file = ex.write_card(onnx_path, card)
    if two_stage:  # the first stage alone, with its own card, so a later run can reuse it (classifier.detector)
        d = metrics["detector"]
        ex.write_card(onnx_path.with_name(onnx_path.stem + ".detector.onnx"), dict(
            card, version=f"{cfg.version}-detector", classifier={}, threshold=round(d["threshold"], 6),
            threshold_method=f"Youden's J on the validation split's study scores ({agg} of slice scores)",
            metrics={"split": "test", "study": d["study"], "slice": d["slice"],
                     "onnx_vs_tensorflow_max_abs_diff": parity_info["max_abs_diff"]},
            evaluation={}))
    installed = ex.install(onnx_path, Path(cfg.export.install_to)) if cfg.export.install_to else None
    seconds = time.perf_counter() - start
    logger.info("run done in %.0f s", seconds)
    return RunResult(out_dir, onnx_path, card_file, metrics_path, plots, installed, metrics, evaluation, seconds)


def _reuse_detector(source: Path, target: Path, cfg: RunConfig) -> dict[str, Any]:
    """Copy an exported first stage for this run, after checking that its card matches the run's input; its card."""
    import shutil

    card_file = ex.card_path(source)
    if not source.is_file() or not card_file.is_file():
        raise ConfigError(f"classifier.detector: {source} (and its card {card_file.name}) not found")
    card = json.loads(card_file.read_text())
    if card.get("sha256") != ex.sha256_of(source):
        raise ConfigError(f"classifier.detector: {source} does not match the sha256 of its card")
    if (card.get("size"), card.get("context")) != (cfg.model.size, cfg.model.context) or not card.get("map_output_name"):
        raise ConfigError(f"classifier.detector: {source} takes size {card.get('size')}, context {card.get('context')}"
                          f" (map {card.get('map_output_name')!r}); the run has {cfg.model.size}, {cfg.model.context}"
                          " and needs a map")
    if card.get("classifier"):
        raise ConfigError(f"classifier.detector: {source} has two stages already; give its first stage alone")
    shutil.copyfile(source, target)
    logger.info("first stage reused from %s (%s %s, sha256 %s...)", source, card.get("name"), card.get("version"),
                card["sha256"][:12])
    return card


def _detector_predict(session: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(slice probabilities (n,), score maps (n, h, w, 1) or None) from the exported first stage."""
    out = ex.onnx_outputs(session, x, batch=128)
    return out[0][:, 0], (out[1] if len(out) > 1 else None)


def _parameters(path: Path) -> int:
    import onnx

    return int(sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer))


def _second_stage(cfg: RunConfig, source: Source, parts: dict[str, list[Any]], session: Any, onnx_path: Path,
                  val: SliceSet, test: SliceSet, metrics: dict[str, Any]) -> tuple[dict[str, Any], float, np.ndarray, np.ndarray]:
    """Train the classifier on the first stage's candidates, export it, merge both stages into ``onnx_path``.

    The first stage's own figures move to ``metrics["detector"]``; the
    headline figures (study, slice, detection, threshold) become the
    two-stage model's. Returns (card entry, threshold, test study scores, test slice scores).
    """
    from training import classifier as cl

    c = cfg.classifier
    t0 = time.perf_counter()
    common = dict(size=cfg.model.size, context=cfg.model.context, patch=c.patch, mm_per_pixel=c.mm_per_pixel,
                  count=c.candidates, slack_mm=c.hit_slack_mm)
    train_source, train_cases = source, list(parts["train"])
    if c.extra_volumes:
        train_source = make_source(replace(cfg, data=replace(cfg.data, volumes=cfg.data.volumes + c.extra_volumes)),
                                   irregular_share=c.extra_irregular, irregular_from=cfg.data.volumes)
        train_cases += train_source.cases()[cfg.data.volumes:]
    train_c = cl.build_candidates(train_source, train_cases, session, copies=c.nodule_copies, seed=cfg.seed, **common)
    val_c = cl.build_candidates(source, parts["val"], session, search_mm=c.search_mm, **common)
    test_c = cl.build_candidates(source, parts["test"], session, search_mm=c.search_mm, **common)
    data_s = time.perf_counter() - t0
    logger.info("classifier samples: train %d (%d positive, %d volumes), val %d, test %d candidates (%.0f s)",
                len(train_c), int(train_c.y.sum()), len(train_cases), len(val_c), len(test_c), data_s)
    t0 = time.perf_counter()
    model, history, best = cl.train_classifier(train_c, val_c, patch=c.patch, epochs=c.epochs,
                                               learning_rate=c.learning_rate, lr_drop_epoch=c.lr_drop_epoch,
                                               batch_size=c.batch_size, seed=cfg.seed)
    train_s = time.perf_counter() - t0
    model.save(onnx_path.with_name(onnx_path.stem + ".classifier.keras"))
    part = onnx_path.with_name(onnx_path.stem + ".classifier.onnx")
    export = cl.export_classifier(model, part, patch=c.patch, opset=cfg.export.opset)
    merged = cl.merge(onnx_path.with_name(onnx_path.stem + ".detector.onnx"), part, onnx_path)
    full = ex.onnx_session(onnx_path)

    def scores(s: Any) -> np.ndarray:
        return ex.onnx_outputs(full, s.x, 256, input_name=cl.INPUT_NAME, output_names=[cl.OUTPUT_NAME])[0][:, 0]

    p_val, p_test = scores(val_c), scores(test_c)
    tf_test = cl.predict(model, test_c.x[:256])
    delta = float(np.max(np.abs(tf_test - p_test[:256]))) if len(tf_test) else 0.0
    if delta > cfg.export.parity_tolerance:
        raise ex.ExportError(f"{onnx_path}: classifier output differs from TensorFlow by {delta:.3g}")
    metrics["parity"] = dict(metrics["parity"], classifier_max_abs_diff=delta,
                             max_abs_diff=max(metrics["parity"]["max_abs_diff"], delta))
    metrics["parity"].setdefault("max_abs_diff_per_output", {})[cl.OUTPUT_NAME] = delta

    val_ref, test_ref = cl.refined(val_c, p_val), cl.refined(test_c, p_test)
    val_y = np.array([k.label for k in val.cases])
    test_y = np.array([k.label for k in test.cases])
    val_study, test_study = cl.study_scores(val_ref), cl.study_scores(test_ref)
    threshold = youden_threshold(val_y, val_study)
    keep_v, keep_t = val.y != IGNORE, test.y != IGNORE
    val_slices = cl.slice_scores(val_c, val_ref, val.case_index, val.slice_index)
    test_slices = cl.slice_scores(test_c, test_ref, test.case_index, test.slice_index)
    slice_threshold = youden_threshold(val.y[keep_v], val_slices[keep_v])
    metrics["detector"] = {k: metrics.pop(k) for k in ("study", "slice", "detection", "threshold", "val_study",
                                                       "study_auc_by_aggregation", "val_detection_cpm") if k in metrics}
    metrics["study"] = binary_metrics(test_y, test_study, threshold)
    metrics["val_study"] = binary_metrics(val_y, val_study, threshold)
    metrics["slice"] = binary_metrics(test.y[keep_t], test_slices[keep_t], slice_threshold)
    metrics["threshold"] = threshold
    metrics["threshold_method"] = ("Youden's J on the validation split's study scores (the classifier's best "
                                   "candidate per study)")
    metrics["study_scores"] = {  # per study (case id, label, score): the threshold can be checked from these
        name: [[k.case_id, int(y), round(float(p), 6)] for k, y, p in zip(part_.cases, ys, ps)]
        for name, part_, ys, ps in (("val", val, val_y, val_study), ("test", test, test_y, test_study))}
    metrics["detection"] = detection_metrics_of(test_c, test_ref, c.candidates)
    metrics["val_detection_cpm"] = detection_metrics_of(val_c, val_ref, c.candidates)["cpm"]
    metrics["classifier"] = {
        "architecture": f"patch CNN ({int(model.count_params())} parameters)",
        "samples": {"train": len(train_c), "train_positive": int(train_c.y.sum()), "train_volumes": len(train_cases),
                    "extra_volumes": c.extra_volumes, "extra_irregular": c.extra_irregular,
                    "val_candidates": len(val_c), "test_candidates": len(test_c)},
        "candidate_auc": {"val": roc_auc(val_c.y, p_val), "test": roc_auc(test_c.y, p_test)},
        "best_epoch": best,
        "history": history,
        "export": dict(export, merged=merged),
        "timing": {"data_s": round(data_s, 1), "train_s": round(train_s, 1)},
    }
    d = metrics["detection"]
    logger.info("two-stage test: study AUC %.3f (detector alone %.3f), slice AUC %.3f, CPM %.3f (detector %.3f), "
                "threshold %.3f", metrics["study"]["roc_auc"], metrics["detector"]["study"]["roc_auc"],
                metrics["slice"]["roc_auc"], d["cpm"], metrics["detector"].get("detection", {}).get("cpm", float("nan")),
                threshold)
    entry = cl.card_entry(c.patch, c.mm_per_pixel, c.candidates, c.search_mm)
    return entry, threshold, test_study, test_slices


def detection_metrics_of(s: Any, per_case: list[Any], candidates: int) -> dict[str, Any]:
    """FROC, CPM and localisation error of a two-stage model's candidates (the classifier's probabilities)."""
    from training.detection import peak_metrics

    return peak_metrics(per_case, s.geometry, min_probability=0.0, max_peaks=candidates,
                        function="node.preprocessing.locate_peaks, then the classifier (node.preprocessing.kept_candidates)")
