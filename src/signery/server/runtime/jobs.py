"""Background work of a server: jobs run every few seconds on a daemon thread.

Every replica runs the same jobs; each job claims its units of work in the
database (a compare-and-set per key), so a unit is done by exactly one replica
however many run. A job takes the current time and returns a small summary;
more jobs (e.g. expiring approval requests) are added to the list given to the
scheduler.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from signery.server.runtime.clock import Clock

log = logging.getLogger("signery.scheduler")

# How long stop() waits for a run under way before giving up on it (the thread
# is a daemon: it never keeps the process alive).
STOP_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    run: Callable[[datetime], Mapping[str, int]]


class Scheduler:
    def __init__(self, *, clock: Clock, interval_seconds: float, jobs: Sequence[Job]) -> None:
        self._clock = clock
        self._interval = interval_seconds
        self._jobs = list(jobs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, job: Job) -> None:
        self._jobs.append(job)

    def run_due(self, now: datetime | None = None) -> dict[str, Mapping[str, int]]:
        """Run every job once; one job failing does not stop the others."""
        now = now or self._clock.now()
        summary: dict[str, Mapping[str, int]] = {}
        for job in self._jobs:
            try:
                summary[job.name] = job.run(now)
            except Exception:
                # Logged and retried at the next run: a database outage must not
                # end the thread.
                log.exception("scheduled job %s failed", job.name)
                summary[job.name] = {"error": 1}
        return summary

    def start(self) -> None:
        """Run the jobs every ``interval_seconds`` (0: never) on a daemon thread."""
        if self._interval <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="signery-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Prompt: the thread sleeps on an event that this sets."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(STOP_TIMEOUT_SECONDS)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.run_due()
