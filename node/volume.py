"""Choose the CT series of a study and load it as a HU volume.

Choosing (:func:`choose_series`) reads headers only (``stop_before_pixels``).
Instances are grouped by Series Instance UID; in a series of the configured
modality each instance is kept only if it

- is single-frame CT Image Storage (Enhanced / Legacy Converted Enhanced CT
  multi-frame is *not* supported: the volume names one SOP instance per slice,
  and the SR references key images by instance, not by frame);
- is not a localizer (ImageType contains ``LOCALIZER``) when
  ``exclude_localizers``;
- has a valid ImagePositionPatient / ImageOrientationPatient;
- is axial when ``require_axial``: its slice normal (row x column direction)
  lies within 10 degrees of the patient z axis (the ImageType text is not
  trusted; gantry tilt up to 10 degrees passes);
- is ORIGINAL (ImageType value 1) when ``require_original``. This is a hard
  rule, not a fallback: a study whose only axial series is DERIVED gets a
  reason naming the rule. With ``require_original = false`` DERIVED series are
  eligible but an ORIGINAL series is still preferred.

A series is then eligible if its kept instances have at least ``min_slices``
distinct positions (a single slice counts as a localizer when
``exclude_localizers``) and its slices are at most ``max_slice_thickness_mm``
thick, where thickness means max(SliceThickness, median position step): a
thin-slice series sampled every 10 mm is as sparse as a 10 mm series. Among
eligible series: ORIGINAL first, then most slices, then thinnest, then the
lowest Series UID (deterministic). No eligible series raises
:class:`NoUsableSeriesError`; its message names what was found. Files pydicom
cannot parse are skipped (logged) when choosing. A series that fails to load
is not replaced by the next one: the study gets that reason.

Loading (:func:`load_volume`) sorts slices by position along the slice normal
(never by InstanceNumber), converts each slice to HU with its own
RescaleSlope/RescaleIntercept (rounded half to even, clipped into int16) and
writes it into one preallocated int16 array, decoding one file at a time.
Tolerated (logged, counted): uneven spacing, gaps (a step > 1.5 x the median
step counts round(step / median) - 1 missing slices), duplicate positions
(the lowest InstanceNumber is kept) and slices of a minority Rows x Columns.
Refused with :class:`VolumeError` naming the series (and the SOP instance
where there is one): instances of several series, more than ``max_slices``
files, multi-frame or colour instances, a majority size over
``max_pixels_per_slice``, differing orientations or pixel spacings, missing
position/spacing/rescale attributes or pixel data, a transfer syntax without an
installed decoder, pixel data that fails to decode, and fewer than
``min_slices`` slices left. A single-slice volume gets SliceThickness (or 0)
as its z spacing.

:func:`load_study` does both, reading each header once, and applies
``min_slices`` again after slices were skipped.

Errors reading the disk (OSError) are not turned into reasons: they propagate
so that the job is retried. Only what pydicom cannot parse or decode is bad
input.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, CTImageStorage

from node.config import SeriesRules
from node.errors import NoUsableSeriesError, StudyLimitError, VolumeError

logger = logging.getLogger(__name__)

#: Slice normals within this angle of the patient z axis count as axial.
AXIAL_TOLERANCE_DEG = 10.0
#: A position step larger than this times the median step is a gap.
GAP_FACTOR = 1.5
#: Slices closer than this (mm, along the normal) share one position.
SAME_POSITION_MM = 0.01
#: Orientation cosines and pixel spacings that differ by less than this agree.
ORIENTATION_TOLERANCE = 1e-3
SPACING_TOLERANCE = 1e-3
LOCALIZER = "LOCALIZER"
ORIGINAL = "ORIGINAL"
#: The single-frame SOP class whose slices form a volume, per modality.
SLICE_SOP_CLASSES: dict[str, str] = {"CT": CTImageStorage}
_INT16 = (-32768, 32767)
#: A series with more of its values than this outside int16 after the rescale is not analysed.
MAX_CLIPPED_FRACTION = 0.5
_MAX_REASONS = 5


@dataclass(frozen=True)
class SeriesChoice:
    """The chosen series: its UID, its files (sorted by position) and why it was chosen."""

    series_uid: str
    paths: tuple[Path, ...]
    why: str


@dataclass(frozen=True, eq=False)
class Volume:
    """A series as HU: ``hu`` is int16 (z, y, x), slices ascending along the slice normal."""

    hu: np.ndarray
    positions: np.ndarray  # float64 (z,), mm along the normal
    spacing: tuple[float, float, float]  # (median z step, row spacing, column spacing) mm
    study_uid: str
    series_uid: str
    sop_class_uids: tuple[str, ...]
    sop_instance_uids: tuple[str, ...]
    missing_slices: int
    skipped: tuple[str, ...]
    instance_numbers: tuple[int | None, ...] = ()  # per slice, as the source says (what a person calls it)


@dataclass(frozen=True)
class _Header:
    """What choosing and loading need from one instance (no pixel data)."""

    path: Path
    sop_uid: str
    sop_class: str
    series_uid: str
    study_uid: str
    modality: str
    image_type: tuple[str, ...]
    transfer_syntax: str
    frames: int
    rows: int
    cols: int
    samples: int
    orientation: tuple[float, ...] | None
    normal: tuple[float, float, float] | None
    position: tuple[float, ...] | None  # (x, y, z) mm
    pixel_spacing: tuple[float, ...] | None  # (row, column) mm
    thickness: float | None
    slope: float | None
    intercept: float | None
    instance_number: int | None

    @property
    def along_normal(self) -> float:
        assert self.position is not None and self.normal is not None
        return float(np.dot(self.position, self.normal))


# --------------------------------------------------------------------------- headers


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    """``count`` finite floats from a multi-valued element, or None if absent or invalid."""
    try:
        value = ds.get(keyword)
        if value is None:
            return None
        values = [value] if count == 1 and not isinstance(value, (list, tuple)) else list(value)
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return out if len(out) == count and all(math.isfinite(v) for v in out) else None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _normal(orientation: tuple[float, ...] | None) -> tuple[float, float, float] | None:
    """The unit slice normal (row x column), or None if the cosines are not two orthogonal unit vectors."""
    if orientation is None:
        return None
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01 or abs(row @ col) > 0.01:
        return None
    n = np.cross(row, col)
    n /= np.linalg.norm(n)
    return (float(n[0]), float(n[1]), float(n[2]))


def _read_header(path: Path) -> _Header:
    """Read one instance's header; VolumeError with a one-line reason if it is not usable DICOM."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except OSError:
        raise  # the disk, not the data: let the job retry
    except Exception as exc:  # untrusted input: any parser failure is a reason, not a crash
        raise VolumeError(f"{Path(path).name} is not readable DICOM: {type(exc).__name__}: {_one_line(exc)}") from exc
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not sop_uid or not series_uid:
        raise VolumeError(f"{Path(path).name} has no SOP Instance UID or Series Instance UID")
    meta = getattr(ds, "file_meta", None)
    orientation = _floats(ds, "ImageOrientationPatient", 6)
    position = _floats(ds, "ImagePositionPatient", 3)
    spacing = _floats(ds, "PixelSpacing", 2)
    thickness = _floats(ds, "SliceThickness", 1)
    slope = _floats(ds, "RescaleSlope", 1)
    intercept = _floats(ds, "RescaleIntercept", 1)
    image_type = ds.get("ImageType") or ()
    return _Header(
        path=Path(path),
        sop_uid=sop_uid,
        sop_class=str(ds.get("SOPClassUID", "") or ""),
        series_uid=series_uid,
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        image_type=tuple(str(v).strip().upper() for v in ([image_type] if isinstance(image_type, str) else image_type)),
        transfer_syntax=str(meta.get("TransferSyntaxUID", "") if meta is not None else ""),
        frames=max(_int(ds, "NumberOfFrames") or 1, 1),
        rows=_int(ds, "Rows") or 0,
        cols=_int(ds, "Columns") or 0,
        samples=_int(ds, "SamplesPerPixel") or 1,
        orientation=orientation,
        normal=_normal(orientation),
        position=position,
        pixel_spacing=spacing,
        thickness=thickness[0] if thickness else None,
        slope=slope[0] if slope else None,
        intercept=intercept[0] if intercept else None,
        instance_number=_int(ds, "InstanceNumber"),
    )


