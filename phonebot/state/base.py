"""The one interface both shared-state backends implement (`SharedState`).

It is deliberately made of the few *semantic* operations the server needs, not of raw
get/set: each one is a single atomic step on the backend (one Redis round trip, often a
Lua script), so two processes racing for the last call slot or the same replayed webhook
can never both win. The classes built on it (`admission.CallAdmission`,
`replays.ReplayGuard`, `ratelimit.SharedRateLimiter`, `verdicts.AmdVerdicts`) hold the
policy; the backends only hold the data.

Keys are short names like "replay:CallSid:CA…"; the part before the first ':' is a
namespace (the memory backend bounds each namespace separately, the Redis backend adds
STATE_KEY_PREFIX in front).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Handler = Callable[[str], None]


def stream_token_key(call_sid: str) -> str:
    """The key that marks a call's stream token spent (its stream started, or it ended)."""
    return f"stream:{call_sid}"


class StateUnavailable(RuntimeError):
    """The shared state could not be reached (within REDIS_TIMEOUT_S, never a hang).

    Callers fail closed: a new call hears the busy message, /dialout answers 503, a
    stream whose token can't be checked is refused. Live calls go on.
    """


@dataclass(frozen=True)
class LeaseCounts:
    """Call slots in use: cluster-wide live and reserved leases, and this process's live."""

    live: int
    reserved: int
    process_live: int

    @property
    def in_use(self) -> int:
        return self.live + self.reserved


# What `admit` answers (the caller turns it into a sentence for the log and the stream).
ADMITTED = "ok"
TOKEN_USED = "used"
CLUSTER_FULL = "full"
PROCESS_FULL = "process_full"
DRAINING = "draining"


class SharedState(ABC):
    """Replays, single-use tokens, call leases, rate limits and verdicts, for all processes."""

    backend: str = "?"
    round_trips: int = 0  # backend operations sent by this process (not /health's pings)
    # Called once per failed backend operation, wherever it happens (request or background
    # lease renewal), so /metrics counts every Redis error (server.py sets it).
    on_error: Callable[[], None] | None = None

    # --- once-only keys (replays, single-use things) --------------------------------

    @abstractmethod
    async def claim(self, keys: Sequence[str], ttl_s: float) -> str | None:
        """Set every key for `ttl_s` and return None, or return the first key already set.

        All or none (SET NX EX for each, atomically): two copies of one request can't
        both pass.
        """

    @abstractmethod
    async def forget(self, keys: Sequence[str]) -> None:
        """Delete keys (a request that failed on our side may be tried again)."""

    # --- values with an expiry ------------------------------------------------------

    @abstractmethod
    async def put(self, key: str, value: str, ttl_s: float) -> None: ...

    @abstractmethod
    async def get(self, key: str) -> str | None: ...

    @abstractmethod
    async def announce(
        self, key: str, value: str, ttl_s: float, channel: str, message: str
    ) -> None:
        """`put` the value and tell every process watching `channel` (one round trip)."""

    @abstractmethod
    def watch(self, channel: str, handler: Handler) -> None:
        """Call `handler(message)` in this process for each `announce` on `channel`.

        Best effort (a message sent while Redis is unreachable is lost): readers also
        `get` the key, so a missed message only costs latency.
        """

    def listen(self) -> None:
        """Make sure `watch` handlers get announcements (the Redis backend starts its
        listener on the running event loop); called by readers before they wait."""
        return None

    # --- rate limits ----------------------------------------------------------------

    @abstractmethod
    async def take_token(self, key: str, per_s: float, burst: float) -> float:
        """Spend one token of the bucket `key`: 0, or seconds until one is available."""

    # --- call leases (admission) ----------------------------------------------------

    @abstractmethod
    async def reserve(self, call_sid: str, ttl_s: float, cap: int) -> bool:
        """Hold a slot for a call whose webhook is being answered; False when full."""

    @abstractmethod
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
        """Spend the call's stream token and turn its reservation into a live lease.

        Returns ADMITTED, or why not (TOKEN_USED, PROCESS_FULL, DRAINING, CLUSTER_FULL);
        a reserved call is let in while draining or when the cluster is full (its slot
        is already counted), but never over the per-process cap.
        """

    @abstractmethod
    async def renew(
        self, process: str, call_sids: Sequence[str], lease_ttl_s: float, token_ttl_s: float
    ) -> None:
        """Extend the leases of this process's live calls (re-adding any that were lost,
        e.g. when Redis restarted without persistence)."""

    @abstractmethod
    async def release(self, process: str, call_sid: str) -> None: ...

    @abstractmethod
    async def counts(self, process: str, *, counted: bool = True) -> LeaseCounts:
        """Call slots in use; `counted=False` for /health's look (not in round_trips)."""

    @abstractmethod
    async def still_reserved(self, call_sids: Sequence[str]) -> list[str]:
        """Those of `call_sids` whose reservation has neither been used nor expired."""

    # --- housekeeping ---------------------------------------------------------------

    @abstractmethod
    async def ping(self) -> None:
        """Raise StateUnavailable unless the backend answers (not counted in round_trips)."""

    async def close(self) -> None:
        """Release connections and background tasks."""
        return None

    def describe(self) -> str:
        return self.backend
