"""Rate limits shared by every process (the `/dialout` limit: `app.state.dialout_limiter`).

A token bucket per client, kept in the shared state (a Lua script on Redis, so two
processes spend from one bucket and a client can't double its rate by being balanced
across them): `burst` requests at once, refilled at `per_minute`.
"""

from __future__ import annotations

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
