"""The DICOM SCP: association policy, C-ECHO and C-STORE. The only SCP code.

Handlers are plain functions with their dependencies bound in the handler
list. The C-STORE handler never raises and does no heavy work: it checks,
writes durably, records the audit event durably, arms the study's completion
timer and returns a named status. Every association accepted or rejected and
every instance stored or refused is audited (see node.audit).
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.tag import Tag
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.audit import AuditError, AuditTrail
from node.completion import Completion
from node.config import Caller, Config
from node.errors import InvalidUIDError
from node.store import Storage, check_uid
from node.tls import peer_subject

logger = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 Table B.2-1; Cxxx sub-codes are ainode's own, each
# sent with an Error Comment that says what was wrong).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
CANNOT_UNDERSTAND_MISSING_UID = 0xC001
CANNOT_UNDERSTAND_INVALID_UID = 0xC002
CANNOT_UNDERSTAND_UID_MISMATCH = 0xC003

UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float Pixel Data

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 Table 9-21.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised

#: The transfer syntaxes accepted for every storage SOP class.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]


class Policy:
    """Who may associate: the called AE title and the allowed callers.

    Replaced as a whole on SIGHUP; readers take one consistent snapshot.
    """

    def __init__(self, ae_title: str, callers: tuple[Caller, ...]) -> None:
        self._lock = threading.Lock()
        self._snapshot = (ae_title, callers)

    def update(self, ae_title: str, callers: tuple[Caller, ...]) -> None:
        with self._lock:
            self._snapshot = (ae_title, callers)

    def check(self, calling: str, called: str, address: str) -> tuple[tuple[int, int, int], str] | None:
        """None if the peer may associate, else (reject reason, why in words)."""
        with self._lock:
            ae_title, callers = self._snapshot
        if called.strip() != ae_title.strip():
            return REJECT_CALLED_AE, f"called AE title {called.strip()!r} is not {ae_title!r}"
        if callers and not any(c.admits(calling, address) for c in callers):
            known = any(c.ae_title.strip() == calling.strip() for c in callers)
            why = "is not allowed from this host" if known else "is not an allowed caller"
            return REJECT_CALLING_AE, f"calling AE title {calling.strip()!r} {why}"
        return None


@dataclass
class Receiver:
    """What the handlers need, bound to them when the server starts."""

    storage: Storage
    completion: Completion
    policy: Policy
    min_free_mb: int
    audit: AuditTrail


def _peer(event: Event) -> str:
    assoc = event.assoc
    return f"{assoc.requestor.ae_title.strip() or '?'}@{assoc.requestor.address}:{assoc.requestor.port}"


def handle_conn_open(event: Event) -> None:
    """Turn Nagle off on the new connection: DIMSE is request/response."""
    sock = event.assoc.dul.socket
    raw = getattr(sock, "socket", None)
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # not a TCP socket; nothing to tune
            logger.debug("TCP_NODELAY not set: %s", exc)


def _tls_subject(event: Event) -> str | None:
    """The client certificate's subject on a TLS connection ('' with no certificate), None on plain TCP."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is None or not hasattr(sock, "getpeercert"):
        return None
    return peer_subject(sock) or ""


def _audit_association(event: Event, receiver: Receiver, refusal: str | None) -> None:
    assoc = event.assoc
    rq = assoc.requestor.primitive
    try:
        receiver.audit.association(rq.calling_ae_title, assoc.requestor.address, assoc.requestor.port,
                                   rq.called_ae_title, refusal, _tls_subject(event))
    except AuditError as exc:  # its stores will be refused for the same reason
        logger.error("Association from %s@%s: not audited: %s", rq.calling_ae_title.strip(),
                     assoc.requestor.address, exc)


