"""Tests for node.volume: choosing the CT series of a study and loading it as HU.

Series are real files: the lung1 chest CT written by node.sample (and copies of
it edited with pydicom), and pydicom's own test files by explicit name.
"""

from __future__ import annotations

import logging
import random
import shutil
import tracemalloc
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ComputedRadiographyImageStorage, JPEG2000Lossless, RLELossless, generate_uid

from node.errors import NoUsableSeriesError, VolumeError
from node.sample import write_ct_series
from node.volume import SeriesRules, choose_series, load_study, load_volume

LUNG1_SPACING = (5.0, 0.5703125, 0.5703125)
Edit = Callable[[int, pydicom.Dataset], None]


def _testfile(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not installed"
    return Path(path)


def _rewrite(paths: list[Path], out_dir: Path, edit: Edit | None = None) -> list[Path]:
    """Copy ``paths`` into ``out_dir`` (as ``<SOP UID>.dcm``), applying ``edit(i, ds)`` to each, in order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        if edit is not None:
            edit(i, ds)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        dest = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(dest, enforce_file_format=True)
        out.append(dest)
    return out


def _new_series(uid: str) -> Edit:
    def edit(i: int, ds: pydicom.Dataset) -> None:
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()

    return edit


def _uid(path: Path, keyword: str) -> str:
    return str(getattr(pydicom.dcmread(path, stop_before_pixels=True), keyword))


@pytest.fixture(scope="module")
def vol(lung1) -> np.ndarray:
    return lung1[0]


@pytest.fixture(scope="module")
def origin(lung1) -> tuple[float, float, float]:
    return lung1[2]


@pytest.fixture(scope="module")
def study_uid(lung1_series: list[Path]) -> str:
    return _uid(lung1_series[0], "StudyInstanceUID")


@pytest.fixture(scope="module")
def lung1_12(lung1_series: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The first 12 lung1 slices as a series of their own (for edits that need not copy all 48)."""
    return _rewrite(lung1_series[:12], tmp_path_factory.mktemp("lung1_12"), _new_series(generate_uid()))


# --------------------------------------------------------------------------- loading


def test_lung1_loads_exactly(lung1_series: list[Path], vol: np.ndarray, origin, study_uid: str) -> None:
    v = load_volume(lung1_series)
    assert v.hu.dtype == np.int16 and v.hu.shape == (48, 512, 512)
    assert np.array_equal(v.hu, vol)
    assert v.positions.dtype == np.float64
    assert np.all(np.diff(v.positions) > 0)
    assert v.positions == pytest.approx(origin[2] + 5.0 * np.arange(48))
    assert v.spacing == pytest.approx(LUNG1_SPACING, abs=1e-5)
    assert v.sop_instance_uids == tuple(p.stem for p in lung1_series)
    assert set(v.sop_class_uids) == {pydicom.uid.CTImageStorage}
    assert v.study_uid == study_uid and v.series_uid == _uid(lung1_series[0], "SeriesInstanceUID")
    assert v.missing_slices == 0 and v.skipped == ()


def test_load_study_chooses_and_loads(lung1_series: list[Path], vol: np.ndarray) -> None:
    choice, v = load_study(reversed(lung1_series))
    assert choice.why == "CT ORIGINAL axial, 48 slices, 5.0 mm"
    assert choice.paths == tuple(lung1_series)  # sorted by position
    assert choice.series_uid == v.series_uid
    assert np.array_equal(v.hu, vol)


@pytest.mark.parametrize("numbers", ["reversed", "scrambled"])
def test_order_is_by_position_not_instance_number(
    lung1_series: list[Path], vol: np.ndarray, tmp_path: Path, numbers: str
) -> None:
    rng = random.Random(7)
    new = list(range(48, 0, -1)) if numbers == "reversed" else rng.sample(range(1, 49), 48)

    def renumber(i: int, ds: pydicom.Dataset) -> None:
        ds.InstanceNumber = new[i]

    paths = _rewrite(lung1_series, tmp_path, renumber)
    rng.shuffle(paths)
    v = load_volume(paths)
    assert np.array_equal(v.hu, vol)
    assert np.all(np.diff(v.positions) > 0)


def test_descending_z_is_sorted_ascending(lung1_series: list[Path], vol: np.ndarray, tmp_path: Path) -> None:
    def flip(i: int, ds: pydicom.Dataset) -> None:
        x, y, z = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, -float(z)]

    v = load_volume(_rewrite(lung1_series, tmp_path, flip))
    assert np.array_equal(v.hu, vol[::-1])
    assert np.all(np.diff(v.positions) > 0)


