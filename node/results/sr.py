"""The result as a DICOM Structured Report that viewers draw: TID 1500 with a TID 1410 group per finding.

One SR per analysed revision of a study, in that study (its own series, one
series for every revision, Instance Number = revision), following DICOM TID
1500 and the IHE AI Results (AIR) profile::

    (126000, DCM, "Imaging Measurement Report")              TID 1500
      language en-US; observer: Device = the model (UID from its sha256, name, version)
      procedure reported (24627-2, LN, "Chest CT")
      Image Library (111028, DCM)                            TID 1600: the images shown
      (126010, DCM, "Imaging Measurements")
        per finding (best first), a planar ROI group         TID 1410
          tracking identifier "Nodule N" + tracking UID
          finding (27925004, SCT, "Nodule"); finding site (39607008, SCT, "Lung")
          algorithm (TID 4019): name, version, parameters (threshold, sha256, ...)
          SCOORD (111030, DCM, "Image Region") POINT (or CIRCLE of the diameter)
            SELECTED FROM the IMAGE the finding is on
          NUM (111047, DCM, "Probability of cancer") in % (UCUM "%"), a whole number
          CODE (RID36042, RADLEX, "Malignancy") = Positive | Negative at the threshold
        or, when there is no located finding, the study group (TID 1501)
          tracking identifier "Study result" + UID; finding nodule, site lung, algorithm
          NUM study probability of cancer in %; CODE malignancy at the threshold
          IMAGE (121112, DCM, "Source of Measurement") per key image
      (C0034375, UMLS, "Qualitative Evaluations")
        TEXT (121073, DCM, "Impression") = the result in words, demo notice first
        CODE (27925004, SCT, "Nodule") = (52101004, SCT, "Present") | (2667000, SCT, "Absent")

TID 1500's rows are ordered (Image Library, Imaging Measurements, then
Qualitative Evaluations), so the plain-text summary is the first item of the
last container, not of the document. A negative study has only the study
group: it says "Absent" in a coded item and "no nodule reached the threshold"
in words, and carries no coordinates. A model without a score map gives the
study group only, never invented coordinates.

Why no study group beside located findings: OHIF v3 (3.13) reads the groups
last to first and stops at the first one without a SCOORD, so one such group
makes it draw nothing at all; and it opens the viewport on the first group's
image. So a report with findings holds only their TID 1410 groups, the most
suspicious first (tests/test_viewer.py shows both in a real browser). The
study result is then in the words and the coded presence.

Header: Patient and General Study modules copied from the sources (with their
Specific Character Set), COMPLETE, UNVERIFIED, every source instance in the
Current Requested Procedure Evidence Sequence, the earlier SR of the study in
the Predecessor Documents Sequence, and the model in the Contributing
Equipment Sequence with purpose (Newcode1, 99IHE, "Processing Algorithm") and
its Device UID, as IHE AIR asks, beside the node that ran it (node.results.dicom).

This module imports highdicom at module level: the receive path never imports it.
"""

from __future__ import annotations

import datetime as _dt
import logging
from enum import Enum
from typing import Any, Sequence

import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    EnhancedSR,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.valuerep import DSfloat

from node.results.dicom import device_observer, document_arguments
from node.results.facts import DEMO_NOTICE, Finding, NodeDevice, Result, percent, percent_value

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- codes

#: Procedure reported: LOINC "Chest CT" (CID 100 is extensible).
PROCEDURE_CHEST_CT = CodedConcept("24627-2", "LN", "Chest CT")
FINDING_NODULE = CodedConcept("27925004", "SCT", "Nodule")
SITE_LUNG = CodedConcept("39607008", "SCT", "Lung")
PROBABILITY_OF_CANCER = CodedConcept("111047", "DCM", "Probability of cancer")
PERCENT = CodedConcept("%", "UCUM", "percent")
#: Concept of the qualitative result; the one the QIICR LIDC-IDRI TID 1500 collection uses.
MALIGNANCY = CodedConcept("RID36042", "RADLEX", "Malignancy")
#: Values of the qualitative result, CID 250 "Positive/Negative" (a test result at a threshold).
POSITIVE = CodedConcept("10828004", "SCT", "Positive")
NEGATIVE = CodedConcept("260385009", "SCT", "Negative")
#: Presence of a finding, CID 240 "Present/Absent".
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("2667000", "SCT", "Absent")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
IMPRESSION = CodedConcept("121073", "DCM", "Impression")
STUDY_GROUP = "Study result"
IMAGE_LIBRARY = "111028"
SERIES_DESCRIPTION = "ainode AI result"


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
SR_SOP_CLASSES: dict[SRClass, str] = {
    SRClass.COMPREHENSIVE: "1.2.840.10008.5.1.4.1.1.88.33",
    SRClass.ENHANCED: "1.2.840.10008.5.1.4.1.1.88.22",
    SRClass.COMPREHENSIVE_3D: "1.2.840.10008.5.1.4.1.1.88.34",
}
SR_TYPE_BY_UID = {SR_SOP_CLASSES[c]: t for c, t in _SR_TYPES.items()}

