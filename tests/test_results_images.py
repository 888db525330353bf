"""The summary image (SC) and the key object selection (KO): built from the real lung1 CT, written, checked by
dciodvfy/dcmdump/dsrdump, read back with pydicom and highdicom, and the marker found at the finding's pixel."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.results import sc as sc_module
from node.results.facts import DEMO_NOTICE, Finding, KeyImage, ModelInfo, NodeDevice, Result, SourceImage
from node.results.ko import build_key_objects
from node.results.sc import build_summary_image, render_summary

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
needs_dcmtk = pytest.mark.skipif(shutil.which("dsrdump") is None, reason="DCMTK not installed")

DEVICE = NodeDevice(uid="2.25.1234567890123456789")
MODEL = ModelInfo(name="ainode-lungnet", version="1.2.0", sha256="ab" * 32, located=True)
NODULE = 33  # slice index of the middle of lung1's labelled nodule (slices 32-34), at about (358, 218)
OTHER = 40
CASES = ("one", "two", "negative", "not-located")
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
KO_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


@pytest.fixture(scope="module")
def headers(lung1_series: list[Path]) -> list[Dataset]:
    """The 48 slice headers, in slice order."""
    heads = [dcmread(p, stop_before_pixels=True) for p in lung1_series]
    return sorted(heads, key=lambda ds: int(ds.InstanceNumber))


@pytest.fixture(scope="module")
def full(lung1_series: list[Path]) -> dict[str, Dataset]:
    """The slices with pixels, by SOP Instance UID (only the few the tests show)."""
    wanted = {NODULE, OTHER, 20, 32}
    paths = sorted(lung1_series, key=lambda p: int(dcmread(p, stop_before_pixels=True).InstanceNumber))
    return {str(ds.SOPInstanceUID): ds for ds in (dcmread(paths[i]) for i in sorted(wanted))}


def image(headers: list[Dataset], i: int) -> SourceImage:
    ds = headers[i]
    return SourceImage(str(ds.SOPClassUID), str(ds.SOPInstanceUID), i, int(ds.InstanceNumber))


def make_result(headers: list[Dataset], case: str) -> Result:
    ds = headers[0]
    keys = (KeyImage(image(headers, NODULE), 0.88), KeyImage(image(headers, 32), 0.81))
    findings: tuple[Finding, ...] = ()
    score = 0.9133
    if case in ("one", "two"):
        findings = (Finding(1, image(headers, NODULE), 358.0, 218.0, 0.9133, diameter_mm=13.0),)
    if case == "two":
        findings += (Finding(2, image(headers, OTHER), 352.0, 330.0, 0.62),)
    if case == "negative":
        score, keys = 0.12, (KeyImage(image(headers, 20), 0.14), KeyImage(image(headers, NODULE), 0.11))
    return Result(study_uid=str(ds.StudyInstanceUID), revision=1, series_uid=str(ds.SeriesInstanceUID),
                  score=score, threshold=0.5, findings=findings, key_images=keys, model=MODEL)


def artifacts_dir() -> Path:
    return Path(os.environ.get("AINODE_ARTIFACTS") or Path(__file__).parent / "artifacts")


@pytest.fixture(scope="module")
def built(headers: list[Dataset], full: dict[str, Dataset], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per case: the result, its summary canvas, and the SC and KO written as files (SC also as PNG)."""
    out = tmp_path_factory.mktemp("objects")
    art = artifacts_dir()
    art.mkdir(parents=True, exist_ok=True)
    cases = {}
    for case in CASES:
        result = make_result(headers, case)
        images = [full[img.sop_instance_uid] for img in result.shown_images]
        sc = build_summary_image(result, images, device=DEVICE, series_uid=generate_uid(),
                                 sop_instance_uid=generate_uid())
        ko = build_key_objects(result, headers, device=DEVICE, series_uid=generate_uid(),
                               sop_instance_uid=generate_uid())
        sc.save_as(out / f"sc-{case}.dcm", enforce_file_format=True)
        ko.save_as(out / f"ko-{case}.dcm", enforce_file_format=True)
        Image.fromarray(dcmread(out / f"sc-{case}.dcm").pixel_array).save(art / f"summary-{case}.png")
        cases[case] = {"result": result, "summary": render_summary(result, images),
                       "sc": out / f"sc-{case}.dcm", "ko": out / f"ko-{case}.dcm"}
    return cases