def test_sort_follows_the_slice_normal(lung1_12: list[Path], vol: np.ndarray, tmp_path: Path) -> None:
    """Sagittal slices [0,1,0,0,0,-1] have normal -x: ascending along it is descending x."""

    def sagittal(i: int, ds: pydicom.Dataset) -> None:
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [10.0 + 5.0 * i, -100.0, 50.0]

    paths = _rewrite(lung1_12, tmp_path, sagittal)
    v = load_volume(paths)
    assert np.array_equal(v.hu, vol[:12][::-1])
    assert v.positions == pytest.approx(-(10.0 + 5.0 * np.arange(12))[::-1])
    with pytest.raises(NoUsableSeriesError, match=r"is not axial \(slice normal 90 degrees"):
        choose_series(paths, SeriesRules(min_slices=10))
    assert choose_series(paths, SeriesRules(require_axial=False)).why.startswith("CT ORIGINAL non-axial, 12 slices")


def test_missing_slice_is_counted(
    lung1_series: list[Path], vol: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    series_uid = _uid(lung1_series[0], "SeriesInstanceUID")
    caplog.set_level(logging.INFO, logger="node.volume")
    v = load_volume(lung1_series[:20] + lung1_series[21:])
    assert v.missing_slices == 1
    assert np.array_equal(v.hu, np.delete(vol, 20, axis=0))
    assert v.spacing[0] == pytest.approx(5.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(series_uid in m and "1 slice(s) missing" in m for m in warnings)
    assert "DEMO" not in caplog.text  # UIDs only, never the patient name


def test_two_missing_slices_in_one_gap(lung1_series: list[Path]) -> None:
    assert load_volume(lung1_series[:20] + lung1_series[22:]).missing_slices == 2


def test_uneven_spacing_is_tolerated(lung1_series: list[Path], vol: np.ndarray, origin, tmp_path: Path) -> None:
    z = origin[2] + 5.0 * np.arange(48) + np.where(np.arange(48) % 2, 0.8, -0.6)

    def jitter(i: int, ds: pydicom.Dataset) -> None:
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, round(float(z[i]), 3)]

    v = load_volume(_rewrite(lung1_series, tmp_path, jitter))
    assert np.array_equal(v.hu, vol)
    assert v.missing_slices == 0
    assert v.positions == pytest.approx(z)
    assert v.spacing[0] == pytest.approx(float(np.median(np.diff(z))))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k-lossless"])
def test_compressed_series_decode_to_the_same_hu(
    lung1, vol: np.ndarray, tmp_path: Path, syntax: str
) -> None:
    _, spacing, origin, _ = lung1
    paths = write_ct_series(vol, spacing, tmp_path, first_position=origin, transfer_syntax=syntax)
    assert pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    _, v = load_study(paths)
    assert np.array_equal(v.hu, vol)


def test_per_slice_slope_and_intercept(lung1_series: list[Path], vol: np.ndarray, tmp_path: Path) -> None:
    rescales = [(1.0, -1024.0), (0.5, -2048.0), (1.0, -1100.0), (0.25, -1500.0)]

    def rescale(i: int, ds: pydicom.Dataset) -> None:
        slope, intercept = rescales[i % len(rescales)]
        stored = np.rint((vol[i].astype(np.float64) - intercept) / slope).astype(np.uint16)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = stored.tobytes()

    v = load_volume(_rewrite(lung1_series, tmp_path, rescale))
    assert np.array_equal(v.hu, vol)


def test_hu_beyond_int16_is_clipped(lung1_12: list[Path], tmp_path: Path) -> None:
    def shift(i: int, ds: pydicom.Dataset) -> None:
        if i == 3:
            ds.RescaleIntercept = "32000"

    paths = _rewrite(lung1_12, tmp_path, shift)
    v = load_volume(paths)
    stored = pydicom.dcmread(paths[3]).pixel_array.astype(np.int64)
    assert np.array_equal(v.hu[3], np.clip(stored + 32000, -32768, 32767))
    assert v.hu[3].max() == 32767


def test_duplicate_position_is_skipped(lung1_series: list[Path], vol: np.ndarray, tmp_path: Path) -> None:
    def duplicate(i: int, ds: pydicom.Dataset) -> None:
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = 1000

    dup = _rewrite([lung1_series[10]], tmp_path, duplicate)
    v = load_volume([*dup, *lung1_series])
    assert v.skipped == (dup[0].stem,)
    assert np.array_equal(v.hu, vol)
    assert v.missing_slices == 0


def test_minority_size_is_skipped(lung1, vol: np.ndarray, lung1_series: list[Path], study_uid: str,
                                  tmp_path: Path) -> None:
    _, spacing, origin, _ = lung1
    series_uid = _uid(lung1_series[0], "SeriesInstanceUID")
    small = write_ct_series(vol[:3, ::2, ::2], (2.5, 1.140625, 1.140625), tmp_path, study_uid=study_uid,
                            series_uid=series_uid, first_position=(origin[0], origin[1], origin[2] + 1.0))
    v = load_volume([*small, *lung1_series], min_slices=10)
    assert np.array_equal(v.hu, vol)
    assert sorted(v.skipped) == sorted(p.stem for p in small)
    with pytest.raises(VolumeError, match=rf"series {series_uid}: 8 usable slices \(3 skipped\), fewer than min_slices"):
        load_volume([*small, *lung1_series[:8]], min_slices=10)


def test_corrupt_j2k_names_the_instance(lung1, vol: np.ndarray, tmp_path: Path) -> None:
    _, spacing, origin, _ = lung1
    paths = write_ct_series(vol[:12], spacing, tmp_path / "j2k", first_position=origin,
                            transfer_syntax=JPEG2000Lossless)
    victim = paths[5]

    def truncate(i: int, ds: pydicom.Dataset) -> None:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([frame[: len(frame) // 2]])

    broken = _rewrite([victim], tmp_path / "broken", truncate)
    paths = [p for p in paths if p != victim] + broken
    assert choose_series(paths, SeriesRules(min_slices=10)).why.startswith("CT ORIGINAL axial, 12 slices")
    with pytest.raises(VolumeError, match=rf"pixel data of instance {victim.stem} \(JPEG 2000.*\) cannot be decoded: "):
        load_volume(paths)


def _set_orientation(i: int, ds: pydicom.Dataset) -> None:
    if i == 4:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.98, 0.199]


def _set_spacing(i: int, ds: pydicom.Dataset) -> None:
    if i == 4:
        ds.PixelSpacing = [0.7, 0.7]


def _drop(keyword: str) -> Edit:
    def edit(i: int, ds: pydicom.Dataset) -> None:
        if i == 4:
            delattr(ds, keyword)

    return edit


def _multi_frame(i: int, ds: pydicom.Dataset) -> None:
    if i == 4:
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_drop("PixelData"), "instance {sop} has no pixel data"),
        (_drop("RescaleIntercept"), "instance {sop} has no valid RescaleIntercept"),
        (_drop("ImagePositionPatient"), "instance {sop} has no valid ImagePositionPatient"),
        (_set_orientation, "instance {sop} has orientation .* different orientations"),
        (_set_spacing, "instance {sop} has PixelSpacing"),
        (_multi_frame, r"instance {sop} is multi-frame \(2 frames\)"),
    ],
    ids=["no-pixel-data", "no-intercept", "no-position", "orientation", "pixel-spacing", "multi-frame"],
)
def test_inconsistent_slices_are_refused(lung1_12: list[Path], tmp_path: Path, edit: Edit, reason: str) -> None:
    paths = _rewrite(lung1_12, tmp_path, edit)
    series_uid = _uid(paths[0], "SeriesInstanceUID")
    with pytest.raises(VolumeError, match=f"^series {series_uid}: " + reason.format(sop=paths[4].stem)):
        load_volume(paths)


