"""One bounded, thread-safe, least-recently-used cache for the whole code base.

Every in-process cache here (parsed key policies, verified access tokens, parsed
public keys and chains, per-source refusal windows, per-client rate buckets) is a
:class:`BoundedCache`. Its invariants:

* **Bounded**: at most ``max_size`` entries; putting one more evicts the least
  recently used, and ``put`` hands the evicted entries back (a caller that must
  not lose what they hold, such as unwritten audit summaries, writes them).
* **Thread-safe**: every method holds one lock for a few dictionary operations
  and calls no code of the caller while holding it (but ``take``'s cheap test).
  ``get_or_make`` builds a missing value *outside* the lock (two threads may
  build the same value once each: callers cache pure functions of their key, so
  either result is right), so one slow parse never stalls every other reader.
* **Optional time to live**: with ``ttl`` (seconds, on ``clock``, monotonic by
  default) an entry older than that is gone for ``get``, and dropped when seen.

Compound updates of a mutable value (a rate bucket spends a token) are the
caller's to serialize; the cache only keeps the map consistent and bounded.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """At most ``max_size`` entries, least recently used evicted first, each
    forgotten ``ttl`` seconds after it was put (never, without ``ttl``). Values
    are never None (``get`` answers None for a missing entry)."""

    __slots__ = ("_clock", "_entries", "_lock", "_ttl", "max_size")

    def __init__(
        self,
        max_size: int,
        *,
        ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 1:
            raise ValueError("a bounded cache holds at least one entry")
        if ttl is not None and ttl <= 0:
            raise ValueError("a time to live must be positive")
        self.max_size = max_size
        self._ttl = ttl
        self._clock = clock
        # key -> (value, expiry on ``clock`` or None), least recently used first.
        self._entries: OrderedDict[K, tuple[V, float | None]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: K) -> V | None:
        """The value under ``key`` (now the most recently used), or None when it is
        missing or expired."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[1] is not None and entry[1] <= self._clock():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: K, value: V) -> list[tuple[K, V]]:
        """Store ``value`` under ``key`` (the most recently used); the entries evicted
        to stay within ``max_size``, least recently used first."""
        expires = None if self._ttl is None else self._clock() + self._ttl
        evicted: list[tuple[K, V]] = []
        with self._lock:
            self._entries[key] = (value, expires)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_size:
                old_key, (old_value, _) = self._entries.popitem(last=False)
                evicted.append((old_key, old_value))
        return evicted

    def get_or_make(self, key: K, make: Callable[[K], V]) -> V:
        """The cached value, or ``make(key)`` cached (built outside the lock; an
        exception from ``make`` caches nothing)."""
        found = self.get(key)
        if found is not None:
            return found
        made = make(key)
        self.put(key, made)
        return made

    def pop(self, key: K) -> V | None:
        """Remove and return the value under ``key`` (None when missing or expired)."""
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is None or (entry[1] is not None and entry[1] <= self._clock()):
            return None
        return entry[0]

    def take(self, select: Callable[[K, V], bool]) -> list[tuple[K, V]]:
        """Remove and return every live entry for which ``select(key, value)`` is
        true, least recently used first (expired entries are dropped). ``select``
        runs under the lock: keep it a cheap, pure test."""
        now = self._clock()
        taken: list[tuple[K, V]] = []
        with self._lock:
            for key, (value, expires) in list(self._entries.items()):
                if expires is not None and expires <= now:
                    del self._entries[key]
                elif select(key, value):
                    del self._entries[key]
                    taken.append((key, value))
        return taken

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
