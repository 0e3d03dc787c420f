"""What every server process shares (in memory, or in Redis with REDIS_URL): replays, call
admission leases, rate limits, the failed-key lockout, web sessions, AMD and warm-transfer
verdicts."""

from __future__ import annotations

import time
from dataclasses import dataclass

from phonebot.config import Settings
from phonebot.state.admission import CallAdmission, StreamGate
from phonebot.state.base import LeaseCounts, SharedState, StateUnavailable
from phonebot.state.memory import Clock, MemoryState
from phonebot.state.ratelimit import AuthLockout, SharedRateLimiter
from phonebot.state.replays import ReplayGuard
from phonebot.state.verdicts import AmdVerdicts, TransferVerdicts

__all__ = [
    "AmdVerdicts",
    "AppState",
    "AuthLockout",
    "CallAdmission",
    "LeaseCounts",
    "MemoryState",
    "ReplayGuard",
    "SharedRateLimiter",
    "SharedState",
    "StateUnavailable",
    "StreamGate",
    "TransferVerdicts",
    "build_app_state",
    "build_state",
]


def build_state(settings: Settings, clock: Clock = time.monotonic) -> SharedState:
    """The backend the settings ask for (`clock` only matters to the memory backend)."""
    if settings.redis_url is not None:
        from phonebot.state.redis import RedisState

        return RedisState(
            settings.redis_url.get_secret_value(),
            prefix=settings.state_key_prefix,
            timeout_s=settings.redis_timeout_s,
        )
    return MemoryState(max_entries=settings.replay_cache_size, clock=clock)


@dataclass
class AppState:
    """Everything an app keeps in the shared state (part of its `AppServices`)."""

    shared: SharedState
    admission: CallAdmission
    replays: ReplayGuard
    dialout_limiter: SharedRateLimiter
    amd_verdicts: AmdVerdicts
    transfer_verdicts: TransferVerdicts
    auth_lockout: AuthLockout


def build_app_state(
    settings: Settings, shared: SharedState | None = None, clock: Clock = time.monotonic
) -> AppState:
    shared = shared or build_state(settings, clock)
    return AppState(
        shared=shared,
        admission=CallAdmission(shared, settings, clock=clock),
        replays=ReplayGuard(
            shared, settings.replay_cache_ttl_s, retry_window_s=settings.webhook_retry_window_s
        ),
        dialout_limiter=SharedRateLimiter(
            shared,
            "dialout",
            settings.dialout_rate_limit_per_minute,
            settings.dialout_rate_limit_burst,
        ),
        amd_verdicts=AmdVerdicts(shared),
        transfer_verdicts=TransferVerdicts(shared),
        auth_lockout=auth_lockout(settings, shared),
    )


def auth_lockout(settings: Settings, shared: SharedState) -> AuthLockout:
    """The lockout after AUTH_FAILURE_LIMIT failed key checks, for AUTH_LOCKOUT_S."""
    return AuthLockout(shared, settings.auth_failure_limit, settings.auth_lockout_s)

