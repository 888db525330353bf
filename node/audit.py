"""The audit trail: one JSON line per event, with the meaning of DICOM PS3.15 A.5 audit messages.

Each line carries the fields of the DICOM audit message schema in snake case:
``time`` (EventDateTime, UTC), ``event_id`` (EventID, CID 400), ``event_type``
(EventTypeCode, CID 401), ``action`` (EventActionCode C/R/U/D/E), ``outcome``
(EventOutcomeIndicator 0/4/8/12) and ``outcome_description``, ``source``
(AuditSourceIdentification), ``participants`` (ActiveParticipant: UserID,
AlternativeUserID ``AETITLE=...``, UserIsRequestor, RoleIDCode,
NetworkAccessPointID/TypeCode) and ``objects`` (ParticipantObjectIdentification).
The events, their codes and why they were chosen are listed in the README.

Participant objects are studies (by Study Instance UID) and configuration
files, never patients: no patient name, ID or birth date is ever written here,
nor in the operational log. PS3.15 also describes a Patient participant
object; ainode leaves it out on purpose, so that the trail can be shipped to a
central collector without carrying identifying data. A study UID leads back to
the patient only through the PACS.

Durability: :meth:`AuditTrail.record` returns once its line is written and
fdatasync'd. Threads that record at the same time share one write and one
fdatasync (group commit: the first waiting thread writes the whole batch
while the others wait for it), so a C-STORE is answered Success only after its
event is on disk, without an fsync per thread. Several processes (the SCP and
its workers) append to the same file: the file is opened with O_APPEND and
every batch is written under an exclusive ``flock``, so lines from different
processes never interleave, whatever their length. A write that fails half way
(disk full) is cut back to the last whole line before the lock is released.
The file is 0600, its folder (created if missing) 0700. A renamed or removed
file (log rotation) is noticed before the next batch and opened afresh.

Syslog (optional, node.syslog): each event is also sent as an RFC 5424
message, best effort; the file stays the record of truth.
"""

from __future__ import annotations

import fcntl
import getpass
import ipaddress
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any, Iterable

from node.errors import AinodeError
from node.syslog import SyslogSender

logger = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700


class AuditError(AinodeError):
    """An audit event could not be made durable (the audit file cannot be written)."""


@dataclass(frozen=True)
class Code:
    """A coded value (code, coding scheme, meaning)."""

    code: str
    meaning: str
    scheme: str = "DCM"

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "scheme": self.scheme, "meaning": self.meaning}


class EventID:
    """PS3.16 CID 400 Audit Event ID."""

    APPLICATION_ACTIVITY = Code("110100", "Application Activity")
    INSTANCES_ACCESSED = Code("110103", "DICOM Instances Accessed")
    INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
    STUDY_DELETED = Code("110105", "DICOM Study Deleted")
    SECURITY_ALERT = Code("110113", "Security Alert")
    USER_AUTHENTICATION = Code("110114", "User Authentication")


class EventType:
    """PS3.16 CID 401 Audit Event Type Code and CID 403 Security Alert Type."""

    APPLICATION_START = Code("110120", "Application Start")
    APPLICATION_STOP = Code("110121", "Application Stop")
    NODE_AUTHENTICATION = Code("110126", "Node Authentication")
    LOGIN = Code("110122", "Login")
    LOGOUT = Code("110123", "Logout")
    SECURITY_CONFIGURATION = Code("110129", "Security Configuration")
    SOFTWARE_CONFIGURATION = Code("110131", "Software Configuration")


class Role:
    """PS3.16 CID 402 Audit Active Participant Role ID."""

    APPLICATION = Code("110150", "Application")
    APPLICATION_LAUNCHER = Code("110151", "Application Launcher")
    DESTINATION = Code("110152", "Destination Role ID")
    SOURCE = Code("110153", "Source Role ID")


STUDY_INSTANCE_UID = Code("110180", "Study Instance UID")  # CID 404 Audit Participant Object ID Type
URI = Code("12", "URI", "RFC-3881")


class Action(str, Enum):
    """EventActionCode."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # action restarted (e.g. refused now, the peer may try again)
    SERIOUS_FAILURE = 8  # action terminated
    MAJOR_FAILURE = 12  # action made unavailable (a system problem)


class ObjectType(IntEnum):
    """ParticipantObjectTypeCode."""

    SYSTEM_OBJECT = 2


class ObjectRole(IntEnum):
    """ParticipantObjectTypeCodeRole."""

    REPORT = 3
    SECURITY_RESOURCE = 13


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: an AE (``user_id`` its AE title) or a process."""

    user_id: str
    requestor: bool
    role: Code | None = None
    address: str | None = None
    ae_title: str | None = None
    tls_subject: str | None = None  # the verified peer certificate's subject, when TLS was used

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"user_id": self.user_id, "requestor": self.requestor}
        if self.ae_title:
            out["alt_user_id"] = f"AETITLE={self.ae_title}"
        if self.role is not None:
            out["role"] = self.role.to_json()
        if self.address:
            out["address"] = self.address
            out["address_type"] = 2 if _is_ip(self.address) else 1  # NetworkAccessPointTypeCode: 2 IP, 1 name
        if self.tls_subject:
            out["tls_subject"] = self.tls_subject
        return out