def coloured(pixels: np.ndarray) -> np.ndarray:
    """Where a pixel is not gray: the CT is drawn gray, so these are the marker's."""
    p = pixels.astype(np.int16)
    return (p.max(axis=-1) - p.min(axis=-1)) > 40


def dciodvfy(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [ln for ln in lines if ln.startswith("Error")] == [], "\n".join(lines)
    return [ln for ln in lines if ln.startswith("Warning")]


# --------------------------------------------------------------------------- the DICOM tools


@needs_dciodvfy
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["sc", "ko"])
def test_dciodvfy_finds_no_error(built: dict, case: str, kind: str) -> None:
    warnings = dciodvfy(built[case][kind])
    # Left: dicom3tools 2022 lacks Device UID in Contributing Equipment (in the standard since), hence "extended".
    assert [w for w in warnings if "Device UID" not in w and "Standard Extended SOP Class" not in w] == []


@needs_dcmtk
@pytest.mark.parametrize("case", CASES)
def test_dcmtk_reads_both(built: dict, case: str) -> None:
    dump = subprocess.run(["dcmdump", str(built[case]["sc"])], capture_output=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    text = dump.stdout.decode("latin-1")
    assert "SecondaryCaptureImageStorage" in text and "BurnedInAnnotation" in text
    sr = subprocess.run(["dsrdump", "+Pc", "+Pl", "+Pu", str(built[case]["ko"])], capture_output=True, timeout=60)
    assert sr.returncode == 0, sr.stderr
    text = sr.stdout.decode("latin-1")
    assert "Key Object Selection Document" in text and '"Of Interest"' in text
    assert text.count('IMAGE:(260753009,SCT,"Source")') == len(built[case]["result"].selected_images)
    assert DEMO_NOTICE in text


# --------------------------------------------------------------------------- read back


@pytest.mark.parametrize("case", CASES)
def test_summary_image_reads_back(built: dict, headers: list[Dataset], case: str) -> None:
    result, summary = built[case]["result"], built[case]["summary"]
    ds = dcmread(built[case]["sc"])
    src = headers[0]
    assert (ds.SOPClassUID, ds.Modality, ds.ConversionType) == (SC_SOP_CLASS, "OT", "WSD")
    assert ds.BurnedInAnnotation == "YES"
    assert ds.StudyInstanceUID == result.study_uid and ds.SeriesInstanceUID != result.series_uid
    for kw in ("PatientName", "PatientID", "StudyID", "StudyDate", "SpecificCharacterSet", "AccessionNumber"):
        assert ds[kw].value == src[kw].value, kw
    assert (ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription) == (9002, 1, "ainode AI summary")
    assert DEMO_NOTICE in ds.ImageComments and "UNVERIFIED" in ds.ImageComments
    assert result.summary() in ds.ImageComments
    drawn = [img.sop_instance_uid for img in result.selected_images[: sc_module.MAX_TILES]]
    assert [i.ReferencedSOPInstanceUID for i in ds.SourceImageSequence] == drawn
    assert [i.ReferencedSOPInstanceUID for i in ds.ReferencedImageSequence] == drawn
    ours = [e for e in ds.ContributingEquipmentSequence if e.get("DeviceUID") == MODEL.device_uid]
    assert len(ours) == 1
    purpose = ours[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("Newcode1", "99IHE")
    assert DEVICE.uid in {e.get("DeviceUID") for e in ds.ContributingEquipmentSequence}
    assert ds.PhotometricInterpretation == "RGB" and ds.pixel_array.shape == summary.pixels.shape
    assert np.array_equal(ds.pixel_array, summary.pixels)
    assert np.array_equal(hd.Image.from_dataset(ds).get_frame(1), summary.pixels)
    assert f"UNVERIFIED - {DEMO_NOTICE}" in summary.lines


@pytest.mark.parametrize("case", CASES)
def test_key_objects_read_back(built: dict, case: str) -> None:
    result = built[case]["result"]
    ds = dcmread(built[case]["ko"])
    assert (ds.SOPClassUID, ds.Modality, ds.SeriesNumber) == (KO_SOP_CLASS, "KO", 9003)
    assert ds.StudyInstanceUID == result.study_uid and ds.SeriesInstanceUID != result.series_uid
    ko = hd.ko.KeyObjectSelectionDocument.from_dataset(ds)
    title = ko.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113000", "DCM", "Of Interest")
    shown = [img.sop_instance_uid for img in result.selected_images]
    if case == "negative":
        assert shown == [result.key_images[0].image.sop_instance_uid]
    assert [str(r.referenced_sop_instance_uid) for r in ko.content.get_references()] == shown
    evidence = {sop.ReferencedSOPInstanceUID for study in ds.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence}
    assert evidence == set(shown)
    (observer,) = ko.content.get_observer_contexts()
    assert isinstance(observer.observer_identifying_attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert observer.observer_identifying_attributes.uid == MODEL.device_uid
    texts = [item for item in ko.content[0].ContentSequence if item.value_type == hd.sr.ValueTypeValues.TEXT]
    description = [t.value for t in texts if t.name.value == "113012"]
    assert len(description) == 1 and result.summary() in description[0] and DEMO_NOTICE in description[0]
    assert "ReferencedRequestSequence" not in ds  # the sample has no order


def test_key_objects_name_the_order_when_there_is_one(headers: list[Dataset], tmp_path: Path) -> None:
    result = make_result(headers, "one")
    ordered = []
    for ds in headers:
        ds = ds.copy()
        ds.AccessionNumber = "ACC-42"
        ordered.append(ds)
    ko = build_key_objects(result, ordered, device=DEVICE, series_uid=generate_uid(), sop_instance_uid=generate_uid())
    (request,) = ko.ReferencedRequestSequence
    assert (request.StudyInstanceUID, request.AccessionNumber) == (result.study_uid, "ACC-42")
    if shutil.which("dciodvfy"):
        ko.save_as(tmp_path / "ko.dcm", enforce_file_format=True)
        dciodvfy(tmp_path / "ko.dcm")


# --------------------------------------------------------------------------- the pixels


@pytest.mark.parametrize("case", ["one", "two"])
def test_marker_is_at_the_finding(built: dict, case: str) -> None:
    result, summary = built[case]["result"], built[case]["summary"]
    assert len(summary.markers) == len(result.findings)
    for finding, marker in zip(result.findings, summary.markers):
        (tile,) = [t for t in summary.tiles if t.image.sop_instance_uid == finding.image.sop_instance_uid]
        x, y = tile.left + finding.column, tile.top + finding.row
        assert (marker.x, marker.y) == (x, y)
        block = summary.pixels[tile.top: tile.top + tile.rows, tile.left: tile.left + tile.columns]
        rows, cols = np.nonzero(coloured(block))
        d = np.hypot(rows - finding.row, cols - finding.column)
        ring = np.abs(d - marker.radius) <= 3
        # A circle around the point: marker pixels at its radius in all four quadrants...
        for up in (True, False):
            for left in (True, False):
                q = ring & ((rows < finding.row) == up) & ((cols < finding.column) == left)
                assert q.sum() >= 3, (case, finding.number, up, left)
        # ...nothing on the nodule itself, nothing far away (the number sits just outside the circle).
        assert not (d < marker.radius - 3).any()
        others = [m for m in summary.markers if m is not marker and abs(m.x - marker.x) < tile.columns]
        near_other = np.zeros_like(d, dtype=bool)
        for m in others:
            near_other |= np.hypot(rows - (m.y - tile.top), cols - (m.x - tile.left)) <= m.radius + 60
        assert (d[~near_other] <= marker.radius + 60).all()
    if case == "one":  # no number: the circle alone, centred on the point
        tile = summary.tiles[0]
        rows, cols = np.nonzero(coloured(summary.pixels[tile.top: tile.top + tile.rows, tile.left:]))
        assert abs(rows.mean() - 358.0) < 1.5 and abs(cols.mean() - 218.0) < 1.5


@pytest.mark.parametrize("case", ["negative", "not-located"])
def test_no_marker_without_a_located_finding(built: dict, case: str) -> None:
    result, summary = built[case]["result"], built[case]["summary"]
    assert summary.markers == ()
    assert [t.image for t in summary.tiles] == list(result.selected_images)
    for tile in summary.tiles:
        block = summary.pixels[tile.top: tile.top + tile.rows, tile.left: tile.left + tile.columns]
        assert not coloured(block).any()
    words = " ".join(summary.lines)
    if case == "negative":
        assert summary.lines[0] == "No nodule reached the threshold"
        assert [t.image for t in summary.tiles] == [result.key_images[0].image]
    else:
        assert "not located" in words
    assert "threshold 50 %" in words and MODEL.title in words


def test_text_lies_on_the_bands_not_on_the_slice(built: dict) -> None:
    summary = built["two"]["summary"]
    top = summary.tiles[0].top
    assert summary.pixels[:top].max() == 255  # the words, above the slices
    assert "2 suspicious nodules" in summary.lines and "Image 41: finding 2" in summary.lines
    assert (summary.pixels[top - 2: top, :] == 0).all()  # a black margin between the words and the slices


def test_without_the_dejavu_font_pillow_s_own_font_is_used(
    headers: list[Dataset], full: dict[str, Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sc_module, "FONT_FILES", {False: ("/nonexistent/x.ttf",), True: ("/nonexistent/y.ttf",)})
    sc_module._font.cache_clear()
    try:
        result = make_result(headers, "one")
        summary = render_summary(result, [full[img.sop_instance_uid] for img in result.shown_images])
        assert summary.pixels[: summary.tiles[0].top].max() == 255
    finally:
        sc_module._font.cache_clear()


# --------------------------------------------------------------------------- arguments


def test_arguments_are_checked(headers: list[Dataset], full: dict[str, Dataset]) -> None:
    result = make_result(headers, "one")
    nodule = full[result.shown_images[0].sop_instance_uid]
    kw: dict[str, Any] = dict(device=DEVICE, series_uid=generate_uid(), sop_instance_uid=generate_uid())
    with pytest.raises(ValueError, match='"images"'):  # not a shown image
        build_summary_image(result, [nodule, full[str(headers[20].SOPInstanceUID)]], **kw)
    with pytest.raises(ValueError, match='"images"'):  # no pixels
        build_summary_image(result, [headers[NODULE]], **kw)
    with pytest.raises(TypeError, match='"images"'):
        build_summary_image(result, nodule, **kw)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='"result"'):
        build_key_objects(result.to_json(), headers, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='"series_uid"'):
        build_key_objects(result, headers, **{**kw, "series_uid": result.series_uid})
    with pytest.raises(ValueError, match='"sources"'):  # the shown image missing
        build_key_objects(result, headers[:NODULE], **kw)
    stranger = headers[NODULE].copy()
    stranger.StudyInstanceUID = generate_uid()
    with pytest.raises(ValueError, match='"sources".*study'):
        build_key_objects(result, [stranger], **kw)
    off = Result(**{**result.__dict__, "findings": (Finding(1, result.shown_images[0], 600.0, 10.0, 0.9),)})
    with pytest.raises(ValueError, match='"result"'):
        build_summary_image(off, [nodule], **kw)


def test_each_kind_has_the_sop_class_its_builder_writes(built):
    from node.results.objects import SOP_CLASSES
    from node.results.sr import SR_SOP_CLASSES

    assert {f"sr-{c.value}": uid for c, uid in SR_SOP_CLASSES.items()} == {
        k: v for k, v in SOP_CLASSES.items() if k.startswith("sr-")}
    for case in built.values():
        assert str(dcmread(case["sc"], stop_before_pixels=True).SOPClassUID) == SOP_CLASSES["sc"]
        assert str(dcmread(case["ko"]).SOPClassUID) == SOP_CLASSES["ko"]
