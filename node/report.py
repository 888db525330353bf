"""The result as a DICOM Structured Report: TID 1500 "Imaging Measurement Report" (highdicom).

One SR per analysed study revision, in the study it describes (new series,
Modality SR), following DICOM TID 1500 and the IHE AI Results (AIR) profile::

    (126000, DCM, "Imaging Measurement Report")          TID 1500
      language en-US; observer type Device (121007) + device UID/name/manufacturer/model
      procedure reported (24627-2, LN, "Chest CT")
      (126010, DCM, "Imaging Measurements")
        (125007, DCM, "Measurement Group")                 TID 1501
          tracking identifier (112039) + tracking UID (112040, stable per study)
          finding (121071) = (27925004, SCT, "Nodule"); finding site (39607008, SCT, "Lung")
          algorithm (TID 4019): name (111001), version (111003), parameters (111002)
          NUM (111047, DCM, "Probability of cancer") [0..1] unit (1, UCUM, "no units")
          CODE (RID36042, RADLEX, "Malignancy") = (10828004, SCT, "Positive")
                                                  | (260385009, SCT, "Negative")
          IMAGE (121112, DCM, "Source of Measurement") x key slices, highest score first

The qualitative result is Positive when probability >= threshold. Header: Patient
and General Study modules copied from the sources (with their Specific Character
Set), CompletionFlag COMPLETE, VerificationFlag UNVERIFIED, every source instance
in the Current Requested Procedure Evidence Sequence, the earlier SR of the study
in the Predecessor Documents Sequence, and the node in the Contributing Equipment
Sequence with purpose (Newcode1, 99IHE, "Processing Algorithm") as IHE AIR asks.

This module imports highdicom at module level: the receive path never imports it.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any, Sequence, cast

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    EnhancedSR,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
    ValueTypeValues,
)
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node import __version__

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- codes

#: Procedure reported: LOINC "Chest CT" (CID 100 is extensible; a chest code fits better
#: than (25045-6, LN, "CT unspecified body region")).
PROCEDURE_CHEST_CT = CodedConcept("24627-2", "LN", "Chest CT")
FINDING_NODULE = CodedConcept("27925004", "SCT", "Nodule")
SITE_LUNG = CodedConcept("39607008", "SCT", "Lung")
PROBABILITY_OF_CANCER = CodedConcept("111047", "DCM", "Probability of cancer")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
#: Concept of the qualitative result; the one the QIICR LIDC-IDRI TID 1500 collection uses.
MALIGNANCY = CodedConcept("RID36042", "RADLEX", "Malignancy")
#: Values of the qualitative result, from CID 250 "Positive/Negative" (a test result at a threshold).
POSITIVE = CodedConcept("10828004", "SCT", "Positive")
NEGATIVE = CodedConcept("260385009", "SCT", "Negative")
#: Contributing Equipment purpose of reference required by IHE AIR (provisional IHE code).
PROCESSING_ALGORITHM = CodedConcept("Newcode1", "99IHE", "Processing Algorithm")
TRACKING_IDENTIFIER = "Lung CT malignancy (study)"
SERIES_DESCRIPTION = "ainode AI result"
_TRACKING_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ainode:study-finding")


class SRClass(str, Enum):
    """The SR storage SOP class to write (configurable per destination)."""

    COMPREHENSIVE = "comprehensive"
    ENHANCED = "enhanced"
    COMPREHENSIVE_3D = "comprehensive3d"


_SRType = type[ComprehensiveSR] | type[EnhancedSR] | type[Comprehensive3DSR]
_SR_TYPES: dict[SRClass, _SRType] = {
    SRClass.COMPREHENSIVE: ComprehensiveSR,
    SRClass.ENHANCED: EnhancedSR,
    SRClass.COMPREHENSIVE_3D: Comprehensive3DSR,
}
_SR_TYPE_BY_UID: dict[str, _SRType] = {
    "1.2.840.10008.5.1.4.1.1.88.33": ComprehensiveSR,
    "1.2.840.10008.5.1.4.1.1.88.22": EnhancedSR,
    "1.2.840.10008.5.1.4.1.1.88.34": Comprehensive3DSR,
}

# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class KeyImage:
    """A slice that drove the study score."""

    sop_class_uid: str
    sop_instance_uid: str
    slice_index: int
    score: float


@dataclass(frozen=True)
class AlgorithmInfo:
    """The model that produced the result (TID 4019).

    ``parameters`` is ``"key=value; key=value"``; each part becomes one
    (111002, DCM, "Algorithm Parameters") item, with ``threshold=`` and
    ``sha256=`` added when absent.
    """

    name: str
    version: str
    sha256: str
    parameters: str


@dataclass(frozen=True)
class DeviceInfo:
    """The node as an observer device and contributing equipment."""

    uid: str
    name: str = "ainode"
    manufacturer: str = "ainode project"
    model_name: str = "ainode"
    software_version: str = __version__


@dataclass(frozen=True)
class Finding:
    """Probability of malignancy for the study and the threshold of the qualitative result."""

    probability: float
    threshold: float

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


# --------------------------------------------------------------------------- build


def build_sr(
    sources: Sequence[Dataset],
    finding: Finding,
    key_images: Sequence[KeyImage],
    algorithm: AlgorithmInfo,
    device: DeviceInfo,
    *,
    series_uid: str,
    sop_instance_uid: str,
    series_number: int = 9001,
    instance_number: int = 1,
    predecessor: Dataset | None = None,
    sr_class: SRClass = SRClass.COMPREHENSIVE,
) -> Dataset:
    """The TID 1500 SR of one analysis, ready for ``save_as(..., enforce_file_format=True)``.

    Parameters
    ----------
    sources
        Headers (pixel data not needed) of every instance the analysis used, all of one study.
    finding
        Study probability of malignancy and the threshold of the qualitative result.
    key_images
        Slices that drove the score; each must be one of ``sources``.
    predecessor
        The earlier SR of this study that this one replaces, if any.

    Raises
    ------
    ValueError
        When an argument is inconsistent (sources of several studies, a key image
        that is not a source, a probability outside [0, 1]...); the message names it.
    """
    study_uid = _check_sources(sources)
    _check_finding(finding)
    by_sop = {str(ds.SOPInstanceUID): ds for ds in sources}
    _check_key_images(key_images, by_sop)
    if str(series_uid) in {str(ds.SeriesInstanceUID) for ds in sources}:
        raise ValueError(f'Argument "series_uid" {series_uid} is a source series; the SR needs a new series.')
    if predecessor is not None:
        _check_predecessor(predecessor, study_uid, sop_instance_uid)
    try:
        sr_class = SRClass(sr_class)
    except ValueError:
        choices = ", ".join(c.value for c in SRClass)
        raise ValueError(f'Argument "sr_class" is {sr_class!r}; expected one of {choices}.') from None
    sr_type = _SR_TYPES[sr_class]

    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(study_uid), identifier=TRACKING_IDENTIFIER
        ),
        finding_type=FINDING_NODULE,
        finding_sites=[FindingSite(SITE_LUNG)],
        algorithm_id=AlgorithmIdentification(
            name=algorithm.name,
            version=algorithm.version,
            parameters=algorithm_parameters(algorithm, finding),
        ),
        measurements=[Measurement(name=PROBABILITY_OF_CANCER, value=float(finding.probability), unit=NO_UNITS)],
        qualitative_evaluations=[
            QualitativeEvaluation(name=MALIGNANCY, value=POSITIVE if finding.positive else NEGATIVE)
        ],
        source_images=[
            SourceImageForMeasurementGroup(k.sop_class_uid, k.sop_instance_uid)
            for k in sorted(key_images, key=lambda k: -k.score)
        ],
    )
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device.uid, name=device.name, manufacturer_name=device.manufacturer, model_name=device.model_name
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_CHEST_CT,
        imaging_measurements=[group],
    )
    now = _dt.datetime.now()
    sr = sr_type(
        evidence=list(sources),
        content=report[0],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=device.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        contributing_equipment=[_contributing_equipment(device, algorithm, now)],
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=device.model_name,
        software_versions=device.software_version,
        content_date=now.date(),
        content_time=now.time(),
        series_date=now.date(),
        series_time=now.time(),
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator="99IHE", name="IHE provisional codes", responsible_organization="IHE"
            )
        ],
    )
    sr.InstanceCreationDate, sr.InstanceCreationTime = sr.ContentDate, sr.ContentTime
    logger.info(
        "Study %s: SR %s built (%s, %d source instances, probability %.3f, %s, %d key images%s)",
        study_uid, sop_instance_uid, sr_class.value, len(by_sop), finding.probability,
        "positive" if finding.positive else "negative", len(key_images),
        f", replaces {predecessor.SOPInstanceUID}" if predecessor is not None else "",
    )
    return sr


def tracking_uid(study_uid: str) -> str:
    """The tracking UID of the study finding: the same for every revision's SR of one study."""
    return f"2.25.{uuid.uuid5(_TRACKING_NAMESPACE, str(study_uid)).int}"


