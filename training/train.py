"""One training run: data -> split -> train -> metrics -> ONNX -> parity -> card (-> install).

Artefacts in ``out_dir``: ``metrics.json``, ``roc.png``, ``confusion.png``,
``history.json``, ``<name>.keras``, ``<name>.onnx`` and ``<name>.card.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from node.preprocessing import LUNG_WINDOW, PREPROCESSING_VERSION
from training import export as ex
from training.config import RunConfig
from training.data import (
    IGNORE,
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
from training.metrics import binary_metrics, plot_confusion, plot_roc, study_scores, youden_threshold
from training.models import INPUT_NAME, OUTPUT_NAME, build_model
from training.synthetic import RULE, SyntheticSource

logger = logging.getLogger(__name__)

DEMO_USE = "semi-synthetic, demo only, not for clinical use"


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


def make_source(cfg: RunConfig, lung1: Path | None = None) -> Source:
    """The configured data source."""
    d = cfg.data
    if d.source == "synthetic":
        return SyntheticSource(volumes=d.volumes, slices_per_volume=d.slices_per_volume, seed=cfg.seed,
                               lung1_path=lung1 or (Path(d.lung1) if d.lung1 else default_lung1_path()),
                               lung1_slices=d.lung1_slices, pydicom_ct_share=d.pydicom_ct_share)
    if d.source == "dicom":
        if not d.root or not d.labels:
            raise ConfigError("data.root and data.labels are required for source 'dicom'")
        return DicomFolderSource(d.root, d.labels)
    if not d.lidc_images:
        raise ConfigError("data.lidc_images is required for source 'lidc'")
    from training.lidc import LidcSource

    return LidcSource(d.lidc_images, d.lidc_max_scans)


def _epoch_logger(epochs: int) -> Any:
    """A Keras callback: one log line per epoch; keeps the weights of the best validation AUC."""
    import keras

    class EpochLog(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.history: list[dict[str, float]] = []
            self.best_auc, self.best_epoch, self.best_weights = -1.0, 0, None
            self._t0 = 0.0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = {k: float(v) for k, v in (logs or {}).items()}
            logs["seconds"] = round(time.perf_counter() - self._t0, 2)
            epoch = len(self.history)  # running count across training stages
            logs["epoch"] = epoch + 1
            self.history.append(logs)
            auc = logs.get("val_auc", float("nan"))
            logger.info("epoch %d/%d: loss %.4f auc %.4f val_loss %.4f val_auc %.4f (%.1f s)", epoch + 1, epochs,
                        logs.get("loss", float("nan")), logs.get("auc", float("nan")),
                        logs.get("val_loss", float("nan")), auc, logs["seconds"])
            if auc > self.best_auc:
                self.best_auc, self.best_epoch = auc, epoch + 1
                self.best_weights = self.model.get_weights()

        def on_train_end(self, logs: Any = None) -> None:
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)
                logger.info("kept the weights of epoch %d (val_auc %.4f)", self.best_epoch, self.best_auc)

    return EpochLog()


def _train_dataset(s: SliceSet, cfg: RunConfig, patch: int) -> tuple[Any, dict[str, float]]:
    """tf.data pipeline: shuffle, class weights as sample weights, augmentation, batching.

    ``patch`` > 0: ``s`` holds patches with a jitter margin, cropped here to ``patch`` pixels.
    """
    import tensorflow as tf

    y = s.y
    n_pos, n_neg = float((y == 1).sum()), float((y == 0).sum())
    if cfg.train.class_weights and n_pos and n_neg:
        weights = {"benign": len(y) / (2 * n_neg), "malignant": len(y) / (2 * n_pos)}
    else:
        weights = {"benign": 1.0, "malignant": 1.0}
    w = np.where(y == 1, weights["malignant"], weights["benign"]).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((s.x, y, w)).shuffle(len(y), seed=cfg.seed, reshuffle_each_iteration=True)
    pad, channels = cfg.train.jitter, s.x.shape[-1]
    out = patch or cfg.model.size  # patches arrive with the jitter margin already around them

    def augment(x: Any, label: Any, weight: Any) -> Any:
        x = tf.image.random_flip_left_right(x)
        if not patch:
            x = tf.pad(x, [[pad, pad], [pad, pad], [0, 0]], mode="SYMMETRIC")
        x = tf.image.random_crop(x, [out, out, channels])
        x = x * tf.random.uniform([], 0.95, 1.05) + tf.random.uniform([], -0.03, 0.03)
        return tf.clip_by_value(x, 0.0, 1.0), label, weight

    def centre(x: Any, label: Any, weight: Any) -> Any:
        return x[pad : pad + out, pad : pad + out], label, weight

    if cfg.train.augment:
        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    elif patch:
        ds = ds.map(centre, num_parallel_calls=tf.data.AUTOTUNE)
    if cfg.train.steps_per_epoch:
        ds = ds.repeat()
    ds = ds.batch(cfg.train.batch_size).prefetch(tf.data.AUTOTUNE)
    return ds, weights


def _labelled(s: SliceSet) -> tuple[np.ndarray, np.ndarray]:
    keep = s.y != IGNORE
    return s.x[keep], s.y[keep]


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
    if cfg.train.patch:
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
    model = build_model(cfg.model.arch, None if cfg.train.patch else cfg.model.size, channels)
    logger.info("model %s: %d parameters, input %s", cfg.model.arch, model.count_params(), model.input_shape)
    log = _epoch_logger(cfg.train.patch_epochs + cfg.train.epochs)
    xv, yv = _labelled(val)
    t0 = time.perf_counter()
    stages = ([(patches, cfg.train.patch, cfg.train.patch_epochs, cfg.train.learning_rate)] if patches else []) + [
        (train, 0, cfg.train.epochs, cfg.train.learning_rate / (3 if patches else 1))]
    for data, patch, epochs, lr in stages:
        logger.info("training %d epochs on %s, learning rate %.1e", epochs,
                    f"{patch}-pixel patches" if patch else "whole slices", lr)
        model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy",
                      metrics=[keras.metrics.AUC(name="auc")])
        ds, class_weights = _train_dataset(data, cfg, patch)
        model.fit(ds, epochs=epochs, steps_per_epoch=cfg.train.steps_per_epoch or None,
                  validation_data=(xv, yv), callbacks=[log], verbose=0)
    del patches
    train_seconds = time.perf_counter() - t0
    model.save(out_dir / f"{cfg.name}.keras")

    # threshold on validation study scores, metrics on test
    agg = cfg.export.aggregation
    val_scores = model.predict(val.x, batch_size=128, verbose=0)[:, 0]
    test_scores = model.predict(test.x, batch_size=128, verbose=0)[:, 0]
    val_y = np.array([c.label for c in val.cases])
    test_y = np.array([c.label for c in test.cases])
    val_study = study_scores(val_scores, val.case_index, len(val.cases), agg)
    test_study = study_scores(test_scores, test.case_index, len(test.cases), agg)
    threshold = youden_threshold(val_y, val_study)
    keep_v, keep_t = val.y != IGNORE, test.y != IGNORE
    slice_threshold = youden_threshold(val.y[keep_v], val_scores[keep_v])
    metrics: dict[str, Any] = {
        "split": counts,
        "study": binary_metrics(test_y, test_study, threshold),
        "slice": binary_metrics(test.y[keep_t], test_scores[keep_t], slice_threshold),
        "val_study": binary_metrics(val_y, val_study, threshold),
        "threshold": threshold,
        "threshold_method": f"Youden's J on the validation split's study scores ({agg} of slice scores)",
        "aggregation": agg,
        "class_weights": class_weights,
        "model": {"arch": cfg.model.arch, "parameters": int(model.count_params()), "size": cfg.model.size,
                  "context": cfg.model.context,
                  "schedule": (f"{cfg.train.patch_epochs} epochs on {cfg.train.patch}-pixel patches, then "
                               if cfg.train.patch else "") + f"{cfg.train.epochs} epochs on whole slices"},
        "best_epoch": log.best_epoch,
        "timing": {"data_s": round(data_seconds, 1), "train_s": round(train_seconds, 1),
                   "epoch_s": [h["seconds"] for h in log.history]},
    }
    logger.info("test (study, %d cases): AUC %.3f acc %.3f F1 %.3f at threshold %.3f", len(test.cases),
                metrics["study"]["roc_auc"], metrics["study"]["accuracy"], metrics["study"]["f1"], threshold)
    plots = [
        plot_roc({"study": (test_y, test_study), "slice": (test.y[keep_t], test_scores[keep_t])},
                 out_dir / "roc.png", f"{cfg.name} {cfg.version}: test ROC"),
        plot_confusion(metrics["study"]["confusion_matrix"], out_dir / "confusion.png",
                       f"test studies, threshold {threshold:.3f}"),
    ]
    (out_dir / "history.json").write_text(json.dumps(log.history, indent=2) + "\n")

    # export + parity on held-out slices
    onnx_path = out_dir / f"{cfg.name}.onnx"
    metrics["export"] = ex.export_onnx(model, onnx_path, size=cfg.model.size, channels=channels, opset=cfg.export.opset)
    metrics["export"]["opset"] = cfg.export.opset
    metrics["parity"] = ex.parity(model, onnx_path, test.x[:256], cfg.export.parity_tolerance)
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    # real-anatomy check
    evaluation: dict[str, Any] = {}
    if cfg.evaluate.lung1:
        from training.evaluate import evaluate_lung1

        image = lung1 or (Path(cfg.data.lung1) if cfg.data.lung1 else default_lung1_path())
        if image.is_file():
            evaluation["lung1"] = evaluate_lung1(onnx_path, image, size=cfg.model.size, context=cfg.model.context,
                                                 aggregation=agg, threshold=threshold,
                                                 training_slices=cfg.data.lung1_slices)
        else:
            logger.warning("lung1 not found at %s: real-anatomy check skipped", image)

    synthetic = cfg.data.source == "synthetic"
    card = {
        "name": cfg.name,
        "version": cfg.version,
        "input_name": INPUT_NAME,
        "input_shape": [None, cfg.model.size, cfg.model.size, channels],
        "output_name": OUTPUT_NAME,
        "preprocessing_version": PREPROCESSING_VERSION,
        "size": cfg.model.size,
        "context": cfg.model.context,
        "window": [float(LUNG_WINDOW[0]), float(LUNG_WINDOW[1])],
        "threshold": round(threshold, 6),
        "threshold_method": metrics["threshold_method"],
        "aggregation": agg,
        "classes": ["benign", "malignant"],
        "input_dtype": "float32",
        "intended_use": cfg.intended_use or (f"{DEMO_USE}: exercises the ainode pipeline end to end" if synthetic else ""),
        "training_data": source.describe(),
        "metrics": {
            "split": "test",
            "study": metrics["study"],
            "slice": metrics["slice"],
            "onnx_vs_tensorflow_max_abs_diff": metrics["parity"]["max_abs_diff"],
            "architecture": f"{cfg.model.arch} ({metrics['model']['parameters']} parameters)",
            **({"labelling_rule": RULE} if synthetic else {}),
        },
        "evaluation": evaluation,
        "seed": cfg.seed,
        "created": _dt.date.today().isoformat(),
        "versions": ex.library_versions(),
    }
    card_file = ex.write_card(onnx_path, card)
    installed = ex.install(onnx_path, Path(cfg.export.install_to)) if cfg.export.install_to else None
    seconds = time.perf_counter() - start
    logger.info("run done in %.0f s", seconds)
    return RunResult(out_dir, onnx_path, card_file, metrics_path, plots, installed, metrics, evaluation, seconds)