def _read_headers(paths: Iterable[Path]) -> tuple[list[_Header], int]:
    """Headers of the readable files, and how many were not readable (logged)."""
    headers: list[_Header] = []
    unreadable = 0
    for path in paths:
        try:
            headers.append(_read_header(path))
        except VolumeError as exc:
            unreadable += 1
            logger.warning("Skipped %s", exc)
    return headers, unreadable


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _count(n: int, noun: str) -> str:
    """``1 slice``, ``2 slices``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _mm(value: float) -> str:
    """A length in mm as text: 5.0, 0.625, 1.25."""
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


# --------------------------------------------------------------------------- choose


@dataclass
class _Candidate:
    series_uid: str
    headers: list[_Header]
    slices: int
    thickness: float
    original: bool
    axial: bool
    left_out: Counter[str] = field(default_factory=Counter)


def _thickness(headers: Sequence[_Header]) -> tuple[float, float | None, float | None]:
    """(effective thickness, median SliceThickness, median step) of a series' slices."""
    thick = [h.thickness for h in headers if h.thickness is not None and h.thickness > 0]
    positions = np.unique(np.round([h.along_normal for h in headers], 2))
    step = float(np.median(np.diff(positions))) if len(positions) > 1 else None
    nominal = float(np.median(thick)) if thick else None
    values = [v for v in (nominal, step) if v is not None]
    return (max(values) if values else 0.0), nominal, step