def ae(title: str, *, requestor: bool, role: Code | None = None, address: str | None = None,
       tls_subject: str | None = None) -> Participant:
    """An application entity as a participant (UserID and AlternativeUserID from its AE title)."""
    title = title.strip() or "?"
    return Participant(title, requestor, role, address, title, tls_subject)


def study(uid: str | None, *, sop_class: str | None = None, instances: Iterable[str] = (),
          series: str | None = None, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """A study as a participant object: Study Instance UID, SOP class, count and instance UIDs."""
    listed = list(instances)
    out: dict[str, Any] = {
        "id": uid or "", "id_type": STUDY_INSTANCE_UID.to_json(),
        "type": int(ObjectType.SYSTEM_OBJECT), "role": int(ObjectRole.REPORT),
    }
    description: dict[str, Any] = {}
    if sop_class:
        description["sop_class"] = {"uid": sop_class, "count": len(listed) or 1}
    if series:
        description["series"] = series
    if listed:
        description["instances"] = listed
    if description:
        out["description"] = description
    if detail:
        out["detail"] = detail
    return out


def file_object(path: Path | str, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """A configuration file as a participant object (a security resource named by its URI)."""
    out = {"id": Path(path).resolve().as_uri(), "id_type": URI.to_json(),
           "type": int(ObjectType.SYSTEM_OBJECT), "role": int(ObjectRole.SECURITY_RESOURCE)}
    if detail:
        out["detail"] = detail
    return out


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- the file


class _Batch:
    __slots__ = ("lines", "done", "error")

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.done = False
        self.error: Exception | None = None


class AuditTrail:
    """Appends audit events to one file durably, and optionally sends them to syslog.

    ``ae_title`` names this node in every event; ``process`` says which
    ainode process wrote it (``serve``, ``worker-analyse``...).
    """

    def __init__(self, path: Path, ae_title: str, process: str, syslog: str = "") -> None:
        self.path = Path(path)
        self.ae_title = ae_title
        self.source = {"id": f"{ae_title}@{socket.gethostname()}", "type": 4,  # application server process
                       "process": process, "pid": os.getpid()}
        self._cond = threading.Condition()
        self._open_batch = _Batch()
        self._flushing = False
        self._fd = -1
        self._ino: tuple[int, int] | None = None
        self.batches = 0  # writes (each followed by one fdatasync), for tests and benchmarks
        self.events = 0
        self.syslog = SyslogSender(syslog) if syslog else None

    # --- life cycle ------------------------------------------------------------------

    def open(self) -> "AuditTrail":
        """Create (0600, folder 0700) or open the file now, so a bad path fails at start."""
        with self._cond:
            self._reopen()
        if self.syslog is not None:
            self.syslog.start()
        return self

    def close(self) -> None:
        if self.syslog is not None:
            self.syslog.close()
        with self._cond:
            while self._flushing:
                self._cond.wait()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _reopen(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        folder = self.path.parent
        if not folder.is_dir():
            folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            logger.warning("Audit file %s had mode %04o: set to 0600", self.path, st.st_mode & 0o777)
            os.fchmod(fd, FILE_MODE)
        if created:
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self._fd, self._ino = fd, (st.st_dev, st.st_ino)

    def _rotated(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._ino

    # --- writing -------------------------------------------------------------------

    def record(self, event: dict[str, Any]) -> None:
        """Write one event durably (returns after fdatasync); raises AuditError if it cannot."""
        event = {"time": now_iso(), **event, "source": self.source}
        line = (json.dumps(event, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")
        with self._cond:
            batch = self._open_batch
            batch.lines.append(line)
            while not batch.done:
                if self._flushing:
                    self._cond.wait()
                else:
                    self._flush_open_batch()
        if batch.error is not None:
            why = getattr(batch.error, "strerror", None) or batch.error
            raise AuditError(f"audit trail {self.path}: {why}") from batch.error
        if self.syslog is not None:
            self.syslog.submit(event, line[:-1])

    def _flush_open_batch(self) -> None:
        """Called with the lock held: write the open batch as its leader, the lock released meanwhile."""
        batch, self._open_batch = self._open_batch, _Batch()
        self._flushing = True
        self._cond.release()
        try:
            self._write(b"".join(batch.lines))
        except Exception as exc:  # handed to every thread of the batch as AuditError
            batch.error = exc
            logger.error("Audit trail %s: cannot write %d event(s): %s", self.path, len(batch.lines), exc)
        finally:
            self._cond.acquire()
            self._flushing = False
            batch.done = True
            self.batches += 1
            self.events += len(batch.lines)
            self._cond.notify_all()

    def _write(self, data: bytes) -> None:
        if self._fd < 0 or self._rotated():
            self._reopen()
        fd = self._fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            start = os.fstat(fd).st_size
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                try:
                    os.ftruncate(fd, start)  # no half line for the next writer to continue
                except OSError:
                    pass
                raise
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.fdatasync(fd)

    # --- the events ----------------------------------------------------------------

    def _us(self, role: Code | None = None, requestor: bool = False) -> Participant:
        return ae(self.ae_title, requestor=requestor, role=role)

    def application(self, started: bool, what: str, outcome: Outcome = Outcome.SUCCESS) -> None:
        """Application Activity: this node (or one of its workers) started or stopped."""
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
        self.record({
            "event_id": EventID.APPLICATION_ACTIVITY.to_json(),
            "event_type": [(EventType.APPLICATION_START if started else EventType.APPLICATION_STOP).to_json()],
            "action": Action.EXECUTE.value, "outcome": int(outcome), "outcome_description": what,
            "participants": [self._us(Role.APPLICATION).to_json(),
                             Participant(user, True, Role.APPLICATION_LAUNCHER).to_json()],
        })

    def association(self, calling: str, address: str, port: int, called: str, refusal: str | None = None,
                    tls_subject: str | None = None) -> None:
        """Security Alert / Node Authentication: an A-ASSOCIATE accepted (outcome 0) or rejected (4)."""
        transport = "TLS" if tls_subject is not None else "plain TCP"
        self.record({
            "event_id": EventID.SECURITY_ALERT.to_json(),
            "event_type": [EventType.NODE_AUTHENTICATION.to_json()],
            "action": Action.EXECUTE.value,
            "outcome": int(Outcome.SUCCESS if refusal is None else Outcome.MINOR_FAILURE),
            "outcome_description": (f"association accepted ({transport})" if refusal is None
                                    else f"association rejected: {refusal}"),
            "participants": [ae(calling, requestor=True, address=f"{address}", tls_subject=tls_subject).to_json()
                             | {"port": port},
                             ae(called, requestor=False).to_json()],
        })

    def tls_refused(self, address: str, port: int, reason: str) -> None:
        """Security Alert / Node Authentication: a TLS handshake failed (no association was possible)."""
        self.record({
            "event_id": EventID.SECURITY_ALERT.to_json(),
            "event_type": [EventType.NODE_AUTHENTICATION.to_json()],
            "action": Action.EXECUTE.value, "outcome": int(Outcome.MINOR_FAILURE),
            "outcome_description": f"connection refused: {reason}",
            "participants": [Participant("?", True, address=address).to_json() | {"port": port},
                             self._us().to_json()],
        })

    def user_authentication(self, user: str, address: str, login: bool, ok: bool, description: str) -> None:
        """User Authentication / Login or Logout of the web page (PS3.15 A.5.3.11): 0 or 4 (refused)."""
        self.record({
            "event_id": EventID.USER_AUTHENTICATION.to_json(),
            "event_type": [(EventType.LOGIN if login else EventType.LOGOUT).to_json()],
            "action": Action.EXECUTE.value, "outcome": int(Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE),
            "outcome_description": description,
            "participants": [Participant(user or "?", True, address=address).to_json(),
                             self._us().to_json()],
        })

    def connection_dropped(self, calling: str, address: str, port: int, reason: str) -> None:
        """Security Alert / Node Authentication: the node dropped a connection (stalled, oversized, malformed)."""
        self.record({
            "event_id": EventID.SECURITY_ALERT.to_json(),
            "event_type": [EventType.NODE_AUTHENTICATION.to_json()],
            "action": Action.EXECUTE.value, "outcome": int(Outcome.MINOR_FAILURE),
            "outcome_description": f"connection dropped: {reason}",
            "participants": [Participant(calling or "?", True, address=address,
                                         ae_title=calling or None).to_json() | {"port": port},
                             self._us().to_json()],
        })

    def instance_stored(self, calling: str, address: str, study_uid: str, series_uid: str, sop_uid: str,
                        sop_class: str, replaced: bool) -> None:
        """DICOM Instances Transferred, as the receiver: C for a new instance, U for a replaced one."""
        self.record({
            "event_id": EventID.INSTANCES_TRANSFERRED.to_json(),
            "action": (Action.UPDATE if replaced else Action.CREATE).value,
            "outcome": int(Outcome.SUCCESS), "outcome_description": "stored",
            "participants": [ae(calling, requestor=True, role=Role.SOURCE, address=address).to_json(),
                             self._us(Role.DESTINATION).to_json()],
            "objects": [study(study_uid, sop_class=sop_class, instances=[sop_uid], series=series_uid)],
        })

    def store_refused(self, calling: str, address: str, status: int, comment: str, study_uid: str | None,
                      sop_uid: str | None, sop_class: str | None) -> None:
        """DICOM Instances Transferred that failed: 4 for bad input (the sender may fix it), 12 out of resources."""
        major = 0xA700 <= status <= 0xA7FF
        self.record({
            "event_id": EventID.INSTANCES_TRANSFERRED.to_json(),
            "action": Action.CREATE.value,
            "outcome": int(Outcome.MAJOR_FAILURE if major else Outcome.MINOR_FAILURE),
            "outcome_description": f"refused with status 0x{status:04X}: {comment}",
            "participants": [ae(calling, requestor=True, role=Role.SOURCE, address=address).to_json(),
                             self._us(Role.DESTINATION).to_json()],
            "objects": [study(study_uid, sop_class=sop_class, instances=[sop_uid] if sop_uid else [])],
        })

    def config_reloaded(self, source: Path | None, security: bool, outcome: Outcome, description: str) -> None:
        """Security Alert / Security or Software Configuration: a SIGHUP reload applied or refused."""
        kind = EventType.SECURITY_CONFIGURATION if security else EventType.SOFTWARE_CONFIGURATION
        self.record({
            "event_id": EventID.SECURITY_ALERT.to_json(),
            "event_type": [kind.to_json()],
            "action": Action.EXECUTE.value, "outcome": int(outcome), "outcome_description": description,
            "participants": [self._us(requestor=True).to_json()],
            "objects": [file_object(source)] if source is not None else [],
        })

    def job(self, study_uid: str, revision: int, action: Action, outcome: Outcome, description: str,
            instances: Iterable[str] = (), sop_class: str | None = None) -> None:
        """DICOM Instances Accessed by an analysis job: R when it starts, C when it made its SR."""
        self.record({
            "event_id": EventID.INSTANCES_ACCESSED.to_json(),
            "action": action.value, "outcome": int(outcome), "outcome_description": description,
            "participants": [self._us(Role.APPLICATION, requestor=True).to_json()],
            "objects": [study(study_uid, sop_class=sop_class, instances=instances, detail={"revision": revision})],
        })

    def study_deleted(self, study_uid: str, instances: int, description: str) -> None:
        """DICOM Study Deleted (action D): retention removed a study whose SR was sent."""
        self.record({
            "event_id": EventID.STUDY_DELETED.to_json(),
            "action": Action.DELETE.value, "outcome": int(Outcome.SUCCESS), "outcome_description": description,
            "participants": [self._us(requestor=True).to_json()],
            "objects": [study(study_uid, detail={"instances": instances})],
        })

    def sr_sent(self, study_uid: str, revision: int, sr_uid: str | None, sop_class: str | None,
                destination: str, dest_ae: str, dest_host: str, outcome: Outcome, description: str) -> None:
        """DICOM Instances Transferred, as the source (action R): an SR sent, retried or given up."""
        self.instances_sent(study_uid, revision, [(sr_uid, sop_class or "")] if sr_uid else [], destination,
                            dest_ae, dest_host, outcome, description)

    def instances_sent(self, study_uid: str, revision: int, objects: Iterable[tuple[str, str]], destination: str,
                       dest_ae: str, dest_host: str, outcome: Outcome, description: str) -> None:
        """DICOM Instances Transferred, as the source (action R): result objects or received instances (store
        and forward) sent, retried or given up; one event for the lot, one participant object per SOP class."""
        by_class: dict[str, list[str]] = {}
        for uid, sop_class in objects:
            by_class.setdefault(sop_class, []).append(uid)
        self.record({
            "event_id": EventID.INSTANCES_TRANSFERRED.to_json(),
            "action": Action.READ.value, "outcome": int(outcome), "outcome_description": description,
            "participants": [self._us(Role.SOURCE, requestor=True).to_json(),
                             ae(dest_ae, requestor=False, role=Role.DESTINATION, address=dest_host).to_json()
                             | {"destination": destination}],
            "objects": [study(study_uid, sop_class=sop_class or None, instances=uids, detail={"revision": revision})
                        for sop_class, uids in sorted(by_class.items())]
                       or [study(study_uid, detail={"revision": revision})],
        })


def open_trail(path: Path, ae_title: str, process: str, syslog: str = "") -> AuditTrail:
    """An open :class:`AuditTrail`; raises AuditError naming the path when it cannot be created."""
    trail = AuditTrail(path, ae_title, process, syslog)
    try:
        return trail.open()
    except OSError as exc:
        raise AuditError(f"audit trail {path}: cannot open for appending: {exc.strerror or exc}") from None
