"""What every result object says, in one place: the result, its findings, the model and the device.

The worker records a :class:`Result` in the revision's outcome (as JSON, see
:meth:`Result.to_json`); the SR (:mod:`node.results.sr`), the summary image
(:mod:`node.results.sc`) and the key object selection (:mod:`node.results.ko`)
are each built from it, so the three objects can never disagree. Numbers are
rounded here once, as a person reads them (:func:`percent`), and the words a
person reads (:meth:`Result.summary`) are written here once.

No highdicom here: this module is plain data.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from pydicom.uid import generate_uid

from node import __version__

#: Said in words by every object a person sees (SR text, summary image, KO title).
DEMO_NOTICE = "demo model, not for clinical use"
MANUFACTURER = "ainode project"
_TRACKING_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ainode:finding")


def percent(p: float) -> str:
    """A probability as a person reads it: ``0.9133`` -> ``"91 %"``; ``"< 1 %"`` and ``"> 99 %"`` at the ends."""
    if not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f'Argument "p" must be a probability in [0, 1], got {p!r}')
    value = round(100 * p)
    if value < 1 and p > 0:
        return "< 1 %"
    if value > 99 and p < 1:
        return "> 99 %"
    return f"{value} %"


def percent_value(p: float) -> int:
    """A probability in percent, rounded to a whole number (the NUM the SR carries).

    Only 0 and 1 themselves give 0 and 100: a model is never certain, and a
    viewer showing "100 %" for 0.996 would say it is.
    """
    value = int(round(100 * float(p)))
    return min(max(value, 1), 99) if 0.0 < p < 1.0 else value


@dataclass(frozen=True)
class SourceImage:
    """One slice of the analysed series."""

    sop_class_uid: str
    sop_instance_uid: str
    slice_index: int  # z index in the volume, 0 = first along the slice normal
    instance_number: int | None = None  # what a person calls the image; None if the source has none

    @property
    def label(self) -> str:
        """How a person names the image: its Instance Number (else its position in the series, 1-based)."""
        return str(self.instance_number if self.instance_number is not None else self.slice_index + 1)


@dataclass(frozen=True)
class KeyImage:
    """A slice that drove the study score, with its slice probability."""

    image: SourceImage
    score: float


@dataclass(frozen=True)
class Finding:
    """One located suspicious nodule: where it is and how likely it is malignant."""

    number: int  # 1 = the most suspicious
    image: SourceImage  # the slice it is on
    row: float  # pixel row on that image (0 = centre of the first row)
    column: float  # pixel column
    probability: float
    diameter_mm: float | None = None  # only when the model estimates it

    def tracking_uid(self, study_uid: str, revision: int) -> str:
        """A UID for this finding of this revision of the study (the same for every object that shows it)."""
        return f"2.25.{uuid.uuid5(_TRACKING_NAMESPACE, f'{study_uid}/{revision}/{self.number}').int}"


@dataclass(frozen=True)
class ModelInfo:
    """The model that produced the result."""

    name: str
    version: str
    sha256: str
    threshold_source: str = "model card"  # "model card" or "config"
    aggregation: str = "top3_mean"
    located: bool = False  # the model has a score map, so findings carry coordinates

    @property
    def device_uid(self) -> str:
        """The model as a device (IHE AIR): derived from its sha256, so a new model is a new device."""
        return generate_uid(entropy_srcs=["ainode-model", self.sha256])

    @property
    def title(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class Result:
    """The result of one analysed revision of a study."""

    study_uid: str
    revision: int
    series_uid: str  # the analysed series
    score: float  # study probability of malignancy
    threshold: float  # in use for this result (the card's, unless the config overrides it)
    findings: tuple[Finding, ...]  # located, best first; empty when negative or when the model has no map
    key_images: tuple[KeyImage, ...]  # best first
    model: ModelInfo
    node_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # timings etc., not shown

    def __post_init__(self) -> None:
        for name in ("score", "threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f'Argument "{name}" must be a number in [0, 1], got {value!r}.')
        for f in self.findings:
            if not 0.0 <= f.probability <= 1.0:
                raise ValueError(f'Finding {f.number} has probability {f.probability!r}; expected [0, 1].')
        if not self.key_images:
            raise ValueError('Argument "key_images" must not be empty.')

    @property
    def positive(self) -> bool:
        return self.score >= self.threshold

    @property
    def shown_images(self) -> tuple[SourceImage, ...]:
        """The images a person should look at, best first: each finding's, else the key images."""
        if self.findings:
            seen: dict[str, SourceImage] = {}
            for f in self.findings:
                seen.setdefault(f.image.sop_instance_uid, f.image)
            return tuple(seen.values())
        return tuple(k.image for k in self.key_images)

    @property
    def selected_images(self) -> tuple[SourceImage, ...]:
        """The images the key object selection flags and the summary image shows, best first:
        :attr:`shown_images` of a positive result; of a negative one only the top key image."""
        return self.shown_images if self.positive else self.shown_images[:1]

    def summary(self) -> str:
        """The result in one line of words, for the SR's first item and the summary image."""
        head = f"AI result ({DEMO_NOTICE}): "
        if not self.positive:
            return (f"{head}no nodule reached the threshold (study probability {percent(self.score)}, "
                    f"threshold {percent(self.threshold)})")
        if not self.findings:
            where = ", ".join(k.image.label for k in self.key_images)
            return (f"{head}suspicious for a malignant nodule, probability {percent(self.score)}, "
                    f"threshold {percent(self.threshold)}, key image{'s' if len(self.key_images) > 1 else ''} "
                    f"{where} (not located)")
        first = self.findings[0]
        text = (f"{head}suspicious nodule, probability {percent(first.probability)}, "
                f"threshold {percent(self.threshold)}, image {first.image.label}")
        if len(self.findings) > 1:
            others = "; ".join(f"{percent(f.probability)} on image {f.image.label}" for f in self.findings[1:])
            text += f"; {len(self.findings) - 1} more: {others}"
        return text

    # --- as JSON, in the outcome file ------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Result":
        def image(d: dict[str, Any]) -> SourceImage:
            return SourceImage(**d)

        return cls(
            study_uid=data["study_uid"],
            revision=int(data["revision"]),
            series_uid=data["series_uid"],
            score=float(data["score"]),
            threshold=float(data["threshold"]),
            findings=tuple(Finding(**{**f, "image": image(f["image"])}) for f in data["findings"]),
            key_images=tuple(KeyImage(image(k["image"]), float(k["score"])) for k in data["key_images"]),
            model=ModelInfo(**data["model"]),
            node_version=data.get("node_version", __version__),
            extra=dict(data.get("extra", {})),
        )


@dataclass(frozen=True)
class NodeDevice:
    """The node itself (software that ran the model), as Contributing Equipment beside the model."""

    uid: str
    name: str = "ainode"
    manufacturer: str = MANUFACTURER
    model_name: str = "ainode"
    software_version: str = __version__


def object_uids(node_uid: str, study_uid: str, revision: int, kind: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of one result object of a revision.

    ``kind`` names the object (``"sr-comprehensive"``, ``"sc"``, ``"ko"``). The
    series depends on the study and the kind only, so every revision's object
    of one kind stays in one series (Instance Number = revision); the instance
    also on the revision. Both are deterministic, so a rerun writes the same
    object, never a second one.
    """
    series = generate_uid(entropy_srcs=[node_uid, study_uid, kind, "series"])
    sop = generate_uid(entropy_srcs=[node_uid, study_uid, str(revision), kind, "sop"])
    return series, sop