def _evaluate(series_uid: str, headers: list[_Header], rules: SeriesRules) -> _Candidate | str:
    """A candidate, or the one-line reason the series is not eligible."""
    name = f"{rules.modality} series {series_uid}"
    left_out: Counter[str] = Counter()
    kept: list[_Header] = []
    slice_class = SLICE_SOP_CLASSES[rules.modality]
    for h in headers:
        if h.sop_class != slice_class or h.frames > 1:
            left_out["multi-frame" if h.frames > 1 else f"{UID(h.sop_class).name or 'no SOP class'}"] += 1
        elif rules.exclude_localizers and LOCALIZER in h.image_type:
            left_out["localizer"] += 1
        elif h.position is None or h.normal is None:
            left_out["no valid position/orientation"] += 1
        elif rules.require_axial and abs(h.normal[2]) < math.cos(math.radians(AXIAL_TOLERANCE_DEG)):
            left_out["not axial"] += 1
        elif rules.require_original and (not h.image_type or h.image_type[0] != ORIGINAL):
            left_out["not ORIGINAL"] += 1
        else:
            kept.append(h)
    if not kept:
        return _nothing_kept(name, headers, left_out, slice_class)
    slices = len({round(h.along_normal, 2) for h in kept})
    if slices == 1 and rules.exclude_localizers:
        return f"{name} is a single slice (treated as a localizer)"
    if slices < rules.min_slices:
        return f"{name} has {_count(slices, 'slice')}, fewer than min_slices = {rules.min_slices}"
    thickness, nominal, step = _thickness(kept)
    if thickness > rules.max_slice_thickness_mm + 1e-3:
        detail = ", ".join(f"{k} {_mm(v)} mm" for k, v in (("thickness", nominal), ("spacing", step)) if v is not None)
        return (f"{name} has {_mm(thickness)} mm slices ({detail}), "
                f"more than max_slice_thickness_mm = {_mm(rules.max_slice_thickness_mm)}")
    original = all(h.image_type[:1] == (ORIGINAL,) for h in kept)
    axial = all(abs(h.normal[2]) >= math.cos(math.radians(AXIAL_TOLERANCE_DEG)) for h in kept if h.normal)
    kept.sort(key=lambda h: (h.along_normal, h.sop_uid))
    return _Candidate(series_uid, kept, slices, thickness, original, axial, left_out)


