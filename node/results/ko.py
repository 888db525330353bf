"""The result as a Key Object Selection (KO) document: the key images flagged for the PACS (highdicom).

Many PACS show a KO as "key images" (a star on the slice, a key-image tab),
without reading any SR. One KO per analysed study revision, in the study it
describes (its own series, Modality KO), following TID 2010::

    (113000, DCM, "Of Interest")                        document title, CID 7010
      observer type Device: the model (UID = ModelInfo.device_uid, name, manufacturer, model)
      TEXT (113012, DCM, "Key Object Description") = Result.summary(), model, UNVERIFIED
      IMAGE (260753009, SCT, "Source") x result.selected_images, best first

"Of Interest" is the CID 7010 title that says what the selection is: images a
reader should look at (the others name a workflow purpose: teaching, surgery,
quality...). The images are :attr:`Result.selected_images`: the shown images of a
positive result; a negative study gets a KO as well, referencing its top key
image only, and its description says that no nodule reached the threshold.

Header: Patient and General Study modules and the character set copied from the
sources; the referenced images in the Current Requested Procedure Evidence
Sequence; a Referenced Request Sequence item when the sources carry an order
(Accession Number or Request Attributes); Contributing Equipment naming the model
(purpose (Newcode1, 99IHE, "Processing Algorithm"), IHE AIR) and the node.

"""

from __future__ import annotations

import datetime as _dt
import logging
from typing import Sequence

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from node.results.dicom import check_common, check_images, copy_study_extras, device_observer, document_arguments
from node.results.facts import NodeDevice, Result

logger = logging.getLogger(__name__)

#: Document title, from CID 7010 "Key Object Selection Document Title".
OF_INTEREST = CodedConcept("113000", "DCM", "Of Interest")
SERIES_DESCRIPTION = "ainode AI key images"


def build_key_objects(
    result: Result,
    sources: Sequence[Dataset],
    *,
    device: NodeDevice,
    series_uid: str,
    sop_instance_uid: str,
    series_number: int = 9003,
    instance_number: int = 1,
) -> Dataset:
    """The Key Object Selection of one result, ready for ``save_as(..., enforce_file_format=True)``.

    Parameters
    ----------
    result
        The result; its :attr:`Result.selected_images` are the key objects, best first.
    sources
        Headers (pixel data not needed) of at least the selected images, all of the
        result's study; others (e.g. the whole series) are allowed and left out.
    device
        The node, as contributing equipment beside the model.

    Raises
    ------
    TypeError, ValueError
        When an argument is of the wrong type or inconsistent (a selected image
        missing from ``sources``, sources of another study...); the message names it.
    """
    check_common(result, device, series_uid, sop_instance_uid, series_number, instance_number)
    by_uid = check_images(result, sources, "sources", series_uid, sop_instance_uid)
    selected = result.selected_images
    missing = [img.label for img in selected if img.sop_instance_uid not in by_uid]
    if missing:
        raise ValueError(f'Argument "sources" lacks the key image(s) {", ".join(missing)} of "result".')
    referenced = [by_uid[img.sop_instance_uid] for img in selected]

    observer = device_observer(result, device)
    content = hd.ko.KeyObjectSelection(
        document_title=OF_INTEREST,
        referenced_objects=referenced,
        observer_device_context=observer,
        description=description(result),
    )
    now = _dt.datetime.now()
    ko = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        requested_procedures=referenced_requests(referenced[0]),
        **document_arguments(result, device, series_uid=series_uid, sop_instance_uid=sop_instance_uid,
                             series_number=series_number, instance_number=instance_number,
                             series_description=SERIES_DESCRIPTION, now=now),
    )
    copy_study_extras(ko, referenced[0])
    ko.InstanceCreationDate, ko.InstanceCreationTime = ko.ContentDate, ko.ContentTime
    logger.info(
        "Study %s: key object selection %s built (series %s, revision %d, %d key images)",
        result.study_uid, sop_instance_uid, series_uid, result.revision, len(referenced),
    )
    return ko


def description(result: Result) -> str:
    """The Key Object Description: the result in words, the model, and that nobody verified it."""
    return f"{result.summary()}. Model {result.model.title}. UNVERIFIED."


def referenced_requests(source: Dataset) -> list[Dataset] | None:
    """The Referenced Request Sequence (Type 1C): one item for the order behind ``source``, if it has one."""
    requests = list(source.get("RequestAttributesSequence", []))
    accession = str(source.get("AccessionNumber", "") or "")
    if not requests and not accession:
        return None
    first = requests[0] if requests else Dataset()
    item = Dataset()
    item.StudyInstanceUID = source.StudyInstanceUID
    item.ReferencedStudySequence = list(first.get("ReferencedStudySequence", []))
    item.AccessionNumber = accession
    if "IssuerOfAccessionNumberSequence" in source:
        item.IssuerOfAccessionNumberSequence = source.IssuerOfAccessionNumberSequence
    item.PlacerOrderNumberImagingServiceRequest = ""
    item.FillerOrderNumberImagingServiceRequest = ""
    item.RequestedProcedureID = first.get("RequestedProcedureID", "")
    item.RequestedProcedureDescription = first.get("RequestedProcedureDescription", "")
    item.RequestedProcedureCodeSequence = list(first.get("RequestedProcedureCodeSequence", []))
    return [item]
