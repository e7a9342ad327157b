"""Prometheus text exposition: HTTP requests counted in process, queue and pair counts from Postgres."""

from __future__ import annotations

import threading
from collections import Counter

from starlette.types import ASGIApp, Receive, Scope, Send


class RequestCounter:
    """ASGI middleware counting requests by method, route template and status code."""

    def __init__(self, app: ASGIApp, counts: Counter[tuple[str, str, int]]):
        self.app = app
        self.counts = counts
        self._lock = threading.Lock()

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
            with self._lock:
                self.counts[(scope["method"], path, status)] += 1


def _labels(**labels: object) -> str:
    inner = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels.items()
    )
    return "{" + inner + "}"


def render_metrics(
    *,
    requests: Counter[tuple[str, str, int]],
    queue: dict[str, int],
    pairs: dict[str, int],
    training: dict[str, int],
    workers: list[dict],
) -> str:
    lines = [
        "# HELP cai_http_requests_total HTTP requests by method, route and status.",
        "# TYPE cai_http_requests_total counter",
    ]
    for (method, path, status), count in sorted(requests.items()):
        lines.append(f"cai_http_requests_total{_labels(method=method, route=path, status=status)} {count}")
    lines += ["# HELP cai_prompts Prompts by state.", "# TYPE cai_prompts gauge"]
    lines += [f"cai_prompts{_labels(state=state)} {count}" for state, count in queue.items()]
    lines += [
        "# HELP cai_pairs_written_total Preference pairs stored.",
        "# TYPE cai_pairs_written_total counter",
        f"cai_pairs_written_total {pairs['total']}",
        "# HELP cai_pairs_flagged Stored pairs carrying a quality flag.",
        "# TYPE cai_pairs_flagged gauge",
        f"cai_pairs_flagged {pairs['flagged']}",
        "# HELP cai_training_jobs Training jobs by status.",
        "# TYPE cai_training_jobs gauge",
    ]
    lines += [
        f"cai_training_jobs{_labels(status=status)} {count}" for status, count in sorted(training.items())
    ]
    lines += [
        "# HELP cai_worker_in_flight Trajectories (or training jobs) a live worker holds.",
        "# TYPE cai_worker_in_flight gauge",
    ]
    lines += [
        f"cai_worker_in_flight{_labels(worker=w['id'], kind=w['kind'])} {w['in_flight']}" for w in workers
    ]
    lines += [
        "# HELP cai_worker_tokens_per_second Generated tokens/s of a live worker.",
        "# TYPE cai_worker_tokens_per_second gauge",
    ]
    lines += [
        f"cai_worker_tokens_per_second{_labels(worker=w['id'], kind=w['kind'])} {w['tokens_per_s']}"
        for w in workers
    ]
    return "\n".join(lines) + "\n"
