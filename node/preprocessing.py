"""What the CNN sees, and where its score map points: numpy only, shared with training.

This module is the single source of the numpy code that training and the node
must agree on: the model's input (HU slices windowed, resized and stacked) and
the reading of its score map into located peaks (:func:`locate_peaks`), so the
detection figures training reports (FROC) measure what the node does.
``training`` imports it, the worker imports it, and a model card names the
``PREPROCESSING_VERSION`` it was trained with (the node refuses a model whose
card names another).

Input: a volume of HU values, shape (z, y, x), slices sorted along the slice
normal. Output: float32 batches, shape (n, size, size, channels), NHWC as
TensorFlow (and its ONNX export) expects, values in [0, 1]. With ``context``
k > 0 each slice gets its k neighbours on both sides as extra channels (2.5D),
repeated at the volume's ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

#: Bump when any output of this module changes for the same input.
PREPROCESSING_VERSION = "1"

#: The lung window (center, width) in HU.
LUNG_WINDOW = (-600.0, 1500.0)


def window(hu: np.ndarray, center: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]) -> np.ndarray:
    """Map HU to [0, 1] through a window (values outside are clipped), as float32."""
    if width <= 0:
        raise ValueError(f'Argument "width" must be more than 0, got {width}')
    lo = center - width / 2.0
    out = np.atleast_1d((np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(width))
    return np.clip(out, 0.0, 1.0, out=out).reshape(np.shape(hu))


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a linear resize along one axis (half-pixel centres)."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def _box_average(images: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """Average non-overlapping fy x fx blocks (the trailing rows/columns that don't fill one are dropped)."""
    n, h, w = images.shape
    h2, w2 = h // fy, w // fx
    cut = images[:, : h2 * fy, : w2 * fx]
    return cut.reshape(n, h2, fy, w2, fx).mean(axis=(2, 4), dtype=np.float32)


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a stack (n, h, w) to (n, size, size), float32.

    Downscaling first averages whole blocks (so a 512 to 224 resize does not
    alias), then interpolates linearly with half-pixel centres.
    """
    if images.ndim != 3:
        raise ValueError(f'Argument "images" must have shape (n, h, w), got {images.shape}')
    if size < 1:
        raise ValueError(f'Argument "size" must be at least 1, got {size}')
    stack = np.asarray(images, dtype=np.float32)
    fy, fx = max(1, stack.shape[1] // size), max(1, stack.shape[2] // size)
    if fy > 1 or fx > 1:
        stack = _box_average(stack, fy, fx)
    n, h, w = stack.shape
    if (h, w) == (size, size):
        return np.ascontiguousarray(stack)
    y0, y1, wy = _axis_weights(h, size)
    x0, x1, wx = _axis_weights(w, size)
    rows = stack[:, y0, :] * (1 - wy)[None, :, None] + stack[:, y1, :] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :] + rows[:, :, x1] * wx[None, None, :]


def prepare_slices(
    volume_hu: np.ndarray,
    indices: Sequence[int] | None = None,
    *,
    size: int = 224,
    context: int = 0,
    hu_window: tuple[float, float] = LUNG_WINDOW,
) -> np.ndarray:
    """The model input for the slices ``indices`` (default: all) of a (z, y, x) HU volume.

    Returns float32 of shape (len(indices), size, size, 2 * context + 1).
    Work is per requested slice, so a caller can go through a long volume in
    batches with bounded memory.
    """
    if volume_hu.ndim != 3:
        raise ValueError(f'Argument "volume_hu" must have shape (z, y, x), got {volume_hu.shape}')
    if context < 0:
        raise ValueError(f'Argument "context" must be 0 or more, got {context}')
    depth = volume_hu.shape[0]
    idx = np.arange(depth) if indices is None else np.asarray(indices, dtype=np.intp)
    if idx.size and (idx.min() < 0 or idx.max() >= depth):
        raise IndexError(f"slice index out of range 0..{depth - 1}")
    offsets = np.arange(-context, context + 1)
    needed = np.clip(idx[:, None] + offsets[None, :], 0, depth - 1)  # (n, channels)
    unique, inverse = np.unique(needed, return_inverse=True)
    prepared = resize(window(volume_hu[unique], *hu_window), size)  # each source slice once
    out = prepared[inverse.reshape(needed.shape)]  # (n, channels, size, size)
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1))


#: The soft-tissue (mediastinal) window (center, width) in HU: where calcium, soft tissue and fat differ.
SOFT_TISSUE_WINDOW = (40.0, 400.0)


def _bilinear(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, fill: float) -> np.ndarray:
    """``image`` (h, w) sampled at fractional (rows, cols) of one shape; ``fill`` outside it."""
    h, w = image.shape
    r0, c0 = np.floor(rows).astype(np.intp), np.floor(cols).astype(np.intp)
    fr, fc = (rows - r0).astype(np.float32), (cols - c0).astype(np.float32)
    padded = np.pad(image.astype(np.float32, copy=False), 1, mode="constant", constant_values=fill)
    r0, c0 = np.clip(r0 + 1, 0, h + 1), np.clip(c0 + 1, 0, w + 1)
    r1, c1 = np.clip(r0 + 1, 0, h + 1), np.clip(c0 + 1, 0, w + 1)
    inside = (rows > -1) & (rows < h) & (cols > -1) & (cols < w)
    out = (padded[r0, c0] * (1 - fr) * (1 - fc) + padded[r0, c1] * (1 - fr) * fc
           + padded[r1, c0] * fr * (1 - fc) + padded[r1, c1] * fr * fc)
    return np.where(inside, out, np.float32(fill))


def prepare_patches(
    volume_hu: np.ndarray,
    centres: Sequence[tuple[float, float, float]],
    *,
    spacing: tuple[float, float, float],
    size: int,
    mm_per_pixel: float,
    z_offsets_mm: Sequence[float],
    windows: Sequence[tuple[float, float]],
) -> np.ndarray:
    """Patches of a (z, y, x) HU volume around ``centres`` (slice, row, column; source voxels), at a fixed scale.

    Each patch is ``size`` x ``size`` pixels of ``mm_per_pixel`` mm, centred on
    its centre (bilinear; -1000 HU, air, outside the image), on the planes
    ``z_offsets_mm`` from it along z (linear between slices, clamped to the
    volume's first and last slice), each plane through every window of
    ``windows``. Returns float32 (n, size, size, len(z_offsets_mm) *
    len(windows)), channels plane-major, values in [0, 1]. A patch in mm
    makes the second stage see a nodule at the same scale whatever the
    scanner's pixel spacing.
    """
    if volume_hu.ndim != 3 or volume_hu.shape[0] == 0:
        raise ValueError(f'Argument "volume_hu" must have shape (z, y, x) with z >= 1, got {volume_hu.shape}')
    if size < 1 or mm_per_pixel <= 0:
        raise ValueError(f'Arguments "size" and "mm_per_pixel" must be positive, got {size} and {mm_per_pixel}')
    depth = volume_hu.shape[0]
    dz, dy, dx = (float(s) if s > 0 else 1.0 for s in spacing)
    grid = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * mm_per_pixel
    out = np.empty((len(centres), size, size, len(z_offsets_mm) * len(windows)), dtype=np.float32)
    for n, (z, row, col) in enumerate(centres):
        rows = np.broadcast_to((row + grid / dy)[:, None], (size, size))
        cols = np.broadcast_to((col + grid / dx)[None, :], (size, size))
        for i, offset in enumerate(z_offsets_mm):
            zf = float(np.clip(z + offset / dz, 0, depth - 1))
            z0 = int(np.floor(zf))
            z1, f = min(z0 + 1, depth - 1), np.float32(zf - z0)
            plane = _bilinear(volume_hu[z0], rows, cols, -1000.0)
            if f > 0:
                plane = plane * (1 - f) + _bilinear(volume_hu[z1], rows, cols, -1000.0) * f
            for j, (center, width) in enumerate(windows):
                out[n, :, :, i * len(windows) + j] = window(plane, center, width)
    return out


def resized_extent(n: int, size: int) -> int:
    """How many source pixels (rows or columns) of ``n`` the resize to ``size`` covers.

    The box average drops the trailing pixels that do not fill a whole block,
    so a model pixel spans ``resized_extent(n, size) / size`` source pixels.
    """
    f = max(1, n // size)
    return (n // f) * f


def map_to_source(coord: float | np.ndarray, map_len: int, source_len: int, size: int) -> float | np.ndarray:
    """A coordinate on a score map of ``map_len`` cells -> the source image's pixel coordinate.

    Pixel centres are integers on both sides (half-pixel convention, as in
    :func:`resize`); ``size`` is the model's input size.
    """
    return (np.asarray(coord, dtype=np.float64) + 0.5) * resized_extent(source_len, size) / map_len - 0.5


#: How far (mm) from its peak a blob may reach: the largest nodule the model is trained on is 30 mm across.
BLOB_REACH_MM = 30.0


@dataclass(frozen=True)
class Peak:
    """A local maximum of a volume's score map, in source image coordinates."""

    slice: int  # index along z of the volume
    row: float  # source pixel row (0 = centre of the first row)
    column: float  # source pixel column
    probability: float  # the map's value at the peak


def _blob_centre(
    maps: np.ndarray, k: int, y: int, x: int, reach: tuple[int, int, int]
) -> tuple[tuple[float, float, float], tuple[slice, slice, slice], np.ndarray]:
    """The centre (z, y, x, in cells) of the blob a peak belongs to, and the blob (its box and mask).

    The blob: cells at or above half the peak's value connected (6-neighbour)
    to the peak, within ``reach`` cells of it on each axis. Its centre is the
    mean position weighted by the value above that half. This places a peak on
    the middle of a plateau (a saturated map) rather than on its first cell,
    and between cells where the map is not saturated.
    """
    half = float(maps[k, y, x]) / 2.0
    lo = [max(0, c - r) for c, r in zip((k, y, x), reach)]
    hi = [min(n, c + r + 1) for c, r, n in zip((k, y, x), reach, maps.shape)]
    box = maps[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    inside = box >= half
    region = np.zeros_like(inside)
    region[k - lo[0], y - lo[1], x - lo[2]] = True
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown[:, :, 1:] |= region[:, :, :-1]
        grown[:, :, :-1] |= region[:, :, 1:]
        grown &= inside
        if np.array_equal(grown, region):
            break
        region = grown
    where = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    weights = np.where(region, box - half, 0.0).astype(np.float64)
    total = float(weights.sum())
    if total <= 0:  # a peak of 0: nothing above half of it
        return (float(k), float(y), float(x)), where, region
    grid = np.indices(box.shape, dtype=np.float64)
    centre = tuple(float((g * weights).sum() / total) + o for g, o in zip(grid, lo))
    return centre, where, region  # type: ignore[return-value]


def locate_peaks(
    maps: np.ndarray,
    *,
    source_shape: tuple[int, int],
    size: int,
    spacing: tuple[float, float, float],
    min_probability: float,
    max_peaks: int,
    min_distance_mm: float = 15.0,
) -> list[Peak]:
    """The most suspicious places of a volume from its score maps, best first.

    Parameters
    ----------
    maps
        Probabilities in [0, 1], shape (z, h, w): the model's score map of every
        slice of the volume, in slice order.
    source_shape
        (rows, columns) of the source slices the maps were computed from.
    size
        The model's input size (the slices were resized to size x size).
    spacing
        (z, row, column) spacing of the volume in mm.
    min_probability
        Peaks below this are not reported.
    max_peaks
        At most this many peaks.
    min_distance_mm
        Non-maximum suppression: a peak closer than this (3-D, in mm) to a
        stronger one is the same finding seen again (on a neighbouring slice,
        or a second maximum of one blob) and is dropped.

    A peak is a cell at least as high as its 26 neighbours (across slices too).
    Its place is the centre of its blob (:func:`_blob_centre`: the connected
    cells above half its value, within :data:`BLOB_REACH_MM`), to a fraction of
    a cell in-plane and to the nearest slice along z, then mapped to source
    pixels. A peak inside the blob of a stronger one (a plateau, a saturated
    map) is that one again.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f'Argument "maps" must have shape (z, h, w), got {maps.shape}')
    if max_peaks < 1:
        raise ValueError(f'Argument "max_peaks" must be at least 1, got {max_peaks}')
    z, h, w = maps.shape
    if z == 0:
        return []
    padded = np.pad(maps, 1, mode="constant", constant_values=-np.inf)
    is_peak = maps >= min_probability
    for dz in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dz or dy or dx:
                    is_peak &= maps >= padded[1 + dz : 1 + dz + z, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    zz, yy, xx = np.nonzero(is_peak)
    order = np.argsort(-maps[zz, yy, xx], kind="stable")
    rows, cols = source_shape
    cell_mm = (spacing[0], spacing[1] * resized_extent(rows, size) / h, spacing[2] * resized_extent(cols, size) / w)
    reach = tuple(max(1, int(np.ceil(BLOB_REACH_MM / c))) if c > 0 else 1 for c in cell_mm)
    consumed = np.zeros(maps.shape, dtype=bool)
    kept: list[Peak] = []
    kept_mm: list[np.ndarray] = []
    for i in order:
        k, y, x = int(zz[i]), int(yy[i]), int(xx[i])
        if consumed[k, y, x]:
            continue
        c = float(maps[k, y, x])
        (fz, fy, fx), where, blob = _blob_centre(maps, k, y, x, reach)  # type: ignore[arg-type]
        consumed[where] |= blob
        k = int(np.clip(round(fz), 0, z - 1))
        row = float(np.clip(map_to_source(fy, h, rows, size), 0, rows - 1))
        col = float(np.clip(map_to_source(fx, w, cols, size), 0, cols - 1))
        mm = _in_mm(k, row, col, spacing)
        if not _clear_of(mm, kept_mm, min_distance_mm):
            continue
        kept.append(Peak(k, row, col, c))
        kept_mm.append(mm)
        if len(kept) == max_peaks:
            break
    return kept


def _in_mm(k: float, row: float, col: float, spacing: Sequence[float]) -> np.ndarray:
    return np.array([k * spacing[0], row * spacing[1], col * spacing[2]])


def _clear_of(mm: np.ndarray, kept_mm: Sequence[np.ndarray], min_distance_mm: float) -> bool:
    """Whether a place (mm) is at least ``min_distance_mm`` (3-D) from every place kept."""
    return all(np.linalg.norm(mm - q) >= min_distance_mm for q in kept_mm)


def suppressed(peaks: Sequence[Peak], spacing: Sequence[float], min_distance_mm: float) -> list[Peak]:
    """``peaks`` (best first) less any within ``min_distance_mm`` (3-D, mm) of a better one kept: the same
    nodule seen twice, as :func:`locate_peaks` suppresses it."""
    kept: list[Peak] = []
    kept_mm: list[np.ndarray] = []
    for p in peaks:
        mm = _in_mm(p.slice, p.row, p.column, spacing)
        if _clear_of(mm, kept_mm, min_distance_mm):
            kept.append(p)
            kept_mm.append(mm)
    return kept


def rescored(peaks: Sequence[Peak], probabilities: Sequence[float]) -> list[Peak]:
    """``peaks`` with a second stage's ``probabilities`` (one each), best first (ties keep their order)."""
    if len(peaks) != len(probabilities):
        raise ValueError(f"{len(peaks)} peaks but {len(probabilities)} probabilities")
    order = np.argsort(-np.asarray(probabilities, dtype=np.float64), kind="stable")
    return [Peak(peaks[i].slice, peaks[i].row, peaks[i].column, float(probabilities[i])) for i in order]


def search_slices(candidates: Sequence[Peak], depth: int, slice_mm: float, search_mm: float) -> list[tuple[int, int]]:
    """The (candidate index, slice) pairs a second stage scores: each candidate on its own slice first, then on
    every other slice of the volume within ``search_mm`` of it along z, nearest first.

    The first stage points at a nodule to within a slice or two: its map is
    per slice and a nodule spans several. The second stage reads a patch
    centred on one slice; scoring a candidate on its neighbours too lets it
    find the slice through the nodule's middle, which is what it was trained on.
    """
    reach = int(np.floor(search_mm / slice_mm + 1e-9)) if slice_mm > 0 and search_mm > 0 else 0
    pairs = []
    for i, p in enumerate(candidates):
        pairs.append((i, p.slice))
        for d in range(1, reach + 1):
            pairs.extend((i, k) for k in (p.slice - d, p.slice + d) if 0 <= k < depth)
    return pairs


def best_slices(candidates: Sequence[Peak], pairs: Sequence[tuple[int, int]],
                probabilities: Sequence[float]) -> list[Peak]:
    """Each candidate on the slice of its ``pairs`` that scored highest (the first of them on a tie: its own,
    from :func:`search_slices`), with that probability; best first (:func:`rescored`). Every candidate needs a pair."""
    if len(pairs) != len(probabilities):
        raise ValueError(f"{len(pairs)} (candidate, slice) pairs but {len(probabilities)} probabilities")
    best: dict[int, tuple[float, int]] = {}
    for (i, k), v in zip(pairs, probabilities):
        if i not in best or float(v) > best[i][0]:
            best[i] = (float(v), int(k))
    if sorted(best) != list(range(len(candidates))):
        raise ValueError(f"pairs cover candidates {sorted(best)}, not all {len(candidates)}")
    moved = [Peak(best[i][1], p.row, p.column, p.probability) for i, p in enumerate(candidates)]
    return rescored(moved, [best[i][0] for i in range(len(candidates))])


def kept_candidates(candidates: Sequence[Peak], pairs: Sequence[tuple[int, int]], probabilities: Sequence[float],
                    spacing: Sequence[float], min_distance_mm: float) -> list[Peak]:
    """The second stage's verdict on ``candidates``, best first: each on its best slice (:func:`best_slices`), less
    any that moved to within ``min_distance_mm`` of a better one (:func:`suppressed`). The node and training both
    decide so."""
    return suppressed(best_slices(candidates, pairs, probabilities), spacing, min_distance_mm)


def score_candidates(
    volume_hu: np.ndarray,
    candidates: Sequence[Peak],
    score: Callable[[np.ndarray], np.ndarray],
    *,
    spacing: tuple[float, float, float],
    size: int,
    mm_per_pixel: float,
    z_offsets_mm: Sequence[float],
    windows: Sequence[Sequence[float]],
    search_mm: float = 0.0,
    min_distance_mm: float = 0.0,
    batch_size: int = 64,
) -> list[Peak]:
    """``candidates`` rescored by a second stage, best first: :func:`prepare_patches` around each on its slice
    and on those within ``search_mm`` (:func:`search_slices`), in batches, through ``score`` (patches -> one
    probability each); each candidate keeps its best slice and probability, and one that moved to within
    ``min_distance_mm`` of a better one is dropped (:func:`kept_candidates`)."""
    pairs = search_slices(candidates, volume_hu.shape[0], float(spacing[0]), search_mm)
    probabilities = np.empty(len(pairs), dtype=np.float32)
    win = [(float(w[0]), float(w[1])) for w in windows]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        centres = [(float(k), candidates[i].row, candidates[i].column) for i, k in chunk]
        patches = prepare_patches(volume_hu, centres, spacing=spacing, size=size, mm_per_pixel=mm_per_pixel,
                                  z_offsets_mm=z_offsets_mm, windows=win)
        out = np.asarray(score(patches), dtype=np.float32).reshape(-1)
        if out.size != len(chunk):
            raise ValueError(f"the second stage gave {out.size} probabilities for {len(chunk)} patches")
        probabilities[start : start + len(chunk)] = out
    return kept_candidates(candidates, pairs, probabilities, spacing, min_distance_mm)


def slice_scores_of(peaks: Sequence[Peak], depth: int) -> np.ndarray:
    """Per slice, the highest probability of the peaks on it; 0 on a slice with none (float32, (depth,)).

    A two-stage model's slice scores: the first stage only points, the second
    scores what it points at, so a slice it pointed at nothing on scores 0 and
    the highest slice score is the top finding's probability.
    """
    scores = np.zeros(depth, dtype=np.float32)
    for p in peaks:
        scores[p.slice] = max(scores[p.slice], np.float32(p.probability))
    return scores
