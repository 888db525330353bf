"""Tests for node.sample: the real-CT (pyradiomics lung1) sample and the CT series writer.

The lung1 fetch is cached across the session by the ``lung1_image_path`` /
``lung1`` fixtures in tests/conftest.py.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node import sample
from node.sample import (
    extract_lung1,
    fetch_lung1,
    load_lung1,
    load_lung1_label,
    main,
    make_lung1_series,
    write_ct_series,
)

DCIODVFY = shutil.which("dciodvfy")


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)


def _read_sorted(paths: list[Path], pixels: bool = True) -> list[pydicom.Dataset]:
    dss = [pydicom.dcmread(p, stop_before_pixels=not pixels) for p in paths]
    return sorted(dss, key=lambda ds: float(ds.ImagePositionPatient[2]))


def _dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    return [ln for ln in out.splitlines() if ln.startswith("Error")], out


@pytest.fixture(scope="module")
def lung1_series(lung1_image_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_lung1_series(tmp_path_factory.mktemp("lung1_series"), cache_dir=lung1_image_path.parent)


# --------------------------------------------------------------------------- the data


def test_lung1_volume_facts(lung1) -> None:
    volume, spacing, origin, direction = lung1
    assert volume.shape == (48, 512, 512)
    assert volume.dtype == np.int16
    assert volume.flags["C_CONTIGUOUS"]
    assert spacing == pytest.approx((5.0, 0.5703125, 0.5703125))
    assert origin == pytest.approx((-146.0, -325.0, -777.5))
    assert np.allclose(direction, ((0, 0, 1), (0, 1, 0), (1, 0, 0)))
    assert int(volume.min()) == -1024 and int(volume.max()) == 3071
    assert -950 < float(np.median(volume)) < -800  # mostly air and lung


def test_lung1_label_is_a_14mm_nodule(lung1, lung1_image_path: Path) -> None:
    volume, spacing, _, _ = lung1
    label = load_lung1_label(lung1_image_path.parent)
    assert label.shape == volume.shape and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, 1}
    idx = np.argwhere(label > 0)
    assert idx[:, 0].min() == 32 and idx[:, 0].max() == 34
    diameter = (6 * len(idx) * float(np.prod(spacing)) / np.pi) ** (1 / 3)
    assert 12.0 < diameter < 16.0
    assert float(volume[label > 0].mean()) > -300  # soft tissue, not lung parenchyma


def test_cache_holds_lung1_only(lung1_image_path: Path) -> None:
    cache = lung1_image_path.parent
    assert (cache / "lung1_label.nrrd").is_file()
    assert not list(cache.glob("lung2*"))
    assert not list(cache.glob(".*.tmp"))
    for name, digest in sample.SAMPLE_SHA256.items():
        assert hashlib.sha256((cache / name).read_bytes()).hexdigest() == digest


def test_load_lung1_uses_cache(lung1_image_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run on a cache hit")

    monkeypatch.setattr(subprocess, "run", no_pip)
    volume, *_ = load_lung1(lung1_image_path.parent)
    assert volume.shape == (48, 512, 512)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AINODE_CACHE", str(tmp_path))
    assert sample.default_cache_dir() == tmp_path
    monkeypatch.delenv("AINODE_CACHE")
    assert sample.default_cache_dir() == Path.home() / ".cache" / "ainode"


# --------------------------------------------------------------------------- fetch failure paths


def test_missing_requirements_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sample, "missing_fetch_requirements", lambda: ["setuptools>=70.1"])
    with pytest.raises(RuntimeError) as info:
        fetch_lung1(tmp_path / "cache")
    message = str(info.value)
    assert "\n" not in message
    assert "setuptools>=70.1" in message
    assert not (tmp_path / "cache").exists()


def test_pip_failure_names_the_cause(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    output = (
        "Collecting pyradiomics==3.0.1\n"
        "  error: subprocess-exited-with-error\n"
        "  │ exit code: 1\n"
        "  ╰─> [2 lines of output]\n"
        "      error: invalid command 'bdist_wheel'\n"
        "error: metadata-generation-failed\n"
    )
    monkeypatch.setattr(sample, "missing_fetch_requirements", lambda: [])
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, stdout=output)
    )
    with pytest.raises(RuntimeError, match="bdist_wheel.*setuptools>=70.1") as info:
        fetch_lung1(tmp_path / "cache")
    assert "\n" not in str(info.value)


def test_fetch_requirements_present_here() -> None:
    assert sample.missing_fetch_requirements() == []


# --------------------------------------------------------------------------- safe extraction


def _tar(path: Path, members: list[tuple[str, bytes | None, str | None]]) -> Path:
    """Build a .tar.gz: (name, data, None) files or (name, None, target) symlinks."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                assert data is not None
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_extract_takes_only_lung1(tmp_path: Path) -> None:
    img, lab = b"image-bytes", b"label-bytes"
    sdist = _tar(tmp_path / "p.tar.gz", [
        ("pkg-1/README.md", b"readme", None),
        ("pkg-1/data/lung2_image.nrrd", b"secret", None),
        ("pkg-1/data/lung2_label.nrrd", b"secret", None),
        ("pkg-1/tests/lung1_image.nrrd", b"wrong dir", None),
        ("pkg-1/data/lung1_label.nrrd", lab, None),
        ("pkg-1/data/lung1_image.nrrd", img, None),
    ])
    cache = tmp_path / "cache"
    written = extract_lung1(sdist, cache, {"lung1_image.nrrd": _sha(img), "lung1_label.nrrd": _sha(lab)})
    assert sorted(p.name for p in cache.iterdir()) == ["lung1_image.nrrd", "lung1_label.nrrd"]
    assert {p.name for p in written} == {"lung1_image.nrrd", "lung1_label.nrrd"}
    assert (cache / "lung1_image.nrrd").read_bytes() == img
    assert (cache / "lung1_label.nrrd").read_bytes() == lab


