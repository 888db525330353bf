"""Detection metrics from score maps: LUNA16-style FROC, CPM and localisation error (numpy only).

Candidates come from :func:`node.preprocessing.locate_peaks`, the function the
node uses to turn a volume's maps into findings, so these figures measure
what the node reports.

Rules (LUNA16, with one change for benign nodules):

- Targets are the **malignant** nodules only. A candidate is a hit on a nodule
  when its 3-D distance (mm) to the nodule's centre is at most the nodule's
  radius. Each nodule counts once: its best (highest-probability) hitting
  candidate makes it detected at every threshold up to that probability;
  further candidates on the same nodule are neither hits nor false positives.
- Every other candidate is a false positive, **including candidates on benign
  nodules** (``benign_hits="false_positive"``; the product must not flag them).
  ``benign_hits="ignore"`` gives the LUNA16 reading of excluded findings
  (neither hit nor false positive); both are reported.
- Sensitivity at ``f`` false positives per scan: the highest sensitivity of
  any threshold whose false positives per scan (over all scans, negative ones
  included) are at most ``f``. CPM: the mean over 1/8, 1/4, 1/2, 1, 2, 4, 8.
- Localisation error: for each detected malignant nodule, the 3-D distance
  (mm) from its centre to its best hitting candidate (median and mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from node.preprocessing import Peak, locate_peaks
from training.data import MALIGNANT, CaseGeometry, SliceSet

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Candidate extraction for the FROC: low floor and many peaks, so the curve reaches 8 FPs per scan.
FROC_MIN_PROBABILITY = 1e-3
FROC_MAX_PEAKS = 32
#: Non-maximum suppression distance of locate_peaks (the node's default).
MIN_DISTANCE_MM = 15.0


@dataclass(frozen=True)
class Scored:
    """One candidate after matching: its probability, what it hit (nodule index or -1), its error in mm."""

    probability: float
    nodule: int  # index into the scan's malignant nodules, -1: none
    benign: bool  # within a benign nodule's radius (and no malignant one)
    error_mm: float


def case_maps(s: SliceSet, maps: np.ndarray) -> list[np.ndarray]:
    """Per case, its slices' maps (z, h, w) in slice order. ``s`` must hold every slice (keep_ignored)."""
    if s.slice_index is None:
        raise ValueError('Argument "s" must carry slice indices (built by build_slices)')
    maps = np.asarray(maps)[..., 0] if maps.ndim == 4 else np.asarray(maps)
    out = []
    for i in range(len(s.cases)):
        rows = np.flatnonzero(s.case_index == i)
        order = rows[np.argsort(s.slice_index[rows], kind="stable")]
        if not np.array_equal(s.slice_index[order], np.arange(order.size)):
            raise ValueError(f"case {s.cases[i].case_id}: slices missing; build the set with keep_ignored=True")
        out.append(maps[order])
    return out


def candidates(maps: np.ndarray, geometry: CaseGeometry, size: int, *, min_probability: float = FROC_MIN_PROBABILITY,
               max_peaks: int = FROC_MAX_PEAKS) -> list[Peak]:
    """The volume's candidates, through the node's own :func:`locate_peaks`."""
    return locate_peaks(maps, source_shape=geometry.shape, size=size, spacing=geometry.spacing,
                        min_probability=min_probability, max_peaks=max_peaks, min_distance_mm=MIN_DISTANCE_MM)


def peak_mm(p: Peak, spacing: Sequence[float]) -> np.ndarray:
    return np.array([p.slice * spacing[0], p.row * spacing[1], p.column * spacing[2]])


def match(peaks: Sequence[Peak], geometry: CaseGeometry) -> list[Scored]:
    """Match one scan's candidates (best first) to its nodules."""
    sp = np.asarray(geometry.spacing)
    malignant = [n for n in geometry.nodules if n.label == MALIGNANT]
    benign = [n for n in geometry.nodules if n.label != MALIGNANT]
    centre = lambda n: np.array([n.z, n.y, n.x]) * sp  # noqa: E731
    out = []
    for p in peaks:
        mm = peak_mm(p, sp)
        hit, err = -1, float("nan")
        for j, n in enumerate(malignant):
            d = float(np.linalg.norm(mm - centre(n)))
            if d <= n.diameter_mm / 2 and (hit < 0 or d < err):
                hit, err = j, d
        on_benign = hit < 0 and any(np.linalg.norm(mm - centre(n)) <= n.diameter_mm / 2 for n in benign)
        out.append(Scored(float(p.probability), hit, on_benign, err))
    return out


