"""The training run's settings: one TOML file read into frozen dataclasses.

Paths in the file are relative to the working directory the command runs in
(the repository root in the documented commands). Unknown keys are errors, so
a typo fails fast and names the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from training.errors import ConfigError

SOURCES = ("synthetic", "dicom", "lidc")
ARCHS = ("seed", "default")
AGGREGATIONS = ("top3_mean", "max")


@dataclass(frozen=True)
class DataConfig:
    """Where the volumes come from (``source``) and that source's settings."""

    source: str = "synthetic"
    # synthetic
    volumes: int = 200
    slices_per_volume: int = 12
    lung1: str = ""  # lung1_image.nrrd; "" = $AINODE_CACHE or ~/.cache/ainode
    lung1_slices: tuple[int, int] = (0, 28)  # half-open range of lung1 slices used as anatomy
    pydicom_ct_share: float = 0.1  # share of volumes built on pydicom's CT_small.dcm
    thin_slices: bool = False  # volumes at 1-5 mm slice spacing (anatomy resampled along z); false: all 5 mm
    # dicom folder + labels.csv
    root: str = ""
    labels: str = ""
    # lidc (pylidc)
    lidc_images: str = ""  # folder holding LIDC-IDRI-XXXX/... DICOM files
    lidc_max_scans: int = 0  # 0 = all scans found on disk
    # all sources
    max_negative_slices: int = 0  # per training volume; 0 = keep all


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of patients held out for validation and test."""

    val: float = 0.15
    test: float = 0.15


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and input geometry."""

    arch: str = "default"
    size: int = 128
    context: int = 1
    map_stride: int = 4  # input pixels per score-map cell (default arch): 4, 8 or 16


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings."""

    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 1e-3
    class_weights: bool = True
    augment: bool = True
    steps_per_epoch: int = 0  # 0 = one pass over the training slices
    patch: int = 0  # first train on patches of this many pixels (default arch); 0 = whole slices only
    patch_epochs: int = 0  # epochs on patches before ``epochs`` on whole slices
    jitter: int = 8  # random shift of patches (and of whole slices when augmenting), pixels
    map_loss_weight: float = 1.0  # weight of the score-map loss beside the slice loss (default arch)
    volume_end_p: float = 0.25  # share of training samples shown with the context clipped as at a volume's end
    map_loss: str = "focal"  # focal (CenterNet, per nodule centre) | bce (per cell, weighted by map_pos_weight)
    map_pos_weight: float = 20.0  # bce: weight of a map cell with target 1 (linear in the target), negatives 1


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export and the card's run-time settings."""

    opset: int = 17
    aggregation: str = "top3_mean"
    parity_tolerance: float = 1e-5
    install_to: str = ""  # also copy the .onnx + card here (e.g. node/models)


@dataclass(frozen=True)
class EvaluateConfig:
    """The check on real anatomy (lung1, its nodule label never used in training)."""

    lung1: bool = True


@dataclass(frozen=True)
class ClassifierConfig:
    """The second stage (``training.classifier``): a patch CNN over the first stage's candidates. 0 epochs: none."""

    epochs: int = 0
    patch: int = 64  # pixels
    mm_per_pixel: float = 0.7  # 64 px = 45 mm, room for a 30 mm nodule and its spicules
    candidates: int = 16  # first-stage peaks scored per study (the card's and the node's)
    search_mm: float = 0.0  # validation, test and the node also score each on the slices within this along z
    learning_rate: float = 1e-3
    lr_drop_epoch: int = 9  # the learning rate is divided by 3 from this epoch on
    batch_size: int = 32
    hit_slack_mm: float = 3.0  # a candidate within a malignant nodule's radius + this is a positive sample
    nodule_copies: int = 4  # jittered patches per malignant nodule in training (benign: half)
    extra_volumes: int = 0  # synthetic volumes generated after the split's, for this stage's training only
    extra_irregular: float = 0.0  # share of the extra volumes' nodules drawn irregular (training.synthetic)
    detector: str = ""  # an exported first stage (.onnx + card) to reuse instead of training one


