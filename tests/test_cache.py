"""signery.cache.BoundedCache: bounded, least recently used first, optional TTL,
consistent under real threads."""

from __future__ import annotations

import threading

import pytest

from signery.cache import BoundedCache


def test_get_and_put() -> None:
    cache: BoundedCache[str, int] = BoundedCache(4)
    assert cache.get("a") is None
    assert cache.put("a", 1) == []
    assert cache.get("a") == 1
    cache.put("a", 2)
    assert cache.get("a") == 2
    assert len(cache) == 1


def test_evicts_the_least_recently_used_and_hands_it_back() -> None:
    cache: BoundedCache[str, int] = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    assert cache.put("c", 3) == [("b", 2)]
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (1, 3)
    assert len(cache) == 2


def test_putting_again_refreshes_recency() -> None:
    cache: BoundedCache[str, int] = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 10)
    assert cache.put("c", 3) == [("b", 2)]


def test_ttl_expires_entries() -> None:
    now = [100.0]
    cache: BoundedCache[str, int] = BoundedCache(8, ttl=5.0, clock=lambda: now[0])
    cache.put("a", 1)
    now[0] = 104.9
    assert cache.get("a") == 1
    now[0] = 105.0
    assert cache.get("a") is None
    assert len(cache) == 0  # dropped when seen
    cache.put("b", 2)
    now[0] = 111.0
    assert cache.pop("b") is None


def test_get_or_make_builds_once_and_caches() -> None:
    cache: BoundedCache[str, int] = BoundedCache(8)
    made: list[str] = []

    def make(key: str) -> int:
        made.append(key)
        return len(key)

    assert cache.get_or_make("abc", make) == 3
    assert cache.get_or_make("abc", make) == 3
    assert made == ["abc"]


def test_get_or_make_caches_nothing_when_making_fails() -> None:
    cache: BoundedCache[str, int] = BoundedCache(8)

    def fail(key: str) -> int:
        raise ValueError(key)

    with pytest.raises(ValueError, match="x"):
        cache.get_or_make("x", fail)
    assert len(cache) == 0


def test_pop_and_take_and_clear() -> None:
    cache: BoundedCache[str, int] = BoundedCache(8)
    for i, key in enumerate("abcd"):
        cache.put(key, i)
    assert cache.pop("a") == 0
    assert cache.pop("a") is None
    assert cache.take(lambda _, v: v % 2 == 1) == [("b", 1), ("d", 3)]
    assert cache.get("c") == 2
    cache.clear()
    assert len(cache) == 0


def test_refuses_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="at least one"):
        BoundedCache(0)
    with pytest.raises(ValueError, match="positive"):
        BoundedCache(1, ttl=0)


def test_stays_bounded_and_consistent_under_threads() -> None:
    """Eight threads putting, getting, popping and evicting at once: the size never
    exceeds the bound, every value read is the one put under its key, and every
    entry put is either still there, popped or handed back as evicted."""
    size, threads, rounds = 64, 8, 4000
    cache: BoundedCache[tuple[int, int], int] = BoundedCache(size)
    start = threading.Barrier(threads)
    errors: list[str] = []
    seen_out: list[set[tuple[int, int]]] = [set() for _ in range(threads)]

    def work(t: int) -> None:
        start.wait()
        for i in range(rounds):
            key = (t, i % 200)
            value = t * 1_000_000 + i % 200
            for old_key, old_value in cache.put(key, value):
                seen_out[t].add(old_key)
                if old_value != old_key[0] * 1_000_000 + old_key[1]:
                    errors.append(f"evicted {old_key} with {old_value}")
            got = cache.get((t, (i * 7) % 200))
            if got is not None and got != t * 1_000_000 + (i * 7) % 200:
                errors.append(f"read {got} under {(t, (i * 7) % 200)}")
            if i % 13 == 0:
                cache.pop((t, (i * 3) % 200))
            if len(cache) > size:
                errors.append("more entries than the bound")

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not any(w.is_alive() for w in workers)
    assert errors == []
    assert len(cache) <= size
    assert any(seen_out)  # eviction did happen


def test_get_or_make_under_threads_returns_one_consistent_value() -> None:
    cache: BoundedCache[int, tuple[int, ...]] = BoundedCache(16)
    start = threading.Barrier(6)
    results: list[tuple[int, ...]] = []
    lock = threading.Lock()

    def work() -> None:
        start.wait()
        for i in range(2000):
            value = cache.get_or_make(i % 40, lambda k: (k, k * k))
            with lock:
                results.append(value)

    workers = [threading.Thread(target=work) for _ in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert len(results) == 6 * 2000
    assert all(v == (v[0], v[0] * v[0]) for v in results)
    assert len(cache) <= 16