def _nothing_kept(name: str, headers: list[_Header], left_out: Counter[str], slice_class: str) -> str:
    """Why no instance of a series was kept: the rule that left out the most of them."""
    order = ["multi-frame", "localizer", "no valid position/orientation", "not axial", "not ORIGINAL"]
    top = max(left_out, key=lambda k: (left_out[k], -order.index(k) if k in order else -len(order)))
    if top == "multi-frame":
        multi = max(headers, key=lambda h: h.frames)
        return (f"{name} holds only multi-frame instances ({UID(multi.sop_class).name}, {multi.frames} frames), "
                f"which are not supported; send it as single-frame {UID(slice_class).name}")
    if top == "localizer":
        return f"{name} is a localizer"
    if top == "no valid position/orientation":
        return f"{name} has no valid ImagePositionPatient/ImageOrientationPatient"
    if top == "not axial":
        normal = next(h.normal for h in headers if h.normal is not None)
        angle = math.degrees(math.acos(min(1.0, abs(normal[2]))))
        return f"{name} is not axial (slice normal {angle:.0f} degrees from the patient z axis)"
    if top == "not ORIGINAL":
        kind = next("\\".join(h.image_type) for h in headers if h.image_type[:1] != (ORIGINAL,)) or "empty"
        return f"{name} is not ORIGINAL (ImageType {kind}) and [series] require_original is set"
    return f"{name} holds no {UID(slice_class).name} instances (found {', '.join(sorted(left_out))})"


def _found(headers: Sequence[_Header], unreadable: int) -> str:
    """What a study holds, e.g. ``CR (1 instance), SR (2 instances), 1 unreadable file``."""
    counts = Counter(h.modality or "no Modality" for h in headers)
    parts = [f"{m} ({_count(n, 'instance')})" for m, n in sorted(counts.items())]
    if unreadable:
        parts.append(_count(unreadable, "unreadable file"))
    return ", ".join(parts)


def _choose(headers: list[_Header], unreadable: int, rules: SeriesRules) -> _Candidate:
    if not headers:
        raise NoUsableSeriesError(
            f"no readable DICOM instances ({_count(unreadable, 'unreadable file')})" if unreadable else "no instances"
        )
    by_series: dict[str, list[_Header]] = {}
    for h in headers:
        if h.modality == rules.modality:
            by_series.setdefault(h.series_uid, []).append(h)
    if not by_series:
        raise NoUsableSeriesError(f"no {rules.modality} series: found {_found(headers, unreadable)}")
    candidates: list[_Candidate] = []
    reasons: list[str] = []
    for series_uid, members in sorted(by_series.items()):
        result = _evaluate(series_uid, members, rules)
        if isinstance(result, str):
            reasons.append(result)
            logger.debug("Series %s not chosen: %s", series_uid, result)
        else:
            candidates.append(result)
    if not candidates:
        if len(reasons) == 1:
            raise NoUsableSeriesError(reasons[0])
        more = f"; and {len(reasons) - _MAX_REASONS} more" if len(reasons) > _MAX_REASONS else ""
        raise NoUsableSeriesError(
            f"no usable {rules.modality} series among {len(reasons)}: " + "; ".join(reasons[:_MAX_REASONS]) + more
        )
    candidates.sort(key=lambda c: (not c.original, -c.slices, c.thickness, c.series_uid))
    return candidates[0]


def _why(c: _Candidate, rules: SeriesRules, others: int) -> str:
    why = (f"{rules.modality} {'ORIGINAL' if c.original else 'DERIVED'} {'axial' if c.axial else 'non-axial'}, "
           f"{c.slices} slices, {_mm(c.thickness)} mm")
    if c.left_out:
        why += "; left out " + ", ".join(f"{n} {k}" for k, n in sorted(c.left_out.items()))
    if others:
        why += f"; {others} other {rules.modality} series not chosen"
    return why


def _choice(headers: list[_Header], unreadable: int, rules: SeriesRules) -> tuple[SeriesChoice, _Candidate]:
    chosen = _choose(headers, unreadable, rules)
    others = len({h.series_uid for h in headers if h.modality == rules.modality}) - 1
    choice = SeriesChoice(chosen.series_uid, tuple(h.path for h in chosen.headers), _why(chosen, rules, others))
    logger.info("Series %s chosen: %s", choice.series_uid, choice.why)
    return choice, chosen


