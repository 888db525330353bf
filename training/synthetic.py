"""The semi-synthetic set: real chest CT anatomy with inserted nodules whose traits set the label.

Anatomy (real pixels, HU):

- pyradiomics ``lung1`` (one NSCLC patient, 48 x 512 x 512, 0.57 x 0.57 x 5 mm).
  Only slices ``lung1_slices`` (default 0..27, the lower and middle thorax) are
  used: the upper slices, which hold that patient's real tumour (slices 32..34),
  are held out for the real-anatomy check. The tumour label file is never read.
- pydicom's ``CT_small.dcm`` (one 128 x 128 chest slice, 0.66 mm pixels),
  repeated along z as a thin slab.

Each volume is a window of consecutive slices at its own slice spacing (=
thickness), drawn from 1, 1.25, 2, 2.5, 3 and 5 mm (40 % of the volumes keep
the anatomy's own 5 mm, as lung1-like studies have): the 5 mm anatomy is
resampled along z to that spacing (linear interpolation of HU) before anything
is drawn into it, and the window keeps ``slices_per_volume`` slices, so a
thin-slice volume covers less of the body along z. The window is warped
in-plane (flip, rotation +-8 degrees, scale 0.85..1.15 for body size, shift),
given 0, 1 or 2 nodules drawn inside the lungs, then a reconstruction kernel
(as is, softer or sharper) and noise (0-20 HU). A nodule has four traits, and the traits alone decide
its label (:func:`is_malignant`):

    malignant  <=>  no calcification  AND  ( spiculated margin and diameter >= 6 mm
                                              or solid and diameter >= 10 mm
                                              or part-solid and diameter >= 8 mm
                                              or ground glass and diameter >= 20 mm )

(a simplified reading of Lung-RADS / Brock: benign-pattern calcification means
benign; size and a solid component raise suspicion; spiculation is suspicious
at any size above 6 mm). A study is malignant when any of its nodules is.

Nodules are rendered in HU at the volume's resolution (the anatomy's pixels,
the volume's slice spacing), with partial volume along z (five sub-samples
spanning each slice's thickness, which equals the spacing), so the model sees
them through ``node.preprocessing`` exactly as it sees real studies. The
volume's spacing is recorded in its :class:`~training.data.Volume`, which the
map targets and the FROC matching use.

The drawn nodules are round-ish, even in density and sit free in aerated
lung; real masses are angular, uneven, with air inside, strands out into the
lung and often against the pleura. ``irregular_share`` draws that share of the
nodules of volumes ``irregular_from`` onward so (:func:`insert_nodule`'s
``irregular``; 40 % of them placed against the lung's edge): same traits, same
label, another look. The classifier's extra training volumes use it
(``classifier.extra_irregular``); the splits' volumes never do, so the
held-out figures stay comparable between runs.

Everything is deterministic from the seed: case ``i`` draws from its own
random streams, so any case can be rebuilt alone.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from training.data import BENIGN, IGNORE, MALIGNANT, Case, Finding, Nodule, Volume, default_lung1_path, read_nrrd_hu
from training.errors import DataError

logger = logging.getLogger(__name__)

TEXTURES = ("solid", "part_solid", "ground_glass")
MARGINS = ("smooth", "lobulated", "spiculated")
CALCIFICATIONS = ("none", "central", "popcorn", "diffuse")
DIAMETER_RANGE_MM = (4.0, 30.0)
NODULE_COUNT_P = (0.15, 0.45, 0.40)  # P(0, 1, 2 nodules in a volume)
SLICE_MM = (1.0, 1.25, 2.0, 2.5, 3.0, 5.0)  # slice spacing = thickness of a volume
SLICE_MM_P = (0.10, 0.10, 0.10, 0.15, 0.15, 0.40)  # a good share at the anatomy's own 5 mm (lung1-like)

RULE = (
    "malignant iff no calcification and (spiculated margin with diameter >= 6 mm, or solid with "
    "diameter >= 10 mm, or part-solid with diameter >= 8 mm, or ground glass with diameter >= 20 mm); "
    "a study is malignant if any nodule is"
)


@dataclass(frozen=True)
class NoduleTraits:
    """The radiological traits of one inserted nodule."""

    diameter_mm: float
    texture: str  # solid | part_solid | ground_glass
    margin: str  # smooth | lobulated | spiculated
    calcification: str  # none | central | popcorn | diffuse (benign patterns)


def is_malignant(t: NoduleTraits) -> bool:
    """The labelling rule (see the module docstring)."""
    if t.calcification != "none":
        return False
    if t.margin == "spiculated" and t.diameter_mm >= 6.0:
        return True
    limits = {"solid": 10.0, "part_solid": 8.0, "ground_glass": 20.0}
    return t.diameter_mm >= limits[t.texture]


def sample_traits(rng: np.random.Generator) -> NoduleTraits:
    """Draw traits: diameter log-uniform 4..30 mm, then texture, margin, calcification (solid only)."""
    lo, hi = DIAMETER_RANGE_MM
    diameter = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    texture = TEXTURES[rng.choice(3, p=[0.6, 0.2, 0.2])]
    margin = MARGINS[rng.choice(3, p=[0.45, 0.30, 0.25])]
    calcification = "none"
    if texture == "solid" and rng.random() < 0.25:
        calcification = CALCIFICATIONS[1 + rng.integers(3)]
        if margin == "spiculated":  # calcified granulomas are not spiculated
            margin = "smooth"
    return NoduleTraits(round(diameter, 2), texture, margin, calcification)


# --------------------------------------------------------------------------- anatomy


@dataclass
class Anatomy:
    """A real CT block: HU (z, y, x) float32, spacing, and a coarse lung mask (z, y/f, x/f)."""

    name: str
    hu: np.ndarray
    spacing: tuple[float, float, float]
    lung: np.ndarray  # bool, in-plane downsampled by ``factor``
    factor: int


def _dilate(mask: np.ndarray) -> np.ndarray:
    """6-neighbour (in-plane 4-neighbour + z) binary dilation."""
    out = mask.copy()
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    out[:, :, 1:] |= mask[:, :, :-1]
    out[:, :, :-1] |= mask[:, :, 1:]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    return ~_dilate(~mask)


def _components(mask: np.ndarray) -> np.ndarray:
    """Connected-component labels (6-neighbour) by min-label propagation; 0 = background."""
    big = np.iinfo(np.int32).max
    labels = np.where(mask, np.arange(1, mask.size + 1, dtype=np.int32).reshape(mask.shape), big)
    while True:
        new = labels.copy()
        for axis in range(3):
            for shift in (1, -1):
                rolled = np.roll(labels, shift, axis=axis)
                edge = [slice(None)] * 3
                edge[axis] = slice(0, 1) if shift == 1 else slice(-1, None)
                rolled[tuple(edge)] = big
                np.minimum(new, rolled, out=new)
        new = np.where(mask, new, big)
        if np.array_equal(new, labels):
            break
        labels = new
    return np.where(mask, labels, 0)


def lung_mask(hu: np.ndarray, factor: int, outside_air: bool) -> np.ndarray:
    """Lung voxels at 1/``factor`` in-plane resolution: air (< -400 HU) not connected to the outside,
    in components at least a tenth of the largest, eroded by one coarse voxel."""
    z, h, w = hu.shape
    coarse = hu[:, : h // factor * factor, : w // factor * factor]
    coarse = coarse.reshape(z, h // factor, factor, w // factor, factor).mean(axis=(2, 4))
    air = coarse < -400
    if outside_air:
        outside = np.zeros_like(air)
        outside[:, 0, :], outside[:, -1, :] = air[:, 0, :], air[:, -1, :]
        outside[:, :, 0], outside[:, :, -1] = air[:, :, 0], air[:, :, -1]
        while True:
            grown = _dilate(outside) & air
            if np.array_equal(grown, outside):
                break
            outside = grown
        air &= ~outside
    labels = _components(air)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    if ids.size == 0:
        raise DataError("no lung found in the anatomy volume")
    keep = ids[counts >= counts.max() / 10]
    return _erode(np.isin(labels, keep))


def load_lung1_anatomy(path: Path | str, slices: tuple[int, int]) -> Anatomy:
    """lung1 slices ``slices`` (half-open) as anatomy."""
    hu, spacing = read_nrrd_hu(path)
    lo, hi = slices
    if hi > hu.shape[0]:
        raise DataError(f"data.lung1_slices {slices}: {path} has only {hu.shape[0]} slices")
    block = hu[lo:hi].astype(np.float32)
    return Anatomy("lung1", block, spacing, lung_mask(block, 4, outside_air=True), 4)


def load_ct_small_anatomy(depth: int) -> Anatomy:
    """pydicom's CT_small.dcm (a 128 x 128 chest slice, field of view inside the body) as a slab."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:
        raise DataError("pydicom's CT_small.dcm test file is not available")
    ds = pydicom.dcmread(path)
    img = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    block = np.repeat(img[None], depth, axis=0)
    dy, dx = (float(v) for v in ds.PixelSpacing)
    return Anatomy("ct_small", block, (5.0, dy, dx), lung_mask(block, 1, outside_air=False), 1)


