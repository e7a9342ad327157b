"""Prometheus metrics with `prometheus_client`: HTTP requests counted in process, the state of the
queue, the pairs, training and the workers read from PostgreSQL at each scrape.

Workers report through their heartbeat rows, so the API alone serves every figure and no
multiprocess collection is needed: a scrape reads the database once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from starlette.types import ASGIApp, Receive, Scope, Send

from cai_dpo.core.db import session_scope
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.queries import pairs as pair_queries
from cai_dpo.core.queries import training as training_queries
from cai_dpo.core.queries import workers as worker_queries


class RequestCounter:
    """ASGI middleware counting requests by method, route template and status code."""

    def __init__(self, app: ASGIApp, counter: Counter):
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.counter.labels(scope["method"], path, str(status)).inc()


class ServiceCollector(Collector):
    """Reads the service's state from PostgreSQL when scraped."""

    def __init__(self, engine: Callable[[], Engine], worker_seen_seconds: float):
        self.engine = engine
        self.worker_seen_seconds = worker_seen_seconds

    def collect(self) -> Iterator[Metric]:
        with session_scope(self.engine()) as session:
            prompts = job_queries.queue_depth(session)
            pairs = pair_queries.pairs_total(session, prompts_done=prompts["done"])
            training = training_queries.training_job_counts(session)
            workers = worker_queries.live_workers(session, seen_seconds=self.worker_seen_seconds)

        by_state = GaugeMetricFamily("cai_prompts", "Prompts by state.", labels=["state"])
        for state, count in prompts.items():
            by_state.add_metric([state], count)
        yield by_state
        yield CounterMetricFamily("cai_pairs_written", "Preference pairs stored.", value=pairs["total"])
        yield GaugeMetricFamily(
            "cai_pairs_flagged", "Stored pairs carrying a quality flag.", pairs["flagged"]
        )
        jobs = GaugeMetricFamily("cai_training_jobs", "Training jobs by status.", labels=["status"])
        for status, count in sorted(training.items()):
            jobs.add_metric([status], count)
        yield jobs

        labels = ["worker", "kind"]
        in_flight = GaugeMetricFamily(
            "cai_worker_in_flight", "Trajectories (or training jobs) a live worker holds.", labels=labels
        )
        rate = GaugeMetricFamily(
            "cai_worker_tokens_per_second", "Generated tokens/s of a live worker.", labels=labels
        )
        healthy = GaugeMetricFamily(
            "cai_worker_healthy", "1 if a live worker can work, 0 if it reports a problem.", labels=labels
        )
        # A generation worker's engine, as the worker last read it (absent where it cannot say).
        engine_gauges = {
            "in_flight_target": GaugeMetricFamily(
                "cai_worker_in_flight_target", "Trajectories a generation worker aims to hold.", labels=labels
            ),
            "running": GaugeMetricFamily(
                "cai_engine_running", "Sequences in a generation worker's engine batch.", labels=labels
            ),
            "waiting": GaugeMetricFamily(
                "cai_engine_waiting", "Requests queued inside a generation worker's engine.", labels=labels
            ),
            "kv_cache_usage": GaugeMetricFamily(
                "cai_engine_kv_cache_usage", "Fraction of the engine's KV cache in use.", labels=labels
            ),
        }
        for worker in workers:
            key = [worker.id, worker.kind]
            stats = worker.stats or {}
            in_flight.add_metric(key, worker.in_flight)
            rate.add_metric(key, worker.tokens_per_s)
            healthy.add_metric(key, 0 if stats.get("problem") else 1)
            for name, gauge in engine_gauges.items():
                if isinstance(stats.get(name), int | float):
                    gauge.add_metric(key, stats[name])
        yield from (in_flight, rate, healthy, *engine_gauges.values())


def metrics_registry(
    engine: Callable[[], Engine], worker_seen_seconds: float
) -> tuple[CollectorRegistry, Counter]:
    """A registry of the app's own (tests build several apps in one process) and its request counter."""
    registry = CollectorRegistry(auto_describe=False)
    requests = Counter(
        "cai_http_requests",
        "HTTP requests by method, route and status.",
        ["method", "route", "status"],
        registry=registry,
    )
    registry.register(ServiceCollector(engine, worker_seen_seconds))
    return registry, requests
