"""Browser sessions of the calls page (`/calls/ui`), kept in the shared state.

The cookie is signed (`phonebot.web.sessions`), but a signature alone can't be taken
back: logging out must end the session on the server too, on every process. So each login
stores its random session id here (`uisession:<id>`, expiring with the session), a request
is logged in only while its id is here, and logging out deletes it. In memory by default
(a restart ends every session); with REDIS_URL every process sees the same sessions.
"""

from __future__ import annotations

from phonebot.state.base import SharedState


def _key(session_id: str) -> str:
    return f"uisession:{session_id}"


async def open_session(shared: SharedState, session_id: str, ttl_s: float) -> None:
    """Remember a new session for `ttl_s` (its cookie's lifetime)."""
    await shared.put(_key(session_id), "1", ttl_s)


async def session_is_open(shared: SharedState, session_id: str) -> bool:
    """Whether the session was opened here and has neither ended nor expired."""
    return await shared.get(_key(session_id)) is not None


async def close_session(shared: SharedState, session_id: str) -> None:
    """End the session on every process (logout)."""
    await shared.forget([_key(session_id)])