# --------------------------------------------------------------------------- warping


def _affine_grid(h: int, w: int, flip: bool, angle: float, scale: float, shift: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Source (y, x) for every output pixel: rotate/scale about the centre, shift (fractions of size), flip x."""
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    y, x = yy - cy - shift[0] * h, xx - cx - shift[1] * w
    if flip:
        x = -x
    c, s = np.cos(np.radians(angle)) / scale, np.sin(np.radians(angle)) / scale
    return c * y - s * x + cy, s * y + c * x + cx


def warp_bilinear(block: np.ndarray, sy: np.ndarray, sx: np.ndarray, fill: float) -> np.ndarray:
    """Sample every slice of ``block`` (z, h, w) at (sy, sx) bilinearly; outside = ``fill``."""
    z, h, w = block.shape
    y0, x0 = np.floor(sy).astype(np.intp), np.floor(sx).astype(np.intp)
    wy, wx = sy - y0, sx - x0
    out = np.zeros((z,) + sy.shape, dtype=np.float32)
    for dy, dx, wgt in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx), (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
        yi, xi = y0 + dy, x0 + dx
        inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        vals = block[:, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
        out += np.where(inside, vals, fill) * wgt
    return out


def resample_z(block: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Slices of ``block`` (z, h, w) at fractional slice positions ``pos``, linearly interpolated along z
    (whole positions return the slices themselves, exactly)."""
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, block.shape[0] - 1)
    i1 = np.minimum(i0 + 1, block.shape[0] - 1)
    wgt = (pos - i0).astype(np.float32)[:, None, None]
    out = block[i0].astype(np.float32)
    if np.any(wgt > 0):
        out = np.where(wgt > 0, (1 - wgt) * out + wgt * block[i1], out).astype(np.float32)
    return out


