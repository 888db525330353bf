"""Durable instance storage: the files on disk are the source of truth.

Layout under the storage root::

    studies/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm   received instances
    state/<StudyUID>/pipeline.json                        the pipeline (called AE title) that received it last
    state/<StudyUID>/rev-0001.json                        one file per queued revision (and its pipeline)
    state/<StudyUID>/rev-0001.outcome.json                its outcome (analysed, no result, failed)
    state/<StudyUID>/rev-0001.send-<dest>.json            its delivery to one destination
    state/<StudyUID>/rev-0001.lost.json                   runs of it lost with their worker (killed mid-job)
    results/<StudyUID>/<SOPInstanceUID>.dcm               the result objects made (SR, summary image, KO)
    tmp/                                                  partial writes (same file system)
    redis/                                                the embedded Redis server
    run/workers.json                                      the pids of the workers ``ainode serve`` runs

An instance is written to ``tmp/``, fsync'd, renamed to its final name and
the folder fsync'd: only then may the C-STORE be answered with Success.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from node.errors import InvalidUIDError

logger = logging.getLogger(__name__)

UID_MAX_LENGTH = 64
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_STRICT_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")  # PS3.5 9.1: no leading zero in a component
_REVISION_FILE = re.compile(r"^rev-(\d{4,})\.json$")
DIR_MODE = 0o700
FILE_MODE = 0o600


def check_uid(uid: object, name: str = "UID", strict: bool = False) -> str:
    """Return ``uid`` if it is a DICOM UID safe to use as a path part, else raise.

    A UID is digits separated by single dots, at most 64 characters (PS3.5 9.1);
    ``strict`` (what a received instance must meet) also refuses a component
    with a leading zero. Paths of what is already stored are checked leniently.
    """
    if not isinstance(uid, str) or not uid:
        raise InvalidUIDError(f"{name} is missing")
    if len(uid) > UID_MAX_LENGTH:
        raise InvalidUIDError(f"{name} is {len(uid)} characters long, more than {UID_MAX_LENGTH}")
    if not _UID.match(uid):
        raise InvalidUIDError(f"{name} {uid[:80]!r} is not digits separated by dots")
    if strict and not _STRICT_UID.match(uid):
        raise InvalidUIDError(f"{name} {uid!r} has a component with a leading zero")
    return uid


METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_dir(storage: Path) -> Path:
    """Where the processes of ``ainode serve`` keep their Prometheus counts (node.metrics)."""
    return Path(storage) / "run" / "metrics"


def prepare_metrics_dir(storage: Path, empty: bool = True) -> Path:
    """Point this process and its children at ``<storage>/run/metrics`` (emptied first with ``empty``).

    Must run before prometheus_client is imported: it picks its mode at import.
    """
    path = metrics_dir(storage)
    if empty:
        shutil.rmtree(path, ignore_errors=True)
    Path(storage).mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    for folder in (path.parent, path):  # 0700 each: mkdir(parents=True) would make them 0755
        folder.mkdir(mode=DIR_MODE, exist_ok=True)
    os.environ[METRICS_ENV] = str(path)
    return path


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path, data: bytes, tmp_dir: Path | None = None, mode: int | None = None, owner: tuple[int, int] | None = None
) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one.

    The temp file lives in ``tmp_dir`` (same file system) or beside ``path``;
    it gets ``mode`` (default 0600) and, where allowed, ``owner`` (uid, gid).
    """
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            if owner is not None:
                try:
                    os.fchown(f.fileno(), *owner)
                except PermissionError:
                    logger.debug("%s: cannot keep owner %d:%d", path, *owner)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


class Partial:
    """An instance being written in tmp/: written as it arrives, then committed or discarded."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path
        self.size = 0
        self.committed = False

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            self.size += n
            view = view[n:]

    def sync(self) -> None:
        os.fsync(self.fd)

    def discard(self) -> None:
        """Close the file; remove it unless it was committed. Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.committed:
            self.committed = True
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


@dataclass(frozen=True)
class Instance:
    """One stored instance as found on disk."""

    study_uid: str
    series_uid: str
    sop_uid: str
    path: Path
    mtime: float


@dataclass(frozen=True)
class Revision:
    """One queued revision of a study: the instances it covers and its job."""

    study_uid: str
    revision: int
    instances: dict[str, str]  # SOP Instance UID -> Series Instance UID
    completed_at: float
    reason: str  # "quiet" | "max_wait" | "reconcile"
    job_id: str
    pipeline: str = ""  # the called AE title of the pipeline; "" (ainode 0.1): the first pipeline

    def to_json(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "revision": self.revision,
            "pipeline": self.pipeline,
            "completed_at": self.completed_at,
            "reason": self.reason,
            "job_id": self.job_id,
            "instances": self.instances,
        }