@pytest.mark.parametrize("bad", ["../data/lung1_image.nrrd", "/data/lung1_image.nrrd"])
def test_extract_refuses_traversal(tmp_path: Path, bad: str) -> None:
    sdist = _tar(tmp_path / "p.tar.gz", [(bad, b"x", None), ("pkg/data/lung1_label.nrrd", b"y", None)])
    cache = tmp_path / "a" / "cache"
    with pytest.raises(RuntimeError, match="unexpected member"):
        extract_lung1(sdist, cache, {})
    assert not (tmp_path / "a").exists()


def test_extract_refuses_links(tmp_path: Path) -> None:
    sdist = _tar(tmp_path / "p.tar.gz", [
        ("pkg/data/lung1_image.nrrd", None, "/etc/passwd"),
        ("pkg/data/lung1_label.nrrd", b"y", None),
    ])
    with pytest.raises(RuntimeError, match="not a regular file"):
        extract_lung1(sdist, tmp_path / "cache", {})


def test_extract_checks_hashes(tmp_path: Path) -> None:
    sdist = _tar(tmp_path / "p.tar.gz", [
        ("pkg/data/lung1_image.nrrd", b"tampered", None),
        ("pkg/data/lung1_label.nrrd", b"y", None),
    ])
    with pytest.raises(RuntimeError, match="SHA-256"):
        extract_lung1(sdist, tmp_path / "cache")  # real pinned hashes
    assert not (tmp_path / "cache").exists()


def test_extract_needs_both_files(tmp_path: Path) -> None:
    sdist = _tar(tmp_path / "p.tar.gz", [("pkg/data/lung1_image.nrrd", b"x", None)])
    with pytest.raises(RuntimeError, match="lung1_label"):
        extract_lung1(sdist, tmp_path / "cache", {})


# --------------------------------------------------------------------------- the series