def choose_series(paths: Iterable[Path], rules: SeriesRules = SeriesRules()) -> SeriesChoice:
    """Choose the series to analyse among a study's files, from headers only.

    Raises NoUsableSeriesError whose message is the reason recorded for the study.
    """
    return _choice(*_read_headers(paths), rules)[0]


# --------------------------------------------------------------------------- load


def _check_headers(headers: list[_Header], series: str, max_slices: int) -> None:
    """Refuse what no volume can be made of, before any pixel data is read."""
    if len(headers) > max_slices:
        raise VolumeError(f"series {series}: {len(headers)} instances, more than max_slices = {max_slices}")
    for h in headers:
        if h.frames > 1:
            raise VolumeError(f"series {series}: instance {h.sop_uid} is multi-frame ({h.frames} frames); "
                              "only single-frame slices are supported")
        if h.samples != 1:
            raise VolumeError(f"series {series}: instance {h.sop_uid} has {h.samples} samples per pixel, not grayscale")
        missing = [k for k, v in (("ImagePositionPatient", h.position), ("ImageOrientationPatient", h.normal),
                                  ("PixelSpacing", h.pixel_spacing), ("RescaleSlope", h.slope),
                                  ("RescaleIntercept", h.intercept)) if v is None]
        if missing:
            raise VolumeError(f"series {series}: instance {h.sop_uid} has no valid {', '.join(missing)}")
    for ts in sorted({h.transfer_syntax for h in headers}):
        _check_decoder(ts, series, next(h.sop_uid for h in headers if h.transfer_syntax == ts))


def _check_decoder(ts: str, series: str, sop_uid: str) -> None:
    from pydicom.pixels import get_decoder

    if not ts:
        raise VolumeError(f"series {series}: instance {sop_uid} has no Transfer Syntax UID")
    try:
        available = get_decoder(UID(ts)).is_available
    except (NotImplementedError, ValueError):
        available = False
    if not available:
        raise VolumeError(f"series {series}: no pixel data decoder installed for transfer syntax "
                          f"{UID(ts).name} ({ts}), used by instance {sop_uid}")


def _majority_size(headers: list[_Header], series: str, skipped: list[str]) -> list[_Header]:
    """Keep the slices of the most common Rows x Columns; skip the others."""
    sizes = Counter((h.rows, h.cols) for h in headers)
    (rows, cols), _ = max(sizes.items(), key=lambda kv: (kv[1], kv[0][0] * kv[0][1]))
    if len(sizes) > 1:
        others = [h for h in headers if (h.rows, h.cols) != (rows, cols)]
        skipped.extend(h.sop_uid for h in others)
        logger.warning("Series %s: skipped %d slice(s) not %dx%d: %s", series, len(others), rows, cols,
                       ", ".join(f"{h.sop_uid} ({h.rows}x{h.cols})" for h in others))
    return [h for h in headers if (h.rows, h.cols) == (rows, cols)]


def _check_geometry(headers: list[_Header], series: str, max_pixels: int) -> None:
    first = headers[0]
    if first.rows < 1 or first.cols < 1:
        raise VolumeError(f"series {series}: slices are {first.rows}x{first.cols}")
    if first.rows * first.cols > max_pixels:
        raise VolumeError(f"series {series}: slices are {first.rows}x{first.cols}, "
                          f"more than max_pixels_per_slice = {max_pixels}")
    ref_o = np.asarray(first.orientation)
    ref_s = np.asarray(first.pixel_spacing)
    for h in headers[1:]:
        if np.max(np.abs(np.asarray(h.orientation) - ref_o)) > ORIENTATION_TOLERANCE:
            raise VolumeError(f"series {series}: instance {h.sop_uid} has orientation {list(h.orientation or ())}, "
                              f"others {list(first.orientation or ())}; slices of different orientations")
        if np.max(np.abs(np.asarray(h.pixel_spacing) / ref_s - 1)) > SPACING_TOLERANCE:
            raise VolumeError(f"series {series}: instance {h.sop_uid} has PixelSpacing {list(h.pixel_spacing or ())}, "
                              f"others {list(first.pixel_spacing or ())}")