def handle_requested(event: Event, receiver: Receiver) -> None:
    """Accept or reject an A-ASSOCIATE request by called AE, calling AE and host."""
    assoc = event.assoc
    rq = assoc.requestor.primitive
    calling, called = rq.calling_ae_title, rq.called_ae_title
    address = assoc.requestor.address
    refusal = receiver.policy.check(calling, called, address)
    if refusal is None:
        return  # pynetdicom may still reject it (association limit): audited by handle_rejected
    reason, why = refusal
    logger.warning("Association from %s@%s to %s: rejected, %s", calling.strip(), address, called.strip(), why)
    assoc.acse.send_reject(*reason)
    _audit_association(event, receiver, why)
    assoc.kill()


def handle_accepted(event: Event, receiver: Receiver) -> None:
    """Log and audit an association once its A-ASSOCIATE-AC is sent."""
    assoc = event.assoc
    rq = assoc.requestor.primitive
    subject = _tls_subject(event)
    tls = "" if subject is None else f" (TLS, client {subject or 'without certificate'})"
    logger.info("Association from %s@%s to %s: accepted%s", rq.calling_ae_title.strip(), assoc.requestor.address,
                rq.called_ae_title.strip(), tls)
    _audit_association(event, receiver, None)


def handle_rejected(event: Event, receiver: Receiver) -> None:
    """Log and audit an association pynetdicom rejected itself (the association limit)."""
    assoc = event.assoc
    rq = assoc.requestor.primitive
    rsp = assoc.acceptor.primitive
    why = getattr(rsp, "reason_str", None) or "rejected by the DICOM layer"
    logger.warning("Association from %s@%s to %s: rejected, %s", rq.calling_ae_title.strip(),
                   assoc.requestor.address, rq.called_ae_title.strip(), why)
    _audit_association(event, receiver, str(why))


def handle_echo(event: Event) -> int:
    """C-ECHO: always Success once the association was accepted."""
    logger.debug("C-ECHO from %s", _peer(event))
    return SUCCESS


def _failure(
    status: int, comment: str, event: Event, receiver: Receiver | None = None,
    uids: tuple[Any, Any, Any] = (None, None, None),
) -> Dataset:
    """A status dataset with an Error Comment (at most 64 characters, LO), logged and audited.

    ``uids``: (Study Instance UID, SOP Instance UID, SOP Class UID) as far as known.
    """
    logger.warning("C-STORE from %s: status 0x%04X, %s", _peer(event), status, comment)
    if receiver is not None:
        study_uid, sop_uid, sop_class = (str(u)[:64] if u else None for u in uids)
        try:
            receiver.audit.store_refused(event.assoc.requestor.ae_title, event.assoc.requestor.address,
                                         status, comment, study_uid, sop_uid, sop_class)
        except AuditError as exc:
            logger.error("C-STORE from %s: refusal not audited: %s", _peer(event), exc)
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def truncation_problem(ds: Dataset) -> str | None:
    """Why a decoded data set looks cut short, or None.

    pydicom reads a short value without complaint; a value shorter than its
    declared length, or an image (Rows/Columns) whose pixel data is gone
    (an encapsulated one cut before its delimiter), means the bytes were cut.
    """
    for tag in ds.keys():
        elem = ds.get_item(tag)
        if (
            isinstance(elem, RawDataElement)
            and elem.value is not None
            and elem.length != UNDEFINED_LENGTH
            and len(elem.value) != elem.length
        ):
            return f"element {Tag(tag)} has {len(elem.value)} of {elem.length} bytes"
    if "Rows" in ds and "Columns" in ds and not any(t in ds for t in _PIXEL_DATA_TAGS):
        return "image without pixel data"
    return None


def handle_store(event: Event, receiver: Receiver) -> int | Dataset:
    """C-STORE: check, store durably, arm completion, answer. Never raises."""
    try:
        return _store(event, receiver)
    except Exception:  # the association must go on whatever one instance does
        logger.exception("C-STORE from %s: unexpected error", _peer(event))
        return _failure(CANNOT_UNDERSTAND, "internal error while storing", event, receiver, _request_uids(event))


def _request_uids(event: Event) -> tuple[Any, Any, Any]:
    request: Any = event.request
    return None, getattr(request, "AffectedSOPInstanceUID", None), getattr(request, "AffectedSOPClassUID", None)


