"""The model card: the JSON file beside every exported model.

``model.onnx`` has its card in ``model.card.json``. Training writes it; the
worker reads it and refuses a model whose card does not match its file
(sha256) or the node's preprocessing (``PREPROCESSING_VERSION``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node.errors import ModelError

BUNDLED_MODEL_NAME = "ainode-lung-ct.onnx"

CARD_SUFFIX = ".card.json"


def card_path(model_path: Path) -> Path:
    """``x/model.onnx`` -> ``x/model.card.json``."""
    return model_path.with_name(model_path.stem + CARD_SUFFIX)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _missing(cls: type, data: dict[str, Any]) -> list[str]:
    """The fields of dataclass ``cls`` without a default that ``data`` lacks."""
    return [k for k, f in cls.__dataclass_fields__.items()  # type: ignore[attr-defined]
            if k not in data and f.default is f.default_factory]


@dataclass(frozen=True)
class Classifier:
    """A model's second stage: a CNN that scores patches cut around the score map's candidates.

    The first stage (the slice input and its score map) points at places; this
    one looks at each of them at a fixed scale in mm, through more than one
    window, and gives each its own probability. It lives in the same ONNX
    graph as a second input and output (one file, one sha256).
    """

    input_name: str  # [N, size, size, channels]
    output_name: str  # [N, 1]: probability per candidate
    size: int  # patch side, pixels
    mm_per_pixel: float
    z_offsets_mm: list[float]  # the planes, from the candidate along z
    windows: list[list[float]]  # [[center, width], ...] HU; channels = planes x windows, plane-major
    candidates: int  # score-map peaks scored per study, best first
    min_distance_mm: float = 15.0  # their non-maximum suppression
    search_mm: float = 0.0  # each is also scored on the slices within this of it along z, and keeps its best

    @property
    def channels(self) -> int:
        return len(self.z_offsets_mm) * len(self.windows)

    @classmethod
    def from_dict(cls, data: Any, where: Path) -> "Classifier":
        """The card's ``classifier`` entry; ModelError naming the key that is missing or wrong."""
        if not isinstance(data, dict):
            raise ModelError(f"{where}: classifier must be an object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        missing = _missing(cls, data)
        if missing:
            raise ModelError(f"{where}: classifier lacks {', '.join(missing)}")
        try:
            c = cls(**{k: v for k, v in data.items() if k in known})
            ok = (c.size >= 1 and c.mm_per_pixel > 0 and c.candidates >= 1 and float(c.search_mm) >= 0
                  and c.z_offsets_mm
                  and c.windows and all(len(w) == 2 and float(w[1]) > 0 for w in c.windows))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelError(f"{where}: classifier has an unusable size, mm_per_pixel, candidates, search_mm, "
                             f"z_offsets_mm or windows: {data}")
        return c


@dataclass(frozen=True)
class ModelCard:
    """What a model is, what it expects and how good it is."""

    name: str
    version: str
    sha256: str  # of the .onnx file
    input_name: str
    input_shape: list[Any]  # [None, size, size, channels], NHWC
    output_name: str  # P(classes[1]) per slice, [N, 1]
    preprocessing_version: str
    size: int  # input height = width, pixels
    context: int  # neighbouring slices on each side (channels = 2 * context + 1)
    window: list[float]  # [center, width] HU
    threshold: float  # on the study score, for the qualitative result
    threshold_method: str  # how the threshold was chosen
    aggregation: str  # how slice scores become the study score
    classes: list[str] = field(default_factory=lambda: ["benign", "malignant"])  # output = P(classes[1])
    input_dtype: str = "float32"
    #: The score map, a second output: [N, h, w, 1] probabilities over the slice (sigmoid applied),
    #: read into located findings by node.preprocessing.locate_peaks. "": no map, no coordinates.
    map_output_name: str = ""
    #: The second stage (:class:`Classifier`), which needs the map; {}: none, the map's peaks keep its values.
    classifier: dict[str, Any] = field(default_factory=dict)
    intended_use: str = ""
    training_data: str = ""  # provenance, in words
    metrics: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    created: str = ""  # ISO 8601 date
    versions: dict[str, str] = field(default_factory=dict)  # tensorflow, tf2onnx, onnx, ...

    def second_stage(self, model_path: Path) -> Classifier | None:
        """The card's classifier, checked, or None when the model has none."""
        if not self.classifier:
            return None
        if not self.map_output_name:
            raise ModelError(f"{card_path(model_path)}: a classifier needs the score map's candidates, and the card "
                             "names no map_output_name")
        if self.aggregation != "max":
            raise ModelError(f"{card_path(model_path)}: a two-stage model's study score is its best candidate's; the "
                             f"card names aggregation {self.aggregation!r}, not \"max\"")
        return Classifier.from_dict(self.classifier, card_path(model_path))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def write(self, model_path: Path) -> Path:
        path = card_path(model_path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, model_path: Path) -> "ModelCard":
        """The card beside ``model_path``; ModelError naming the file and key if it is unusable."""
        path = card_path(model_path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(f"{path}: model card missing") from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: unreadable model card: {exc}") from None
        known = set(cls.__dataclass_fields__)
        missing = _missing(cls, data)
        if missing:
            raise ModelError(f"{path}: model card lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def check(self, model_path: Path, preprocessing_version: str) -> None:
        """Raise ModelError if the file's hash or the preprocessing version do not match."""
        if self.preprocessing_version != preprocessing_version:
            raise ModelError(
                f"{card_path(model_path)}: model was trained with preprocessing version "
                f"{self.preprocessing_version!r}, this node has {preprocessing_version!r}"
            )
        actual = sha256_of(model_path)
        if actual != self.sha256:
            raise ModelError(f"{model_path}: sha256 {actual[:12]}... does not match its card ({self.sha256[:12]}...)")
        if self.input_shape[-1] != 2 * self.context + 1 or self.input_shape[1:3] != [self.size, self.size]:
            raise ModelError(f"{card_path(model_path)}: input_shape {self.input_shape} does not match size/context")


def bundled_model_path() -> Path:
    """Where the bundled model lives (the file may not be installed)."""
    return Path(__file__).resolve().parent / "models" / BUNDLED_MODEL_NAME


def resolve_model_path(configured: str) -> Path:
    """The model file for the config value ``model.path`` ("" = the bundled model).

    Raises ModelError, naming the path, if there is no such file.
    """
    if not configured:
        path = bundled_model_path()
        if not path.is_file():
            raise ModelError(
                f"bundled model {path} is not installed: set [model] path in the config to a model file"
            )
        return path
    path = Path(configured).expanduser()
    if not path.is_file():
        raise ModelError(f"[model] path: model file {path} not found")
    return path
