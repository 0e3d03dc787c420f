"""State shared by every server process: one interface, two backends.

What must hold across processes (and machines) behind a load balancer, where Twilio
spreads the hops of one call (webhook, media stream, `/amd`, status callbacks) over
whichever process the balancer picks:

- replays: each signed webhook answered once, a lost answer re-sent on Twilio's retry
  (`replays.ReplayGuard`);
- call admission: a cluster-wide cap and a per-process cap, as leases that expire when
  a process dies, and single-use stream tokens (`admission.CallAdmission`);
- the `/dialout` rate limit (`ratelimit.SharedRateLimiter`) and the lockout after failed
  key checks (`ratelimit.AuthLockout`);
- the calls page's logins (`sessions`), so logging out ends a session everywhere;
- answering-machine verdicts (`verdicts.AmdVerdicts`).

`build_state(settings)` picks the backend: `memory.MemoryState` (default: one process,
nothing to install) or `redis.RedisState` when REDIS_URL is set. `build_app_state`
builds the app's objects on it; they live on the app (`app.state.*`), never in module
globals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from phonebot.config import Settings
from phonebot.state.admission import CallAdmission, StreamGate
from phonebot.state.base import LeaseCounts, SharedState, StateUnavailable
from phonebot.state.memory import Clock, MemoryState
from phonebot.state.ratelimit import AuthLockout, SharedRateLimiter
from phonebot.state.replays import ReplayGuard
from phonebot.state.verdicts import AmdVerdicts

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
    "app_auth_lockout",
    "app_shared_state",
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
    """Everything an app keeps in the shared state (put on `app.state` by server.py)."""

    shared: SharedState
    admission: CallAdmission
    replays: ReplayGuard
    dialout_limiter: SharedRateLimiter
    amd_verdicts: AmdVerdicts
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
        auth_lockout=auth_lockout(settings, shared),
    )


def auth_lockout(settings: Settings, shared: SharedState) -> AuthLockout:
    """The lockout after AUTH_FAILURE_LIMIT failed key checks, for AUTH_LOCKOUT_S."""
    return AuthLockout(shared, settings.auth_failure_limit, settings.auth_lockout_s)


def app_shared_state(app_state: Any) -> SharedState:
    """The app's shared state (`app.state.shared`, set by server.py's `create_app`).

    An app assembled from the routers alone (a test's, a tool's) gets the one its settings
    pick (`build_state`) on first use, kept on the app like everything else.
    """
    shared = getattr(app_state, "shared", None)
    if shared is None:
        shared = app_state.shared = build_state(app_state.settings)
    return shared


def app_auth_lockout(app_state: Any) -> AuthLockout:
    """The app's `auth_lockout` (from `build_app_state`), made on first use when absent."""
    lockout = getattr(app_state, "auth_lockout", None)
    if lockout is None:
        lockout = app_state.auth_lockout = auth_lockout(
            app_state.settings, app_shared_state(app_state)
        )
    return lockout
