"""Prometheus metrics for ``GET /metrics`` (the ``prometheus-client`` library).

Counters and histograms are fed by the stages as things happen (ingest, jobs,
outbox, the SCP and the API); gauges of state (runs, jobs, queue, outbox) are
read from the index at each scrape, so they are right after a restart too.
One registry per node, so that two nodes in one process do not mix.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from dicom_node.db import Database, Delivery, Job
from dicom_node.ingest import Receipt
from dicom_node.sandbox import MemoryPool, Outcome
from dicom_node.tls import CertificateExpiry

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# the worker's stage names -> the label values
STAGES = {"decoding": "decode", "computing": "compute", "encoding": "encode", "writing": "write"}
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def _labelled(
    name: str, documentation: str, labels: list[str], rows: Iterable[tuple[Any, ...]]
) -> GaugeMetricFamily:
    """A gauge with one value per row: the labels' values, then the count."""
    gauge = GaugeMetricFamily(name, documentation, labels=labels)
    for *values, n in rows:
        gauge.add_metric([str(v) for v in values], n)
    return gauge


class _IndexCollector(Collector):
    """Gauges read from the index at scrape time."""

    def __init__(self, db: Database, storage_dir: Path | None = None) -> None:
        self.db = db
        self.storage_dir = storage_dir

    def collect(self) -> Iterator[Metric]:
        snap = self.db.metrics_snapshot()
        runs = GaugeMetricFamily("angio_node_runs", "Runs by state", labels=["state"])
        for state, n in sorted(snap["runs"].items()):
            runs.add_metric([state], n)
        yield runs
        jobs = GaugeMetricFamily(
            "angio_node_jobs", "Jobs by pipeline and state", labels=["pipeline", "state"]
        )
        for pipeline, state, n in snap["jobs"]:
            jobs.add_metric([pipeline, state], n)
        yield jobs
        yield GaugeMetricFamily(
            "angio_node_job_queue_depth", "Queued jobs due to run now", value=snap["queue_depth"]
        )
        yield GaugeMetricFamily(
            "angio_node_job_queue_older",
            "Queued jobs of older runs (acquired before workers.live_window_h), taken after "
            "live runs' jobs",
            value=snap["older_queued_jobs"],
        )
        backlog = GaugeMetricFamily(
            "angio_node_outbox_backlog",
            "Deliveries pending per destination",
            labels=["destination"],
        )
        deliveries = GaugeMetricFamily(
            "angio_node_outbox_deliveries",
            "Deliveries by destination and state",
            labels=["destination", "state"],
        )
        for dest, state, n in snap["outbox"]:
            deliveries.add_metric([dest, state], n)
            if state == "pending":
                backlog.add_metric([dest], n)
        yield backlog
        yield deliveries
        yield _labelled(
            "angio_node_result_commitments",
            "Results sent to destinations that commit, by destination and commitment "
            "(awaiting: their files kept until it comes)",
            ["destination", "commitment"],
            snap["result_commitments"],
        )
        yield _labelled(
            "angio_node_results_rejected",
            "The node's results a destination rejected (IHE IOCM rejection notes), by "
            "pipeline and the note's title code: kept as feedback",
            ["pipeline", "code"],
            [(r["pipeline"], r["code"], r["n"]) for r in snap["rejected_results"]],
        )
        yield _labelled(
            "angio_node_storage_commitments",
            "Storage commitment requests of senders by requester and state (pending: the "
            "result not yet taken)",
            ["requester", "state"],
            snap["storage_commitments"],
        )
        yield GaugeMetricFamily(
            "angio_node_runs_purged",
            "Runs whose received files and results retention deleted",
            value=snap["purged_runs"],
        )
        if self.storage_dir is not None:
            yield GaugeMetricFamily(
                "angio_node_storage_free_bytes",
                "Free space where the node stores runs and results",
                value=shutil.disk_usage(self.storage_dir).free,
            )


class _CertificateCollector(Collector):
    def __init__(self, expiry: CertificateExpiry) -> None:
        self.expiry = expiry

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "angio_node_tls_certificate_expiry_timestamp_seconds",
            "When each TLS certificate file of the settings ends (the earliest of a "
            "chain or bundle), in seconds since the epoch; for tls.*, the one loaded at "
            "start",
            labels=["setting"],
        )
        for f, end in self.expiry.current():
            if not isinstance(end, str):  # unreadable: logged at start and every day
                gauge.add_metric([f.setting], end.timestamp())
        yield gauge