def test_limits(lung1_12: list[Path]) -> None:
    with pytest.raises(VolumeError, match=r"12 instances, more than max_slices = 10"):
        load_volume(lung1_12, max_slices=10)
    with pytest.raises(VolumeError, match=r"slices are 512x512, more than max_pixels_per_slice = 65536"):
        load_volume(lung1_12, max_pixels_per_slice=256 * 256)


def test_several_series_or_unreadable_files_are_refused(lung1_12: list[Path], lung1_series: list[Path],
                                                        tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"instances of 2 series"):
        load_volume([*lung1_12, *lung1_series])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 10)
    with pytest.raises(VolumeError, match=r"junk.dcm is not readable DICOM"):
        load_volume([*lung1_12, junk])


def test_enhanced_multi_frame_is_not_supported(lung1_12: list[Path], tmp_path: Path) -> None:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    mf = LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in lung1_12], series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1,
    )
    path = tmp_path / "mf.dcm"
    mf.save_as(path)
    with pytest.raises(NoUsableSeriesError, match=(
        rf"^CT series {mf.SeriesInstanceUID} holds only multi-frame instances "
        r"\(Legacy Converted Enhanced CT Image Storage, 12 frames\), which are not supported")):
        choose_series([path])
    with pytest.raises(VolumeError, match=r"is multi-frame \(12 frames\)"):
        load_volume([path])


