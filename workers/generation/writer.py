"""Group commit of finished prompts: many prompts' "result + done" in one transaction.

A trajectory hands its finished result (a pair, a comparison) to the `ResultWriter` and waits
for its commit. While one write is in flight every result that finishes joins the next, so at a
few finished prompts a second there is one small transaction each, and at hundreds a second a
few transactions carry them all: the database cost per pair falls as the load rises instead of
the worker queueing behind its own commits. Each prompt in a batch is still checked against its
lease (`complete_prompts`); a worker killed before the commit wrote none of the batch, and the
prompts come back when their leases run out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from workers.runtime import DatabaseUnavailable

log = logging.getLogger(__name__)


@dataclass
class Finished:
    """One prompt's result, waiting for its batch to commit."""

    prompt_id: int
    table: Any  # the result's mapped class: Pair or Comparison
    values: dict[str, Any]
    written: asyncio.Future[bool] = field(default_factory=lambda: _new_future())


# write(batch) -> the prompt ids whose result was written; raises when the batch could not be.
WriteBatch = Callable[[list[Finished]], Awaitable[set[int]]]


class ResultWriter:
    """Commits finished prompts in batches of at most `max_batch`, one batch in flight at a time."""

    def __init__(self, write: WriteBatch, *, max_batch: int) -> None:
        self.write = write
        self.max_batch = max_batch
        self.pending: list[Finished] = []
        self.has_pending = asyncio.Event()
        self.batches = 0

    async def submit(self, prompt_id: int, table: Any, values: dict[str, Any]) -> bool:
        """Queue one prompt's result and wait for its batch: True if written, False if this
        worker no longer held the prompt's lease."""
        item = Finished(prompt_id, table, values)
        self.pending.append(item)
        self.has_pending.set()
        # A cancelled trajectory stops waiting; its result is still written if its lease holds.
        return await asyncio.shield(item.written)

    async def run(self) -> None:
        """Write batches until cancelled; `flush` drains what is left."""
        while True:
            await self.has_pending.wait()
            await self.flush_once()

    async def flush(self) -> None:
        """Write everything queued now (a stopping worker keeps the pairs it has made)."""
        while self.pending:
            await self.flush_once()

    async def flush_once(self) -> None:
        batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
        if not self.pending:
            self.has_pending.clear()
        if not batch:
            return
        self.batches += 1
        try:
            written = await self.write(batch)
        except asyncio.CancelledError:
            for item in batch:
                _settle(item, exc=asyncio.CancelledError())
            raise
        except Exception as exc:
            if len(batch) == 1 or not _worth_splitting(exc):
                for item in batch:
                    _settle(item, exc=exc)
                return
            # One result the database refuses (it cannot store a value) must fail its own prompt,
            # not the batch: write them one by one.
            log.warning("a batch of %d results failed (%s); writing them one by one", len(batch), exc)
            for item in batch:
                try:
                    _settle(item, written=item.prompt_id in await self.write([item]))
                except Exception as alone:  # noqa: BLE001 - reported to the prompt's trajectory
                    _settle(item, exc=alone)
            return
        for item in batch:
            _settle(item, written=item.prompt_id in written)


def _worth_splitting(exc: Exception) -> bool:
    """Whether a failed batch may hold results that would be written alone: not when the
    database is out of reach (every write fails the same way)."""
    return not isinstance(exc, DatabaseUnavailable)


def _new_future() -> asyncio.Future[bool]:
    future = asyncio.get_running_loop().create_future()
    # A trajectory cancelled while it waited never reads its future: reading the exception here
    # keeps asyncio from logging it as never retrieved (the prompt's fate is in the database).
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


def _settle(item: Finished, *, written: bool = False, exc: BaseException | None = None) -> None:
    if item.written.done():
        return
    if exc is not None:
        item.written.set_exception(exc)
    else:
        item.written.set_result(written)
