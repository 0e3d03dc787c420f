"""Each signed webhook is answered once, on whichever process it lands.

Keys are the CallSid (covered by the signature, so a captured request can't be altered
to dodge it) and Twilio's `I-Twilio-Idempotency-Token` header (not signed, so only a
second line of defence), claimed with SET NX EX for REPLAY_CACHE_TTL_S.

Twilio's own retries: Twilio retries a webhook when it got no usable answer (could not
connect, timed out, or, with connection overrides, a 5xx), and every try carries the same
`I-Twilio-Idempotency-Token` (https://www.twilio.com/docs/usage/webhooks/webhooks-connection-overrides).
A request that never reached us is not remembered, and one that failed here with an
exception is forgotten, so both retries are answered afresh. A retry of a request we
*did* answer (its answer lost on the way) gets that same answer again (`answer_for_retry`:
same TwiML, same stream token, no second call reservation) within WEBHOOK_RETRY_WINDOW_S,
even when the retry lands on another process; a replay with another or no idempotency
token, or after the window, still gets 409.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from fastapi import Request

from phonebot.state.base import SharedState

IDEMPOTENCY_HEADER = "i-twilio-idempotency-token"
REPLAY = "replay:"
ANSWER = "answer:"


class ReplayGuard:
    """The app's `replays`: claims of signed webhooks, and the answers kept for retries.

    `retry_window_s` (WEBHOOK_RETRY_WINDOW_S, at most `ttl_s`) is how long an answer is
    kept for Twilio's retry of the same request.
    """

    def __init__(self, shared: SharedState, ttl_s: float, retry_window_s: float | None = None):
        self._shared = shared
        self._ttl_s = ttl_s
        self._window_s = ttl_s if retry_window_s is None else min(retry_window_s, ttl_s)

    @staticmethod
    def idempotency_token(request: Request) -> str | None:
        token = request.headers.get(IDEMPOTENCY_HEADER)
        return token[:128] if token else None

    async def answer_for_retry(self, request: Request, call_sid: str) -> str | None:
        """The TwiML we gave this request, when it is Twilio retrying one we answered.

        A retry is the same `I-Twilio-Idempotency-Token`, on the same path, for the same
        CallSid (both covered by the signature), within the retry window.
        """
        token = self.idempotency_token(request)
        stored = await self._shared.get(ANSWER + token) if token else None
        if stored is None:
            return None
        answer = json.loads(stored)
        if (answer["path"], answer["call_sid"]) != (request.url.path, call_sid):
            return None
        return answer["body"]

    async def remember_answer(self, request: Request, call_sid: str, body: str) -> None:
        """Keep the answer to a request carrying an idempotency token for its retries."""
        if token := self.idempotency_token(request):
            answer = {"path": request.url.path, "call_sid": call_sid, "body": body}
            await self._shared.put(ANSWER + token, json.dumps(answer), self._window_s)

    @classmethod
    def keys(cls, request: Request, call_sid: str | None) -> list[str]:
        keys = [f"CallSid:{call_sid}"] if call_sid else []
        token = cls.idempotency_token(request)
        return keys + ([f"Idempotency:{token}"] if token else [])

    async def claim(self, keys: Sequence[str]) -> str | None:
        """Remember `keys` and return None, or return the first key already seen (atomic:
        two copies of one request, on one process or two, can't both pass)."""
        found = await self._shared.claim([REPLAY + key for key in keys], self._ttl_s)
        return found.removeprefix(REPLAY) if found else None

    async def forget(self, keys: Sequence[str]) -> None:
        """Let a request that failed on our side be retried."""
        stored = [REPLAY + key for key in keys]
        stored += [
            ANSWER + key.split(":", 1)[1] for key in keys if key.startswith("Idempotency:")
        ]
        await self._shared.forget(stored)