def test_memory_stays_near_the_volume_size(lung1, vol: np.ndarray, tmp_path: Path) -> None:
    """The volume is filled in place: traced memory peaks near its own size, not twice it."""
    _, spacing, origin, _ = lung1
    paths = write_ct_series(vol, spacing, tmp_path, first_position=origin, n_slices=96)
    tracemalloc.start()
    try:
        v = load_volume(paths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert v.hu.shape == (96, 512, 512)
    assert np.array_equal(v.hu[48:96], vol)
    assert peak < v.hu.nbytes + 16 * 2**20, f"peak {peak / 2**20:.0f} MiB for a {v.hu.nbytes / 2**20:.0f} MiB volume"


# --------------------------------------------------------------------------- choosing


def test_single_ct_slice_is_no_usable_series(tmp_path: Path) -> None:
    ct_small = _testfile("CT_small.dcm")
    series_uid = _uid(ct_small, "SeriesInstanceUID")
    with pytest.raises(NoUsableSeriesError, match=rf"^CT series {series_uid} is a single slice \(treated as a localizer\)$"):
        choose_series([ct_small])
    with pytest.raises(NoUsableSeriesError, match=rf"^CT series {series_uid} has 1 slice, fewer than min_slices = 10$"):
        load_study([ct_small], SeriesRules(exclude_localizers=False))


def test_study_without_ct_names_what_was_found(tmp_path: Path) -> None:
    def to_cr(i: int, ds: pydicom.Dataset) -> None:
        ds.Modality = "CR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
        ds.SOPInstanceUID = generate_uid()

    cr = _rewrite([_testfile("CT_small.dcm")], tmp_path, to_cr)
    files = [*cr, _testfile("MR_small.dcm"), _testfile("reportsi.dcm"), _testfile("rtplan.dcm")]
    with pytest.raises(NoUsableSeriesError) as err:
        choose_series(files)
    assert str(err.value) == "no CT series: found CR (1 instance), MR (1 instance), RTPLAN (1 instance), SR (1 instance)"
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 200)
    with pytest.raises(NoUsableSeriesError, match=r"^no CT series: found SR \(1 instance\), 1 unreadable file$"):
        choose_series([_testfile("reportsi.dcm"), junk])
    with pytest.raises(NoUsableSeriesError, match=r"^no readable DICOM instances \(1 unreadable file\)$"):
        choose_series([junk])
    with pytest.raises(NoUsableSeriesError, match=r"^no instances$"):
        choose_series([])


