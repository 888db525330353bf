"""The TID 1500 SR: built from real CT files, written, checked by dciodvfy/dsrdump, read back."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.report import (
    AlgorithmInfo,
    DeviceInfo,
    Finding,
    KeyImage,
    SRClass,
    build_sr,
    sr_summary,
    tracking_uid,
)

SR_SOP_CLASS = {
    SRClass.COMPREHENSIVE: "1.2.840.10008.5.1.4.1.1.88.33",
    SRClass.ENHANCED: "1.2.840.10008.5.1.4.1.1.88.22",
    SRClass.COMPREHENSIVE_3D: "1.2.840.10008.5.1.4.1.1.88.34",
}
NAME_LATIN1 = "Müller^Jürgen"
NAME_UTF8 = "Dvořák^Łukasz=山田^太郎"
ALGORITHM = AlgorithmInfo(
    name="ainode-lungnet", version="1.2.0", sha256="ab" * 32,
    parameters="threshold=0.5; aggregation=top3-mean; preprocessing=1",
)
DEVICE = DeviceInfo(uid="2.25.1234567890123456789")
needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
needs_dsrdump = pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dsrdump (DCMTK) not installed")


@pytest.fixture(scope="module")
def ct_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A real 8-slice 64x64 CT series (ISO_IR 100) of a patient with a non-ASCII name."""
    from node.sample import write_ct_series

    rng = np.random.default_rng(7)
    vol = rng.normal(-700, 150, (8, 64, 64)).clip(-1024, 3000).astype(np.int16)
    vol[3:5, 28:36, 28:36] = 40  # a "nodule"
    return write_ct_series(
        vol, (2.5, 0.7, 0.7), tmp_path_factory.mktemp("ct"), patient_name=NAME_LATIN1, patient_id="AINODE-T1"
    )


@pytest.fixture(scope="module")
def sources(ct_paths: list[Path]) -> list[Dataset]:
    return [dcmread(p, stop_before_pixels=True) for p in ct_paths]


