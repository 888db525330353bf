"""The node's Prometheus metrics, counted in every process and served by the web process.

``ainode serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at ``<storage>/run/metrics``
(emptied at its start, node.store.prepare_metrics_dir) before any of its
processes import prometheus_client,
so the SCP, each worker and the sender write their counts there and the web
process (node.web) serves their sum (prometheus_client's multiprocess mode).
What is a state rather than a count (queue depth, free disk, workers up) is
read when Prometheus scrapes (node.web.health). A process started alone, with
no such folder, counts for itself only.

Only counters and histograms live here: they add up across processes and
survive a process's restart. prometheus_client is small and pure Python; the
receive path may import this module (no web stack).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram


ASSOCIATIONS = Counter("ainode_associations_total", "A-ASSOCIATE requests, by outcome and reason",
                       ["outcome", "reason"])
DROPPED = Counter("ainode_connections_dropped_total",
                  "Connections the node dropped: timeout, oversized, malformed, connection_limit", ["reason"])
INSTANCES = Counter("ainode_instances_total", "C-STORE requests answered, by status", ["status"])
RECEIVED_BYTES = Counter("ainode_received_bytes_total", "Bytes of instances stored")
STUDIES = Counter("ainode_studies_completed_total", "Study revisions queued for analysis, by why", ["reason"])
JOBS = Counter("ainode_jobs_total", "Jobs finished, by queue and outcome", ["queue", "outcome"])
JOB_SECONDS = Histogram("ainode_job_seconds", "Job durations, by queue and outcome", ["queue", "outcome"],
                        buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800))
INFERENCE_SECONDS = Histogram("ainode_inference_seconds", "Model inference time per study, by provider",
                              ["provider"], buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
INFERENCE_SLICES = Counter("ainode_inference_slices_total", "Slices run through the model, by provider",
                           ["provider"])
SENDS = Counter("ainode_sends_total", "Result deliveries tried, by destination and outcome",
                ["destination", "outcome"])
WORKER_DEATHS = Counter("ainode_worker_deaths_total", "Workers that died under the node, by role", ["role"])