def algorithm_parameters(algorithm: AlgorithmInfo, finding: Finding) -> list[str]:
    """The TID 4019 parameter items: ``algorithm.parameters`` split on ';', plus threshold and sha256."""
    items = [p.strip() for p in algorithm.parameters.split(";") if p.strip()]
    given = dict(_key_value(p) for p in items)
    if "threshold" in given:
        try:
            same = math.isclose(float(given["threshold"]), finding.threshold, abs_tol=1e-9)
        except ValueError:
            same = False
        if not same:
            raise ValueError(
                f'Argument "algorithm" has parameter threshold={given["threshold"]} but '
                f'argument "finding" has threshold {finding.threshold:g}.'
            )
    else:
        items.append(f"threshold={finding.threshold:g}")
    if "sha256" not in given:
        items.append(f"sha256={algorithm.sha256}")
    return items


def _key_value(item: str) -> tuple[str, str]:
    key, _, value = item.partition("=")
    return key.strip(), value.strip()


def _contributing_equipment(
    device: DeviceInfo, algorithm: AlgorithmInfo, now: _dt.datetime
) -> hd.ContributingEquipment:
    """The node as contributing equipment, with the IHE AIR purpose of reference and its device UID."""
    item = hd.ContributingEquipment(
        manufacturer=device.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,  # replaced below: highdicom allows DCM codes only
        manufacturer_model_name=device.model_name,
        software_versions=device.software_version,
        contribution_datetime=now,
        contribution_description=f"{algorithm.name} {algorithm.version}"[:64],
    )
    item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    item.DeviceUID = device.uid
    return item