@pytest.fixture(scope="module")
def utf8_sources(ct_paths: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """The same series rewritten as ISO_IR 192 with a name Latin-1 cannot hold, read back from files."""
    out = tmp_path_factory.mktemp("ct-utf8")
    study = generate_uid()
    paths = []
    for p in ct_paths:
        ds = dcmread(p)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = NAME_UTF8
        ds.StudyInstanceUID = study
        ds.save_as(out / p.name, enforce_file_format=True)
        paths.append(out / p.name)
    return [dcmread(p, stop_before_pixels=True) for p in paths]


def key_images(sources: list[Dataset]) -> list[KeyImage]:
    return [
        KeyImage(str(sources[i].SOPClassUID), str(sources[i].SOPInstanceUID), i, score)
        for i, score in ((3, 0.81), (4, 0.93))
    ]


def build(sources: list[Dataset], sr_class: SRClass = SRClass.COMPREHENSIVE, **kw) -> Dataset:
    kw.setdefault("series_uid", str(generate_uid()))
    kw.setdefault("sop_instance_uid", str(generate_uid()))
    finding = kw.pop("finding", Finding(probability=0.8731, threshold=0.5))
    keys = kw.pop("key_images", key_images(sources))
    return build_sr(sources, finding, keys, ALGORITHM, DEVICE, sr_class=sr_class, **kw)


def write(sr: Dataset, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("sr_class", list(SRClass))
def test_sr_header_round_trip(sources: list[Dataset], tmp_path: Path, sr_class: SRClass) -> None:
    series_uid = str(generate_uid())
    sr = build(sources, sr_class, series_uid=series_uid, series_number=9001, instance_number=3)
    path = write(sr, tmp_path / "sr.dcm")

    ds = dcmread(path)
    src = sources[0]
    assert ds.SOPClassUID == SR_SOP_CLASS[sr_class]
    assert ds.file_meta.MediaStorageSOPClassUID == SR_SOP_CLASS[sr_class]
    assert ds.Modality == "SR"
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert str(ds.PatientName) == NAME_LATIN1
    for kw in ("PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyInstanceUID"):
        assert ds[kw].value == src[kw].value, kw
    assert ds.SeriesInstanceUID == series_uid
    assert ds.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
    assert (ds.SeriesNumber, ds.InstanceNumber) == (9001, 3)
    assert ds.SeriesDescription == "ainode AI result"
    assert (ds.CompletionFlag, ds.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert ds.Manufacturer == DEVICE.manufacturer
    for kw in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
        assert ds.get(kw), kw
    assert "PredecessorDocumentsSequence" not in ds

    (evidence,) = ds.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    listed = {sop.ReferencedSOPInstanceUID for series in evidence.ReferencedSeriesSequence
              for sop in series.ReferencedSOPSequence}
    assert listed == {s.SOPInstanceUID for s in sources}

    ours = [e for e in ds.ContributingEquipmentSequence if e.get("DeviceUID") == DEVICE.uid]
    assert len(ours) == 1
    (purpose,) = ours[0].PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1", "99IHE", "Processing Algorithm")
    assert (ours[0].Manufacturer, ours[0].ManufacturerModelName, ours[0].SoftwareVersions) == (
        DEVICE.manufacturer, DEVICE.model_name, DEVICE.software_version)
    assert "99IHE" in {c.CodingSchemeDesignator for c in ds.CodingSchemeIdentificationSequence}

    root = ds.ConceptNameCodeSequence[0]
    assert (root.CodeValue, root.CodingSchemeDesignator) == ("126000", "DCM")
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"


@pytest.mark.parametrize("sr_class", list(SRClass))
def test_sr_summary_reads_back_the_result(sources: list[Dataset], tmp_path: Path, sr_class: SRClass) -> None:
    sr = build(sources, sr_class)
    path = write(sr, tmp_path / "sr.dcm")
    for summary in (sr_summary(path), sr_summary(dcmread(path)), sr_summary(sr)):
        assert summary["probability"] == pytest.approx(0.8731)
        assert summary["threshold"] == 0.5
        assert summary["qualitative"] == "positive"
        assert summary["key_image_uids"] == [sources[4].SOPInstanceUID, sources[3].SOPInstanceUID]  # highest first
        assert (summary["algorithm_name"], summary["algorithm_version"]) == ("ainode-lungnet", "1.2.0")
        assert summary["algorithm_parameters"] == [
            "threshold=0.5", "aggregation=top3-mean", "preprocessing=1", f"sha256={'ab' * 32}"]
        assert summary["device_uid"] == DEVICE.uid
        assert summary["tracking_uid"] == tracking_uid(sources[0].StudyInstanceUID)
        assert summary["study_uid"] == sources[0].StudyInstanceUID
        assert summary["sop_class_uid"] == SR_SOP_CLASS[sr_class]
        assert summary["predecessor_uids"] == []


@needs_dciodvfy
@pytest.mark.parametrize("sr_class", list(SRClass))
def test_dciodvfy_finds_no_error(sources: list[Dataset], tmp_path: Path, sr_class: SRClass) -> None:
    prior = dcmread(write(build(sources, sr_class), tmp_path / "prior.dcm"))
    path = write(build(sources, sr_class, predecessor=prior), tmp_path / "sr.dcm")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [ln for ln in lines if ln.startswith("Error")] == [], "\n".join(lines)
    # The only warning left: dicom3tools 2022 lacks Device UID in Contributing Equipment (in the standard since).
    assert [ln for ln in lines if ln.startswith("Warning") and "Device UID" not in ln
            and "Standard Extended SOP Class" not in ln] == []


@needs_dsrdump
@pytest.mark.parametrize("sr_class", list(SRClass))
def test_dsrdump_reads_it(sources: list[Dataset], tmp_path: Path, sr_class: SRClass) -> None:
    path = write(build(sources, sr_class), tmp_path / "sr.dcm")
    proc = subprocess.run(["dsrdump", str(path)], capture_output=True, timeout=60)
    out = proc.stdout.decode("latin-1")
    assert proc.returncode == 0, out + proc.stderr.decode("latin-1")
    assert "Imaging Measurement Report" in out
    assert 'Probability of cancer")="0.8731"' in out
    assert '"Malignancy")=(10828004,SCT,"Positive")' in out
    assert [ln for ln in proc.stderr.decode("latin-1").splitlines() if ln.startswith(("W:", "E:"))] == []


def test_utf8_patient_name_survives(utf8_sources: list[Dataset], tmp_path: Path) -> None:
    path = write(build(utf8_sources), tmp_path / "sr.dcm")
    ds = dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == NAME_UTF8
    assert ds.StudyInstanceUID == utf8_sources[0].StudyInstanceUID
    assert sr_summary(path)["probability"] == pytest.approx(0.8731)


@needs_dsrdump
@needs_dciodvfy
def test_utf8_sr_passes_the_dicom_tools(utf8_sources: list[Dataset], tmp_path: Path) -> None:
    path = write(build(utf8_sources), tmp_path / "sr.dcm")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    assert [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")] == []
    dump = subprocess.run(["dsrdump", "+U8", str(path)], capture_output=True, timeout=60)
    assert dump.returncode == 0
    assert NAME_UTF8 in dump.stdout.decode("utf-8")


def test_sr_class_may_be_given_by_value(sources: list[Dataset]) -> None:
    assert build(sources, "enhanced").SOPClassUID == SR_SOP_CLASS[SRClass.ENHANCED]  # type: ignore[arg-type]


def test_below_threshold_is_negative(sources: list[Dataset]) -> None:
    summary = sr_summary(build(sources, finding=Finding(probability=0.12, threshold=0.5)))
    assert (summary["probability"], summary["qualitative"]) == (pytest.approx(0.12), "negative")
    assert sr_summary(build(sources, finding=Finding(probability=0.5, threshold=0.5)))["qualitative"] == "positive"


def test_predecessor_is_referenced(sources: list[Dataset], tmp_path: Path) -> None:
    prior = dcmread(write(build(sources), tmp_path / "prior.dcm"), stop_before_pixels=True)
    path = write(build(sources, predecessor=prior, instance_number=2), tmp_path / "sr.dcm")
    ds = dcmread(path)
    (study,) = ds.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (sop,) = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (prior.StudyInstanceUID, prior.SeriesInstanceUID)
    assert (sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID) == (prior.SOPClassUID, prior.SOPInstanceUID)
    summary = sr_summary(path)
    assert summary["predecessor_uids"] == [(prior.StudyInstanceUID, prior.SeriesInstanceUID, prior.SOPInstanceUID)]
    assert summary["tracking_uid"] == sr_summary(prior)["tracking_uid"]  # the same finding, tracked


def test_sources_of_two_studies_are_refused(sources: list[Dataset]) -> None:
    other = copy.deepcopy(sources[-1])
    other.StudyInstanceUID = generate_uid()
    with pytest.raises(ValueError, match='"sources"'):
        build([*sources[:-1], other], key_images=[])


@pytest.mark.parametrize(
    "change, argument",
    [
        (dict(finding=Finding(probability=1.2, threshold=0.5)), '"finding"'),
        (dict(finding=Finding(probability=float("nan"), threshold=0.5)), '"finding"'),
        (dict(finding=Finding(probability=0.7, threshold=0.6)), '"algorithm"'),  # parameters say 0.5
        (dict(key_images=[KeyImage("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 0, 0.9)]), '"key_images"'),
        (dict(series_uid="SOURCE"), '"series_uid"'),
        (dict(sr_class="basic"), '"sr_class"'),
    ],
)
def test_bad_arguments_are_named(sources: list[Dataset], change: dict, argument: str) -> None:
    if change.get("series_uid") == "SOURCE":
        change = dict(series_uid=str(sources[0].SeriesInstanceUID))
    with pytest.raises(ValueError, match=argument):
        build(sources, **change)


def test_predecessor_of_another_study_is_refused(sources: list[Dataset], utf8_sources: list[Dataset]) -> None:
    with pytest.raises(ValueError, match='"predecessor"'):
        build(sources, predecessor=build(utf8_sources))


def test_three_hundred_sources_are_all_evidence(sources: list[Dataset]) -> None:
    many = []
    for i in range(300):
        ds = copy.deepcopy(sources[i % len(sources)])
        ds.SOPInstanceUID = generate_uid()
        many.append(ds)
    sr = build(many, key_images=key_images(many))
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert sum(len(s.ReferencedSOPSequence) for s in evidence.ReferencedSeriesSequence) == 300
