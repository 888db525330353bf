"""The result objects of a revision on disk: built once from the recorded result, then kept.

Kinds: ``sr-<class>`` (the SR in one storage class: ``sr-comprehensive``,
``sr-enhanced``, ``sr-comprehensive3d``), ``sc`` (the summary image) and
``ko`` (the key object selection). Each lives at
``results/<StudyUID>/<SOPInstanceUID>.dcm``; its UIDs derive from the node,
the study, the revision and the kind (:func:`node.results.facts.object_uids`),
so building it again after a crash writes the same file, never a second
object. Every revision's object of one kind is in one series, Instance Number
= revision; a later revision's SR names the earlier one as its predecessor.
"""

from __future__ import annotations

import logging
from io import BytesIO
from pathlib import Path
from typing import Any, Iterable, Sequence

from pydicom import dcmread
from pydicom.dataset import Dataset

from node.config import Destination
from node.errors import VolumeError
from node.results.facts import KeyImage, ModelInfo, NodeDevice, Result, SourceImage, object_uids
from node.store import Storage, write_atomic

logger = logging.getLogger(__name__)

SC, KO = "sc", "ko"
SR_PREFIX = "sr-"
#: The SOP class of each kind of object (SR classes as node.config.SR_CLASSES names them).
SOP_CLASSES = {
    "sr-comprehensive": "1.2.840.10008.5.1.4.1.1.88.33",
    "sr-enhanced": "1.2.840.10008.5.1.4.1.1.88.22",
    "sr-comprehensive3d": "1.2.840.10008.5.1.4.1.1.88.34",
    SC: "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    KO: "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document Storage
}
#: Series Number of each kind of object (the SR classes share one number: a destination gets one class).
SERIES_NUMBERS = {"sr": 9001, SC: 9002, KO: 9003}


def kinds_for(dest: Destination) -> list[str]:
    """The object kinds a destination gets, in the order they are sent (SR first); an HL7 destination's
    message names the SR, so it needs that alone."""
    if dest.kind == "hl7":
        return [f"{SR_PREFIX}{dest.sr_class}"]
    kinds = []
    for obj in dest.objects:
        kinds.append(f"{SR_PREFIX}{dest.sr_class}" if obj == "sr" else obj)
    return sorted(kinds, key=lambda k: (not k.startswith(SR_PREFIX), k))


def all_kinds(destinations: Iterable[Destination], default_sr_class: str = "comprehensive") -> list[str]:
    """Every kind some destination needs, plus the default SR (always made: it is the record)."""
    kinds = {f"{SR_PREFIX}{default_sr_class}"}
    for dest in destinations:
        kinds.update(kinds_for(dest))
    return sorted(kinds, key=lambda k: (not k.startswith(SR_PREFIX), k))


def recorded_result(storage: Storage, study_uid: str, revision: int) -> tuple[Result, list[str]]:
    """The result recorded in a revision's outcome and the instances it analysed; VolumeError if it has none."""
    outcome = storage.read_outcome(study_uid, revision)
    if outcome is None or outcome["status"] != "analysed":
        raise VolumeError(f"study {study_uid} revision {revision} has no analysis to report")
    if "findings" not in outcome["result"]:
        return _result_of_ainode_0_1(outcome), list(outcome["result"]["instances_used"])
    return Result.from_json(outcome["result"]), list(outcome["instances_used"])


def _result_of_ainode_0_1(outcome: dict[str, Any]) -> Result:
    """An outcome written by ainode 0.1 (a study score and key slices, no findings) as a Result,
    so its objects can still be built (a resend after an upgrade)."""
    old = outcome["result"]
    keys = tuple(KeyImage(SourceImage(k["sop_class_uid"], k["sop_instance_uid"], int(k["slice_index"])),
                          float(k["score"])) for k in old["key_images"])
    model = ModelInfo(old["model"]["name"], old["model"]["version"], old["model"]["sha256"], "config",
                      old.get("aggregation", "top3_mean"), located=False)
    return Result(outcome["study_uid"], int(outcome["revision"]), old["series_uid"], float(old["score"]),
                  float(old["threshold"]), (), keys, model)