_REFERENCE_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def _check_sources(sources: Sequence[Dataset]) -> str:
    """The one Study Instance UID of ``sources``; ValueError naming the argument otherwise."""
    if isinstance(sources, Dataset) or not isinstance(sources, Sequence):
        raise TypeError('Argument "sources" must be a sequence of Dataset.')
    if len(sources) == 0:
        raise ValueError('Argument "sources" must not be empty.')
    for i, ds in enumerate(sources):
        if not isinstance(ds, Dataset):
            raise TypeError(f'Item {i} of argument "sources" is not a Dataset.')
        missing = [k for k in _REFERENCE_KEYWORDS if not ds.get(k)]
        if missing:
            raise ValueError(f'Item {i} of argument "sources" has no {", ".join(missing)}.')
    studies = sorted({str(ds.StudyInstanceUID) for ds in sources})
    if len(studies) != 1:
        raise ValueError(
            f'Argument "sources" spans {len(studies)} studies ({", ".join(studies)}); all must be one study.'
        )
    return studies[0]


def _check_finding(finding: Finding) -> None:
    for name in ("probability", "threshold"):
        value = getattr(finding, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f'Argument "finding" has {name} {value!r}; expected a number in [0, 1].')


def _check_key_images(key_images: Sequence[KeyImage], by_sop: dict[str, Dataset]) -> None:
    for k in key_images:
        src = by_sop.get(str(k.sop_instance_uid))
        if src is None:
            raise ValueError(f'Argument "key_images" references {k.sop_instance_uid}, which is not in "sources".')
        if str(src.SOPClassUID) != str(k.sop_class_uid):
            raise ValueError(
                f'Argument "key_images" gives SOP class {k.sop_class_uid} for {k.sop_instance_uid}, '
                f"whose source has {src.SOPClassUID}."
            )


def _check_predecessor(predecessor: Dataset, study_uid: str, sop_instance_uid: str) -> None:
    missing = [k for k in _REFERENCE_KEYWORDS if not predecessor.get(k)]
    if missing:
        raise ValueError(f'Argument "predecessor" has no {", ".join(missing)}.')
    if str(predecessor.StudyInstanceUID) != study_uid:
        raise ValueError(f'Argument "predecessor" belongs to study {predecessor.StudyInstanceUID}, not {study_uid}.')
    if str(predecessor.SOPInstanceUID) == str(sop_instance_uid):
        raise ValueError('Argument "predecessor" has the SOP Instance UID of the SR being built.')