def _store(event: Event, receiver: Receiver) -> int | Dataset:
    storage = receiver.storage
    request: Any = event.request
    known = _request_uids(event)
    free = storage.free_mb()
    if free < receiver.min_free_mb:
        return _failure(OUT_OF_RESOURCES, f"storage has {free:.0f} MB free, below min_free_mb", event, receiver, known)

    try:
        ds = event.dataset
        study_uid = ds.get("StudyInstanceUID")
        series_uid = ds.get("SeriesInstanceUID")
        sop_uid = ds.get("SOPInstanceUID")
        sop_class = ds.get("SOPClassUID")
        problem = truncation_problem(ds)
    except Exception as exc:  # pydicom raises many kinds on bad bytes
        return _failure(CANNOT_UNDERSTAND, f"data set cannot be decoded: {type(exc).__name__}", event, receiver, known)
    if problem:
        return _failure(CANNOT_UNDERSTAND, f"data set cannot be decoded: {problem}", event, receiver, known)
    known = (study_uid, sop_uid or known[1], sop_class or known[2])

    for name, value in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid), ("SOPInstanceUID", sop_uid)):
        if not value:
            return _failure(CANNOT_UNDERSTAND_MISSING_UID, f"{name} missing", event, receiver, known)
    try:
        study_uid = check_uid(str(study_uid), "StudyInstanceUID")
        series_uid = check_uid(str(series_uid), "SeriesInstanceUID")
        sop_uid = check_uid(str(sop_uid), "SOPInstanceUID")
    except InvalidUIDError as exc:
        return _failure(CANNOT_UNDERSTAND_INVALID_UID, str(exc), event, receiver, known)
    if sop_uid != request.AffectedSOPInstanceUID:
        return _failure(CANNOT_UNDERSTAND_UID_MISMATCH, "SOPInstanceUID differs from the request's", event, receiver,
                        known)
    if sop_class and str(sop_class) != request.AffectedSOPClassUID:
        return _failure(DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from the request's", event, receiver,
                        known)

    meta = event.file_meta
    calling = event.assoc.requestor.ae_title.strip()
    if calling:
        meta.SourceApplicationEntityTitle = calling
    head = BytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    try:
        path, replaced = storage.write_instance(
            study_uid, series_uid, sop_uid, (head.getbuffer(), request.DataSet.getbuffer())
        )
    except OSError as exc:
        return _failure(OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}", event, receiver, known)
    try:  # durable before Success: a crash loses no audit event of an acknowledged instance
        receiver.audit.instance_stored(calling, event.assoc.requestor.address, study_uid, series_uid, sop_uid,
                                       str(sop_class or request.AffectedSOPClassUID), replaced)
    except AuditError as exc:
        logger.error("Study %s: %s stored but not audited: %s", study_uid, sop_uid, exc)
        return _failure(OUT_OF_RESOURCES, "cannot write the audit trail", event)
    receiver.completion.instance_stored(study_uid)
    logger.debug("Study %s: stored %s%s", study_uid, sop_uid, " (replaced)" if replaced else "")
    return SUCCESS


def build_ae(cfg: Config) -> AE:
    """The application entity with every storage SOP class and Verification."""
    ae = AE(ae_title=cfg.node.ae_title)
    ae.maximum_associations = cfg.node.max_associations
    ae.maximum_pdu_size = cfg.node.max_pdu
    ae.require_called_aet = False  # the Policy checks it, with the reload-able title
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae


def handlers(receiver: Receiver) -> list[Any]:
    """The event handlers of the SCP, with their dependencies bound."""
    return [
        (evt.EVT_CONN_OPEN, handle_conn_open),
        (evt.EVT_REQUESTED, handle_requested, [receiver]),
        (evt.EVT_ACCEPTED, handle_accepted, [receiver]),
        (evt.EVT_REJECTED, handle_rejected, [receiver]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [receiver]),
    ]
