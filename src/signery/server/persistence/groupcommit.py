"""The loop of a group-commit writer thread, shared by the audit recorder and the
usage-limit reservations.

The thread blocks for one piece of work, then takes everything else that queued
up meanwhile (while its previous transaction was committing), up to a limit,
and hands the lot to ``write`` for one transaction: under load one commit (one
fsync on SQLite) covers many requests; alone, a request is written at once.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Put on the queue to end the loop once everything queued before it is written.
STOP = object()


def run_writer(
    work: queue.SimpleQueue[T | object],
    write: Callable[[list[T]], None],
    batch_max: int,
    size: Callable[[T], int] = lambda _: 1,
) -> None:
    """Write batches from ``work`` until ``STOP`` comes (in the writer thread)."""
    stopping = False
    while not stopping:
        item = work.get()
        if item is STOP:
            return
        batch: list[T] = [item]  # type: ignore[list-item]  # anything but STOP is a T
        count = size(batch[0])
        while count < batch_max:
            try:
                nxt = work.get_nowait()
            except queue.Empty:
                break
            if nxt is STOP:
                stopping = True
                break
            batch.append(nxt)  # type: ignore[arg-type]  # anything but STOP is a T
            count += size(batch[-1])
        write(batch)