def froc(per_scan: Sequence[Sequence[Scored]], n_targets: int, *, benign_hits: str = "false_positive",
         fp_rates: Sequence[float] = FP_RATES) -> dict[str, Any]:
    """FROC sensitivities at ``fp_rates``, CPM and localisation error over matched scans."""
    if benign_hits not in ("false_positive", "ignore"):
        raise ValueError(f'Argument "benign_hits" must be "false_positive" or "ignore", got {benign_hits!r}')
    n_scans = len(per_scan)
    best: list[tuple[float, float]] = []  # per detected nodule: (probability of its best hit, error)
    fps: list[float] = []
    for scan in per_scan:
        seen: dict[int, tuple[float, float]] = {}
        for c in scan:
            if c.nodule >= 0:
                if c.nodule not in seen or c.probability > seen[c.nodule][0]:
                    seen[c.nodule] = (c.probability, c.error_mm)
            elif not (c.benign and benign_hits == "ignore"):
                fps.append(c.probability)
        best.extend(seen.values())
    hit_p = np.sort(np.array([b[0] for b in best]))[::-1]
    fp_p = np.sort(np.array(fps))[::-1]
    thresholds = np.unique(np.r_[hit_p, fp_p, np.inf])[::-1]
    sens = np.array([(hit_p >= t).sum() for t in thresholds]) / max(n_targets, 1)
    fppi = np.array([(fp_p >= t).sum() for t in thresholds]) / max(n_scans, 1)
    at = {}
    for f in fp_rates:
        ok = fppi <= f
        at[_rate_key(f)] = float(sens[ok].max()) if ok.any() else 0.0
    errors = np.array([b[1] for b in best])
    return {
        "sensitivity_at_fp_per_scan": at,
        "cpm": float(np.mean(list(at.values()))),
        "targets": int(n_targets),
        "scans": int(n_scans),
        "detected_at_any_threshold": int(len(best)),
        "false_positives_total": int(len(fps)),
        "benign_hits": benign_hits,
        "localisation_error_mm": {
            "n": int(errors.size),
            "median": float(np.median(errors)) if errors.size else float("nan"),
            "mean": float(np.mean(errors)) if errors.size else float("nan"),
        },
        "curve": {"fp_per_scan": [round(float(v), 4) for v in fppi], "sensitivity": [round(float(v), 4) for v in sens]},
    }


def _rate_key(f: float) -> str:
    return {0.125: "1/8", 0.25: "1/4", 0.5: "1/2"}.get(f, f"{f:g}")


def detection_metrics(s: SliceSet, maps: np.ndarray, size: int) -> dict[str, Any]:
    """FROC (benign hits as false positives, and ignored), CPM and localisation error for a whole split."""
    return peak_metrics([candidates(m, g, size) for m, g in zip(case_maps(s, maps), s.geometry)], s.geometry)


def peak_metrics(per_case: Sequence[Sequence[Peak]], geometry: Sequence[CaseGeometry], *,
                 min_probability: float = FROC_MIN_PROBABILITY, max_peaks: int = FROC_MAX_PEAKS,
                 function: str = "node.preprocessing.locate_peaks") -> dict[str, Any]:
    """:func:`detection_metrics` for candidates already found (best first per case), e.g. a second stage's."""
    matched = [match(peaks, g) for peaks, g in zip(per_case, geometry)]
    n_targets = sum(1 for g in geometry for n in g.nodules if n.label == MALIGNANT)
    strict = froc(matched, n_targets, benign_hits="false_positive")
    loose = froc(matched, n_targets, benign_hits="ignore")
    strict["benign_hits_ignored"] = {"sensitivity_at_fp_per_scan": loose["sensitivity_at_fp_per_scan"],
                                     "cpm": loose["cpm"]}
    strict["candidates"] = {"min_probability": min_probability, "max_peaks": max_peaks,
                            "min_distance_mm": MIN_DISTANCE_MM, "function": function}
    strict["hit_rule"] = ("a candidate hits a malignant nodule within its radius of its centre (3-D, mm); each "
                          "nodule counts once (its best candidate); other candidates on it are ignored; candidates "
                          "on benign nodules are false positives (benign_hits_ignored: neither)")
    return strict