class Storage:
    """The storage root and every file operation on it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.studies = self.root / "studies"
        self.state = self.root / "state"
        self.tmp = self.root / "tmp"
        self.results = self.root / "results"
        self._pipelines: dict[str, str] = {}  # study -> the pipeline its marker names, as this process wrote or read it
        self._pipelines_lock = threading.Lock()

    def prepare(self, clear_tmp: bool = True) -> None:
        """Create the folders (mode 0700) and, with ``clear_tmp``, remove what a crash left in tmp/.

        Only the receiving node clears tmp/ (at its start, before it accepts
        associations); a worker starting beside a running node must not.
        """
        for d in (self.root, self.studies, self.state, self.tmp, self.results):
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if not clear_tmp:
            return
        removed = 0
        for leftover in self.tmp.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)  # a deletion cut short (node.retention)
            else:
                leftover.unlink()
            removed += 1
        if removed:
            logger.warning("Removed %d partial write(s) left in %s by an earlier crash", removed, self.tmp)

    # --- instances -----------------------------------------------------------------

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """The final path of an instance; every UID is checked first."""
        return (
            self.studies
            / check_uid(study_uid, "Study Instance UID")
            / check_uid(series_uid, "Series Instance UID")
            / f"{check_uid(sop_uid, 'SOP Instance UID')}.dcm"
        )

    def ensure_dir(self, path: Path) -> None:
        """Create ``path`` (and its parent) durably if missing."""
        if path.is_dir():
            return
        parent = path.parent
        if not parent.is_dir():
            self.ensure_dir(parent)
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:
            return  # another association made it
        fsync_dir(parent)

    def write_instance(
        self, study_uid: str, series_uid: str, sop_uid: str, chunks: Sequence[bytes | memoryview]
    ) -> tuple[Path, bool]:
        """Store one Part 10 file, given as consecutive byte chunks, durably.

        Returns (final path, True if it replaced a file of the same SOP Instance UID).
        """
        partial = self.open_partial()
        try:
            for chunk in chunks:
                partial.write(chunk)
            return self.commit_partial(partial, study_uid, series_uid, sop_uid)
        finally:
            partial.discard()

    def open_partial(self) -> "Partial":
        """A new file in tmp/ that an instance is written into as it arrives."""
        fd, tmp = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        return Partial(fd, Path(tmp))

    def commit_partial(self, partial: "Partial", study_uid: str, series_uid: str, sop_uid: str) -> tuple[Path, bool]:
        """fsync the partial file, rename it to its final name, fsync the folder.

        Folders are made only now, once the file is whole and on disk, so a
        refused or failed instance leaves no empty study or series folder.
        Returns (final path, True if it replaced a file of the same SOP Instance UID).
        """
        final = self.instance_path(study_uid, series_uid, sop_uid)
        partial.sync()
        self.ensure_dir(final.parent)
        replaced = final.exists()
        os.replace(partial.path, final)
        partial.committed = True
        fsync_dir(final.parent)
        return final, replaced

    def free_mb(self) -> float:
        """Free space on the storage file system, in MiB, for an unprivileged writer."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize / (1024 * 1024)

    def study_uids(self) -> list[str]:
        """Every study folder with a valid UID name."""
        try:
            names = os.listdir(self.studies)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _UID.match(n) and (self.studies / n).is_dir())

    def instances(self, study_uid: str) -> list[Instance]:
        """Every stored instance of a study (unordered)."""
        out: list[Instance] = []
        study_dir = self.studies / check_uid(study_uid, "Study Instance UID")
        try:
            series_dirs = list(os.scandir(study_dir))
        except FileNotFoundError:
            return out
        for series in series_dirs:
            if not series.is_dir() or not _UID.match(series.name):
                continue
            for entry in os.scandir(series.path):
                if entry.name.endswith(".dcm") and _UID.match(entry.name[:-4]):
                    out.append(
                        Instance(study_uid, series.name, entry.name[:-4], Path(entry.path), entry.stat().st_mtime)
                    )
        return out

    def iter_instances(self) -> Iterator[Instance]:
        """Every stored instance of every study."""
        for study in self.study_uids():
            yield from self.instances(study)

    # --- which pipeline received a study ------------------------------------------

    def pipeline_path(self, study_uid: str) -> Path:
        return self.state / check_uid(study_uid, "Study Instance UID") / "pipeline.json"

    def mark_pipeline(self, study_uid: str, pipeline: str) -> None:
        """Record, durably, that ``pipeline`` received the study's latest instance (before its Success).

        Written when it changes, so a study's first instance costs one small
        write and the rest none; its next revision runs in that pipeline.
        """
        with self._pipelines_lock:
            if self._pipelines.get(study_uid) == pipeline:
                return
        if self.read_pipeline(study_uid) != pipeline:
            path = self.pipeline_path(study_uid)
            self.ensure_dir(path.parent)
            write_atomic(path, json.dumps({"pipeline": pipeline, "at": time.time()}).encode(), self.tmp)
        with self._pipelines_lock:
            if len(self._pipelines) > 100_000:
                self._pipelines.clear()
            self._pipelines[study_uid] = pipeline

    def read_pipeline(self, study_uid: str) -> str:
        """The pipeline that received the study's latest instance; "" when none is recorded (ainode 0.1)."""
        try:
            return str(json.loads(self.pipeline_path(study_uid).read_text())["pipeline"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return ""

    def forget_pipeline(self, study_uid: str) -> None:
        """Drop what this process remembers of a study's marker (the study was deleted)."""
        with self._pipelines_lock:
            self._pipelines.pop(study_uid, None)

    # --- revisions -----------------------------------------------------------------

    def revisions(self, study_uid: str) -> list[int]:
        """The revision numbers recorded for a study, ascending."""
        try:
            names = os.listdir(self.state / check_uid(study_uid, "Study Instance UID"))
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _REVISION_FILE.match(n)))

    def revision_path(self, study_uid: str, revision: int) -> Path:
        return self.state / check_uid(study_uid, "Study Instance UID") / f"rev-{revision:04d}.json"

    def outcome_path(self, study_uid: str, revision: int) -> Path:
        """Where the worker records a revision's final outcome (result or reason)."""
        return self.state / check_uid(study_uid, "Study Instance UID") / f"rev-{revision:04d}.outcome.json"

    def read_revision(self, study_uid: str, revision: int) -> Revision:
        data = json.loads(self.revision_path(study_uid, revision).read_text())
        return Revision(
            data["study_uid"], data["revision"], data["instances"], data["completed_at"], data["reason"], data["job_id"],
            data.get("pipeline", ""),
        )

    def latest_revision(self, study_uid: str) -> Revision | None:
        revs = self.revisions(study_uid)
        return self.read_revision(study_uid, revs[-1]) if revs else None

    def write_revision(self, rev: Revision) -> Path:
        """Record a revision durably (before its job is queued)."""
        path = self.revision_path(rev.study_uid, rev.revision)
        self.ensure_dir(path.parent)
        write_atomic(path, json.dumps(rev.to_json(), indent=1).encode(), self.tmp)
        return path

    def has_outcome(self, study_uid: str, revision: int) -> bool:
        return self.outcome_path(study_uid, revision).exists()

    def read_outcome(self, study_uid: str, revision: int) -> dict[str, Any] | None:
        """A revision's recorded outcome, or None while it has none."""
        try:
            return json.loads(self.outcome_path(study_uid, revision).read_text())
        except FileNotFoundError:
            return None

    def write_outcome(self, study_uid: str, revision: int, status: str, **fields: Any) -> dict[str, Any]:
        """Record a revision's outcome (``analysed``, ``no_result``, ``failed``) durably; returns it."""
        outcome = {"study_uid": study_uid, "revision": revision, "status": status, "finished_at": time.time(), **fields}
        write_atomic(self.outcome_path(study_uid, revision), json.dumps(outcome, indent=1).encode(), self.tmp)
        return outcome

    def lost_runs_path(self, study_uid: str, revision: int) -> Path:
        return self.state / check_uid(study_uid, "Study Instance UID") / f"rev-{revision:04d}.lost.json"

    def note_lost_run(self, study_uid: str, revision: int, entry: dict[str, Any]) -> None:
        """Add a run lost with its worker (killed mid-job) to the revision's record, durably."""
        path = self.lost_runs_path(study_uid, revision)
        runs = self.lost_runs(study_uid, revision)
        runs.append({"at": time.time(), **entry})
        self.ensure_dir(path.parent)
        write_atomic(path, json.dumps(runs, indent=1).encode(), self.tmp)

    def lost_runs(self, study_uid: str, revision: int) -> list[dict[str, Any]]:
        try:
            return list(json.loads(self.lost_runs_path(study_uid, revision).read_text()))
        except (FileNotFoundError, ValueError):
            return []

    @property
    def ready_dir(self) -> Path:
        return self.root / "run" / "ready"

    def worker_ready(self, name: str) -> Path:
        """Mark the worker ``name`` (ainode-<role>-<host>-<pid>) ready; returns the mark, removed at its exit."""
        for folder in (self.ready_dir.parent, self.ready_dir):
            folder.mkdir(mode=DIR_MODE, exist_ok=True)
        path = self.ready_dir / name
        path.touch(mode=FILE_MODE)
        return path

    def ready_workers(self) -> list[str]:
        """The names of the workers that marked themselves ready (some may have died since)."""
        try:
            return sorted(os.listdir(self.ready_dir))
        except FileNotFoundError:
            return []

    def result_path(self, study_uid: str, sop_uid: str) -> Path:
        """Where a result object (SR, summary image, KO) of the study is kept."""
        return self.results / check_uid(study_uid, "Study Instance UID") / f"{check_uid(sop_uid, 'SOP Instance UID')}.dcm"
