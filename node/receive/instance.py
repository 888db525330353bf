"""One C-STORE: check the received data set, store it durably, answer with a named status.

The data set arrives into a partial file in ``tmp/`` (node.store.Partial)
behind a file meta built from the command and the presentation context.
Once its last fragment is in, :meth:`Receiver.store` walks its structure
(node.receive.dataset), checks its UIDs, fsyncs and renames it into place,
records the audit event durably, notes the study for its completion timers
and returns the status. Every refusal is logged and audited with the
reason the sender gets as its Error Comment.
"""

from __future__ import annotations

import logging
import mmap
import zlib
from dataclasses import dataclass
from typing import Any

from node.audit import AuditError, AuditTrail
from node.completion import Completion
from node.errors import InvalidUIDError
from node.receive.dataset import (
    COLUMNS, ROWS, SERIES_UID, SOP_CLASS_UID, SOP_INSTANCE_UID, STUDY_UID, Undecodable, Walked, walk,
)
from node.receive.policy import Policy
from node.store import Partial, Storage, check_uid

logger = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 Table B.2-1; Cxxx sub-codes are ainode's own, each
# sent with an Error Comment that says what was wrong).
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
CANNOT_UNDERSTAND_MISSING_UID = 0xC001
CANNOT_UNDERSTAND_INVALID_UID = 0xC002
CANNOT_UNDERSTAND_UID_MISMATCH = 0xC003

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")  # Deflated Explicit VR LE, Deflated Image Frame
NATIVE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")
#: A deflated data set may inflate to at most this (a deflate bomb is refused, not held in memory).
MAX_INFLATED = 1 << 30


@dataclass(frozen=True)
class Peer:
    """Who sent it: the calling AE title (stripped), the connection's address and, once accepted, the
    called AE title (the pipeline)."""

    ae_title: str
    address: str
    port: int
    called: str = ""

    def __str__(self) -> str:
        return f"{self.ae_title or '?'}@{self.address}:{self.port}"


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE-RQ's command values and its presentation context's transfer syntax."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    context_sop_class: str