@dataclass(frozen=True)
class RunConfig:
    """One training run."""

    name: str = "ainode-lung-ct"
    version: str = "0.0.0"
    seed: int = 0
    out_dir: str = "runs/latest"
    intended_use: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "split": SplitConfig, "model": ModelConfig, "train": TrainConfig,
             "export": ExportConfig, "evaluate": EvaluateConfig, "classifier": ClassifierConfig}


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known or key in _SECTIONS:
            raise ConfigError(f"{where}: unknown key {key!r}")
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or len(value) != len(default):
                raise ConfigError(f"{where}.{key}: expected a list of {len(default)} values, got {value!r}")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{key}: expected true/false, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
            value = float(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where}.{key}: expected an integer, got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{where}.{key}: expected a string, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def validate(cfg: RunConfig) -> RunConfig:
    """Check values that types alone do not; raise ConfigError naming the key."""
    if cfg.data.source not in SOURCES:
        raise ConfigError(f"data.source: must be one of {', '.join(SOURCES)}, got {cfg.data.source!r}")
    if cfg.model.arch not in ARCHS:
        raise ConfigError(f"model.arch: must be one of {', '.join(ARCHS)}, got {cfg.model.arch!r}")
    if cfg.export.aggregation not in AGGREGATIONS:
        raise ConfigError(f"export.aggregation: must be one of {', '.join(AGGREGATIONS)}")
    if not 8 <= cfg.model.size <= 512:
        raise ConfigError(f"model.size: must be 8..512, got {cfg.model.size}")
    if cfg.model.map_stride not in (4, 8, 16):
        raise ConfigError(f"model.map_stride: must be 4, 8 or 16, got {cfg.model.map_stride}")
    if cfg.model.arch == "default" and cfg.model.size % 16:
        raise ConfigError(f"model.size: the default architecture needs a multiple of 16, got {cfg.model.size}")
    if cfg.train.patch and cfg.train.patch % 16:
        raise ConfigError(f"train.patch: must be a multiple of 16, got {cfg.train.patch}")
    if not 0.0 <= cfg.train.volume_end_p <= 1.0:
        raise ConfigError(f"train.volume_end_p: must be 0..1, got {cfg.train.volume_end_p}")
    if cfg.train.map_loss not in ("focal", "bce"):
        raise ConfigError(f"train.map_loss: must be focal or bce, got {cfg.train.map_loss!r}")
    if cfg.train.map_loss_weight < 0 or cfg.train.map_pos_weight < 1:
        raise ConfigError("train.map_loss_weight must be >= 0 and train.map_pos_weight >= 1")
    if cfg.model.context < 0:
        raise ConfigError(f"model.context: must be 0 or more, got {cfg.model.context}")
    if cfg.model.arch == "seed" and cfg.model.size < 22:
        raise ConfigError("model.size: the seed architecture needs at least 22 pixels")
    for key in ("val", "test"):
        if not 0.0 < getattr(cfg.split, key) < 0.5:
            raise ConfigError(f"split.{key}: must be between 0 and 0.5")
    if cfg.train.patch and cfg.model.arch == "seed":
        raise ConfigError("train.patch: the seed architecture (Flatten + Dense) takes whole slices only; set 0")
    if cfg.train.patch and not (8 <= cfg.train.patch <= cfg.model.size and cfg.train.patch % 2 == 0):
        raise ConfigError(f"train.patch: must be an even number 8..model.size, got {cfg.train.patch}")
    if bool(cfg.train.patch) != bool(cfg.train.patch_epochs):
        raise ConfigError("train.patch and train.patch_epochs: set both (patch pre-training) or neither")
    if cfg.train.epochs < 1 or cfg.train.batch_size < 1:
        raise ConfigError("train.epochs and train.batch_size must be at least 1")
    if cfg.data.volumes < 3 or cfg.data.slices_per_volume < 1:
        raise ConfigError("data.volumes must be at least 3 and data.slices_per_volume at least 1")
    lo, hi = cfg.data.lung1_slices
    if not 0 <= lo < hi:
        raise ConfigError(f"data.lung1_slices: need 0 <= start < stop, got {cfg.data.lung1_slices}")
    c = cfg.classifier
    if (c.epochs < 0 or c.candidates < 1 or c.patch < 16 or c.patch % 8 or c.mm_per_pixel <= 0 or c.extra_volumes < 0
            or c.search_mm < 0 or not 0 <= c.extra_irregular <= 1):
        raise ConfigError("classifier: epochs >= 0, candidates >= 1, patch a multiple of 8 from 16, mm_per_pixel > 0, "
                          "extra_volumes >= 0, search_mm >= 0 and 0 <= extra_irregular <= 1")
    if c.epochs and cfg.model.arch != "default":
        raise ConfigError("classifier.epochs: the classifier scores the score map's candidates; the seed "
                          "architecture has no map")
    if c.epochs and cfg.export.aggregation != "max":
        raise ConfigError("export.aggregation: a two-stage model's study score is its best candidate's; set \"max\"")
    if c.detector and not c.epochs:
        raise ConfigError("classifier.detector: reusing a first stage only makes sense with classifier.epochs > 0")
    if c.extra_volumes and cfg.data.source != "synthetic":
        raise ConfigError("classifier.extra_volumes: only the synthetic source can make more volumes")
    if cfg.export.opset not in (17, 18):
        raise ConfigError(f"export.opset: must be 17 or 18, got {cfg.export.opset}")
    return cfg


def load_config(path: Path | str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read ``path`` (TOML); ``overrides`` maps dotted keys (``train.epochs``) to values."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        table = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            table = table.setdefault(part, {})
        table[leaf] = value
    top = {k: v for k, v in raw.items() if k not in _SECTIONS}
    cfg = _build(RunConfig, top, str(p))
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{p}: [{name}] must be a table")
        cfg = replace(cfg, **{name: _build(cls, table, f"{p} [{name}]")})
    return validate(cfg)
