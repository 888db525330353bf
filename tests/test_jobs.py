"""node.jobs against a real redis-server and real rq objects: a dead worker's job requeued, then failed;
an execution whose heartbeat stopped found; the node's own scheduling of retries."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry

from node.jobs import Scheduling, recover_worker, requeue_abandoned, worker_name
from node.worker import AinodeWorker


@pytest.fixture
def r(redis_server):
    client = redis_server.client()
    client.flushall()
    return client


def started(r, queue: Queue, pid: int) -> tuple[AinodeWorker, Job]:
    """A worker that took the queue's next job and began it (then, in the test, dies)."""
    worker = AinodeWorker([queue], connection=r, name=worker_name("analyse", pid))
    worker.register_birth()
    job = Job.fetch(queue.pop_job_id(), connection=r)
    worker.prepare_execution(job)
    job.set_status(JobStatus.STARTED)
    return worker, job


def test_a_dead_workers_job_is_requeued_then_failed_the_second_time(r):
    queue = Queue("ainode", connection=r)
    queue.enqueue("time.sleep", 1, job_id="study_1_2_r1")
    lost: list[tuple[str, str]] = []

    def on_lost(job, why, then):
        lost.append((why, then))

    worker, job = started(r, queue, 4242001)
    assert StartedJobRegistry("ainode", connection=r).get_job_ids() == [job.id]
    assert recover_worker(r, worker.name, "worker pid 4242001 was killed by SIGKILL", on_lost) == [job.id]
    assert queue.get_job_ids() == [job.id] and job.get_status(refresh=True) == JobStatus.QUEUED
    assert StartedJobRegistry("ainode", connection=r).get_job_ids() == []
    assert lost == [("worker pid 4242001 was killed by SIGKILL", "queued again")]

    worker, job = started(r, queue, 4242002)
    assert recover_worker(r, worker.name, "worker pid 4242002 was killed by SIGKILL", on_lost) == [job.id]
    assert job.get_status(refresh=True) == JobStatus.FAILED
    assert job.id in FailedJobRegistry("ainode", connection=r).get_job_ids()
    assert queue.get_job_ids() == []
    assert lost[-1][1].startswith("failed: its worker died 2 times")


def test_only_executions_whose_heartbeat_stopped_are_requeued(r):
    queue = Queue("ainode", connection=r)
    for n in (1, 2):
        queue.enqueue("time.sleep", 1, job_id=f"study_1_{n}_r1")
    _, silent = started(r, queue, 4242011)
    _, beating = started(r, queue, 4242012)
    registry = StartedJobRegistry("ainode", connection=r)
    for entry in r.zrange(registry.key, 0, -1):  # the silent one's last beat was over EXECUTION_TTL_S ago
        if entry.decode().startswith(silent.id):
            r.zadd(registry.key, {entry: time.time() - 1})
    handled = requeue_abandoned(r, lambda job, why, then: None)
    assert handled == [silent.id]
    assert queue.get_job_ids() == [silent.id]
    assert registry.get_job_ids() == [beating.id]


def test_the_node_moves_due_retries_even_when_a_dead_scheduler_holds_the_lock(r):
    from rq.scheduler import RQScheduler

    r.set(RQScheduler.get_locking_key("ainode-send"), "a-scheduler-killed-with-its-worker", ex=60)
    queue = Queue("ainode-send", connection=r)
    queue.enqueue_in(timedelta(seconds=1), "time.sleep", 0, job_id="send_1")
    scheduling = Scheduling(r, clear_stale_locks=True)
    deadline = time.monotonic() + 5
    while queue.get_job_ids() != ["send_1"] and time.monotonic() < deadline:
        scheduling.tick()
        time.sleep(0.2)
    assert queue.get_job_ids() == ["send_1"]
    scheduling.stop()
