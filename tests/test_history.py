"""node.history's StateCache: a settled study is read from its files once, and again whenever they change."""

from __future__ import annotations

import json
import time

from pydicom.uid import generate_uid

from node.config import Config, NodeConfig
from node.history import StateCache
from node.store import Revision, Storage


def test_the_cache_follows_every_file_the_node_writes(tmp_path):
    storage = Storage(tmp_path / "storage")
    storage.prepare()
    cfg = Config(node=NodeConfig(storage=storage.root))
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(2)]
    for sop in sops:
        storage.write_instance(study, series, sop, [b"\0" * 132])
    storage.write_revision(Revision(study, 1, {s: series for s in sops}, time.time(), "quiet", "j"))
    storage.write_outcome(study, 1, "analysed", result={"score": 0.9, "threshold": 0.5, "findings": []})
    send = storage.outcome_path(study, 1).with_name("rev-0001.send-pacs.json")
    send.write_text(json.dumps({"destination": "pacs", "status": "retrying", "last_error": "PACS down"}))
    cache = StateCache()
    (first,) = cache.states(storage, cfg, None)
    assert (first.state, first.instances) == ("retrying", 2)
    assert cache.states(storage, cfg, None)[0] is first  # nothing changed: the same object, no file read
    time.sleep(0.01)
    tmp = send.with_suffix(".tmp")
    tmp.write_text(json.dumps({"destination": "pacs", "status": "sent"}))
    tmp.replace(send)  # as the sender writes it: a rename into the state folder
    assert cache.states(storage, cfg, None)[0].state == "sent"
    time.sleep(0.01)
    storage.write_instance(study, series, generate_uid(), [b"\0" * 132])  # a late instance, no revision yet
    assert cache.states(storage, cfg, None)[0].instances == 3
