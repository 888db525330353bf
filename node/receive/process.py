"""The receiving side of a node, in the node's own process or in processes of its own.

:class:`Receiving` is the SCP with what it needs (policy, receiver, server),
started, reloaded and drained the same way wherever it runs. With ``[node]
receivers = 1`` (the default) ``ainode serve`` runs it itself. With N > 1 it
starts N receiving processes (``ainode receive``, :func:`run_receiver`), each
listening on the same port(s) with SO_REUSEPORT: the kernel spreads new
connections over them, so several cores decode, check and fsync at once.
The node keeps what there must be one of: the embedded Redis, the completion
loop (each receiving process writes its studies' timers to Redis itself, once
per tick), the workers, SIGHUP (passed on to each receiving process) and the
audit of start, stop and reload. Each receiving process dies with the node
(the kernel kills it) and is started again by the node if it dies alone.

Limits (``max_associations``, ``max_connections_per_host``, the pending cap)
are each receiving process's own: a node with N of them takes up to N times as
many, and one stalled peer still holds at most its process's share.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

from node import config as config_mod
from node.audit import AuditTrail, open_trail
from node.completion import Completion, quiet_by_pipeline
from node.config import Config
from node.enqueue import JobQueue, redis_client
from node.errors import AinodeError
from node.receive.instance import Receiver
from node.receive.policy import Policy
from node.receive.server import Limits, Server
from node.store import Storage
from node.tls import server_context

logger = logging.getLogger(__name__)

TICK_S = 0.25  # the node's completion loop and each receiving process write the timers this often
DRAIN_S = 30.0
ROLE = "receive"


class Receiving:
    """The SCP of a node: who may associate, how an instance is stored, the listening sockets."""

    def __init__(self, cfg: Config, storage: Storage, completion: Completion, audit: AuditTrail) -> None:
        self.completion = completion
        self.policy = Policy(cfg.pipelines, cfg.callers)
        self.receiver = Receiver(storage, completion, self.policy, cfg.node.min_free_mb, audit)
        self.server = Server(self.receiver, Limits.of(cfg))

    def listen(self, cfg: Config, tls_context: object, reuse_port: bool = False) -> list[str]:
        """Listen on the plain port and/or the TLS port; returns them in words. ConfigError if it cannot."""
        self.server.tls_context = tls_context  # type: ignore[assignment]
        ports = []
        if cfg.node.port:
            self.server.listen(cfg.node.host, cfg.node.port, reuse_port=reuse_port)
            ports.append(f"{cfg.node.host}:{cfg.node.port}")
        if tls_context is not None:
            self.server.listen(cfg.node.host, cfg.tls.port, tls=True, reuse_port=reuse_port)
            required = ", client certificate required" if cfg.tls.require_client_cert else ""
            ports.append(f"{cfg.node.host}:{cfg.tls.port} (TLS{required})")
        return ports

    def apply(self, new: Config, tls_context: object | None) -> None:
        """What a SIGHUP changes here: callers and pipelines, limits, the watermark, completion times, and
        (for new connections) the TLS certificate, key and CA. Open associations keep what they had."""
        if tls_context is not None:
            self.server.tls_context = tls_context  # type: ignore[assignment]
        self.policy.update(new.pipelines, new.callers)
        self.server.limits = Limits.of(new)
        self.receiver.min_free_mb = new.node.min_free_mb
        self.completion.update_config(new.completion, quiet_by_pipeline(new))

    def stop(self, drain_s: float = DRAIN_S) -> None:
        """Stop accepting, let open associations finish (at most ``drain_s``), abort the rest, write the timers."""
        server = self.server
        server.stop_listening()
        deadline = time.monotonic() + drain_s
        while server.open_connections and time.monotonic() < deadline:
            time.sleep(0.05)
        if server.open_connections:
            logger.warning("Aborting %d connection(s) still open at stop", server.abort_all())
            deadline = time.monotonic() + 2.0
            while server.open_connections and time.monotonic() < deadline:
                time.sleep(0.05)
        self.completion.flush()  # the timers of the last instances stored


def run_receiver(cfg: Config, index: int, supervisor: int) -> int:
    """``ainode receive``: one receiving process of a node (``--supervised-by`` its pid); exit code."""
    from node.jobs import die_with, worker_name

    die_with(supervisor)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # as the node: node.receive says it in one line
    storage = Storage(cfg.node.storage)
    storage.prepare(clear_tmp=False)  # the node cleared tmp/ before it started us; others may write there now
    audit = open_trail(cfg.audit_path, cfg.node.ae_title, f"{ROLE}-{index}", cfg.audit.syslog)
    url = cfg.redis.url
    if not url:
        from node.embedded_redis import EmbeddedRedis

        url = EmbeddedRedis(cfg.node.storage).url  # the node's, already running
    redis = redis_client(url)
    completion = Completion(storage, redis, cfg.completion, JobQueue(redis), quiet_by_pipeline=quiet_by_pipeline(cfg))
    receiving = Receiving(cfg, storage, completion, audit)
    stop, reload = threading.Event(), threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        reload.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        tls_context = server_context(cfg.tls, str(cfg.source or "config")) if cfg.tls.enabled else None
        ports = receiving.listen(cfg, tls_context, reuse_port=True)
    except AinodeError as exc:
        logger.error("Receiving process %d: %s", index, exc)
        audit.close()
        return 2
    ready = storage.worker_ready(worker_name(ROLE, os.getpid()))
    logger.info("Receiving process %d (pid %d) listening on %s", index, os.getpid(), " and ".join(ports))
    try:
        while not stop.wait(TICK_S):
            receiving.completion.flush()
            if reload.is_set():
                reload.clear()
                cfg = _reload(cfg, receiving, index)
    finally:
        receiving.stop()
        ready.unlink(missing_ok=True)
        audit.close()
        logger.info("Receiving process %d stopped", index)
    return 0


def _reload(cfg: Config, receiving: Receiving, index: int) -> Config:
    """SIGHUP, passed on by the node (which audits the reload): apply what can change live."""
    if cfg.source is None:
        return cfg
    try:
        new = config_mod.load(cfg.source)
        tls_context = (server_context(new.tls, str(new.source))
                       if receiving.server.tls_context is not None and new.tls.enabled else None)
    except AinodeError as exc:
        logger.error("Receiving process %d: config not reloaded, keeping the running one: %s", index, exc)
        return cfg
    receiving.apply(new, tls_context)
    logger.info("Receiving process %d: config reloaded (%d pipelines, %d callers)", index, len(new.pipelines),
                len(new.callers))
    return config_mod.kept_for_restart(cfg, new)
