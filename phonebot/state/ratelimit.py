"""Rate limits shared by every process: the `/dialout` limit (the app's `dialout_limiter`)
and the lockout after failed key checks (the app's `auth_lockout`).

A token bucket per client, kept in the shared state (a Lua script on Redis, so two
processes spend from one bucket and a client can't double its rate by being balanced
across them): `burst` requests at once, refilled at `per_minute`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from phonebot.state.base import SharedState


class SharedRateLimiter:
    """Token buckets named `rate:<name>:<client>`."""

    def __init__(self, shared: SharedState, name: str, per_minute: float, burst: int):
        self._shared = shared
        self._name = name
        self.per_minute = per_minute
        self.burst = burst

    async def retry_after(self, key: str) -> float:
        """Take a token for `key`: 0 when allowed, else seconds until one is available.

        Raises StateUnavailable when the shared state can't be reached.
        """
        return await self._shared.take_token(
            f"rate:{self._name}:{key}", self.per_minute / 60.0, self.burst
        )


class AuthLockout:
    """Failed key checks per client, shared by every process (the app's `auth_lockout`).

    Each failure spends a token of the client's bucket (`rate:authfail:<client>`, holding
    `limit - 1` tokens and refilled at `limit` per `lockout_s`), so the `limit`-th failure
    in a burst finds it empty and locks the client out for `lockout_s`: a lock key
    (`authlock:<client>`) whose value is its wall-clock end, so any process can answer
    Retry-After. While it lives every key check of that client is refused, the right key
    included; otherwise a guesser would learn it was right from the one answer that isn't
    a 429. Only failures spend tokens: a client that knows its key is never slowed down.
    """

    def __init__(
        self,
        shared: SharedState,
        limit: int,
        lockout_s: float,
        wall: Callable[[], float] = time.time,
    ):
        self._shared = shared
        self.limit = limit
        self.lockout_s = lockout_s
        self._wall = wall

    async def locked_for(self, client: str) -> float:
        """Seconds this client stays locked out, 0 when it isn't (one read)."""
        until = await self._shared.get(f"authlock:{client}")
        if until is None:
            return 0.0
        return max(1.0, float(until) - self._wall())

    async def failed(self, client: str) -> float:
        """Count one failed key check: seconds of lockout it started, 0 when none."""
        per_s = self.limit / self.lockout_s
        if not await self._shared.take_token(f"rate:authfail:{client}", per_s, self.limit - 1):
            return 0.0
        until = self._wall() + self.lockout_s
        await self._shared.put(f"authlock:{client}", repr(until), self.lockout_s)
        return self.lockout_s
