"""The in-memory backend: the default, for one server process, with nothing to install.

Everything lives in cachetools caches with per-item expiry (`TLRUCache`), one per key
namespace, each bounded (REPLAY_CACHE_SIZE entries), so a flood of webhooks or AMD
callbacks for calls that never stream costs bounded memory. The clock is injectable so
tests can move time instead of sleeping. There is no await inside an operation, so each
one is atomic on the event loop, exactly like the Redis backend's scripts are on Redis.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from cachetools import TLRUCache

from phonebot.state.base import (
    ADMITTED,
    CLUSTER_FULL,
    DRAINING,
    PROCESS_FULL,
    TOKEN_USED,
    Handler,
    LeaseCounts,
    SharedState,
    stream_token_key,
)
from phonebot.state.token_bucket import Clock, RateLimiter

MAX_LEASES = 100_000


def _expiry(_key: str, entry: tuple[str, float], now: float) -> float:
    return now + entry[1]


def ttl_cache(max_entries: int, clock: Clock) -> TLRUCache:
    """A cache whose entries are (value, ttl_s) and expire ttl_s after being set."""
    return TLRUCache(maxsize=max_entries, ttu=_expiry, timer=clock)


class MemoryState(SharedState):
    backend = "memory"

    def __init__(self, max_entries: int = 10_000, clock: Clock = time.monotonic):
        self._max_entries = max_entries
        self._clock = clock
        self._tables: dict[str, TLRUCache] = {}
        # One in-process RateLimiter (an LRU of token buckets) per rate.
        self._limiters: dict[tuple[float, float], RateLimiter] = {}
        self._live = ttl_cache(MAX_LEASES, clock)  # call_sid -> (process, ttl)
        self._reserved = ttl_cache(MAX_LEASES, clock)  # call_sid -> ("", ttl)
        self._handlers: dict[str, list[Handler]] = {}
        self.round_trips = 0

    def _table(self, key: str) -> TLRUCache:
        namespace = key.split(":", 1)[0]
        table = self._tables.get(namespace)
        if table is None:
            table = self._tables[namespace] = ttl_cache(self._max_entries, self._clock)
        return table

    def size(self, namespace: str) -> int:
        """Entries alive in one namespace (for tests of the bounds)."""
        table = self._tables.get(namespace)
        return len(table) if table is not None else 0

    async def claim(self, keys: Sequence[str], ttl_s: float) -> str | None:
        self.round_trips += 1
        for key in keys:
            if key in self._table(key):
                return key
        for key in keys:
            self._table(key)[key] = ("1", ttl_s)
        return None

    async def forget(self, keys: Sequence[str]) -> None:
        self.round_trips += 1
        for key in keys:
            self._table(key).pop(key, None)

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        self.round_trips += 1
        self._table(key)[key] = (value, ttl_s)

    async def get(self, key: str) -> str | None:
        self.round_trips += 1
        entry = self._table(key).get(key)
        return None if entry is None else entry[0]

    async def announce(
        self, key: str, value: str, ttl_s: float, channel: str, message: str
    ) -> None:
        await self.put(key, value, ttl_s)
        for handler in list(self._handlers.get(channel, ())):
            handler(message)

    def watch(self, channel: str, handler: Handler) -> None:
        self._handlers.setdefault(channel, []).append(handler)

    async def take_token(self, key: str, per_s: float, burst: float) -> float:
        self.round_trips += 1
        limiter = self._limiters.get((per_s, burst))
        if limiter is None:
            limiter = RateLimiter(per_s * 60.0, burst, clock=self._clock)
            self._limiters[(per_s, burst)] = limiter
        return limiter.retry_after(key)

    async def reserve(self, call_sid: str, ttl_s: float, cap: int) -> bool:
        self.round_trips += 1
        if call_sid in self._live:
            return True
        if call_sid not in self._reserved and len(self._live) + len(self._reserved) >= cap:
            return False
        self._reserved[call_sid] = ("", ttl_s)
        return True

    async def admit(
        self,
        call_sid: str,
        process: str,
        *,
        token_ttl_s: float,
        lease_ttl_s: float,
        cap: int,
        process_cap: int,
        draining: bool,
    ) -> str:
        self.round_trips += 1
        token = stream_token_key(call_sid)
        if token in self._table(token) or call_sid in self._live:
            return TOKEN_USED
        reserved = self._reserved.pop(call_sid, None) is not None
        if self._process_live(process) >= process_cap:
            return PROCESS_FULL
        if not reserved and draining:
            return DRAINING
        if not reserved and len(self._live) + len(self._reserved) >= cap:
            return CLUSTER_FULL
        self._table(token)[token] = ("1", token_ttl_s)
        self._live[call_sid] = (process, lease_ttl_s)
        return ADMITTED

    async def renew(
        self, process: str, call_sids: Sequence[str], lease_ttl_s: float, token_ttl_s: float
    ) -> None:
        self.round_trips += 1
        for call_sid in call_sids:
            self._live[call_sid] = (process, lease_ttl_s)

    async def release(self, process: str, call_sid: str) -> None:
        self.round_trips += 1
        self._live.pop(call_sid, None)

    async def counts(self, process: str, *, counted: bool = True) -> LeaseCounts:
        self.round_trips += counted
        return LeaseCounts(len(self._live), len(self._reserved), self._process_live(process))

    async def still_reserved(self, call_sids: Sequence[str]) -> list[str]:
        self.round_trips += 1
        return [sid for sid in call_sids if sid in self._reserved]

    def _process_live(self, process: str) -> int:
        self._live.expire()
        return sum(1 for owner, _ in self._live.values() if owner == process)

    async def ping(self) -> None:
        return None
