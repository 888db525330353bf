"""What the three result objects share as DICOM: the contributing equipment, the copied study
attributes and the checks of their common arguments (highdicom).

:mod:`node.results.sr`, :mod:`node.results.sc` and :mod:`node.results.ko`
each build one object; what they must say alike is written here once.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Sequence

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept, DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID

from node.results.facts import NodeDevice, Result, SourceImage

#: Contributing Equipment purpose of reference required by IHE AIR (provisional IHE code).
PROCESSING_ALGORITHM = CodedConcept("Newcode1", "99IHE", "Processing Algorithm")
IHE_CODING_SCHEME = CodingSchemeIdentificationItem(
    designator="99IHE", name="IHE provisional codes", responsible_organization="IHE"
)
#: Patient and study attributes (Type 3) copied from the source beside those highdicom copies.
STUDY_EXTRAS = ("IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "PatientAge", "PatientSize",
                "PatientWeight", "PatientIdentityRemoved", "DeidentificationMethod",
                "DeidentificationMethodCodeSequence", "StudyDescription", "IssuerOfAccessionNumberSequence")


def copy_study_extras(target: Dataset, source: Dataset, more: Sequence[str] = ()) -> None:
    """Copy :data:`STUDY_EXTRAS` (and ``more``) that ``source`` has and ``target`` lacks."""
    for keyword in (*STUDY_EXTRAS, *more):
        if keyword in source and keyword not in target:
            target[keyword] = source[keyword]


def device_observer(result: Result, device: NodeDevice) -> ObserverContext:
    """The model as the observer of an SR or KO document: a device whose UID derives from its sha256."""
    model = result.model
    return ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=model.device_uid, name=model.title[:64], manufacturer_name=device.manufacturer,
            model_name=model.name[:64],
        ),
    )


def document_arguments(
    result: Result, device: NodeDevice, *, series_uid: str, sop_instance_uid: str, series_number: int,
    instance_number: int, series_description: str, now: _dt.datetime,
) -> dict[str, Any]:
    """The keyword arguments every SR document class of highdicom (the SR, the KO) takes alike from us."""
    return dict(
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=device.manufacturer,
        contributing_equipment=contributing_equipment(result, device, now),
        series_description=series_description,
        manufacturer_model_name=device.model_name,
        software_versions=device.software_version,
        content_date=now.date(),
        content_time=now.time(),
        series_date=now.date(),
        series_time=now.time(),
        coding_schemes=[IHE_CODING_SCHEME],
    )


def contributing_equipment(result: Result, device: NodeDevice, now: _dt.datetime) -> list[hd.ContributingEquipment]:
    """The model (IHE AIR "Processing Algorithm", Device UID from its sha256) and the node that ran it."""
    model = result.model
    algorithm = hd.ContributingEquipment(
        manufacturer=device.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,  # replaced below: highdicom allows DCM codes only
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
        contribution_datetime=now,
        contribution_description=f"{model.title}, threshold {result.threshold:g} ({model.threshold_source})"[:64],
    )
    algorithm.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    algorithm.DeviceUID = model.device_uid
    node = hd.ContributingEquipment(
        manufacturer=device.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=device.model_name,
        software_versions=device.software_version,
        contribution_datetime=now,
        contribution_description=f"{device.name}: ran {model.title}"[:64],
    )
    node.DeviceUID = device.uid
    return [algorithm, node]


# --------------------------------------------------------------------------- checks (shared with sc)


def check_common(
    result: Result, device: NodeDevice, series_uid: str, sop_instance_uid: str,
    series_number: int, instance_number: int,
) -> None:
    """TypeError/ValueError naming the argument for the arguments every result object takes."""
    if not isinstance(result, Result):
        raise TypeError('Argument "result" must be a node.results.facts.Result.')
    if not isinstance(device, NodeDevice):
        raise TypeError('Argument "device" must be a node.results.facts.NodeDevice.')
    for name, uid in (("series_uid", series_uid), ("sop_instance_uid", sop_instance_uid)):
        if not isinstance(uid, str) or not UID(uid).is_valid:
            raise ValueError(f'Argument "{name}" must be a valid UID, got {uid!r}.')
    if series_uid == sop_instance_uid:
        raise ValueError('Arguments "series_uid" and "sop_instance_uid" must differ.')
    if series_uid == result.series_uid:
        raise ValueError(f'Argument "series_uid" {series_uid} is the analysed series; the object needs its own.')
    for name, number in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 2**31:
            raise ValueError(f'Argument "{name}" must be a positive integer, got {number!r}.')


def check_images(
    result: Result, datasets: Sequence[Dataset], argument: str, series_uid: str, sop_instance_uid: str,
) -> dict[str, Dataset]:
    """``datasets`` by SOP Instance UID, after checking they are images of the result's series.

    Every dataset must be of the result's study and analysed series, and one that
    the result names (a key image or a finding's image) must have the SOP class
    the result gives it; the new object's UIDs must not be taken by any of them.
    """
    if isinstance(datasets, Dataset) or not isinstance(datasets, Sequence):
        raise TypeError(f'Argument "{argument}" must be a sequence of Dataset.')
    if len(datasets) == 0:
        raise ValueError(f'Argument "{argument}" must not be empty.')
    named: dict[str, SourceImage] = {k.image.sop_instance_uid: k.image for k in result.key_images}
    named.update({f.image.sop_instance_uid: f.image for f in result.findings})
    by_uid: dict[str, Dataset] = {}
    for i, ds in enumerate(datasets):
        if not isinstance(ds, Dataset):
            raise TypeError(f'Item {i} of argument "{argument}" is not a Dataset.')
        missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
                   if not ds.get(k)]
        if missing:
            raise ValueError(f'Item {i} of argument "{argument}" has no {", ".join(missing)}.')
        uid = str(ds.SOPInstanceUID)
        if str(ds.StudyInstanceUID) != result.study_uid:
            raise ValueError(
                f'Item {i} of argument "{argument}" ({uid}) is of study {ds.StudyInstanceUID}, '
                f'not the result\'s study {result.study_uid}.'
            )
        if str(ds.SeriesInstanceUID) != result.series_uid:
            raise ValueError(
                f'Item {i} of argument "{argument}" ({uid}) is of series {ds.SeriesInstanceUID}, '
                f'not the analysed series {result.series_uid}.'
            )
        if uid in by_uid:
            raise ValueError(f'Item {i} of argument "{argument}" repeats SOP instance {uid}.')
        if uid in (series_uid, sop_instance_uid):
            raise ValueError(f'Item {i} of argument "{argument}" has the UID {uid} of the object being built.')
        image = named.get(uid)
        if image is not None and image.sop_class_uid != str(ds.SOPClassUID):
            raise ValueError(
                f'Item {i} of argument "{argument}" ({uid}) has SOP class {ds.SOPClassUID}, '
                f'but "result" gives {image.sop_class_uid}.'
            )
        by_uid[uid] = ds
    return by_uid
