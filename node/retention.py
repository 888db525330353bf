"""Retention: delete a study ``storage.keep_days`` after its SR was sent, never before.

A study is deleted only when its latest revision was analysed, its SR was
delivered to every destination configured now, the last delivery is older than
``keep_days``, and no instance arrived that the revision does not cover. A study
with no result, a failed analysis or an undelivered SR is kept (the admin
decides). Its folders are first moved into ``tmp/`` (one rename each, so a
crash never leaves half a study for reconcile to queue again), then removed;
each deletion is logged and audited (DICOM Study Deleted).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from node.audit import AuditTrail
from node.config import Config
from node.send import read_send_state
from node.store import Storage

logger = logging.getLogger(__name__)

DAY_S = 86400.0


def sent_at(storage: Storage, cfg: Config, study_uid: str) -> float | None:
    """When the study's latest result reached its last destination; None if it is not all sent."""
    revisions = storage.revisions(study_uid)
    if not revisions:
        return None
    rev = revisions[-1]
    outcome = storage.read_outcome(study_uid, rev)
    if outcome is None or outcome["status"] not in ("analysed", "forwarded"):
        return None
    pipeline = cfg.pipeline(storage.read_revision(study_uid, rev).pipeline)
    destinations = cfg.destinations_of(pipeline) if pipeline is not None else ()
    if not destinations:
        return None
    times = []
    for dest in destinations:
        state = read_send_state(storage, study_uid, rev, dest.name)
        if not state or state.get("status") != "sent":
            return None
        times.append(float(state["at"]))
    covered = storage.read_revision(study_uid, rev).instances
    if any(i.sop_uid not in covered for i in storage.instances(study_uid)):
        return None  # a late instance: its revision is still to come
    return max(times)


def purge(storage: Storage, cfg: Config, audit: AuditTrail | None, now: float | None = None) -> list[str]:
    """Delete the studies past their retention; returns their UIDs. Does nothing when keep_days is 0."""
    if cfg.storage.keep_days <= 0:
        return []
    now = time.time() if now is None else now
    limit = cfg.storage.keep_days * DAY_S
    deleted = []
    for study_uid in storage.study_uids():
        when = sent_at(storage, cfg, study_uid)
        if when is None or now - when < limit:
            continue
        instances = len(storage.instances(study_uid))
        _remove(storage, study_uid)
        age = (now - when) / DAY_S
        logger.info("Study %s: deleted (%d instances), its SR was sent %.1f days ago", study_uid, instances, age)
        if audit is not None:
            audit.study_deleted(study_uid, instances, f"retention: SR sent {age:.1f} days ago, keep_days "
                                f"{cfg.storage.keep_days:g}")
        deleted.append(study_uid)
    return deleted


def _remove(storage: Storage, study_uid: str) -> None:
    """Move the study's folders into tmp/ (atomic renames), then delete them."""
    doomed: list[Path] = []
    for parent in (storage.studies, storage.results, storage.state):  # instances first: no orphan revision
        folder = parent / study_uid
        if folder.exists():
            target = storage.tmp / f"deleting-{parent.name}-{study_uid}"
            os.replace(folder, target)
            doomed.append(target)
    storage.forget_pipeline(study_uid)
    for target in doomed:
        shutil.rmtree(target)
