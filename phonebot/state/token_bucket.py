"""Token buckets: the arithmetic of every rate limit, in-process.

Used per call in audio seconds (rate 1: real time) and key presses
(`phonebot.twilio.stream_guard`), per client for the calls page's logins
(`phonebot.web.calls_ui`), and by the memory backend of the shared state for `/dialout`
(the Redis backend runs the same arithmetic in a Lua script).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import LRUCache

Clock = Callable[[], float]
# Clients tracked by a RateLimiter; beyond this the least recently seen is forgotten.
MAX_TRACKED_CLIENTS = 10_000


class TokenBucket:
    """Refills at `rate` per second up to `burst`; `admit(cost)` spends it or refuses.

    A legit peer averages at most the rate, so only one sending faster, beyond the
    burst, is ever refused.
    """

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic):
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def admit(self, cost: float) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if cost > self._tokens:
            return False
        self._tokens -= cost
        return True

    def wait_s(self, cost: float) -> float:
        """After a refused `admit(cost)`: seconds until `cost` would be admitted."""
        return max(0.0, cost - self._tokens) / self._rate


class RateLimiter:
    """One token bucket per key: `burst` requests at once, refilled at `per_minute`.

    The table is an LRU (cachetools) of at most `max_keys` buckets, so a scan from many
    addresses costs bounded memory; a forgotten key simply starts again with a full bucket.
    """

    def __init__(
        self,
        per_minute: float,
        burst: float,
        max_keys: int = MAX_TRACKED_CLIENTS,
        clock: Clock = time.monotonic,
    ):
        self.per_minute = per_minute
        self.burst = burst
        self._clock = clock
        self._buckets: LRUCache[str, TokenBucket] = LRUCache(maxsize=max_keys)

    def retry_after(self, key: str) -> float:
        """Take a token for `key`: 0 when allowed, else seconds until one is available."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.per_minute / 60.0, self.burst, self._clock)
            self._buckets[key] = bucket
        return 0.0 if bucket.admit(1) else bucket.wait_s(1)

    def __len__(self) -> int:
        return len(self._buckets)