# --------------------------------------------------------------------------- build


def build_sr(
    result: Result,
    sources: Sequence[Dataset],
    device: NodeDevice,
    *,
    series_uid: str,
    sop_instance_uid: str,
    series_number: int = 9001,
    instance_number: int = 1,
    predecessor: Dataset | None = None,
    sr_class: SRClass | str = SRClass.COMPREHENSIVE,
) -> Dataset:
    """The TID 1500 SR of one result, ready for ``save_as(..., enforce_file_format=True)``.

    Parameters
    ----------
    result
        The result: study score, threshold, located findings, key images, model.
    sources
        Headers (pixel data not needed) of every instance the analysis used, all of the result's study.
    device
        The node (software) that ran the model, named in the header.
    predecessor
        The earlier SR of this study that this one replaces, if any.

    Raises ValueError when an argument is inconsistent (sources of another
    study, an image of the result that is not a source...); the message names it.
    """
    study_uid = _check_sources(sources, result)
    by_sop = {str(ds.SOPInstanceUID): ds for ds in sources}
    _check_images(result, by_sop)
    if str(series_uid) in {str(ds.SeriesInstanceUID) for ds in sources}:
        raise ValueError(f'Argument "series_uid" {series_uid} is a source series; the SR needs a new series.')
    if predecessor is not None:
        _check_predecessor(predecessor, study_uid, sop_instance_uid)
    try:
        sr_class = SRClass(sr_class)
    except ValueError:
        choices = ", ".join(c.value for c in SRClass)
        raise ValueError(f'Argument "sr_class" is {sr_class!r}; expected one of {choices}.') from None

    algorithm = AlgorithmIdentification(
        name=result.model.name, version=result.model.version, parameters=algorithm_parameters(result)
    )
    groups: list[Any] = [_finding_group(result, f, algorithm) for f in result.findings]
    if not groups:
        groups.append(_study_group(result, algorithm))
    observer = device_observer(result, device)
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_CHEST_CT,
        imaging_measurements=groups,
        referenced_images=[by_sop[image.sop_instance_uid] for image in result.shown_images],
    )
    report[0].ContentSequence.append(_qualitative_evaluations(result))
    now = _dt.datetime.now()
    sr = _SR_TYPES[sr_class](
        evidence=list(sources),
        content=report[0],
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        **document_arguments(result, device, series_uid=series_uid, sop_instance_uid=sop_instance_uid,
                             series_number=series_number, instance_number=instance_number,
                             series_description=SERIES_DESCRIPTION, now=now),
    )
    sr.InstanceCreationDate, sr.InstanceCreationTime = sr.ContentDate, sr.ContentTime
    logger.info(
        "Study %s: SR %s built (%s, %d source instances, probability %s, %s, %d finding(s)%s)",
        study_uid, sop_instance_uid, sr_class.value, len(by_sop), percent(result.score),
        "positive" if result.positive else "negative", len(result.findings),
        f", replaces {predecessor.SOPInstanceUID}" if predecessor is not None else "",
    )
    return sr


def _finding_group(result: Result, finding: Finding, algorithm: AlgorithmIdentification) -> Any:
    """TID 1410 for one located finding: its point (or circle) on its image, its probability and result."""
    point = np.array([[finding.column + 0.5, finding.row + 0.5]])  # SCOORD: (column, row), pixel edge at 0.0
    graphic_type = GraphicTypeValues.POINT
    if finding.diameter_mm is not None:
        spacing = float(_pixel_spacing(result, finding)[1])
        radius_px = finding.diameter_mm / 2.0 / spacing
        point = np.array([point[0], point[0] + [radius_px, 0.0]])
        graphic_type = GraphicTypeValues.CIRCLE
    region = ImageRegion(
        graphic_type=graphic_type,
        graphic_data=point,
        source_image=SourceImageForRegion(finding.image.sop_class_uid, finding.image.sop_instance_uid),
    )
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=finding.tracking_uid(result.study_uid, result.revision), identifier=f"Nodule {finding.number}"
        ),
        referenced_region=region,
        finding_type=FINDING_NODULE,
        finding_sites=[FindingSite(SITE_LUNG)],
        algorithm_id=algorithm,
        measurements=[_probability(finding.probability)],
        qualitative_evaluations=[
            QualitativeEvaluation(
                name=MALIGNANCY, value=POSITIVE if finding.probability >= result.threshold else NEGATIVE
            )
        ],
    )