def _sort_and_dedupe(
    headers: list[_Header], normal: np.ndarray, series: str, skipped: list[str]
) -> tuple[list[_Header], np.ndarray]:
    """Slices ascending along ``normal``; of slices sharing a position the lowest InstanceNumber stays."""
    pos = np.array([np.dot(np.asarray(h.position), normal) for h in headers], dtype=np.float64)
    order = np.argsort(pos, kind="stable")
    groups: list[list[int]] = []
    for i in order.tolist():
        if groups and pos[i] - pos[groups[-1][0]] < SAME_POSITION_MM:
            groups[-1].append(i)
        else:
            groups.append([i])
    never = 1 << 62
    kept: list[int] = []
    for group in groups:
        group.sort(key=lambda i: (headers[i].instance_number if headers[i].instance_number is not None else never,
                                  headers[i].sop_uid))
        kept.append(group[0])
        for i in group[1:]:
            skipped.append(headers[i].sop_uid)
            logger.warning("Series %s: skipped %s, same position (%.2f mm) as %s", series, headers[i].sop_uid,
                           pos[i], headers[group[0]].sop_uid)
    return [headers[i] for i in kept], pos[kept]


def _gaps(positions: np.ndarray, series: str) -> tuple[float, int]:
    """(median step, number of missing slices); logs gaps and uneven spacing."""
    steps = np.diff(positions)
    median = float(np.median(steps))
    missing = 0
    for i in np.flatnonzero(steps > GAP_FACTOR * median):
        n = max(1, int(round(steps[i] / median)) - 1)
        missing += n
        logger.warning("Series %s: gap of %.2f mm after %.2f mm (median step %.2f mm): %d slice(s) missing",
                       series, steps[i], positions[i], median, n)
    if not missing and steps.max() > (1 + 0.1) * steps.min():
        logger.warning("Series %s: uneven slice spacing, steps %.2f to %.2f mm (median %.2f mm)",
                       series, steps.min(), steps.max(), median)
    return median, missing


def _decode_into(h: _Header, out: np.ndarray, series: str) -> int:
    """Decode one slice, convert to HU into ``out`` (int16); returns how many values were clipped."""
    try:
        ds = dcmread(h.path)
    except OSError:
        raise  # the disk, not the data: let the job retry
    except Exception as exc:  # untrusted input
        raise VolumeError(f"series {series}: instance {h.sop_uid} cannot be read: {_one_line(exc)}") from exc
    if "PixelData" not in ds:
        raise VolumeError(f"series {series}: instance {h.sop_uid} has no pixel data")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # decoders raise many types; the reason matters, not the type
        raise VolumeError(f"series {series}: pixel data of instance {h.sop_uid} ({UID(h.transfer_syntax).name}) "
                          f"cannot be decoded: {_one_line(exc)}") from exc
    finally:
        del ds
    if stored.shape != out.shape:
        raise VolumeError(f"series {series}: instance {h.sop_uid} decoded to shape {stored.shape}, "
                          f"expected {out.shape}")
    assert h.slope is not None and h.intercept is not None  # checked by _check_headers
    hu = stored.astype(np.float64)
    del stored
    hu *= h.slope
    hu += h.intercept
    np.rint(hu, out=hu)
    clipped = int(np.count_nonzero((hu < _INT16[0]) | (hu > _INT16[1])))
    np.clip(hu, *_INT16, out=hu)
    out[...] = hu
    return clipped


def _check_cost(n: int, rows: int, cols: int, series: str, max_volume_mb: int) -> None:
    """Refuse, from the headers alone, a series whose decoding would cost more than allowed.

    The volume is int16; decoding one slice needs its stored array and a
    float64 copy besides. A decompression bomb (tiny JPEG 2000 files that
    decode to 4096x4096 each) is caught here, before a byte is decoded.
    """
    need = n * rows * cols * 2 + rows * cols * 16
    if need > max_volume_mb * 2**20:
        raise StudyLimitError(f"series {series}: {n} slices of {rows}x{cols} would take {need / 2**20:.0f} MB "
                              f"decoded, more than [series] max_volume_mb = {max_volume_mb}")