# --------------------------------------------------------------------------- nodules


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(v, -30, 30)))


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def insert_nodule(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    centre: tuple[float, float, float],
    traits: NoduleTraits,
    rng: np.random.Generator,
    *,
    irregular: bool = False,
) -> tuple[list[int], list[int]]:
    """Draw one nodule into ``hu`` (float32 (z, y, x), in place) centred at voxel ``centre``.

    ``spacing[0]`` is the slice spacing and thickness: the five partial-volume
    sub-samples of each slice span +-0.4 of it. Returns (core slices, touched
    slices): the slices that show the nodule's
    middle (|dz| <= 0.6 r, at least the nearest one) and all slices it reaches.

    ``irregular`` draws the nodule, with the same traits, as real masses tend
    to look (:func:`_irregular_look`): an angular outline with bulges and
    indentations, a blurred edge, uneven density with air pockets, sometimes a
    ground-glass halo, and a few long thin strands (tags) into the lung. It
    changes the look, never the traits, so the label stays the rule's.
    """
    dz, dy, dx = spacing
    zc, yc, xc = centre
    r = traits.diameter_mm / 2.0
    edge = 0.3  # mm, soft boundary
    # shape: lobes push the surface out toward a few directions
    amp = {"smooth": 0.05, "lobulated": 0.45, "spiculated": 0.15}[traits.margin]
    if irregular:  # more lobes, and some of them pull the surface in: an angular outline
        lobes = _unit_vectors(rng, int(rng.integers(6, 12)))
        lobe_amp = amp + rng.uniform(-0.35, 0.6, size=len(lobes))
        power = 4  # narrower bulges: corners rather than lobes
    else:
        lobes = _unit_vectors(rng, int(rng.integers(3, 6)))
        lobe_amp = amp * rng.uniform(0.6, 1.4, size=len(lobes))
        power = 2
    spicules = np.zeros((0, 3))
    if traits.margin == "spiculated":  # strands radiating mostly in the axial plane
        spicules = _unit_vectors(rng, int(rng.integers(8, 15))) * np.array([0.3, 1.0, 1.0])
        spicules /= np.linalg.norm(spicules, axis=1, keepdims=True)
    spic_len = np.minimum(rng.uniform(0.8, 2.0, size=len(spicules)) * r, 20.0)
    spic_width = rng.uniform(1.4, 2.4, size=len(spicules))
    # densities
    noise_sd = 12.0
    if traits.texture == "ground_glass":
        body_hu, noise_sd = rng.uniform(-700, -450), 25.0
    elif traits.texture == "part_solid":
        body_hu, noise_sd = rng.uniform(-650, -450), 25.0
    else:
        body_hu = rng.uniform(10, 50)
    if traits.calcification == "diffuse":
        body_hu = rng.uniform(200, 500)
    spic_hu = rng.uniform(-100, 20) if traits.texture == "solid" else rng.uniform(-400, -250)
    spic_hus = np.full(len(spicules), spic_hu)
    cores: list[tuple[np.ndarray, float, float]] = []  # (offset mm (z, y, x), radius mm, HU)
    if traits.texture == "part_solid":
        cores.append((np.zeros(3), rng.uniform(0.3, 0.55) * r, rng.uniform(0, 50)))
    if traits.calcification == "central":
        cores.append((np.zeros(3), rng.uniform(0.3, 0.5) * r, rng.uniform(300, 900)))
    elif traits.calcification == "popcorn":
        for _ in range(int(rng.integers(3, 7))):
            off = _unit_vectors(rng, 1)[0] * rng.uniform(0, 0.55) * r
            cores.append((off, rng.uniform(0.12, 0.22) * r, rng.uniform(300, 900)))
    look = _irregular_look(rng, r, body_hu) if irregular else _REGULAR
    if look.tags:
        spicules = np.concatenate([spicules, look.tags[0]])
        spic_len = np.concatenate([spic_len, look.tags[1]])
        spic_width = np.concatenate([spic_width, look.tags[2]])
        spic_hus = np.concatenate([spic_hus, look.tags[3]])
    edge = look.edge_mm or edge

    reach = (r * (1 + float(np.clip(lobe_amp, 0, None).sum())) * max(1.0, look.halo_scale)
             + (float(spic_len.max()) if len(spicules) else 0.0) + 1.0)
    z_all = [k for k in range(hu.shape[0]) if abs(k - zc) * dz <= reach + dz / 2]
    y_lo, y_hi = max(0, int(yc - reach / dy) - 1), min(hu.shape[1], int(yc + reach / dy) + 2)
    x_lo, x_hi = max(0, int(xc - reach / dx) - 1), min(hu.shape[2], int(xc + reach / dx) + 2)
    py = ((np.arange(y_lo, y_hi) - yc) * dy)[:, None]
    px = ((np.arange(x_lo, x_hi) - xc) * dx)[None, :]
    subs = np.linspace(-0.4, 0.4, 5) * dz  # across the slice's thickness (= its spacing)
    touched = []
    for k in z_all:
        base = hu[k, y_lo:y_hi, x_lo:x_hi]
        acc = np.zeros_like(base)
        for sub in subs:
            pz = (k - zc) * dz + sub
            rho = np.sqrt(pz * pz + py * py + px * px) + 1e-6
            u = np.stack(np.broadcast_arrays(pz / rho, py / rho, px / rho))  # (3, h, w)
            proj = np.tensordot(lobes, u, axes=(1, 0))  # (n, h, w)
            # the mean of clip(proj, 0) ** power over directions is 1/6 (power 2) or 1/10 (4)
            radius = r * (1 + np.tensordot(lobe_amp, np.clip(proj, 0, None) ** power, axes=(0, 0))
                          - lobe_amp.sum() / (2 * power + 2))
            a_body = _sigmoid((radius - rho) / edge)
            noise = rng.normal(0.0, noise_sd, size=base.shape).astype(np.float32)
            val = base
            if look.halo_scale:
                a_halo = _sigmoid((radius * look.halo_scale - rho) / edge)
                val = val + a_halo * np.maximum(look.halo_hu + noise - val, 0)
            val = val + a_body * np.maximum(body_hu + noise - val, 0)
            for off, pr, phu in look.pockets:  # density changes inside the body (denser, softer, air)
                dist = np.sqrt((pz - off[0]) ** 2 + (py - off[1]) ** 2 + (px - off[2]) ** 2)
                val = val + a_body * _sigmoid((pr - dist) / edge) * (phu + noise - val)
            for v, length, width, shu in zip(spicules, spic_len, spic_width, spic_hus):
                s = v[0] * pz + v[1] * py + v[2] * px
                q = np.sqrt(np.maximum(rho * rho - s * s, 0))
                t = width * np.clip(1 - (s - 0.7 * r) / (length + 0.3 * r), 0.25, 1.0)
                a_sp = _sigmoid((t / 2 - q) / edge) * (s > 0) * (s < r + length)
                val = val + a_sp * np.maximum(shu - val, 0)
            for off, cr, chu in cores:
                dist = np.sqrt((pz - off[0]) ** 2 + (py - off[1]) ** 2 + (px - off[2]) ** 2)
                a_c = _sigmoid((cr - dist) / edge)
                val = val + a_c * np.maximum(chu + noise - val, 0)
            acc += val
        new = acc / len(subs)
        if np.abs(new - base).max() > 20:
            touched.append(k)
        hu[k, y_lo:y_hi, x_lo:x_hi] = new
    nearest = int(round(zc))
    core = sorted({k for k in z_all if abs(k - zc) * dz <= 0.6 * r} | {min(max(nearest, 0), hu.shape[0] - 1)})
    return core, sorted(set(touched) | set(core))