def test_lung1_series_round_trips(lung1, lung1_series: list[Path]) -> None:
    volume, spacing, origin, _ = lung1
    assert len(lung1_series) == 48
    dss = _read_sorted(lung1_series)
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in dss])
    assert np.allclose(np.diff(z), spacing[0])
    assert z[0] == pytest.approx(origin[2])
    assert len({ds.SOPInstanceUID for ds in dss}) == 48
    assert len({ds.StudyInstanceUID for ds in dss}) == 1
    assert len({ds.SeriesInstanceUID for ds in dss}) == 1
    assert len({ds.FrameOfReferenceUID for ds in dss}) == 1
    for k, ds in enumerate(dss):
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert Path(ds.filename).name == f"{ds.SOPInstanceUID}.dcm"
        assert ds.Modality == "CT" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.InstanceNumber == k + 1
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.ImagePositionPatient[:2]] == pytest.approx(origin[:2])
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([spacing[1], spacing[2]])
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == spacing[0]
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert (int(ds.RescaleIntercept), int(ds.RescaleSlope)) == (-1024, 1)
        assert ds.PatientName == "DEMO^LUNG1" and ds.PatientID == "AINODE-DEMO-1"
        assert np.array_equal(_hu(ds), volume[k])


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
def test_lung1_slice_passes_dciodvfy(lung1_series: list[Path]) -> None:
    for path in (lung1_series[0], lung1_series[-1]):
        errors, out = _dciodvfy_errors(path)
        assert not errors, out


def test_tiling_to_300_slices(lung1, tmp_path: Path) -> None:
    volume, spacing, origin, _ = lung1
    paths = write_ct_series(volume, spacing, tmp_path, n_slices=300, first_position=origin)
    assert len(paths) == 300
    dss = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert len({ds.SOPInstanceUID for ds in dss}) == 300
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in dss])
    assert np.all(np.diff(z) > 0)
    assert np.allclose(np.diff(z), spacing[0])
    assert [ds.InstanceNumber for ds in dss] == list(range(1, 301))
    for i in (0, 47, 48, 299):
        assert np.array_equal(_hu(pydicom.dcmread(paths[i])), volume[i % 48])


@pytest.mark.parametrize(
    ("lo", "hi", "bits_stored", "pixel_rep"),
    [(-1024, 3071, 12, 0), (-1024, 6000, 16, 0), (-3024, 3071, 16, 1)],
)
def test_pixel_format_fits_the_range(tmp_path: Path, lo: int, hi: int, bits_stored: int, pixel_rep: int) -> None:
    rng = np.random.default_rng(0)
    volume = rng.integers(lo, hi + 1, size=(3, 16, 12), dtype=np.int16)
    volume[0, 0, 0], volume[0, 0, 1] = lo, hi
    paths = write_ct_series(volume, (2.5, 0.7, 0.8), tmp_path)
    dss = _read_sorted(paths)
    for k, ds in enumerate(dss):
        assert (ds.Rows, ds.Columns) == (16, 12)
        assert (ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (bits_stored, bits_stored - 1, pixel_rep)
        assert np.array_equal(_hu(ds), volume[k])
    if DCIODVFY is not None:
        errors, out = _dciodvfy_errors(paths[0])
        assert not errors, out


def test_write_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_ct_series(np.zeros((4, 4), np.int16), (1, 1, 1), tmp_path)
    with pytest.raises(ValueError):
        write_ct_series(np.zeros((1, 4, 4), np.int16), (0, 1, 1), tmp_path)
    with pytest.raises(ValueError):
        write_ct_series(np.full((1, 4, 4), 70000, np.int32), (1, 1, 1), tmp_path)
    with pytest.raises(ValueError):
        write_ct_series(np.zeros((1, 4, 4), np.int16), (1, 1, 1), tmp_path, study_uid="not a uid")
    assert not list(tmp_path.iterdir())


def test_cli(lung1_image_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main([str(out), "--slices", "5", "--cache-dir", str(lung1_image_path.parent)]) == 0
    assert capsys.readouterr().out.startswith("5 files written")
    assert len(list(out.glob("*.dcm"))) == 5
