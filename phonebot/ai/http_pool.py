"""One pool of HTTP connections per server process for its calls' outbound requests.

Why: Pipecat's OpenAI services each build their own `AsyncOpenAI` client, and with it a
fresh TLS context (loading the CA bundle: 10-15 ms of CPU each); a call built three, and
its post-call analysis one more. Profiled with py-spy while 40 calls started within a
second (`bench/load.py --pattern burst`, docs/scaling.md "Where the time went"), building
those contexts was a third of the server's CPU, and every greeting waited behind them.
One pool per process pays for its TLS context once, and keeps connections to the AI
provider open between calls, so a call's first request skips the TCP and TLS handshakes
too (OpenAI's advice: reuse one client, https://github.com/openai/openai-python#configuring-the-http-client).

The pool holds sockets of one event loop, so it belongs to the app (its `AppServices`,
closed by the lifespan) and reaches a call through its `CallDeps`; a call without one
(a test, a Pipecat Cloud session) builds its clients as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import httpx2
from openai import DefaultAsyncHttpxClient

__all__ = ["HttpPool"]

# Pipecat's own limits for an OpenAI LLM client (BaseOpenAILLMService.create_client), now
# for every call of the process together.
MAX_CONNECTIONS = 1000
MAX_KEEPALIVE = 100
# Long enough to span the gap between two turns of a call (one every 6-10 s), short
# enough that a provider's load balancer never closes a connection we think is open.
KEEPALIVE_EXPIRY_S = 30.0


@dataclass(frozen=True)
class HttpPool:
    """The process's HTTP clients: `openai` for the OpenAI SDK's services (it takes only
    its own `httpx2` clients), `web` for plain requests (the post-call analysis)."""

    openai: httpx2.AsyncClient
    web: httpx.AsyncClient

    @classmethod
    def build(cls) -> HttpPool:
        """Both clients, with no connection yet (they connect on first use); the same
        limits, in each library's own `Limits`."""
        limits = {
            "max_connections": MAX_CONNECTIONS,
            "max_keepalive_connections": MAX_KEEPALIVE,
            "keepalive_expiry": KEEPALIVE_EXPIRY_S,
        }
        return cls(
            openai=DefaultAsyncHttpxClient(limits=httpx2.Limits(**limits)),
            web=httpx.AsyncClient(limits=httpx.Limits(**limits)),
        )

    async def aclose(self) -> None:
        """Close every connection (the app's lifespan, once its calls have drained)."""
        await self.openai.aclose()
        await self.web.aclose()
