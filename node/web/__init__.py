"""The node's HTTP side: liveness, readiness and Prometheus metrics (more pages to come).

A process of its own (``ainode web``, started and supervised by ``ainode
serve`` when ``[web] enabled``), so the SCP's process never loads the web
stack (Starlette, served by uvicorn). It reads what the other processes
write: storage, Redis, and their Prometheus counts (node.metrics).
"""
