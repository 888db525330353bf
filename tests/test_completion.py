"""Completion timers, revisions and reconcile, against a real redis-server, with a test clock."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from node.completion import KEY_DEADLINE, KEY_EPOCH, KEY_QUIET, Completion
from node.config import CompletionConfig
from node.embedded_redis import EmbeddedRedis
from node.enqueue import QUEUE_NAME, JobQueue, job_id
from node.errors import InvalidUIDError
from node.store import Storage, check_uid
from tests.peers import pid_alive, short_tmp


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(redis_server, tmp_path):
    r = redis_server.client()
    r.flushall()
    storage = Storage(tmp_path / "storage")
    storage.prepare()
    clock = Clock()
    completion = Completion(storage, r, CompletionConfig(quiet_seconds=10, max_wait_seconds=60), JobQueue(r), clock)
    completion.reconcile()
    return storage, completion, clock, r


def store(storage: Storage, study: str, n: int = 1, series: str | None = None) -> list[str]:
    series = series or generate_uid()
    sops = [generate_uid() for _ in range(n)]
    for sop in sops:
        storage.write_instance(study, series, sop, [b"\0" * 128, b"DICM"])
    return sops


def jobs(r) -> list[str]:
    return [x.decode() for x in r.lrange(f"rq:queue:{QUEUE_NAME}", 0, -1)]


def test_quiet_period_then_one_job(setup):
    storage, completion, clock, r = setup
    study = generate_uid()
    store(storage, study, 3)
    completion.instance_stored(study)
    clock.now += 9.9
    assert completion.tick() == 0
    clock.now += 0.2
    assert completion.tick() == 1
    assert jobs(r) == [job_id(study, 1)]
    rev = storage.latest_revision(study)
    assert rev is not None and rev.revision == 1 and len(rev.instances) == 3 and rev.reason == "quiet"
    clock.now += 100
    assert completion.tick() == 0  # nothing armed any more
    assert r.zscore(KEY_QUIET, study) is None and r.zscore(KEY_DEADLINE, study) is None


def test_max_wait_fires_while_instances_keep_coming(setup):
    storage, completion, clock, r = setup
    study = generate_uid()
    for _ in range(13):  # one every 5 s: never 10 s quiet
        store(storage, study)
        completion.instance_stored(study)
        clock.now += 5
        completion.tick()
    revs = storage.revisions(study)
    assert revs == [1]
    assert storage.read_revision(study, 1).reason == "max_wait"
    clock.now += 11
    completion.tick()
    assert storage.revisions(study) == [1, 2]  # the late instances, once quiet
    assert len(storage.read_revision(study, 2).instances) == 13


def test_a_resent_study_queues_nothing_new(setup):
    storage, completion, clock, r = setup
    study = generate_uid()
    store(storage, study, 2)
    completion.instance_stored(study)
    clock.now += 11
    completion.tick()
    completion.instance_stored(study)  # the same instances arrive again (files replaced)
    clock.now += 11
    assert completion.tick() == 0
    assert storage.revisions(study) == [1] and jobs(r) == [job_id(study, 1)]


def test_reconcile_rearms_from_disk_and_requeues_lost_jobs(setup):
    storage, completion, clock, r = setup
    done, lost, pending = generate_uid(), generate_uid(), generate_uid()
    for study in (done, lost):
        store(storage, study)
        completion.instance_stored(study)
    clock.now += 11
    completion.tick()
    storage.outcome_path(done, 1).write_text("{}")  # the worker finished this one
    store(storage, pending, 2)  # stored, never armed (Redis was down)
    r.flushall()  # Redis restarted empty
    clock.now = max(p.stat().st_mtime for p in storage.studies.rglob("*.dcm")) + 1
    assert completion.tick() == 0  # reconciled: the lost job is queued again, pending is armed, not due
    assert r.exists(KEY_EPOCH)
    assert jobs(r) == [job_id(lost, 1)]
    clock.now += 10
    assert completion.tick() == 1
    assert sorted(jobs(r)) == sorted([job_id(lost, 1), job_id(pending, 1)])
    assert storage.revisions(done) == [1] and storage.revisions(lost) == [1]


def test_redis_down_at_store_time_is_not_an_error(setup, redis_server, tmp_path):
    storage, _, clock, _ = setup
    from node.enqueue import redis_client

    dead = redis_client("redis://127.0.0.1:1/0", timeout=0.5)
    completion = Completion(storage, dead, CompletionConfig(quiet_seconds=10, max_wait_seconds=60), JobQueue(dead), clock)
    study = generate_uid()
    store(storage, study)
    completion.instance_stored(study)  # logs, does not raise
    assert completion.tick() == 0  # paused, does not raise
    completion.redis = completion.queue.connection = redis_server.client()
    completion.queue = JobQueue(completion.redis)
    clock.now = max(p.stat().st_mtime for p in storage.studies.rglob("*.dcm")) + 11
    assert completion.tick() == 1


@pytest.mark.parametrize("uid", ["", "../x", "1.2.3/4", "1..2", "1.2.", "a.1", "1." + "2" * 63, "1.2\x00"])
def test_unsafe_uids_are_refused(uid):
    with pytest.raises(InvalidUIDError):
        check_uid(uid)


def test_write_instance_replaces_and_prepare_clears_partial_writes(tmp_path):
    storage = Storage(tmp_path)
    storage.prepare()
    study, series, sop = "1.2.3", "1.2.3.4", "1.2.3.4.5"
    path, replaced = storage.write_instance(study, series, sop, [b"one"])
    assert not replaced and path.read_bytes() == b"one" and oct(path.stat().st_mode & 0o777) == "0o600"
    path, replaced = storage.write_instance(study, series, sop, [b"two", memoryview(b"!")])
    assert replaced and path.read_bytes() == b"two!"
    assert [i.sop_uid for i in storage.instances(study)] == [sop]
    (storage.tmp / "x.part").write_bytes(b"partial")
    storage.prepare()
    assert list(storage.tmp.iterdir()) == []


def test_embedded_redis_that_does_not_answer_is_replaced():
    root = short_tmp()
    first = EmbeddedRedis(root)
    first.start()
    old = first.pid
    assert old is not None
    os.kill(old, signal.SIGSTOP)  # alive, ours, but not answering
    second = EmbeddedRedis(root)
    try:
        second.start()
        assert second.pid != old and not pid_alive(old)
        assert second.client().ping()
    finally:
        second.stop()
        if pid_alive(old):
            os.kill(old, signal.SIGKILL)
    assert second.pid is None and not (root / "redis" / "redis.pid").exists()


def test_embedded_redis_refuses_a_socket_path_too_long():
    from node.errors import RedisUnavailableError

    with pytest.raises(RedisUnavailableError, match="longer than"):
        EmbeddedRedis(Path("/tmp/" + "x" * 120)).start()