def ensure_object(
    storage: Storage, device: NodeDevice, study_uid: str, revision: int, kind: str, result: Result | None = None,
    instances_used: Sequence[str] | None = None,
) -> Path:
    """The file of one result object of a revision, built if missing.

    From ``result`` and ``instances_used`` (the SOP Instance UIDs the analysis
    read: the SR's evidence) when given, else from the revision's outcome.
    """
    series_uid, sop_uid = object_uids(device.uid, study_uid, revision, kind)
    path = storage.result_path(study_uid, sop_uid)
    if path.exists():
        return path
    if result is None or instances_used is None:
        result, instances_used = recorded_result(storage, study_uid, revision)
    rev = storage.read_revision(study_uid, revision)
    common: dict[str, Any] = dict(device=device, series_uid=series_uid, sop_instance_uid=sop_uid,
                                  instance_number=revision)
    if kind.startswith(SR_PREFIX):
        from node.results.sr import build_sr

        sources = _evidence(storage, result, rev.instances, instances_used)
        ds = build_sr(result, sources, predecessor=_predecessor(storage, device, study_uid, revision, kind),
                      series_number=SERIES_NUMBERS["sr"], sr_class=kind.removeprefix(SR_PREFIX), **common)
    elif kind == SC:
        from node.results.sc import build_summary_image

        images = [dcmread(storage.instance_path(study_uid, rev.instances[i.sop_instance_uid], i.sop_instance_uid))
                  for i in result.shown_images]
        ds = build_summary_image(result, images, series_number=SERIES_NUMBERS[SC], **common)
    elif kind == KO:
        from node.results.ko import build_key_objects

        sources = [_header(storage, study_uid, rev.instances[i.sop_instance_uid], i.sop_instance_uid)
                   for i in result.shown_images]
        ds = build_key_objects(result, sources, series_number=SERIES_NUMBERS[KO], **common)
    else:
        raise ValueError(f'Argument "kind" must be sr-<class>, {SC} or {KO}, got {kind!r}')
    storage.ensure_dir(path.parent)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    write_atomic(path, buf.getvalue(), storage.tmp)
    logger.info("Study %s r%d: %s %s written", study_uid, revision, kind, sop_uid)
    return path


def _header(storage: Storage, study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
    return dcmread(storage.instance_path(study_uid, series_uid, sop_uid), stop_before_pixels=True)


def _evidence(storage: Storage, result: Result, series_of: dict[str, str], used: Sequence[str]) -> list[Dataset]:
    """The SR's sources: the headers of the images it shows (read from disk; the first gives the SR its
    Patient and Study modules), and for every other instance analysed just its four UIDs.

    Reading 300 headers again cost 0.3 s a study; the evidence lists only UIDs. Every analysed slice
    has one SOP class (node.volume keeps the series' single-frame slice class only).
    """
    shown = [i.sop_instance_uid for i in result.shown_images]
    sop_class = result.key_images[0].image.sop_class_uid
    sources = [_header(storage, result.study_uid, series_of[sop], sop) for sop in shown]
    for sop in sorted(set(used) - set(shown)):
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = result.study_uid, series_of[sop]
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
        sources.append(ds)
    return sources


def _predecessor(storage: Storage, device: NodeDevice, study_uid: str, revision: int, kind: str) -> Dataset | None:
    """The SR of the latest earlier analysed revision in the same class, which this one replaces."""
    for earlier in reversed([r for r in storage.revisions(study_uid) if r < revision]):
        prior = storage.read_outcome(study_uid, earlier)
        if prior and prior["status"] == "analysed":
            # the SR that revision really made (outcomes of ainode 0.1 name theirs under "sr", by class)
            made = prior.get("objects", {}).get(kind) or prior.get("sr", {}).get(kind.removeprefix(SR_PREFIX))
            path = storage.results / study_uid / made if made else None
            if path is None or not path.exists():
                path = ensure_object(storage, device, study_uid, earlier, kind)
            return dcmread(path, stop_before_pixels=True)
    return None
