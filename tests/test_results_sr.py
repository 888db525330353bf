"""The TID 1500 SR: built from real CT files, written, checked by dciodvfy/dsrdump, read back."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.results.facts import DEMO_NOTICE, Finding, KeyImage, ModelInfo, NodeDevice, Result, SourceImage
from node.results.sr import SR_SOP_CLASSES, SRClass, build_sr
from node.results.sr_read import sr_summary

SR_SOP_CLASS = SR_SOP_CLASSES
NAME_LATIN1 = "Müller^Jürgen"
NAME_UTF8 = "Dvořák^Łukasz=山田^太郎"
MODEL = ModelInfo(name="ainode-lungnet", version="1.2.0", sha256="ab" * 32, located=True)
DEVICE = NodeDevice(uid="2.25.1234567890123456789")
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


def image(sources: list[Dataset], i: int) -> SourceImage:
    return SourceImage(str(sources[i].SOPClassUID), str(sources[i].SOPInstanceUID), i, int(sources[i].InstanceNumber))


def result(sources: list[Dataset], score: float = 0.8731, threshold: float = 0.5, findings: int = 1,
           **kw) -> Result:
    """A result on ``sources``: key slices 4 and 3; ``findings`` located nodules (on slices 4, 6, ...)."""
    located = tuple(Finding(n + 1, image(sources, 4 + 2 * n), 31.5 - 10 * n, 32.0 + 5 * n, score - 0.05 * n)
                    for n in range(findings)) if score >= threshold else ()
    values = dict(study_uid=str(sources[0].StudyInstanceUID), revision=1, series_uid=str(sources[0].SeriesInstanceUID),
                  score=score, threshold=threshold, findings=located,
                  key_images=(KeyImage(image(sources, 4), 0.93), KeyImage(image(sources, 3), 0.81)), model=MODEL,
                  extra={"pixel_spacing": [0.7, 0.7]})
    values.update(kw)
    return Result(**values)


def build(sources: list[Dataset], sr_class: SRClass = SRClass.COMPREHENSIVE, res: Result | None = None,
          **kw) -> Dataset:
    kw.setdefault("series_uid", str(generate_uid()))
    kw.setdefault("sop_instance_uid", str(generate_uid()))
    return build_sr(res or result(sources), sources, DEVICE, sr_class=sr_class, **kw)


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

    ours = [e for e in ds.ContributingEquipmentSequence if e.get("DeviceUID") == MODEL.device_uid]
    assert len(ours) == 1  # IHE AIR: the model, as a device whose UID derives from its sha256
    (purpose,) = ours[0].PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1", "99IHE", "Processing Algorithm")
    assert (ours[0].Manufacturer, ours[0].ManufacturerModelName, ours[0].SoftwareVersions) == (
        DEVICE.manufacturer, MODEL.name, MODEL.version)
    node = [e for e in ds.ContributingEquipmentSequence if e.get("DeviceUID") == DEVICE.uid]
    assert len(node) == 1 and node[0].SoftwareVersions == DEVICE.software_version
    assert (ds.ManufacturerModelName, ds.SoftwareVersions) == (DEVICE.model_name, DEVICE.software_version)
    assert "99IHE" in {c.CodingSchemeDesignator for c in ds.CodingSchemeIdentificationSequence}

    root = ds.ConceptNameCodeSequence[0]
    assert (root.CodeValue, root.CodingSchemeDesignator) == ("126000", "DCM")
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"


@pytest.mark.parametrize("sr_class", list(SRClass))
def test_sr_summary_reads_back_the_result(sources: list[Dataset], tmp_path: Path, sr_class: SRClass) -> None:
    sr = build(sources, sr_class)
    path = write(sr, tmp_path / "sr.dcm")
    for summary in (sr_summary(path), sr_summary(dcmread(path)), sr_summary(sr)):
        assert summary["probability"] == pytest.approx(0.87)  # a whole percent, as a person reads it
        assert summary["unit"] == "%"
        assert summary["qualitative"] == "positive"
        assert summary["nodule"] == "present"
        assert summary["impression"].startswith(f"AI result ({DEMO_NOTICE}): suspicious nodule, probability 87 %")
        assert "threshold 50 %" in summary["impression"]
        assert f"image {sources[4].InstanceNumber}" in summary["impression"]  # images named by Instance Number
        assert summary["key_image_uids"] == [sources[4].SOPInstanceUID]  # the finding's image
        assert summary["image_library_uids"] == [sources[4].SOPInstanceUID]
        assert summary["study_tracking_uid"] is None  # no group without coordinates: OHIF would draw nothing
        (finding,) = summary["findings"]
        assert finding["graphic_type"] == "POINT"
        assert finding["graphic_data"] == [[32.5, 32.0]]  # (column, row) with the image's top-left corner at 0.0
        assert finding["image_uid"] == sources[4].SOPInstanceUID
        assert (finding["tracking_id"], finding["probability"], finding["qualitative"]) == ("Nodule 1", 0.87,
                                                                                          "positive")
        assert (summary["algorithm_name"], summary["algorithm_version"]) == ("ainode-lungnet", "1.2.0")
        assert summary["algorithm_parameters"] == [
            "threshold=50 % (model card)", "aggregation=top3_mean", f"sha256={'ab' * 32}",
            f"intended use={DEMO_NOTICE}"]
        assert summary["device_uid"] == MODEL.device_uid
        assert MODEL.device_uid in summary["equipment_device_uids"]
        assert summary["study_uid"] == sources[0].StudyInstanceUID
        assert summary["sop_class_uid"] == SR_SOP_CLASS[sr_class]
        assert summary["predecessor_uids"] == []


def test_only_located_groups_beside_findings(sources: list[Dataset]) -> None:
    """OHIF v3 draws nothing when any measurement group lacks a SCOORD (tests/test_viewer.py shows it)."""
    sr = build(sources, res=result(sources, score=0.9, findings=2))
    (measurements,) = [c for c in sr.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "126010"]
    for group in measurements.ContentSequence:
        assert any(item.ValueType == "SCOORD" for item in group.ContentSequence)
    negative = build(sources, res=result(sources, score=0.1))
    (measurements,) = [c for c in negative.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "126010"]
    (group,) = measurements.ContentSequence  # TID 1500 needs one group: the study's
    assert not any(item.ValueType == "SCOORD" for item in group.ContentSequence)


def test_a_new_model_is_a_new_device(sources: list[Dataset]) -> None:
    other = dataclasses.replace(MODEL, sha256="cd" * 32)
    first = sr_summary(build(sources))
    second = sr_summary(build(sources, res=result(sources, model=other)))
    assert first["device_uid"] != second["device_uid"] == other.device_uid


def test_negative_study_asserts_no_nodule_and_has_no_coordinates(sources: list[Dataset]) -> None:
    sr = build(sources, res=result(sources, score=0.12))
    summary = sr_summary(sr)
    assert (summary["qualitative"], summary["nodule"], summary["findings"]) == ("negative", "absent", [])
    assert summary["impression"] == (f"AI result ({DEMO_NOTICE}): no nodule reached the threshold "
                                     "(study probability 12 %, threshold 50 %)")
    assert "GraphicType" not in str(sr)  # no SCOORD anywhere


def test_two_findings_make_two_planar_groups(sources: list[Dataset]) -> None:
    summary = sr_summary(build(sources, res=result(sources, score=0.9, findings=2)))
    assert [f["tracking_id"] for f in summary["findings"]] == ["Nodule 1", "Nodule 2"]
    assert [f["image_uid"] for f in summary["findings"]] == [sources[4].SOPInstanceUID, sources[6].SOPInstanceUID]
    assert len({f["tracking_uid"] for f in summary["findings"]}) == 2
    assert summary["image_library_uids"] == [sources[4].SOPInstanceUID, sources[6].SOPInstanceUID]
    assert "1 more: 85 % on image" in summary["impression"]


def test_a_diameter_makes_a_circle(sources: list[Dataset]) -> None:
    res = result(sources)
    res = dataclasses.replace(res, findings=(dataclasses.replace(res.findings[0], diameter_mm=7.0),))
    (finding,) = sr_summary(build(sources, res=res))["findings"]
    assert finding["graphic_type"] == "CIRCLE"
    centre, edge = finding["graphic_data"]
    assert edge[0] - centre[0] == pytest.approx(3.5 / 0.7, abs=1e-3)  # the radius in pixels


def test_a_model_without_map_reports_no_coordinates(sources: list[Dataset]) -> None:
    res = result(sources, model=dataclasses.replace(MODEL, located=False), findings=0)
    summary = sr_summary(build(sources, res=res))
    assert (summary["qualitative"], summary["findings"]) == ("positive", [])
    assert summary["impression"].endswith("(not located)")


@needs_dciodvfy
@pytest.mark.parametrize("sr_class", list(SRClass))
@pytest.mark.parametrize("score", [0.8731, 0.12])
def test_dciodvfy_finds_no_error(sources: list[Dataset], tmp_path: Path, sr_class: SRClass, score: float) -> None:
    prior = dcmread(write(build(sources, sr_class), tmp_path / "prior.dcm"))
    sr = build(sources, sr_class, res=result(sources, score=score, findings=2), predecessor=prior)
    path = write(sr, tmp_path / "sr.dcm")
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
    assert 'Probability of cancer")="87" (%,UCUM,"percent")' in out
    assert '"Malignancy")=(10828004,SCT,"Positive")' in out
    assert '"Nodule")=(52101004,SCT,"Present")' in out
    assert 'SCOORD:(,,"Image Region")=(POINT,' in out
    assert [ln for ln in proc.stderr.decode("latin-1").splitlines() if ln.startswith(("W:", "E:"))] == []


def test_utf8_patient_name_survives(utf8_sources: list[Dataset], tmp_path: Path) -> None:
    path = write(build(utf8_sources, res=result(utf8_sources)), tmp_path / "sr.dcm")
    ds = dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == NAME_UTF8
    assert ds.StudyInstanceUID == utf8_sources[0].StudyInstanceUID
    assert sr_summary(path)["probability"] == pytest.approx(0.87)


@needs_dsrdump
@needs_dciodvfy
def test_utf8_sr_passes_the_dicom_tools(utf8_sources: list[Dataset], tmp_path: Path) -> None:
    path = write(build(utf8_sources, res=result(utf8_sources)), tmp_path / "sr.dcm")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    assert [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")] == []
    dump = subprocess.run(["dsrdump", "+U8", str(path)], capture_output=True, timeout=60)
    assert dump.returncode == 0
    assert NAME_UTF8 in dump.stdout.decode("utf-8")


def test_sr_class_may_be_given_by_value(sources: list[Dataset]) -> None:
    assert build(sources, "enhanced").SOPClassUID == SR_SOP_CLASS[SRClass.ENHANCED]  # type: ignore[arg-type]


def test_at_the_threshold_is_positive(sources: list[Dataset]) -> None:
    assert sr_summary(build(sources, res=result(sources, score=0.5)))["qualitative"] == "positive"
    assert sr_summary(build(sources, res=result(sources, score=0.499)))["qualitative"] == "negative"


def test_predecessor_is_referenced(sources: list[Dataset], tmp_path: Path) -> None:
    prior = dcmread(write(build(sources), tmp_path / "prior.dcm"), stop_before_pixels=True)
    path = write(build(sources, res=result(sources, revision=2), predecessor=prior, instance_number=2),
                 tmp_path / "sr.dcm")
    ds = dcmread(path)
    (study,) = ds.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (sop,) = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (prior.StudyInstanceUID, prior.SeriesInstanceUID)
    assert (sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID) == (prior.SOPClassUID, prior.SOPInstanceUID)
    summary = sr_summary(path)
    assert summary["predecessor_uids"] == [(prior.StudyInstanceUID, prior.SeriesInstanceUID, prior.SOPInstanceUID)]
    assert summary["findings"][0]["tracking_uid"] != sr_summary(prior)["findings"][0]["tracking_uid"]
    negative = [sr_summary(build(sources, res=result(sources, score=0.1, revision=r))) for r in (1, 2)]
    assert negative[0]["study_tracking_uid"] == negative[1]["study_tracking_uid"]  # the study result, tracked


def test_sources_of_two_studies_are_refused(sources: list[Dataset]) -> None:
    other = copy.deepcopy(sources[-1])
    other.StudyInstanceUID = generate_uid()
    with pytest.raises(ValueError, match='"sources"'):
        build([*sources[:-1], other])


def test_bad_arguments_are_named(sources: list[Dataset]) -> None:
    with pytest.raises(ValueError, match='"score"'):
        result(sources, score=1.2)
    with pytest.raises(ValueError, match='"score"'):
        result(sources, score=float("nan"))
    stranger = SourceImage("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 0, 1)
    with pytest.raises(ValueError, match='"result"'):
        build(sources, res=result(sources, key_images=(KeyImage(stranger, 0.9),)))
    res = result(sources)
    outside = dataclasses.replace(res.findings[0], row=70.0)
    with pytest.raises(ValueError, match="outside"):
        build(sources, res=dataclasses.replace(res, findings=(outside,)))
    with pytest.raises(ValueError, match='"series_uid"'):
        build(sources, series_uid=str(sources[0].SeriesInstanceUID))
    with pytest.raises(ValueError, match='"sr_class"'):
        build(sources, sr_class="basic")  # type: ignore[arg-type]


def test_predecessor_of_another_study_is_refused(sources: list[Dataset], utf8_sources: list[Dataset]) -> None:
    with pytest.raises(ValueError, match='"predecessor"'):
        build(sources, predecessor=build(utf8_sources, res=result(utf8_sources)))


def test_three_hundred_sources_are_all_evidence(sources: list[Dataset]) -> None:
    many = []
    for i in range(300):
        ds = copy.deepcopy(sources[i % len(sources)])
        ds.SOPInstanceUID = generate_uid()
        many.append(ds)
    sr = build(many, res=result(many))
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert sum(len(s.ReferencedSOPSequence) for s in evidence.ReferencedSeriesSequence) == 300


def test_the_timelines_object_names_match_the_objects_made():
    from node.history import _OBJECT_NAMES
    from node.results.objects import SOP_CLASSES

    assert {uid: _OBJECT_NAMES[uid] for uid in SOP_CLASSES.values()} == \
        {uid: kind.split("-")[0].upper() for kind, uid in SOP_CLASSES.items()}
