"""The ASGI app (Starlette) and its server (uvicorn): ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import logging
import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node.config import Config
from node.store import METRICS_ENV
from node.web.health import Health, StateCollector

logger = logging.getLogger(__name__)


def create_app(cfg: Config, health: Health, audit: Any = None) -> Starlette:
    state = StateCollector(health)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        checks = await run_in_threadpool(health.readiness)
        ready = all(c.ok for c in checks.values())
        body = {"ready": ready, "checks": {name: c.to_json() for name, c in checks.items()},
                "failing": [name for name, c in checks.items() if not c.ok]}
        return JSONResponse(body, status_code=200 if ready else 503)

    alone = CollectorRegistry()  # no shared folder: only the state (this process counts nothing)
    alone.register(state)

    def render_metrics() -> bytes:
        if not os.environ.get(METRICS_ENV):
            return generate_latest(alone)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # the counts of every process of the node
        registry.register(state)
        return generate_latest(registry)

    async def metrics(request: Request) -> Response:
        return Response(await run_in_threadpool(render_metrics), media_type=CONTENT_TYPE_LATEST)

    pages: list[Any] = []
    if audit is not None:  # the results page (it needs the audit trail: logins and actions are audited)
        from node.web.pages import Pages, routes

        pages = routes(Pages(cfg, health.redis, audit))
    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics),
                             *pages])


def run_web(cfg: Config, log_level: str = "INFO") -> int:
    """Serve until SIGTERM/SIGINT (uvicorn's own handlers)."""
    import uvicorn

    from node.context import redis_for

    from node.audit import open_trail

    health = Health(cfg, redis_for(cfg))
    audit = open_trail(cfg.audit_path, cfg.node.ae_title, "web", cfg.audit.syslog)
    app = create_app(cfg, health, audit)
    ssl: dict[str, Any] = {}
    if cfg.web.tls:
        ssl = {"ssl_certfile": cfg.tls.cert, "ssl_keyfile": cfg.tls.key}
    scheme = "https" if cfg.web.tls else "http"
    logger.info("ainode web on %s://%s:%d (the results page; /healthz, /readyz, /metrics)", scheme, cfg.web.host,
                cfg.web.port)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.web.host, port=cfg.web.port, access_log=False,
                                           log_level="warning" if log_level != "DEBUG" else "debug",
                                           lifespan="off", **ssl))
    try:
        server.run()
    finally:
        audit.close()
    return 0
