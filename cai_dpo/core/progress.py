"""Progress of long work as pure functions: job status, rate and ETA from counts and times."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Progress:
    status: str
    rate_per_s: float | None
    eta_s: float | None


def job_progress(
    counts: dict[str, int],
    *,
    cancelled: bool,
    first_started_at: datetime | None,
    last_finished_at: datetime | None,
    now: datetime,
) -> Progress:
    """Status of a generation job and its pairs/s and ETA, from its prompts' counts per state.

    The rate is finished prompts over the time since the first claim: it includes the time the
    job's first trajectories took, so it is what a user waiting for the job experiences.
    """
    open_ = counts.get("queued", 0) + counts.get("running", 0)
    finished = counts.get("done", 0) + counts.get("failed", 0)
    if cancelled:
        status = "cancelling" if counts.get("running", 0) else "cancelled"
    elif open_ == 0:
        status = "done" if counts.get("done", 0) or not finished else "failed"
    elif counts.get("running", 0) or finished:
        status = "running"
    else:
        status = "queued"
    rate = None
    if first_started_at is not None and finished:
        end = now if open_ else (last_finished_at or now)
        elapsed = (end - first_started_at).total_seconds()
        rate = finished / elapsed if elapsed > 0 else None
    remaining = (
        counts.get("queued", 0) + counts.get("running", 0) if not cancelled else counts.get("running", 0)
    )
    eta = remaining / rate if rate and remaining else (0.0 if not remaining else None)
    return Progress(status=status, rate_per_s=rate, eta_s=eta)


def eta_seconds(done: int, total: int, elapsed_s: float) -> float | None:
    """Remaining time at the average rate so far (training steps, CLI progress)."""
    if done <= 0 or elapsed_s <= 0:
        return None
    return max(total - done, 0) * elapsed_s / done