def _study_group(result: Result, algorithm: AlgorithmIdentification) -> Any:
    """TID 1501 for the study: its probability and qualitative result, its key images (no coordinates)."""
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=study_tracking_uid(result), identifier=STUDY_GROUP),
        finding_type=FINDING_NODULE,
        finding_sites=[FindingSite(SITE_LUNG)],
        algorithm_id=algorithm,
        measurements=[_probability(result.score)],
        qualitative_evaluations=[QualitativeEvaluation(name=MALIGNANCY, value=POSITIVE if result.positive else NEGATIVE)],
        source_images=[
            SourceImageForMeasurementGroup(k.image.sop_class_uid, k.image.sop_instance_uid) for k in result.key_images
        ],
    )


def _probability(p: float) -> Measurement:
    """The probability of cancer as a NUM in whole percent, written "91" (highdicom would write "91.0")."""
    value = percent_value(p)
    measurement = Measurement(name=PROBABILITY_OF_CANCER, value=value, unit=PERCENT)
    measurement[0].MeasuredValueSequence[0].NumericValue = DSfloat(str(value))
    return measurement


def _qualitative_evaluations(result: Result) -> ContainerContentItem:
    """TID 1500 row 12: the result in words (first) and as a coded presence of a suspicious nodule."""
    container = ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS)
    container.ContentSequence = ContentSequence([
        TextContentItem(name=IMPRESSION, value=result.summary(), relationship_type=RelationshipTypeValues.CONTAINS),
        CodeContentItem(
            name=FINDING_NODULE, value=PRESENT if result.positive else ABSENT,
            relationship_type=RelationshipTypeValues.CONTAINS,
        ),
    ])
    return container


def warm_up() -> None:
    """Load what highdicom loads on first use (its IOD tables, about 0.3 s), so a worker's first job does not pay it."""
    ImageRegion(graphic_type=GraphicTypeValues.POINT, graphic_data=np.array([[1.0, 1.0]]),
                source_image=SourceImageForRegion("1.2.840.10008.5.1.4.1.1.2", "2.25.1"))


def study_tracking_uid(result: Result) -> str:
    """The study group's tracking UID: the same for every revision's SR of one study."""
    from pydicom.uid import generate_uid

    return generate_uid(prefix="2.25.", entropy_srcs=["ainode-study-finding", result.study_uid])


def algorithm_parameters(result: Result) -> list[str]:
    """The TID 4019 parameter items: threshold (with where it came from), aggregation, sha256, the notice."""
    pipeline = [f"pipeline={result.extra['pipeline']}"] if result.extra.get("pipeline") else []
    return [
        f"threshold={percent(result.threshold)} ({result.model.threshold_source})",
        f"aggregation={result.model.aggregation}",
        f"sha256={result.model.sha256}",
        *pipeline,
        f"intended use={DEMO_NOTICE}",
    ]


def _pixel_spacing(result: Result, finding: Finding) -> tuple[float, float]:
    spacing = result.extra.get("pixel_spacing")
    if not spacing:
        raise ValueError(f"Finding {finding.number} has a diameter but the result has no pixel spacing.")
    return float(spacing[0]), float(spacing[1])


_REFERENCE_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def _check_sources(sources: Sequence[Dataset], result: Result) -> str:
    """The Study Instance UID of ``sources`` (the result's); TypeError/ValueError naming the argument otherwise."""
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
    if studies != [result.study_uid]:
        raise ValueError(
            f'Argument "sources" spans studies {", ".join(studies)}; all must be the result\'s study {result.study_uid}.'
        )
    return result.study_uid


def _check_images(result: Result, by_sop: dict[str, Dataset]) -> None:
    images = [k.image for k in result.key_images] + [f.image for f in result.findings]
    for image in images:
        src = by_sop.get(image.sop_instance_uid)
        if src is None:
            raise ValueError(f'Argument "result" references image {image.sop_instance_uid}, which is not in "sources".')
        if str(src.SOPClassUID) != image.sop_class_uid:
            raise ValueError(
                f'Argument "result" gives SOP class {image.sop_class_uid} for {image.sop_instance_uid}, '
                f"whose source has {src.SOPClassUID}."
            )
    for f in result.findings:
        src = by_sop[f.image.sop_instance_uid]
        rows, cols = int(src.Rows), int(src.Columns)
        if not (-0.5 <= f.row < rows - 0.5 and -0.5 <= f.column < cols - 0.5):
            raise ValueError(
                f'Argument "result": finding {f.number} at ({f.row:.1f}, {f.column:.1f}) lies outside its '
                f"{rows} x {cols} image."
            )


def _check_predecessor(predecessor: Dataset, study_uid: str, sop_instance_uid: str) -> None:
    missing = [k for k in _REFERENCE_KEYWORDS if not predecessor.get(k)]
    if missing:
        raise ValueError(f'Argument "predecessor" has no {", ".join(missing)}.')
    if str(predecessor.StudyInstanceUID) != study_uid:
        raise ValueError(f'Argument "predecessor" belongs to study {predecessor.StudyInstanceUID}, not {study_uid}.')
    if str(predecessor.SOPInstanceUID) == str(sop_instance_uid):
        raise ValueError('Argument "predecessor" has the SOP Instance UID of the SR being built.')
