"""``GET /metrics``: one orchestrator's metrics in the Prometheus text format.

Each app has a registry of its own (never the process-wide one), so several servers can
run in one process. Gauges are computed at scrape time from the projections, never kept in
step by hand. What the projections do not know is observed from the log: a fold subscriber
notes (on this process's monotonic clock) when a job was submitted and when a dispatch was
decided, and a durable subscriber observes when the dispatch became durable, which is the
moment the node may start the process, and how many events each commit wrote.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from eventq import events as ev
from eventq import serverlog
from eventq.actors.scheduler_state import PARKED, TERMINAL
from eventq.http.common import ORCH, ApiError
from eventq.log import Record
from eventq.projections.queue import GATED, RUNNING, WAITING
from eventq.server import Orchestrator

routes = web.RouteTableDef()

#: What ``Metrics.on_append`` notes: the moment a dispatch is decided. A submission is not
#: noted: its time is the job's (``JobState.queued_at``), which the state keeps anyway.
READS = frozenset({ev.AttemptDispatched})
STATUSES = (*GATED, *WAITING, *PARKED, *RUNNING, *TERMINAL)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
WAIT_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class StateCollector:
    """Gauges read from the orchestrator's projections at each scrape."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch

    def collect(self) -> Iterator[Metric]:
        yield from self._jobs()
        yield from self._gpus()
        yield from self._log()

    def _jobs(self) -> Iterator[Metric]:
        state = self.orch.state
        by_status = Counter(job.status for job in state.jobs.values())
        jobs = GaugeMetricFamily("eventq_jobs", "Jobs in the read model by status (pending: in "
                                 "the queue; waiting: for dependencies or a begin time).",
                                 labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], by_status[status])
        yield jobs
        yield GaugeMetricFamily("eventq_queue_depth", "Jobs waiting in the queue.",
                                value=state.waiting_count())
        running = GaugeMetricFamily("eventq_running_jobs", "Jobs with a live attempt, by user "
                                    "and team (team is empty for none).", labels=["user", "team"])
        pairs = Counter((job.spec.user, job.spec.team or "")
                        for job in state.jobs.values() if job.active)
        for (user, team), count in sorted(pairs.items()):
            running.add_metric([user, team], count)
        yield running

    def _gpus(self) -> Iterator[Metric]:
        table = self.orch.gpu_table
        total = GaugeMetricFamily("eventq_gpus", "GPUs in a node's inventory.", labels=["node"])
        held = GaugeMetricFamily("eventq_gpus_allocated", "GPUs held by an attempt.",
                                 labels=["node"])
        free = GaugeMetricFamily("eventq_gpus_free", "GPUs free to allocate (not held, not busy "
                                 "with work eventq did not start).", labels=["node"])
        for name, node in sorted(table.nodes.items()):
            total.add_metric([name], len(node.gpus))
            held.add_metric([name], len(node.held))
            free.add_metric([name], len(table.free(name)))
        yield from (total, held, free)

    def _log(self) -> Iterator[Metric]:
        log = self.orch.log
        yield CounterMetricFamily("eventq_events_appended", "Events in the log (its head seq).",
                                  value=log.head_seq)
        yield CounterMetricFamily("eventq_log_commits", "Commits written by this process.",
                                  value=log.commits)
        yield CounterMetricFamily("eventq_log_committed_events",
                                  "Events committed by this process.", value=log.committed_events)
        yield CounterMetricFamily("eventq_lines_lost", "Writes of the server's lines dropped "
                                  "because they failed (their reader gone, their disk full); "
                                  "the event log holds what they said.",
                                  value=serverlog.lines_lost())


class Metrics:
    """The registry of one app, and the log subscribers that feed its histograms."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        self.registry = CollectorRegistry()
        self.registry.register(StateCollector(orch))
        self.dispatch_latency = Histogram(
            "eventq_dispatch_latency_seconds",
            "From a dispatch being decided (attempt_dispatched appended) to it being durable, "
            "when the node may start the process.",
            registry=self.registry, buckets=LATENCY_BUCKETS)
        self.submit_to_dispatch = Histogram(
            "eventq_submit_to_dispatch_seconds",
            "From a job's submission to its first dispatch being durable (includes time spent "
            "waiting in the queue; first dispatches this process decided).",
            registry=self.registry, buckets=WAIT_BUCKETS)
        self.commit_batch = Histogram(
            "eventq_log_commit_batch_events", "Events written by one commit of the log.",
            registry=self.registry, buckets=BATCH_BUCKETS)
        self._decided: dict[int, float] = {}
        self._clock: Callable[[], float] = time.monotonic

    def on_append(self, record: Record) -> None:
        """A fold subscriber of dispatches: runs inside ``append``, so it only notes a time."""
        self._decided[record.seq] = self._clock()

    def on_durable(self, records: Sequence[Record]) -> None:
        now, jobs = self._clock(), self.orch.state.jobs
        self.commit_batch.observe(len(records))
        for record in records:
            e = record.event
            if not isinstance(e, ev.AttemptDispatched):
                continue
            decided = self._decided.pop(record.seq, None)
            if decided is None:
                continue
            durable_after = now - decided
            self.dispatch_latency.observe(durable_after)
            job = jobs.get(e.job_id)
            if e.attempt == ev.FIRST_ATTEMPT and job is not None:
                # The log's times to the decision, then this process's clock to the disk.
                self.submit_to_dispatch.observe(record.time - job.queued_at + durable_after)

    def attach(self) -> None:
        self.orch.log.subscribe(self.on_append, READS)
        self.orch.log.on_durable(self.on_durable)

    def detach(self) -> None:
        log = self.orch.log
        log.unsubscribe(self.on_append)
        log.off_durable(self.on_durable)


METRICS = web.AppKey("metrics", Metrics)


def install(app: web.Application) -> None:
    """Give ``app`` its own registry, fed from its orchestrator's log, and ``/metrics``."""
    metrics = Metrics(app[ORCH])
    metrics.attach()
    app[METRICS] = metrics

    async def detach(_: web.Application) -> None:
        metrics.detach()

    app.on_cleanup.append(detach)
    app.add_routes(routes)


@routes.get("/metrics")
async def scrape(request: web.Request) -> web.Response:
    """The format the scraper asks for (Prometheus asks for OpenMetrics first), else the
    text format 0.0.4, as prometheus-client's own servers answer."""
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encode(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


def only(app: web.Application) -> web.Application:
    """An application that serves ``app``'s /metrics and nothing else, without a token:
    ``eventq server --metrics-listen`` puts it on an address of its own."""
    metrics_only = web.Application(middlewares=[_refusals_as_json])
    metrics_only[METRICS] = app[METRICS]
    metrics_only.router.add_get("/metrics", scrape)
    return metrics_only


@web.middleware
async def _refusals_as_json(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return ApiError(exc.status, "this address serves only GET /metrics").response()
