"""Retention: a study goes keep_days after its SR reached every destination, never before."""

from __future__ import annotations

import json
import time

from node.config import Config, Destination, NodeConfig, StorageConfig
from node.retention import DAY_S, purge
from node.store import Revision, Storage


def make_study(storage: Storage, uid: str, *, outcome: str | None = "analysed", sent: dict[str, float] | None = None,
               late: bool = False) -> None:
    storage.write_instance(uid, uid + ".1", uid + ".1.1", [b"x"])
    storage.write_revision(Revision(uid, 1, {uid + ".1.1": uid + ".1"}, 0.0, "quiet", "job"))
    if late:
        storage.write_instance(uid, uid + ".1", uid + ".1.2", [b"y"])
    if outcome:
        storage.outcome_path(uid, 1).write_text(json.dumps({"status": outcome}))
    for dest, at in (sent or {}).items():
        path = storage.revision_path(uid, 1).with_name(f"rev-0001.send-{dest}.json")
        path.write_text(json.dumps({"status": "sent", "at": at}))
    (storage.results / uid).mkdir()
    (storage.results / uid / "sr.dcm").write_bytes(b"sr")


def test_only_studies_sent_everywhere_long_enough_ago_are_deleted(tmp_path):
    storage = Storage(tmp_path)
    storage.prepare()
    now = time.time()
    old, recent = now - 8 * DAY_S, now - 6 * DAY_S
    make_study(storage, "1.1", sent={"a": old, "b": old})           # goes
    make_study(storage, "1.2", sent={"a": old, "b": recent})        # last delivery too recent
    make_study(storage, "1.3", sent={"a": old})                     # not delivered to b
    make_study(storage, "1.4", outcome="no_result")                 # never sent: kept
    make_study(storage, "1.5", sent={"a": old, "b": old}, late=True)  # a late instance is pending
    cfg = Config(node=NodeConfig(storage=tmp_path), storage=StorageConfig(keep_days=7),
                 destinations=(Destination("a", ae_title="A", host="127.0.0.1", port=104), Destination("b", ae_title="B", host="127.0.0.1", port=104)))
    from node.audit import open_trail

    trail = open_trail(tmp_path / "audit.jsonl", "AINODE", "serve", "")
    assert purge(storage, cfg, trail, now) == ["1.1"]
    trail.close()
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["event_id"]["code"], e["action"], e["objects"][0]["id"]) for e in events] == [("110105", "D", "1.1")]
    assert storage.study_uids() == ["1.2", "1.3", "1.4", "1.5"]
    assert not (storage.results / "1.1").exists() and not (storage.state / "1.1").exists()
    assert list(storage.tmp.iterdir()) == []
    keep_all = Config(node=NodeConfig(storage=tmp_path), destinations=cfg.destinations)
    assert purge(storage, keep_all, None, now + 100 * DAY_S) == []  # keep_days = 0 keeps everything


def test_a_deletion_cut_short_is_finished_at_start(tmp_path):
    storage = Storage(tmp_path)
    storage.prepare()
    half = storage.tmp / "deleting-studies-1.9"
    (half / "1.9.1").mkdir(parents=True)
    (half / "1.9.1" / "x.dcm").write_bytes(b"x")
    storage.prepare()
    assert list(storage.tmp.iterdir()) == []