class Metrics:
    def __init__(
        self,
        db: Database,
        models: Mapping[str, Path] | None = None,
        storage_dir: Path | None = None,
    ) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.received = Counter(
            "angio_node_instances_received",
            "Instances stored (C-STORE or STOW-RS)",
            ["transport"],
            registry=r,
        )
        self.refused = Counter(
            "angio_node_instances_refused",
            "Instances refused, by the DIMSE status answered",
            ["transport", "status"],
            registry=r,
        )
        self.bytes = Counter(
            "angio_node_received_bytes", "Bytes of instances received", ["transport"], registry=r
        )
        self.associations = Counter(
            "angio_node_associations",
            "DICOM associations by result (accepted, rejected, tls_refused)",
            ["result"],
            registry=r,
        )
        self.api_requests = Counter(
            "angio_node_api_requests",
            "REST and DICOMweb requests by method and HTTP status",
            ["method", "code"],
            registry=r,
        )
        self.api_in_progress = Gauge(
            "angio_node_api_requests_in_progress",
            "REST and DICOMweb requests being served now; at [api] max_concurrent_requests "
            "the next gets a 503",
            registry=r,
        )
        self.api_connections = Gauge(
            "angio_node_api_connections_open",
            "Connections the API holds open; at twice [api] max_concurrent_requests the "
            "next is closed at accept",
            registry=r,
        )
        self.job_duration = Histogram(
            "angio_node_job_duration_seconds",
            "Wall time of one job attempt in its worker process",
            ["pipeline", "outcome"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "angio_node_job_stage_duration_seconds",
            "Wall time of one stage of a job (decode, compute, encode, write)",
            ["pipeline", "stage"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.job_memory_share = Histogram(
            "angio_node_job_memory_budget_share",
            "Peak resident memory of one job attempt as a share of its budget for the run "
            "(above 1 the job was ended); to size [workers] pipeline_memory_mib and "
            "pipeline_memory_bytes_per_pixel",
            ["pipeline"],
            buckets=(0.1, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )
        self.job_time_share = Histogram(
            "angio_node_job_time_limit_share",
            "Wall time of one job attempt as a share of its time limit for the run (above 1 "
            "the job was ended); to size [workers] job_timeout_s and "
            "pipeline_seconds_per_megapixel",
            ["pipeline"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
            registry=r,
        )
        self.deliveries = Counter(
            "angio_node_deliveries_sent", "Objects delivered", ["destination"], registry=r
        )
        self.delivery_failures = Counter(
            "angio_node_delivery_failures",
            "Failed delivery attempts (retry: will be tried again; permanent: refused)",
            ["destination", "kind"],
            registry=r,
        )
        self.packages = Gauge(
            "angio_node_model_package_info",
            "Model package configured per pipeline (1), with its name and version",
            ["pipeline", "name", "version"],
            registry=r,
        )
        for pipeline, folder in (models or {}).items():
            name, version = package_identity(folder)
            self.packages.labels(pipeline, name, version).set(1)
        r.register(_IndexCollector(db, storage_dir))

    def watch_memory(self, pool: MemoryPool) -> None:
        """Gauges of the embedded engine's memory pool, read at scrape time."""
        Gauge(
            "angio_node_jobs_memory_bytes",
            "The pool the jobs running at once reserve their budgets in ([workers] "
            "jobs_memory_mib)",
            registry=self.registry,
        ).set(pool.capacity)
        Gauge(
            "angio_node_jobs_memory_reserved_bytes",
            "Memory the running jobs have reserved (their budgets for their runs)",
            registry=self.registry,
        ).set_function(lambda: pool.held)
        Gauge(
            "angio_node_jobs_waiting_for_memory",
            "Jobs whose worker read the run's headers and waits for room in the pool",
            registry=self.registry,
        ).set_function(lambda: pool.waiting)

    def watch_certificates(self, expiry: CertificateExpiry) -> None:
        """The end of validity of each certificate the node uses, read at scrape time
        (for an alert before it ends: ``... - time() < 14 * 86400``)."""
        self.registry.register(_CertificateCollector(expiry))

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

    # -- what the stages report ---------------------------------------------------------
    def instance(self, receipt: Receipt, source: str, transport: str, size: int, peer: str) -> None:
        self.bytes.labels(transport).inc(size)
        if receipt.ok:
            self.received.labels(transport).inc()
        else:
            self.refused.labels(transport, f"0x{receipt.status:04X}").inc()

    def job(self, job: Job, outcome: Outcome) -> None:
        result = "done" if outcome.ok else "transient" if outcome.transient else "failed"
        total = 0.0
        for stage, seconds in outcome.timings:
            total += seconds
            if stage in STAGES:
                self.stage_duration.labels(job.pipeline, STAGES[stage]).observe(seconds)
        self.job_duration.labels(job.pipeline, result).observe(total)
        if outcome.budget and outcome.peak_rss:  # watched in this node's worker processes
            self.job_memory_share.labels(job.pipeline).observe(outcome.peak_rss / outcome.budget)
        if outcome.time_limit and not outcome.interrupted:  # a wait for memory is not timed
            timed = total - outcome.waited_s
            self.job_time_share.labels(job.pipeline).observe(timed / outcome.time_limit)

    def delivery(
        self, destination: str, _item: Delivery, sent: bool, _reason: str, permanent: bool
    ) -> None:
        if sent:
            self.deliveries.labels(destination).inc()
        else:
            self.delivery_failures.labels(destination, "permanent" if permanent else "retry").inc()


def package_identity(folder: Path | str) -> tuple[str, str]:
    """(name, version) from a model package's package.json, without loading it."""
    try:
        meta: dict[str, Any] = json.loads((Path(folder) / "package.json").read_text())
        return str(meta.get("name", Path(folder).name)), str(meta.get("version", "unknown"))
    except (OSError, ValueError) as exc:
        log.warning("model package %s: cannot read package.json: %s", folder, exc)
        return Path(folder).name, "unreadable"