def _localizer(i: int, ds: pydicom.Dataset) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [[1, 0, 0, 0, 0, -1], [0, 1, 0, 0, 0, -1]][i]


def test_localizer_and_axial_series_picks_the_axial(lung1_series: list[Path], tmp_path: Path) -> None:
    scout_uid = generate_uid()

    def scout(i: int, ds: pydicom.Dataset) -> None:
        _new_series(scout_uid)(i, ds)
        _localizer(i, ds)

    scouts = _rewrite(lung1_series[:2], tmp_path, scout)
    choice = choose_series([*scouts, *lung1_series])
    assert choice.series_uid == _uid(lung1_series[0], "SeriesInstanceUID")
    assert choice.why == "CT ORIGINAL axial, 48 slices, 5.0 mm; 1 other CT series not chosen"
    with pytest.raises(NoUsableSeriesError, match=rf"^CT series {scout_uid} is a localizer$"):
        choose_series(scouts)


def test_localizer_images_inside_the_series_are_left_out(lung1_series: list[Path], tmp_path: Path) -> None:
    series_uid = _uid(lung1_series[0], "SeriesInstanceUID")

    def scout(i: int, ds: pydicom.Dataset) -> None:
        ds.SOPInstanceUID = generate_uid()
        _localizer(i, ds)

    scouts = _rewrite(lung1_series[:2], tmp_path, scout)
    choice, v = load_study([*scouts, *lung1_series])
    assert choice.series_uid == series_uid
    assert choice.why == "CT ORIGINAL axial, 48 slices, 5.0 mm; left out 2 localizer"
    assert len(choice.paths) == 48 and v.hu.shape[0] == 48


def test_most_slices_then_thinnest(lung1, vol: np.ndarray, lung1_series: list[Path], study_uid: str,
                                   tmp_path: Path) -> None:
    _, spacing, origin, _ = lung1
    thin_uid = _uid(lung1_series[0], "SeriesInstanceUID")
    thick = write_ct_series(vol[::2], (10.0, *spacing[1:]), tmp_path / "thick", study_uid=study_uid,
                            first_position=origin)
    choice = choose_series([*thick, *lung1_series], SeriesRules(max_slice_thickness_mm=10.0))
    assert choice.series_uid == thin_uid and choice.why.startswith("CT ORIGINAL axial, 48 slices, 5.0 mm")
    # Same number of slices: the thinner wins.
    a = write_ct_series(vol[:24], spacing, tmp_path / "a", study_uid=study_uid, first_position=origin)
    b = write_ct_series(vol[:24], (2.5, *spacing[1:]), tmp_path / "b", study_uid=study_uid, first_position=origin)
    choice = choose_series([*a, *b])
    assert choice.series_uid == _uid(b[0], "SeriesInstanceUID")
    assert choice.why == "CT ORIGINAL axial, 24 slices, 2.5 mm; 1 other CT series not chosen"