# --------------------------------------------------------------------------- read back


def sr_summary(sr: Dataset | str | os.PathLike[str]) -> dict[str, Any]:
    """The essentials of one of our SRs (a Dataset or a file), parsed with highdicom.

    Keys: ``study_uid``, ``series_uid``, ``sop_instance_uid``, ``sop_class_uid``,
    ``probability``, ``threshold`` (from the algorithm parameters, or None),
    ``qualitative`` (``"positive"``/``"negative"``), ``key_image_uids`` (highest
    score first), ``algorithm_name``, ``algorithm_version``,
    ``algorithm_parameters``, ``tracking_uid``, ``device_uid``,
    ``completion_flag``, ``verification_flag``, ``predecessor_uids``
    (``[(study, series, sop), ...]``). Raises ValueError if it is not a TID 1500
    report with one measurement group carrying a probability.
    """
    doc = _as_highdicom_sr(sr)
    report = doc.content
    if not isinstance(report, MeasurementReport):
        raise ValueError('Argument "sr" is not a TID 1500 Imaging Measurement Report.')
    groups = report.get_image_measurement_groups()
    if len(groups) != 1:
        raise ValueError(f'Argument "sr" has {len(groups)} measurement groups; expected 1.')
    group = groups[0]
    probabilities = group.get_measurements(name=PROBABILITY_OF_CANCER)
    if len(probabilities) != 1:
        raise ValueError(f'Argument "sr" has {len(probabilities)} "Probability of cancer" values; expected 1.')
    evaluations = group.get_qualitative_evaluations(name=MALIGNANCY)
    qualitative = None
    if evaluations:
        value = cast(CodedConcept, evaluations[0].value)  # highdicom annotates it as a number
        qualitative = {POSITIVE.value: "positive", NEGATIVE.value: "negative"}.get(value.value, value.meaning)
    texts = {
        name: [item.TextValue for item in find_content_items(group[0], name=code, value_type=ValueTypeValues.TEXT)]
        for name, code in (
            ("name", codes.DCM.AlgorithmName),
            ("version", codes.DCM.AlgorithmVersion),
            ("parameters", codes.DCM.AlgorithmParameters),
        )
    }
    params = dict(_key_value(p) for p in texts["parameters"])
    try:
        threshold: float | None = float(params["threshold"])
    except (KeyError, ValueError):
        threshold = None
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
        "probability": float(probabilities[0].value),
        "threshold": threshold,
        "qualitative": qualitative,
        "key_image_uids": [str(img.referenced_sop_instance_uid) for img in group.source_images],
        "algorithm_name": texts["name"][0] if texts["name"] else None,
        "algorithm_version": texts["version"][0] if texts["version"] else None,
        "algorithm_parameters": texts["parameters"],
        "tracking_uid": str(group.tracking_uid) if group.tracking_uid else None,
        "device_uid": str(devices[0].uid) if devices else None,
        "completion_flag": doc.get("CompletionFlag"),
        "verification_flag": doc.get("VerificationFlag"),
        "predecessor_uids": [
            (str(study.StudyInstanceUID), str(series.SeriesInstanceUID), str(sop.ReferencedSOPInstanceUID))
            for study in doc.get("PredecessorDocumentsSequence", [])
            for series in study.ReferencedSeriesSequence
            for sop in series.ReferencedSOPSequence
        ],
    }


def _as_highdicom_sr(sr: Dataset | str | os.PathLike[str]) -> Any:
    """A highdicom SR object for ``sr`` (read with ``srread`` when it is a path).

    A Dataset, even one :func:`build_sr` returned, goes through ``from_dataset``
    so that its content is parsed as a TID 1500 ``MeasurementReport``.
    """
    if isinstance(sr, (str, os.PathLike)):
        return hd.sr.srread(sr)
    if not isinstance(sr, Dataset):
        raise TypeError('Argument "sr" must be a Dataset or a path.')
    sr_type = _SR_TYPE_BY_UID.get(str(sr.get("SOPClassUID", "")))
    if sr_type is None:
        raise ValueError(f'Argument "sr" has SOP class {sr.get("SOPClassUID")}, not a supported SR class.')
    return sr_type.from_dataset(sr)