@dataclass(frozen=True)
class _Look:
    """How an irregular nodule departs from the drawn one (see :func:`insert_nodule`)."""

    edge_mm: float = 0.0  # 0: the default soft boundary
    halo_scale: float = 0.0  # ground-glass halo out to this multiple of the radius; 0: none
    halo_hu: float = 0.0
    pockets: tuple[tuple[np.ndarray, float, float], ...] = ()  # (offset mm (z, y, x), radius mm, HU)
    tags: tuple[np.ndarray, ...] = ()  # (directions, lengths mm, widths mm, HU) of the strands


_REGULAR = _Look()


def _irregular_look(rng: np.random.Generator, r: float, body_hu: float) -> _Look:
    """Draw an irregular look: blurred edge, uneven density, air pockets, maybe a halo, 0-3 tags."""
    pockets = []
    for _ in range(int(rng.integers(2, 6))):  # denser and softer parts
        off = _unit_vectors(rng, 1)[0] * rng.uniform(0, 0.6) * r
        pockets.append((off, rng.uniform(0.2, 0.45) * r, body_hu + rng.uniform(-90, 40)))
    for _ in range(int(rng.integers(0, 3))):  # air: a bronchus or a small cavity
        off = _unit_vectors(rng, 1)[0] * rng.uniform(0.1, 0.6) * r
        pockets.append((off, rng.uniform(0.08, 0.2) * r, rng.uniform(-950, -700)))
    halo = rng.random() < 0.4
    n_tags = int(rng.integers(0, 4))
    directions = _unit_vectors(rng, n_tags) * np.array([0.2, 1.0, 1.0])  # mostly in the axial plane
    directions /= np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-9)
    tags = (directions, rng.uniform(8, 25, size=n_tags), rng.uniform(0.7, 1.4, size=n_tags),
            rng.uniform(-350, -120, size=n_tags))
    return _Look(edge_mm=float(rng.uniform(0.4, 1.2)),
                 halo_scale=float(rng.uniform(1.15, 1.5)) if halo else 0.0,
                 halo_hu=float(rng.uniform(-750, -550)),
                 pockets=tuple(pockets), tags=tags if n_tags else ())