def test_thick_or_sparse_series_are_not_chosen(lung1, vol: np.ndarray, tmp_path: Path) -> None:
    _, spacing, origin, _ = lung1
    thick = write_ct_series(vol[::2], (10.0, *spacing[1:]), tmp_path / "thick", first_position=origin)
    uid = _uid(thick[0], "SeriesInstanceUID")
    with pytest.raises(NoUsableSeriesError, match=(
            rf"^CT series {uid} has 10.0 mm slices \(thickness 10.0 mm, spacing 10.0 mm\), "
            r"more than max_slice_thickness_mm = 5.0$")):
        choose_series(thick)

    def thin(i: int, ds: pydicom.Dataset) -> None:
        ds.SliceThickness = "1.0"

    sparse = _rewrite(thick, tmp_path / "sparse", thin)
    with pytest.raises(NoUsableSeriesError, match=r"has 10.0 mm slices \(thickness 1.0 mm, spacing 10.0 mm\)"):
        choose_series(sparse)


def test_derived_series(lung1_series: list[Path], tmp_path: Path) -> None:
    derived_uid = generate_uid()

    def derive(i: int, ds: pydicom.Dataset) -> None:
        _new_series(derived_uid)(i, ds)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]

    derived = _rewrite(lung1_series, tmp_path, derive)
    with pytest.raises(NoUsableSeriesError, match=(
            rf"^CT series {derived_uid} is not ORIGINAL \(ImageType DERIVED\\SECONDARY\\AXIAL\) "
            r"and \[series\] require_original is set$")):
        choose_series(derived)
    # A localizer image inside the derived series does not change the reason: most instances are DERIVED.
    def derived_scout(i: int, ds: pydicom.Dataset) -> None:
        derive(i, ds)
        _localizer(i, ds)

    scout = _rewrite(lung1_series[:1], tmp_path / "scout", derived_scout)
    with pytest.raises(NoUsableSeriesError, match=rf"^CT series {derived_uid} is not ORIGINAL"):
        choose_series([*scout, *derived])
    lax = SeriesRules(require_original=False)
    assert choose_series(derived, lax).why == "CT DERIVED axial, 48 slices, 5.0 mm"
    # An ORIGINAL series is preferred even with fewer slices.
    original = lung1_series[:24]
    choice = choose_series([*derived, *original], lax)
    assert choice.series_uid == _uid(original[0], "SeriesInstanceUID")
    assert choice.why == "CT ORIGINAL axial, 24 slices, 5.0 mm; 1 other CT series not chosen"


def test_several_unusable_series_are_all_named(lung1_series: list[Path], tmp_path: Path) -> None:
    ct_small = _testfile("CT_small.dcm")
    with pytest.raises(NoUsableSeriesError) as err:
        choose_series([ct_small, *lung1_series[:5]])
    text = str(err.value)
    assert text.startswith("no usable CT series among 2: CT series ")
    assert "is a single slice" in text and "has 5 slices, fewer than min_slices = 10" in text


def test_choosing_reads_headers_only(lung1_12: list[Path], tmp_path: Path) -> None:
    """Pixel data is not touched by choose_series: a file cut inside it is still chosen."""
    paths = [Path(shutil.copy(p, tmp_path / p.name)) for p in lung1_12]
    with open(paths[0], "r+b") as fh:
        fh.truncate(paths[0].stat().st_size // 2)
    assert len(choose_series(paths).paths) == 12
    with pytest.raises(VolumeError, match=rf"instance {paths[0].stem}"):
        load_volume(paths)


def test_series_rules_are_validated() -> None:
    with pytest.raises(ValueError, match='"modality"'):
        SeriesRules(modality="MR")
    with pytest.raises(ValueError, match='"min_slices"'):
        SeriesRules(min_slices=0)
    with pytest.raises(ValueError, match='"max_slice_thickness_mm"'):
        SeriesRules(max_slice_thickness_mm=0)


def test_disk_errors_propagate_for_a_retry(lung1_12: list[Path], tmp_path: Path) -> None:
    """A file that cannot be opened is an I/O problem (the job retries), not a reason recorded for the study."""
    gone = tmp_path / "gone.dcm"
    with pytest.raises(FileNotFoundError):
        choose_series([*lung1_12, gone])
    with pytest.raises(FileNotFoundError):
        load_volume([*lung1_12, gone])
