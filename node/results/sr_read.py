"""Reading one of our SRs back (highdicom): what a test, the demo or an admin needs to know of it."""

from __future__ import annotations

import os
from typing import Any, cast

import highdicom as hd
from highdicom.sr import (
    CodedConcept,
    DeviceObserverIdentifyingAttributes,
    MeasurementReport,
    ValueTypeValues,
)
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.results.sr import (
    ABSENT,
    FINDING_NODULE,
    IMAGE_LIBRARY,
    IMPRESSION,
    MALIGNANCY,
    NEGATIVE,
    POSITIVE,
    PRESENT,
    PROBABILITY_OF_CANCER,
    SR_TYPE_BY_UID,
)


def sr_summary(sr: Dataset | str | os.PathLike[str]) -> dict[str, Any]:
    """The essentials of one of our SRs (a Dataset or a file), parsed with highdicom.

    Keys: ``study_uid``, ``series_uid``, ``sop_instance_uid``, ``sop_class_uid``,
    ``instance_number``, ``probability`` (0..1 from the percent NUM: the study
    group's, or with located findings the first finding's), ``qualitative``
    (``"positive"``/``"negative"``, of that group), ``nodule`` (``"present"``/
    ``"absent"``), ``impression`` (the words), ``key_image_uids`` (the study group's,
    or the findings' images), ``study_tracking_uid`` (None with findings),
    ``findings`` (per TID 1410 group: ``tracking_id``, ``tracking_uid``,
    ``probability``, ``qualitative``, ``graphic_type``, ``graphic_data``
    (list of (column, row)), ``image_uid``), ``algorithm_name``,
    ``algorithm_version``, ``algorithm_parameters``, ``device_uid`` (the
    observer), ``equipment_device_uids`` (Contributing Equipment),
    ``completion_flag``, ``verification_flag``, ``predecessor_uids``
    (``[(study, series, sop), ...]``), ``image_library_uids``.

    Raises ValueError if it is not one of our TID 1500 reports.
    """
    doc = _as_highdicom_sr(sr)
    report = doc.content
    if not isinstance(report, MeasurementReport):
        raise ValueError('Argument "sr" is not a TID 1500 Imaging Measurement Report.')
    study_groups = report.get_image_measurement_groups()
    if len(study_groups) > 1:
        raise ValueError(f'Argument "sr" has {len(study_groups)} study measurement groups; expected at most 1.')
    study = study_groups[0] if study_groups else None
    findings = []
    for group in report.get_planar_roi_measurement_groups():
        region = group.roi
        probability = group.get_measurements(name=PROBABILITY_OF_CANCER)
        findings.append({
            "tracking_id": group.tracking_identifier,
            "tracking_uid": str(group.tracking_uid) if group.tracking_uid else None,
            "probability": float(probability[0].value) / 100.0 if probability else None,
            "unit": probability[0].unit.value if probability else None,
            "qualitative": _qualitative(group),
            "graphic_type": region.graphic_type.value if region is not None else None,
            "graphic_data": region.value.tolist() if region is not None else None,
            "image_uid": str(region.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            if region is not None and "ReferencedSOPSequence" in region else _selected_from(region),
        })
    if study is None and not findings:
        raise ValueError('Argument "sr" has neither a study group nor a located finding.')
    first = study if study is not None else report.get_planar_roi_measurement_groups()[0]
    probabilities = first.get_measurements(name=PROBABILITY_OF_CANCER)
    if len(probabilities) != 1:
        raise ValueError(f'Argument "sr" has {len(probabilities)} probabilities in its first group; expected 1.')
    texts = {
        name: [item.TextValue for item in find_content_items(first[0], name=code, value_type=ValueTypeValues.TEXT)]
        for name, code in (
            ("name", codes.DCM.AlgorithmName),
            ("version", codes.DCM.AlgorithmVersion),
            ("parameters", codes.DCM.AlgorithmParameters),
        )
    }
    root = doc.ContentSequence
    impressions = [i.TextValue for i in find_content_items(doc, name=IMPRESSION, recursive=True)]
    nodule = [i for i in find_content_items(doc, name=FINDING_NODULE, value_type=ValueTypeValues.CODE, recursive=True)
              if i.ConceptCodeSequence[0].CodeValue in (PRESENT.value, ABSENT.value)]
    library = [
        str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for c in root if c.ConceptNameCodeSequence[0].CodeValue == IMAGE_LIBRARY
        for i in find_content_items(c, value_type=ValueTypeValues.IMAGE, recursive=True)
    ]
    devices = [
        ctx.observer_identifying_attributes
        for ctx in report.get_observer_contexts(observer_type=codes.DCM.Device)
        if isinstance(ctx.observer_identifying_attributes, DeviceObserverIdentifyingAttributes)
    ]
    return {
        "study_uid": str(doc.StudyInstanceUID),
        "series_uid": str(doc.SeriesInstanceUID),
        "sop_instance_uid": str(doc.SOPInstanceUID),
        "sop_class_uid": str(doc.SOPClassUID),
        "instance_number": int(doc.InstanceNumber),
        "probability": float(probabilities[0].value) / 100.0,
        "unit": probabilities[0].unit.value,
        "qualitative": _qualitative(first),
        "nodule": ("present" if nodule[0].ConceptCodeSequence[0].CodeValue == PRESENT.value else "absent")
        if nodule else None,
        "impression": impressions[0] if impressions else None,
        "key_image_uids": [str(img.referenced_sop_instance_uid) for img in study.source_images]
        if study is not None else list(dict.fromkeys(f["image_uid"] for f in findings)),
        "findings": findings,
        "algorithm_name": texts["name"][0] if texts["name"] else None,
        "algorithm_version": texts["version"][0] if texts["version"] else None,
        "algorithm_parameters": texts["parameters"],
        "study_tracking_uid": str(study.tracking_uid) if study is not None and study.tracking_uid else None,
        "device_uid": str(devices[0].uid) if devices else None,
        "equipment_device_uids": [str(e.get("DeviceUID", "")) for e in doc.get("ContributingEquipmentSequence", [])],
        "completion_flag": doc.get("CompletionFlag"),
        "verification_flag": doc.get("VerificationFlag"),
        "image_library_uids": library,
        "predecessor_uids": [
            (str(s.StudyInstanceUID), str(series.SeriesInstanceUID), str(sop.ReferencedSOPInstanceUID))
            for s in doc.get("PredecessorDocumentsSequence", [])
            for series in s.ReferencedSeriesSequence
            for sop in series.ReferencedSOPSequence
        ],
    }


def _qualitative(group: Any) -> str | None:
    evaluations = group.get_qualitative_evaluations(name=MALIGNANCY)
    if not evaluations:
        return None
    value = cast(CodedConcept, evaluations[0].value)  # highdicom annotates it as a number
    return {POSITIVE.value: "positive", NEGATIVE.value: "negative"}.get(value.value, value.meaning)


def _selected_from(region: Any) -> str | None:
    if region is None:
        return None
    for item in region.get("ContentSequence", []):
        if "ReferencedSOPSequence" in item:
            return str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return None


def _as_highdicom_sr(sr: Dataset | str | os.PathLike[str]) -> Any:
    """A highdicom SR object for ``sr`` (read with ``srread`` when it is a path)."""
    if isinstance(sr, (str, os.PathLike)):
        return hd.sr.srread(sr)
    if not isinstance(sr, Dataset):
        raise TypeError('Argument "sr" must be a Dataset or a path.')
    sr_type = SR_TYPE_BY_UID.get(str(sr.get("SOPClassUID", "")))
    if sr_type is None:
        raise ValueError(f'Argument "sr" has SOP class {sr.get("SOPClassUID")}, not a supported SR class.')
    return sr_type.from_dataset(sr)
