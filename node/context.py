"""What the jobs of one worker process share: config, storage, Redis, the audit trail, the model once loaded.

Both job modules use it (:mod:`node.worker` runs analyses, :mod:`node.send`
delivers results); neither imports the other's jobs, so data moves forward
only: worker -> results -> send.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.uid import generate_uid
from redis import Redis

from node import __version__
from node.audit import AuditTrail, open_trail
from node.config import Config, Pipeline
from node.enqueue import redis_client
from node.store import Storage

if TYPE_CHECKING:
    from node.infer import Model
    from node.results.facts import NodeDevice

logger = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What jobs in this process share: config, storage, Redis, and the model once loaded."""

    cfg: Config
    storage: Storage
    redis: Redis
    _models: dict[str, Any] = field(default_factory=dict, repr=False)  # resolved model path -> Model
    _mtime: float | None = None
    _audit: AuditTrail | None = field(default=None, repr=False)
    role: str = "analyse"

    @property
    def audit(self) -> AuditTrail:
        """This process's audit trail, opened on first use."""
        if self._audit is None:
            self._audit = open_trail(self.cfg.audit_path, self.cfg.node.ae_title, f"worker-{self.role}",
                                     self.cfg.audit.syslog)
        return self._audit

    def refresh(self) -> Config:
        """The config, re-read if its file changed (destinations added or fixed by an admin).

        Storage, Redis and ``[model]`` stay as started (pipelines may name new
        models: each is loaded on its first job); a file that no longer
        validates is logged and the running config kept.
        """
        from node.config import reread

        new, self._mtime = reread(self.cfg, self._mtime)
        if new is not None:
            self.cfg = replace(new, node=self.cfg.node, redis=self.cfg.redis, model=self.cfg.model)
        return self.cfg

    @property
    def model(self) -> "Model":
        """The model of the first pipeline (``[model] path`` unless it names its own)."""
        return self.model_for(self.cfg.pipelines[0])

    def model_for(self, pipeline: "Pipeline") -> "Model":
        """The model a pipeline runs, loaded once per process (pipelines that name one model share it)."""
        from node.infer import Model, resolve_model_path

        path = str(resolve_model_path(self.cfg.model_path(pipeline)))
        if path not in self._models:
            self._models[path] = Model(Path(path), self.cfg.model.device)
        return self._models[path]

    def threshold(self, pipeline: "Pipeline | None" = None) -> tuple[float, str]:
        """The threshold of a pipeline (the first by default) and where it comes from: the pipeline's,
        else ``[model] threshold``, else its model card's."""
        pipeline = pipeline or self.cfg.pipelines[0]
        if (value := self.cfg.threshold(pipeline)) is not None:
            return value, "config"
        return float(self.model_for(pipeline).card.threshold), "model card"

    @property
    def node_uid(self) -> str:
        """A UID for this node: the same for the same host and storage, across restarts."""
        return generate_uid(entropy_srcs=["ainode-device", socket.gethostname(), str(self.storage.root)])

    def device(self) -> "NodeDevice":
        from node.results.facts import NodeDevice

        return NodeDevice(uid=self.node_uid, software_version=__version__)


_CONTEXT: WorkerContext | None = None


def redis_for(cfg: Config) -> Redis:
    """The configured Redis; with an empty URL, the node's embedded server (which must be running)."""
    if cfg.redis.url:
        return redis_client(cfg.redis.url)
    from node.embedded_redis import EmbeddedRedis

    return redis_client(EmbeddedRedis(cfg.node.storage).url)


def context() -> WorkerContext:
    """This process's context; made from the default config when a job runs outside ``ainode worker``."""
    global _CONTEXT
    if _CONTEXT is None:
        from node import config

        cfg = config.load()
        _CONTEXT = WorkerContext(cfg, Storage(cfg.node.storage), redis_for(cfg))
    return _CONTEXT


def set_context(ctx: WorkerContext) -> None:
    global _CONTEXT
    _CONTEXT = ctx