@dataclass
class Receiver:
    """What the SCP needs to store: bound once when the node starts; some fields change on SIGHUP."""

    storage: Storage
    completion: Completion
    policy: Policy
    min_free_mb: int
    audit: AuditTrail

    # --- the C-STORE path -------------------------------------------------------------

    def refuse_early(self, peer: Peer, request: StoreRequest) -> tuple[int, str] | None:
        """A refusal known from the command alone (before the data set is read), or None."""
        free = self.storage.free_mb()
        if free < self.min_free_mb:
            return self.failure(OUT_OF_RESOURCES, f"storage has {free:.0f} MB free, below min_free_mb", peer,
                                (None, request.sop_instance, request.sop_class))
        if request.sop_class != request.context_sop_class:
            return self.failure(SOP_CLASS_NOT_SUPPORTED,
                                "Affected SOP Class differs from the presentation context's", peer,
                                (None, request.sop_instance, request.sop_class))
        return None

    def store(self, peer: Peer, request: StoreRequest, partial: Partial, head: int) -> tuple[int, str | None]:
        """Check the whole partial file and commit it; (status, error comment). Never raises."""
        try:
            return self._store(peer, request, partial, head)
        except Exception:  # the association must go on whatever one instance does
            logger.exception("C-STORE from %s: unexpected error", peer)
            return self.failure(CANNOT_UNDERSTAND, "internal error while storing", peer,
                                (None, request.sop_instance, request.sop_class))

    def _store(self, peer: Peer, request: StoreRequest, partial: Partial, head: int) -> tuple[int, str | None]:
        known: tuple[Any, Any, Any] = (None, request.sop_instance, request.sop_class)
        try:
            walked = _walk_partial(partial, head, request.transfer_syntax)
        except Undecodable as exc:
            return self.failure(CANNOT_UNDERSTAND, f"data set cannot be decoded: {exc}", peer, known)
        study_uid = walked.text(STUDY_UID)
        series_uid = walked.text(SERIES_UID)
        sop_uid = walked.text(SOP_INSTANCE_UID)
        sop_class = walked.text(SOP_CLASS_UID)
        known = (study_uid, sop_uid or request.sop_instance, sop_class or request.sop_class)
        if ROWS in walked.values and COLUMNS in walked.values and not walked.pixel_data:
            return self.failure(CANNOT_UNDERSTAND, "data set cannot be decoded: image without pixel data", peer,
                                known)
        for name, value in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                            ("SOPInstanceUID", sop_uid), ("SOPClassUID", sop_class)):
            if not value:
                return self.failure(CANNOT_UNDERSTAND_MISSING_UID, f"{name} missing", peer, known)
        try:
            study_uid = check_uid(study_uid, "StudyInstanceUID", strict=True)
            series_uid = check_uid(series_uid, "SeriesInstanceUID", strict=True)
            sop_uid = check_uid(sop_uid, "SOPInstanceUID", strict=True)
            check_uid(sop_class, "SOPClassUID", strict=True)
        except InvalidUIDError as exc:
            return self.failure(CANNOT_UNDERSTAND_INVALID_UID, str(exc), peer, known)
        if sop_uid != request.sop_instance:
            return self.failure(CANNOT_UNDERSTAND_UID_MISMATCH, "SOPInstanceUID differs from the request's", peer,
                                known)
        if sop_class != request.sop_class:
            return self.failure(DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from the request's", peer,
                                known)
        assert study_uid and series_uid and sop_class
        try:
            _, replaced = self.storage.commit_partial(partial, study_uid, series_uid, sop_uid)
            self.storage.mark_pipeline(study_uid, peer.called)
        except OSError as exc:
            return self.failure(OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}", peer, known)
        try:  # durable before Success: a crash loses no audit event of an acknowledged instance
            self.audit.instance_stored(peer.ae_title, peer.address, study_uid, series_uid, sop_uid, sop_class,
                                       replaced)
        except AuditError as exc:
            logger.error("Study %s: %s stored but not audited: %s", study_uid, sop_uid, exc)
            return self.failure(OUT_OF_RESOURCES, "cannot write the audit trail", peer)
        self.completion.instance_stored(study_uid, peer.called)
        logger.debug("Study %s: stored %s%s", study_uid, sop_uid, " (replaced)" if replaced else "")
        return SUCCESS, None

    def failure(self, status: int, comment: str, peer: Peer,
                uids: tuple[Any, Any, Any] = (None, None, None)) -> tuple[int, str]:
        """A refusal (status, Error Comment of at most 64 characters), logged and audited.

        ``uids``: (Study Instance UID, SOP Instance UID, SOP Class UID) as far as known.
        """
        logger.warning("C-STORE from %s: status 0x%04X, %s", peer, status, comment)
        study_uid, sop_uid, sop_class = (str(u)[:64] if u else None for u in uids)
        try:
            self.audit.store_refused(peer.ae_title, peer.address, status, comment, study_uid, sop_uid, sop_class)
        except AuditError as exc:
            logger.error("C-STORE from %s: refusal not audited: %s", peer, exc)
        return status, comment[:64]


def _walk_partial(partial: Partial, head: int, transfer_syntax: str) -> Walked:
    """Walk the data set written after ``head`` bytes of file meta in the partial file."""
    size = partial.size - head
    if size <= 0:
        raise Undecodable("empty data set")
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    encapsulated = transfer_syntax not in NATIVE
    mapped = mmap.mmap(partial.fd, partial.size, access=mmap.ACCESS_READ)
    problem = None
    try:
        data = memoryview(mapped)[head:]
        try:
            return walk(_inflate(data) if transfer_syntax == DEFLATED[0] else data, implicit, little, encapsulated)
        except Undecodable as exc:
            problem = str(exc)  # raised again below, once no frame holds a view of the mapping
        finally:
            data.release()
    finally:
        if problem is None:
            try:
                mapped.close()
            except BufferError:  # an unexpected error's traceback still holds a view: the GC closes it
                pass
        else:
            mapped.close()
    raise Undecodable(problem)


def _inflate(data: memoryview) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, MAX_INFLATED)
    except zlib.error as exc:
        raise Undecodable(f"deflated data set is corrupt: {exc}") from None
    if inflater.unconsumed_tail:
        raise Undecodable(f"deflated data set inflates to more than {MAX_INFLATED >> 20} MB")
    return out
