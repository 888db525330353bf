"""What happened to each study: ``ainode results list`` and ``ainode results resend``.

Read from the files (the truth) and, for jobs still in flight, from rq.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job

from node.config import Config
from node.enqueue import JobQueue, job_id
from node.results.facts import percent
from node.store import Revision, Storage

logger = logging.getLogger(__name__)


#: The states a study can be in, in the order a study goes through them ("forwarded": a store-and-forward
#: pipeline's study, to be sent on as it came).
STATES = ("waiting", "queued", "analysing", "analysed", "forwarded", "no result", "failed", "sent", "retrying",
          "dead")


@dataclass(frozen=True)
class StudyState:
    study_uid: str
    instances: int
    revision: int
    state: str  # one of STATES
    detail: str
    score: float | None = None
    received_at: float | None = None  # the first instance's file time (epoch seconds)
    last_at: float | None = None  # the latest instance, revision, outcome or send
    pipeline: str = ""  # the pipeline (called AE title) of the latest revision, else the one receiving it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _job_status(redis: Redis | None, jid: str) -> tuple[str, str]:
    if redis is None:
        return "queued", "Redis unreachable"
    try:
        job = Job.fetch(jid, connection=redis)
    except Exception:  # NoSuchJobError, or a job rq cannot read back
        return "queued", "job not in Redis (the node queues it again)"
    got = job.get_status(refresh=False)
    status = getattr(got, "value", got) or "queued"  # JobStatus is a str Enum: str() gives "JobStatus.STARTED"
    if status == "failed":
        lines = (job.latest_result().exc_string if job.latest_result() else "") or ""
        return "failed", (lines.strip().splitlines() or ["failed"])[-1]
    return ("analysing" if status == "started" else "queued"), f"job {status}"


def _mtime(path: Any) -> float | None:
    try:
        return float(path.stat().st_mtime)
    except OSError:
        return None


def recorded_sends(storage: Storage, study_uid: str, revision: int) -> list[dict[str, Any]]:
    """The deliveries of a revision as recorded when each was tried (whatever today's config says)."""
    folder = storage.revision_path(study_uid, revision).parent
    out = []
    for path in sorted(folder.glob(f"rev-{revision:04d}.send-*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def study_state(storage: Storage, cfg: Config, redis: Redis | None, study_uid: str) -> StudyState:
    """The state of one study, from disk first."""
    files = storage.instances(study_uid)
    instances = len(files)
    received = min((i.mtime for i in files), default=None)
    last = max((i.mtime for i in files), default=None)
    revisions = storage.revisions(study_uid)
    if not revisions:
        return StudyState(study_uid, instances, 0, "waiting", "for the quiet period", None, received, last,
                          _pipeline_name(cfg, storage.read_pipeline(study_uid)))
    rev = revisions[-1]
    try:
        pipeline = _pipeline_name(cfg, storage.read_revision(study_uid, rev).pipeline)
    except (OSError, ValueError, KeyError):
        pipeline = ""
    times = [t for t in (last, _mtime(storage.revision_path(study_uid, rev)),
                         _mtime(storage.outcome_path(study_uid, rev))) if t]
    outcome = storage.read_outcome(study_uid, rev)
    lost = storage.lost_runs(study_uid, rev)
    lost_note = (f"; {len(lost)} run(s) lost with their worker (last: {lost[-1].get('why')}, "
                 f"{lost[-1].get('then')})" if lost else "")

    def state(name: str, detail: str, score: float | None = None) -> StudyState:
        return StudyState(study_uid, instances, rev, name, detail + lost_note, score, received, max(times), pipeline)

    if outcome is None:
        return state(*_job_status(redis, job_id(study_uid, rev)))
    if outcome["status"] not in ("analysed", "forwarded"):
        return state("no result" if outcome["status"] == "no_result" else "failed", outcome.get("reason", ""))
    sends = recorded_sends(storage, study_uid, rev)
    times += [float(s["at"]) for s in sends if isinstance(s.get("at"), (int, float))]
    order = {"dead": 3, "retrying": 2, "dropped": 1, "sent": 0}
    worst = max((s.get("status", "sent") for s in sends), key=lambda x: order.get(x, 0), default=None)
    name = {"dead": "dead", "retrying": "retrying", None: outcome["status"]}.get(worst, "sent")
    described = []
    for s in sends:
        err = f" ({s.get('last_error') or s.get('reason')})" if s.get("status") != "sent" and \
            (s.get("last_error") or s.get("reason")) else ""
        described.append(f"{s.get('destination')}: {s.get('status')}{err}")
    configured = cfg.pipeline(pipeline)
    if not sends:
        described.append("not sent yet" if configured and configured.destinations else "no destinations configured")
    if outcome["status"] == "forwarded":
        return state(name, f"store and forward, {len(outcome.get('forward', {}))} instance(s); " + "; ".join(described))
    result = outcome["result"]
    positive = result["score"] >= result["threshold"]
    located = len(result.get("findings", []))
    detail = (f"{percent(result['score'])} at threshold {percent(result['threshold'])} "
              f"({'positive' if positive else 'negative'}{f', {located} located' if located else ''}); "
              + "; ".join(described))
    return state(name, detail, result["score"])


def _pipeline_name(cfg: Config, recorded: str) -> str:
    """A revision's pipeline as people name it: its AE title ("" of ainode 0.1: the first pipeline's)."""
    if recorded:
        return recorded
    return cfg.pipelines[0].name


def list_states(storage: Storage, cfg: Config, redis: Redis | None, states: Iterable[str] = (),
                since: float | None = None) -> list[StudyState]:
    """Every study's state, the most recently active first; only ``states`` (if given), only since ``since``."""
    wanted = set(states)
    return [st for st in StateCache().states(storage, cfg, redis)
            if (not wanted or st.state in wanted) and (since is None or (st.last_at or 0) >= since)]


def parse_since(text: str, now: float | None = None) -> float:
    """A point in time from a duration back from now (``90m``, ``24h``, ``7d``) or a local date or time
    (``2026-12-01``, ``2026-12-01T08:00``); ValueError saying which forms are understood."""
    import datetime as dt

    units = {"m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return (time.time() if now is None else now) - float(text[:-1]) * units[text[-1]]
    try:
        return dt.datetime.fromisoformat(text).astimezone().timestamp()
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (90m, 24h, 7d) nor a date (2026-12-01)") from None


def local_time(t: float | None, seconds: bool = False) -> str:
    """An epoch time as people read it here: local, to the minute (or second)."""
    import datetime as dt

    form = "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M"
    return dt.datetime.fromtimestamp(t).astimezone().strftime(form) if t else "-"


_UID_NAME = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: States that change only when a file of the study changes (the others also follow Redis: re-read each time).
_SETTLED = {"analysed", "no result", "failed", "sent", "retrying", "dead"}


class StateCache:
    """Study states for a long-lived reader (the web page): each kept until a folder of its study changes.

    A study's signature is the modification times of its state folder, its
    study folder and each series folder: every file the node writes for it
    (an instance, a revision, an outcome, a delivery) is created or renamed
    into one of them. 10 000 studies cost a few stats each instead of their
    JSON files.
    """

    def __init__(self) -> None:
        self._states: dict[str, tuple[tuple[int, ...], StudyState]] = {}

    @staticmethod
    def _mtimes(folder: Any) -> dict[str, int]:
        """name -> mtime of each UID-named subfolder, from one scandir."""
        out = {}
        try:
            with os.scandir(folder) as entries:
                for e in entries:
                    if e.is_dir(follow_symlinks=False) and _UID_NAME.match(e.name):
                        out[e.name] = e.stat(follow_symlinks=False).st_mtime_ns
        except OSError:
            pass
        return out

    @staticmethod
    def _series_mtimes(folder: str) -> list[int]:
        """The mtimes of a study folder's subfolders (its series), sorted: part of the study's signature.
        The hot loop of a 10 000-study page: plain strings, no pathlib, no name check."""
        try:
            with os.scandir(folder) as entries:
                return sorted(e.stat(follow_symlinks=False).st_mtime_ns for e in entries
                              if e.is_dir(follow_symlinks=False))
        except OSError:
            return []

    def states(self, storage: Storage, cfg: Config, redis: Redis | None) -> list[StudyState]:
        if redis is not None:
            try:
                redis.ping()
            except RedisError:
                redis = None
        studies = self._mtimes(storage.studies)
        states = self._mtimes(storage.state)
        base = str(storage.studies) + os.sep
        out = []
        for uid, study_mtime in studies.items():
            sig = (states.get(uid, 0), study_mtime, *self._series_mtimes(base + uid))
            kept = self._states.get(uid)
            if kept is not None and kept[0] == sig:
                out.append(kept[1])
                continue
            st = study_state(storage, cfg, redis, uid)
            if st.state in _SETTLED:
                self._states[uid] = (sig, st)
            out.append(st)
        for gone in set(self._states) - set(studies):
            del self._states[gone]
        return sorted(out, key=lambda st: st.last_at or 0, reverse=True)


def resend(storage: Storage, cfg: Config, redis: Redis, study_uid: str, destination: str | None = None) -> list[str]:
    """Queue the latest analysed result (or forwarded instances) of a study again, to its pipeline's
    destinations or to ``destination``; returns the job ids."""
    from node.send import enqueue_send

    for rev in reversed(storage.revisions(study_uid)):
        outcome = storage.read_outcome(study_uid, rev)
        if outcome and outcome["status"] in ("analysed", "forwarded"):
            break
    else:
        raise LookupError(f"study {study_uid} has no analysed result to send")
    recorded = storage.read_revision(study_uid, rev).pipeline
    pipeline = cfg.pipeline(recorded)
    if destination:
        names = [destination]
    elif pipeline is None:
        raise LookupError(f"study {study_uid} was received by pipeline {recorded}, no longer configured: "
                          "name a destination")
    else:
        names = list(pipeline.destinations)
    if not names:
        raise LookupError(f"pipeline {pipeline.name if pipeline else recorded} has no destinations")
    for name in names:
        if (dest := cfg.destination(name)) is None:
            raise LookupError(f"unknown destination {name!r}")
        if dest.kind == "hl7" and outcome["status"] == "forwarded":
            raise LookupError(f"destination {name!r} is HL7, which takes results only; this study was forwarded")
    return [enqueue_send(redis, cfg, study_uid, rev, name, force=True) for name in names]


def reanalyse(storage: Storage, redis: Redis, study_uid: str) -> Revision:
    """Queue a new revision of the same instances as the latest one; its result objects supersede the last.

    For a revision that failed for good, or a result to redo with a new model or threshold.
    """
    last = storage.latest_revision(study_uid)
    if last is None:
        raise LookupError(f"study {study_uid} has no revision yet (still within its quiet period?)")
    if not storage.has_outcome(study_uid, last.revision):
        raise LookupError(f"study {study_uid} revision {last.revision} is still queued or being analysed")
    instances = {i.sop_uid: i.series_uid for i in storage.instances(study_uid)}
    number = last.revision + 1
    rev = Revision(study_uid, number, instances, time.time(), "reanalyse", job_id(study_uid, number), last.pipeline)
    storage.write_revision(rev)  # durable before the job exists, as completion does
    JobQueue(redis).enqueue(study_uid, number, rev.pipeline)
    return rev


#: The result objects' SOP classes by the names people know them by (node.results.objects makes them).
_OBJECT_NAMES = {
    "1.2.840.10008.5.1.4.1.1.88.33": "SR", "1.2.840.10008.5.1.4.1.1.88.22": "SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "SR", "1.2.840.10008.5.1.4.1.1.7": "SC", "1.2.840.10008.5.1.4.1.1.88.59": "KO",
}


def _object_names(sop_classes: set[str]) -> str:
    return ", ".join(sorted(_OBJECT_NAMES.get(uid, uid) for uid in sop_classes))


def timeline(storage: Storage, audit_path: Any, study_uid: str) -> list[tuple[float, str]]:
    """What happened to a study, oldest first, from the audit trail and the state files.

    Stored instances are told in batches (one line per association and minute);
    each revision's completion, each job start and end with its reason, each
    send try and each run lost with its worker, as recorded when it happened.
    """
    import datetime as dt

    events: list[tuple[float, str]] = []
    batches: dict[tuple[str, int], list[float]] = {}
    try:
        lines = open(audit_path, encoding="ascii", errors="replace").read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if study_uid not in line:
            continue
        try:
            event = json.loads(line)
            at = dt.datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError):
            continue
        code = event.get("event_id", {}).get("code")
        what = event.get("outcome_description", "")
        if code == "110104" and what == "stored":  # instances transferred in: batched
            source = next((p.get("user_id", "?") for p in event.get("participants", []) if p.get("requestor")), "?")
            batches.setdefault((source, int(at // 60)), []).append(at)
            continue
        revision = next((o.get("detail", {}).get("revision") for o in event.get("objects", [])
                         if isinstance(o.get("detail"), dict)), None)
        if code == "110104":  # instances transferred out: to whom, and what
            to = next((p.get("user_id") for p in event.get("participants", []) if not p.get("requestor")), None)
            kinds = {(o.get("description") or {}).get("sop_class", {}).get("uid") for o in event.get("objects", [])}
            kinds.discard(None)
            what = f"{what}{f' to {to}' if to else ''}{f' ({_object_names(kinds)})' if kinds else ''}"
        events.append((at, f"{f'r{revision} ' if revision else ''}{what}"))
    for (source, _), times in batches.items():
        events.append((min(times), f"{len(times)} instance(s) stored from {source}"))
    for rev in storage.revisions(study_uid):
        try:
            r = storage.read_revision(study_uid, rev)
        except (OSError, ValueError, KeyError):
            continue
        if r.completed_at:
            events.append((r.completed_at, f"r{rev} complete ({r.reason}), {len(r.instances)} instances queued"))
        for lost in storage.lost_runs(study_uid, rev):
            events.append((float(lost.get("at", 0)), f"r{rev} run lost: {lost.get('why')}; {lost.get('then')}"))
    return sorted(events)