# --------------------------------------------------------------------------- reconstruction kernel


def _kernel(rng: np.random.Generator) -> dict[str, object]:
    """Half the volumes as acquired, a quarter softer (blur 0.4-1.2 mm), a quarter sharper (unsharp mask)."""
    u = rng.random()
    if u < 0.5:
        return {"kernel": "standard", "kernel_sigma_mm": 0.0, "kernel_amount": 0.0}
    if u < 0.75:
        return {"kernel": "soft", "kernel_sigma_mm": float(rng.uniform(0.4, 1.2)), "kernel_amount": 0.0}
    return {"kernel": "sharp", "kernel_sigma_mm": float(rng.uniform(0.6, 1.2)), "kernel_amount": float(rng.uniform(0.5, 1.5))}


def gaussian_blur(hu: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable in-plane Gaussian blur of every slice of ``hu`` (z, y, x), edges replicated."""
    radius = max(1, int(np.ceil(3 * sigma_px)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2).astype(np.float32)
    taps /= taps.sum()
    out = hu
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i, t in enumerate(taps):
            acc += t * np.take(padded, np.arange(i, i + n), axis=axis)
        out = acc
    return out


def apply_kernel(hu: np.ndarray, pixel_mm: float, kernel: str, sigma_mm: float, amount: float) -> np.ndarray:
    """Soften (blur) or sharpen (unsharp mask) a volume in-plane, as another reconstruction kernel would."""
    if kernel == "standard" or sigma_mm <= 0:
        return hu
    blurred = gaussian_blur(hu, sigma_mm / pixel_mm)
    return blurred if kernel == "soft" else hu + amount * (hu - blurred)


# --------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class VolumePlan:
    """Everything drawn for one volume before rendering."""

    anatomy: str
    z0: int
    flip: bool
    angle: float
    scale: float
    shift: tuple[float, float]
    noise_hu: float
    nodules: tuple[NoduleTraits, ...]
    kernel: str = "standard"  # standard (as acquired) | soft (Gaussian blur) | sharp (unsharp mask)
    kernel_sigma_mm: float = 0.0
    kernel_amount: float = 0.0  # sharp: x + amount * (x - blur(x))
    slice_mm: float = 5.0  # slice spacing = thickness; the anatomy is resampled along z to it
    irregular: tuple[bool, ...] = ()  # per nodule: drawn irregular (``insert_nodule``); empty: none is
    attached: tuple[bool, ...] = ()  # per nodule: against the lung's edge (pleura, mediastinum); empty: none is

    @property
    def label(self) -> int:
        return MALIGNANT if any(is_malignant(t) for t in self.nodules) else BENIGN


class SyntheticSource:
    """The semi-synthetic demo set (see the module docstring); one virtual patient per volume."""

    def __init__(
        self,
        *,
        volumes: int,
        slices_per_volume: int,
        seed: int,
        lung1_path: Path | str | None = None,
        lung1_slices: tuple[int, int] = (0, 28),
        pydicom_ct_share: float = 0.1,
        thin_slices: bool = False,
        irregular_share: float = 0.0,
        irregular_from: int = 0,
    ) -> None:
        self.n = volumes
        self.depth = slices_per_volume
        self.seed = seed
        self.lung1_path = Path(lung1_path) if lung1_path else default_lung1_path()
        self.lung1_slices = lung1_slices
        self.ct_share = pydicom_ct_share
        self.thin_slices = thin_slices
        self.irregular_share = irregular_share  # of the nodules of volumes irregular_from onward
        self.irregular_from = irregular_from
        self._anatomy: dict[str, Anatomy] = {}
        self._plans = [self._plan(i) for i in range(volumes)]

    def anatomy(self, name: str) -> Anatomy:
        if name not in self._anatomy:
            if name == "lung1":
                self._anatomy[name] = load_lung1_anatomy(self.lung1_path, self.lung1_slices)
            else:
                self._anatomy[name] = load_ct_small_anatomy(self.depth)
            logger.info("anatomy %s: %s voxels, %d lung voxels (coarse)", name,
                        self._anatomy[name].hu.shape, int(self._anatomy[name].lung.sum()))
        return self._anatomy[name]

    def _plan(self, i: int) -> VolumePlan:
        rng = np.random.default_rng([self.seed, i, 0])
        anatomy = "ct_small" if rng.random() < self.ct_share else "lung1"
        span = self.lung1_slices[1] - self.lung1_slices[0]
        z0 = int(rng.integers(0, max(1, span - self.depth + 1))) if anatomy == "lung1" else 0
        count = int(rng.choice(3, p=NODULE_COUNT_P))
        plan = VolumePlan(
            anatomy=anatomy, z0=z0, flip=bool(rng.random() < 0.5), angle=float(rng.uniform(-8, 8)),
            scale=float(rng.uniform(0.85, 1.15)), shift=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))),
            noise_hu=float(rng.uniform(0, 20)), nodules=tuple(sample_traits(rng) for _ in range(count)),
            **_kernel(rng),  # drawn after the rest, so the draws above (and the labels) do not depend on it
            slice_mm=float(SLICE_MM[rng.choice(len(SLICE_MM), p=SLICE_MM_P)]) if self.thin_slices else 5.0,  # last
        )
        if self.irregular_share and i >= self.irregular_from:  # drawn after everything, so the rest is unchanged
            irregular = tuple(bool(rng.random() < self.irregular_share) for _ in plan.nodules)
            attached = tuple(bool(k and rng.random() < 0.4) for k in irregular)
            plan = dataclasses.replace(plan, irregular=irregular, attached=attached)
        return plan

    def plan(self, case: Case) -> VolumePlan:
        return self._plans[int(case.case_id.rsplit("-", 1)[1])]

    def cases(self) -> list[Case]:
        return [Case(f"synth-{i:04d}", f"synth-{i:04d}", p.label) for i, p in enumerate(self._plans)]

    def load(self, case: Case) -> Volume:
        i = int(case.case_id.rsplit("-", 1)[1])
        plan = self._plans[i]
        rng = np.random.default_rng([self.seed, i, 1])
        anat = self.anatomy(plan.anatomy)
        spacing = (plan.slice_mm,) + tuple(anat.spacing[1:])
        # source slice positions of the volume's slices: from slice z0 on, one every slice_mm
        step = plan.slice_mm / anat.spacing[0]
        last = anat.hu.shape[0] - 1
        depth = min(self.depth, int(np.floor((last - plan.z0) / step + 1e-6)) + 1)
        pos = plan.z0 + np.arange(depth) * step
        block = resample_z(anat.hu, pos)
        h, w = block.shape[1:]
        sy, sx = _affine_grid(h, w, plan.flip, plan.angle, plan.scale, plan.shift)
        hu = warp_bilinear(block, sy, sx, fill=-1000.0)
        f = anat.factor
        lung = resample_z(anat.lung.astype(np.float32), pos) > 0.5
        cy, cx = _affine_grid(lung.shape[1], lung.shape[2], plan.flip, plan.angle, plan.scale, plan.shift)
        lung = warp_bilinear(lung.astype(np.float32), cy, cx, fill=0.0) > 0.5
        labels = np.zeros(depth, dtype=np.int8)
        findings: list[Finding] = []
        nodules: list[Nodule] = []
        placed: list[tuple[np.ndarray, float]] = []
        for j, traits in enumerate(plan.nodules):
            irregular = bool(plan.irregular and plan.irregular[j])
            edge = bool(plan.attached and plan.attached[j])
            centre = self._place(lung & ~_erode(lung), f, spacing, traits, placed, rng, (h, w)) if edge else None
            if centre is None:  # not attached, or no room at the lung's edge
                centre = self._place(lung, f, spacing, traits, placed, rng, (h, w))
            if centre is None:
                logger.warning("%s: no room for a %.1f mm nodule", case.case_id, traits.diameter_mm)
                continue
            core, touched = insert_nodule(hu, spacing, centre, traits, rng, irregular=irregular)
            label = MALIGNANT if is_malignant(traits) else BENIGN
            findings.extend(Finding(k, centre[1], centre[2], label) for k in core)
            nodules.append(Nodule(centre[0], centre[1], centre[2], traits.diameter_mm, label))
            if label == MALIGNANT:
                labels[[k for k in touched if labels[k] == BENIGN]] = IGNORE
                labels[core] = MALIGNANT
        hu = apply_kernel(hu, anat.spacing[1], plan.kernel, plan.kernel_sigma_mm, plan.kernel_amount)
        hu += rng.normal(0.0, plan.noise_hu, size=hu.shape).astype(np.float32)
        if plan.label == MALIGNANT and not (labels == MALIGNANT).any():  # pragma: no cover - placement failed
            raise DataError(f"{case.case_id}: malignant nodule could not be placed")
        out = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
        return Volume(case, out, spacing, labels, findings, nodules)

    @staticmethod
    def _place(
        lung: np.ndarray,
        f: int,
        spacing: tuple[float, float, float],
        traits: NoduleTraits,
        placed: list[tuple[np.ndarray, float]],
        rng: np.random.Generator,
        shape: tuple[int, int],
    ) -> tuple[float, float, float] | None:
        """A centre (voxel coordinates) inside the lung, clear of other nodules and the image edge."""
        zz, yy, xx = np.nonzero(lung)
        if zz.size == 0:
            return None
        r = traits.diameter_mm / 2
        for _ in range(50):
            j = int(rng.integers(zz.size))
            c = np.array([zz[j] + rng.uniform(-0.5, 0.5), (yy[j] + rng.uniform(0, 1)) * f, (xx[j] + rng.uniform(0, 1)) * f])
            mm = c * np.asarray(spacing)
            margin_px = r / spacing[1] + 2
            if not (margin_px <= c[1] < shape[0] - margin_px and margin_px <= c[2] < shape[1] - margin_px):
                continue
            if all(np.linalg.norm(mm - q) > r + rq + 10 for q, rq in placed):
                placed.append((mm, r))
                return float(np.clip(c[0], 0, lung.shape[0] - 1)), float(c[1]), float(c[2])
        return None

    def describe(self) -> str:
        lo, hi = self.lung1_slices
        return (
            f"semi-synthetic, demo only, not for clinical use: {self.n} volumes of {self.depth} slices built on real "
            f"chest CT anatomy (pyradiomics lung1 slices {lo}-{hi - 1}, one patient; pydicom CT_small.dcm, "
            f"{self.ct_share:.0%} of volumes), "
            + (f"each resampled to a slice spacing of 1-5 mm ({SLICE_MM_P[-1]:.0%} at 5 mm), " if self.thin_slices
               else "all at 5 mm slices, ")
            + f"each warped and given 0-2 inserted nodules labelled by rule: {RULE}. "
            f"Seed {self.seed}. Split by volume; all volumes share the same few real anatomies, so the metrics "
            "measure recognition of the rule's traits, not generalisation to new patients."
        )


def summarize(plans: Sequence[VolumePlan]) -> dict[str, int]:
    """Counts of volumes and nodules by label, for the logs and the card."""
    nodules = [t for p in plans for t in p.nodules]
    return {
        "volumes": len(plans),
        "malignant_volumes": sum(p.label for p in plans),
        "nodules": len(nodules),
        "malignant_nodules": sum(is_malignant(t) for t in nodules),
        "ct_small_volumes": sum(p.anatomy == "ct_small" for p in plans),
        "thin_slice_volumes": sum(p.slice_mm < 5.0 for p in plans),
    }