def _build_volume(headers: list[_Header], max_slices: int, max_pixels: int, min_slices: int,
                  max_volume_mb: int = 2048) -> Volume:
    if not headers:
        raise VolumeError("no instances to load")
    series_uids = sorted({h.series_uid for h in headers})
    if len(series_uids) > 1:
        raise VolumeError(f"instances of {len(series_uids)} series ({', '.join(series_uids[:3])}) "
                          "cannot form one volume")
    series = series_uids[0]
    started = time.monotonic()
    _check_headers(headers, series, max_slices)
    skipped: list[str] = []
    headers = _majority_size(headers, series, skipped)
    _check_geometry(headers, series, max_pixels)
    normal = np.asarray(headers[0].normal)
    headers, positions = _sort_and_dedupe(headers, normal, series, skipped)
    if len(headers) < min_slices:
        raise VolumeError(f"series {series}: {len(headers)} usable slices ({len(skipped)} skipped), "
                          f"fewer than min_slices = {min_slices}")
    studies = {h.study_uid for h in headers}
    if len(studies) > 1:
        raise VolumeError(f"series {series}: slices belong to {len(studies)} studies")
    if len(headers) > 1:
        dz, missing = _gaps(positions, series)
    else:
        dz, missing = headers[0].thickness or 0.0, 0
    rows, cols = headers[0].rows, headers[0].cols
    _check_cost(len(headers), rows, cols, series, max_volume_mb)
    hu = np.empty((len(headers), rows, cols), dtype=np.int16)
    clipped = sum(_decode_into(h, hu[i], series) for i, h in enumerate(headers))
    if clipped > MAX_CLIPPED_FRACTION * hu.size:
        raise StudyLimitError(f"series {series}: {100 * clipped / hu.size:.0f}% of its values fall outside the "
                              "int16 HU range after RescaleSlope/RescaleIntercept: not a physical CT")
    if clipped:
        logger.warning("Series %s: %d HU value(s) clipped into int16", series, clipped)
    row_mm, col_mm = headers[0].pixel_spacing or (0.0, 0.0)
    logger.info("Series %s: loaded %d slices of %dx%d (%s mm), %d missing, %d skipped, in %.2f s", series,
                len(headers), rows, cols, _mm(dz), missing, len(skipped), time.monotonic() - started)
    return Volume(
        hu=hu,
        positions=positions,
        spacing=(float(dz), float(row_mm), float(col_mm)),
        study_uid=headers[0].study_uid,
        series_uid=series,
        sop_class_uids=tuple(h.sop_class for h in headers),
        sop_instance_uids=tuple(h.sop_uid for h in headers),
        missing_slices=missing,
        skipped=tuple(skipped),
        instance_numbers=tuple(h.instance_number for h in headers),
    )


def load_volume(
    paths: Sequence[Path], *, max_slices: int = 2000, max_pixels_per_slice: int = 4096 * 4096, min_slices: int = 1
) -> Volume:
    """Load the files of one series as a HU volume sorted along the slice normal.

    Raises VolumeError with a one-line reason naming the series (and instance).
    """
    headers: list[_Header] = []
    for path in paths:
        try:
            headers.append(_read_header(path))
        except VolumeError as exc:
            raise VolumeError(f"cannot load the series: {exc}") from exc
    return _build_volume(headers, max_slices, max_pixels_per_slice, min_slices)


def load_study(
    study_dir_files: Iterable[Path],
    rules: SeriesRules = SeriesRules(),
    *,
    max_slices: int = 2000,
    max_pixels_per_slice: int = 4096 * 4096,
) -> tuple[SeriesChoice, Volume]:
    """Choose the series of a study's files and load it (headers are read once).

    Raises NoUsableSeriesError (no eligible series) or VolumeError (the chosen one cannot be loaded).
    """
    choice, chosen = _choice(*_read_headers(study_dir_files), rules)
    volume = _build_volume(chosen.headers, max_slices, max_pixels_per_slice, rules.min_slices, rules.max_volume_mb)
    return choice, volume
