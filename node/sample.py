"""Real-CT sample data: the pyradiomics "lung1" chest CT, as NRRD and as a DICOM series.

The volume comes from the pyradiomics 3.0.1 source distribution on PyPI
(``data/lung1_image.nrrd`` + ``data/lung1_label.nrrd``: 512x512x48 int16 HU,
0.5703125 x 0.5703125 x 5 mm, one ~14 mm nodule in the label). It is fetched
once with pip into a cache directory and used by tests, benchmarks and the demo
command. ``lung2_*`` in the same archive is deliberately never extracted: it is
kept back as an outside check.

Writing a series: :func:`write_ct_series` turns any (z, y, x) HU volume into a
CT Image Storage series (one Part 10 file per slice, named by SOP Instance UID)
with made-up patient/study identifiers and real pixels.

CLI: ``python -m node.sample OUT_DIR [--slices N]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Sequence

import nrrd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

logger = logging.getLogger(__name__)

PYRADIOMICS_VERSION = "3.0.1"
IMAGE_NAME = "lung1_image.nrrd"
LABEL_NAME = "lung1_label.nrrd"
#: SHA-256 of the two members we take from pyradiomics-3.0.1.tar.gz.
SAMPLE_SHA256: dict[str, str] = {
    IMAGE_NAME: "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed",
    LABEL_NAME: "e9d9a88054d7bc1d3034193ff907ce6b8c6ba28a7bc3a16f23728982d1b6b50a",
}
_MAX_MEMBER_BYTES = 64 * 1024 * 1024
_PIP_TIMEOUT_S = 900

#: Lung window (HU) written as WindowCenter / WindowWidth.
LUNG_WINDOW = (-600.0, 1500.0)
RESCALE_INTERCEPT = -1024
RESCALE_SLOPE = 1

Spacing = tuple[float, float, float]
Point = tuple[float, float, float]
Direction = tuple[Point, Point, Point]


# --------------------------------------------------------------------------- fetch


def default_cache_dir() -> Path:
    """``$AINODE_CACHE`` if set, else ``~/.cache/ainode``."""
    env = os.environ.get("AINODE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ainode"


def _version_tuple(text: str) -> tuple[int, ...]:
    nums = []
    for part in text.split(".")[:3]:
        m = re.match(r"\d+", part)
        if not m:
            break
        nums.append(int(m.group()))
    return tuple(nums)


def missing_fetch_requirements() -> list[str]:
    """Packages that ``pip download`` of the pyradiomics sdist needs but this interpreter lacks.

    pip prepares the sdist's metadata with ``--no-build-isolation``, i.e. it runs
    pyradiomics' ``setup.py`` in *this* interpreter: that imports numpy and
    setuptools, and needs the ``bdist_wheel`` command (setuptools >= 70.1, or the
    ``wheel`` package). versioneer is vendored inside the sdist.
    """
    missing: list[str] = []
    if importlib.util.find_spec("pip") is None:
        missing.append("pip")
    if importlib.util.find_spec("numpy") is None:  # pragma: no cover - we import numpy
        missing.append("numpy")
    try:
        st_version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        missing.append("setuptools>=70.1")
    else:
        if _version_tuple(st_version) < (70, 1) and importlib.util.find_spec("wheel") is None:
            missing.append(f"wheel (or setuptools>=70.1; found setuptools {st_version})")
    return missing


def fetch_lung1(cache_dir: Path | str | None = None) -> Path:
    """Return the path of the cached ``lung1_image.nrrd`` (``lung1_label.nrrd`` beside it).

    On a cache miss, downloads the pyradiomics sdist with pip into a temporary
    directory and extracts only the two lung1 files (checked by SHA-256),
    writing each atomically. Raises RuntimeError with a one-line reason when
    the fetch cannot run or fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    image, label = cache / IMAGE_NAME, cache / LABEL_NAME
    if image.is_file() and label.is_file():
        return image

    missing = missing_fetch_requirements()
    if missing:
        raise RuntimeError(
            f"cannot fetch the lung1 sample: pip needs {', '.join(missing)} importable in "
            f"{sys.executable} to download the pyradiomics sdist; install with: "
            f"{sys.executable} -m pip install 'setuptools>=70.1' numpy"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ainode-pyradiomics-") as tmp:
        sdist = _pip_download_sdist(Path(tmp))
        extract_lung1(sdist, cache)
    logger.info("lung1 sample cached in %s", cache)
    return image


def _pip_download_sdist(dest: Path) -> Path:
    """Download ``pyradiomics==3.0.1`` (sdist only) into ``dest`` and return the archive path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--no-build-isolation", f"pyradiomics=={PYRADIOMICS_VERSION}", "-d", str(dest),
    ]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    logger.info("fetching pyradiomics %s sdist with pip", PYRADIOMICS_VERSION)
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=_PIP_TIMEOUT_S, env=env, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"pip download of pyradiomics timed out after {_PIP_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        logger.error("pip download failed (exit %d):\n%s", proc.returncode, tail)
        raise RuntimeError(
            f"pip download of pyradiomics=={PYRADIOMICS_VERSION} failed (exit {proc.returncode}): "
            f"{_key_error_line(proc.stdout)}"
        )
    found = sorted(dest.glob(f"pyradiomics-{PYRADIOMICS_VERSION}.tar.gz"))
    if len(found) != 1:
        raise RuntimeError(f"pip download did not leave pyradiomics-{PYRADIOMICS_VERSION}.tar.gz in {dest}")
    return found[0]


_GENERIC_PIP_ERRORS = ("subprocess-exited-with-error", "metadata-generation-failed")


def _key_error_line(output: str) -> str:
    """The most telling error line of a pip run, with a hint for known causes."""
    lines = [ln.strip(" │╰─>×\t") for ln in output.splitlines()]
    errors = [
        ln for ln in lines
        if re.search(r"(Error\b|error:|ERROR:)", ln) and not any(g in ln for g in _GENERIC_PIP_ERRORS)
    ]
    line = errors[-1] if errors else (lines[-1] if lines else "no output")
    if "bdist_wheel" in line:
        line += " (install setuptools>=70.1 or wheel)"
    elif "versioneer" in output.lower() and "No module named" in line:
        line += " (install versioneer)"
    return line


def extract_lung1(
    sdist: Path, cache: Path, expected_sha256: dict[str, str] | None = None
) -> list[Path]:
    """Extract ``*/data/lung1_image.nrrd`` and ``*/data/lung1_label.nrrd`` from ``sdist`` into ``cache``.

    Nothing else is read out of the archive (``lung2_*`` stays inside). Member
    paths are never used as destinations, only matched by name; links and
    non-regular members are refused. Each file is checked against
    ``expected_sha256`` and written atomically (temporary name + rename), label
    first, so an existing image implies its label.
    """
    expected = SAMPLE_SHA256 if expected_sha256 is None else expected_sha256
    wanted = (LABEL_NAME, IMAGE_NAME)
    payload: dict[str, bytes] = {}
    with tarfile.open(sdist, mode="r:gz") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if len(parts) != 3 or parts[1] != "data" or parts[2] not in wanted:
                continue
            if parts[0] in ("", "/", ".", "..") or parts[2] in payload:
                raise RuntimeError(f"unexpected member {member.name!r} in {sdist.name}")
            if not member.isreg():
                raise RuntimeError(f"member {member.name!r} in {sdist.name} is not a regular file")
            if member.size > _MAX_MEMBER_BYTES:
                raise RuntimeError(f"member {member.name!r} in {sdist.name} is too large ({member.size} B)")
            fh = tar.extractfile(member)
            if fh is None:  # pragma: no cover - isreg() members always have data
                raise RuntimeError(f"cannot read {member.name!r} from {sdist.name}")
            data = fh.read()
            digest = hashlib.sha256(data).hexdigest()
            if expected.get(parts[2]) not in (None, digest):
                raise RuntimeError(f"{member.name} has SHA-256 {digest}, expected {expected[parts[2]]}")
            payload[parts[2]] = data
            if len(payload) == len(wanted):
                break
    absent = [n for n in wanted if n not in payload]
    if absent:
        raise RuntimeError(f"{sdist.name} has no data/{', data/'.join(absent)}")
    cache.mkdir(parents=True, exist_ok=True)
    return [_atomic_write(cache / name, payload[name]) for name in wanted]


def _atomic_write(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- load


def read_nrrd_volume(path: Path | str) -> tuple[np.ndarray, Spacing, Point, Direction]:
    """Read a 3-D NRRD as ``(array (z, y, x), spacing (z, y, x) mm, origin, direction)``.

    ``origin`` is the (x, y, z) LPS patient position (mm) of voxel [0, 0, 0].
    ``direction`` holds one LPS unit vector per array axis, in the array's
    (z, y, x) order, so voxel [k, j, i] lies at
    ``origin + k*spacing[0]*direction[0] + j*spacing[1]*direction[1] + i*spacing[2]*direction[2]``.
    """
    data, header = nrrd.read(str(path), index_order="C")
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    dirs = np.asarray(header["space directions"], dtype=float)  # rows: file axes i (x), j (y), k (z)
    steps = np.linalg.norm(dirs, axis=1)
    units = dirs / steps[:, None]
    origin = np.asarray(header.get("space origin", (0.0, 0.0, 0.0)), dtype=float)
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("right-anterior-superior", "ras"):
        flip = np.array([-1.0, -1.0, 1.0])
        units, origin = units * flip, origin * flip
    elif space not in ("left-posterior-superior", "lps"):
        raise ValueError(f"{path}: unsupported NRRD space {space!r}")
    spacing = (float(steps[2]), float(steps[1]), float(steps[0]))
    direction = tuple(tuple(float(v) for v in units[a]) for a in (2, 1, 0))
    return (
        np.ascontiguousarray(data),
        spacing,
        (float(origin[0]), float(origin[1]), float(origin[2])),
        direction,  # type: ignore[return-value]
    )


def load_lung1(cache_dir: Path | str | None = None) -> tuple[np.ndarray, Spacing, Point, Direction]:
    """Fetch (if needed) and read lung1: ``(int16 HU array (z, y, x), spacing (z, y, x), origin, direction)``."""
    return read_nrrd_volume(fetch_lung1(cache_dir))


def load_lung1_label(cache_dir: Path | str | None = None) -> np.ndarray:
    """The lung1 nodule label as a uint8 (z, y, x) mask aligned with :func:`load_lung1`."""
    label = fetch_lung1(cache_dir).with_name(LABEL_NAME)
    arr = read_nrrd_volume(label)[0]
    if arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"{label}: label values outside 0..255")
    return arr.astype(np.uint8)


# --------------------------------------------------------------------------- write


def _ds(value: float) -> str:
    """A DS string (<= 16 chars) for ``value``."""
    return format_number_as_ds(float(round(float(value), 6)))


_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _uid_or_new(value: str | None, name: str) -> UID:
    """``value`` as a UID (checked), or a fresh one when it is None/empty."""
    if not value:
        return generate_uid()
    if len(value) > 64 or not _UID_RE.fullmatch(value):
        raise ValueError(f"{name} {value!r} is not a valid UID")
    return UID(value)


def _pixel_format(lo: int, hi: int) -> tuple[np.dtype, int, int]:
    """(stored dtype, BitsStored, PixelRepresentation) for HU range [lo, hi] with intercept -1024."""
    slo, shi = lo - RESCALE_INTERCEPT, hi - RESCALE_INTERCEPT
    if slo >= 0 and shi <= 4095:
        return np.dtype("<u2"), 12, 0
    if slo >= 0 and shi <= 65535:
        return np.dtype("<u2"), 16, 0
    if slo >= -32768 and shi <= 32767:
        return np.dtype("<i2"), 16, 1
    raise ValueError(f"HU range [{lo}, {hi}] does not fit 16-bit pixels with intercept {RESCALE_INTERCEPT}")


def write_ct_series(
    volume_hu: np.ndarray,
    spacing: Sequence[float],
    out_dir: Path | str,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_name: str = "DEMO^LUNG1",
    patient_id: str = "AINODE-DEMO-1",
    first_position: Sequence[float] | None = None,
    n_slices: int | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    series_number: int = 1,
    series_description: str = "AINODE SAMPLE CT",
) -> list[Path]:
    """Write ``volume_hu`` (z, y, x) as a CT Image Storage series, one Part 10 file per slice.

    Files are named ``<SOPInstanceUID>.dcm`` in ``out_dir`` and returned in slice
    order. ``spacing`` is (z, y, x) mm; ``first_position`` the (x, y, z) LPS
    position of the first slice's first voxel (default (0, 0, 0)); slices move
    along +z by ``spacing[0]`` with orientation [1,0,0,0,1,0]. Stored values are
    HU + 1024 (intercept -1024, slope 1): unsigned 12-bit when the HU range is
    [-1024, 3071], else unsigned or signed 16-bit. ``n_slices`` > depth tiles
    the volume (slice i shows ``volume_hu[i % depth]``) with positions still
    increasing. Compressed transfer syntaxes go through ``Dataset.compress``
    (needs the matching pydicom encoder).
    """
    vol = np.asarray(volume_hu)
    if vol.ndim != 3 or 0 in vol.shape:
        raise ValueError(f"volume_hu must be a non-empty (z, y, x) array, got shape {vol.shape}")
    if not np.issubdtype(vol.dtype, np.integer):
        rounded = np.rint(vol)
        if not np.array_equal(rounded, vol):
            logger.warning("volume_hu is not integral; HU values are rounded")
        vol = rounded.astype(np.int32)
    depth, rows, cols = vol.shape
    dz, dy, dx = (float(s) for s in spacing)
    if min(dz, dy, dx) <= 0:
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
    count = depth if n_slices is None else int(n_slices)
    if count < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    ts = UID(transfer_syntax)
    if not ts.is_transfer_syntax:
        raise ValueError(f"{ts} is not a transfer syntax")
    if ts == ExplicitVRBigEndian:
        raise ValueError("big endian transfer syntax is not supported")
    x0, y0, z0 = (0.0, 0.0, 0.0) if first_position is None else (float(v) for v in first_position)

    study = _uid_or_new(study_uid, "study_uid")
    series = _uid_or_new(series_uid, "series_uid")
    frame = _uid_or_new(frame_of_reference_uid, "frame_of_reference_uid")

    dtype, bits_stored, pixel_rep = _pixel_format(int(vol.min()), int(vol.max()))
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(
        study=study, series=series, frame=frame, patient_name=patient_name, patient_id=patient_id,
        date=date, time=time, rows=rows, cols=cols, dx=dx, dy=dy, dz=dz, bits_stored=bits_stored,
        pixel_rep=pixel_rep, series_number=series_number, series_description=series_description,
    )
    paths: list[Path] = []
    for i in range(count):
        z = z0 + i * dz
        sop = generate_uid()
        ds = _slice_dataset(i, sop, (x0, y0, z), **common)
        stored = (vol[i % depth].astype(np.int32) - RESCALE_INTERCEPT).astype(dtype)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if ts.is_compressed else ts
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.PixelData = stored.tobytes()
        if ts.is_compressed:
            ds.compress(ts, stored, generate_instance_uid=False)
        path = out / f"{sop}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    logger.info("wrote %d CT slices (%dx%d, %s) to %s", count, rows, cols, ts.name, out)
    return paths


def _slice_dataset(
    index: int,
    sop: UID,
    position: Point,
    *,
    study: UID,
    series: UID,
    frame: UID,
    patient_name: str,
    patient_id: str,
    date: str,
    time: str,
    rows: int,
    cols: int,
    dx: float,
    dy: float,
    dz: float,
    bits_stored: int,
    pixel_rep: int,
    series_number: int,
    series_description: str,
) -> Dataset:
    """The dataset (without pixel data) of one CT slice."""
    ds = Dataset()
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "ainode sample: synthetic identifiers, real pixels"
    # General Study
    ds.StudyInstanceUID = study
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "CT CHEST (ainode sample)"
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = series_number
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    # Frame of Reference
    ds.FrameOfReferenceUID = frame
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = "ainode sample"
    ds.ManufacturerModelName = "node.sample"
    ds.SoftwareVersions = "ainode"
    # General Image / General Acquisition
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time
    ds.ContentDate = date
    ds.ContentTime = time
    ds.BurnedInAnnotation = "NO"
    # Image Plane
    ds.PixelSpacing = [_ds(dy), _ds(dx)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.ImagePositionPatient = [_ds(position[0]), _ds(position[1]), _ds(position[2])]
    ds.SliceThickness = _ds(dz)
    ds.SpacingBetweenSlices = _ds(dz)
    ds.SliceLocation = _ds(position[2])
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_rep
    # CT Image
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = str(RESCALE_SLOPE)
    ds.RescaleType = "HU"
    ds.KVP = "120"
    ds.ConvolutionKernel = "STANDARD"
    # VOI LUT
    ds.WindowCenter = _ds(LUNG_WINDOW[0])
    ds.WindowWidth = _ds(LUNG_WINDOW[1])
    ds.WindowCenterWidthExplanation = "LUNG"
    return ds


def make_lung1_series(
    out_dir: Path | str, n_slices: int | None = None, *, cache_dir: Path | str | None = None, **kw
) -> list[Path]:
    """Fetch + load lung1 and write it as a CT series in ``out_dir`` (see :func:`write_ct_series`)."""
    volume, spacing, origin, direction = load_lung1(cache_dir)
    axial = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0))
    if not np.allclose(direction, axial, atol=1e-6):
        raise ValueError(f"lung1 direction {direction} is not axial; cannot write [1,0,0,0,1,0] slices")
    kw.setdefault("first_position", origin)
    return write_ct_series(volume, spacing, out_dir, n_slices=n_slices, **kw)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m node.sample OUT_DIR [--slices N]``: write the lung1 demo series."""
    parser = argparse.ArgumentParser(
        prog="python -m node.sample", description="Write the real-CT lung1 sample as a DICOM CT series."
    )
    parser.add_argument("out_dir", type=Path, help="directory to write the DICOM files into")
    parser.add_argument("--slices", type=int, default=None,
                        help="number of slices (default: the volume's 48; more tiles the volume)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="sample cache (default: $AINODE_CACHE or ~/.cache/ainode)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = make_lung1_series(args.out_dir, n_slices=args.slices, cache_dir=args.cache_dir)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(paths)} files written to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
