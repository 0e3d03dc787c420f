"""Running a call's post-call analysis once the call is over, and handing it to its record.

A call whose agent has an `analysis:` block gets one when it ends (`post_call_analysis`,
built in `PhoneCall._finish` from what the call saw: its LLM context, the outcomes it
recorded, how it ended). It never delays the hang-up or holds the call's slot: on the
server it runs in the app's `AnalysisJobs` (drained, with a bounded wait, after the calls
at shutdown); with no app (Pipecat Cloud's `bot()`) it is awaited after the call has ended.

With an LLM (the call's LLM provider is "openai": OPENAI_API_KEY or OPENAI_BASE_URL) it is
ONE chat completion (phonebot.agents.analysis says what is asked and how the answer is
read), tried up to ATTEMPTS times with backoff on a network error, a timeout, a 5xx, a
429 or an answer that isn't the JSON asked for; if every try fails, the extractive
analysis is stored instead and says why (`method`, `error`). Without an LLM the
extractive analysis is all there is. The result goes to the record (`analysis`,
`success`) and out as a signed `call.analyzed` event (phonebot.records.writer).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from loguru import logger

from phonebot.agents.agent import Agent
from phonebot.agents.analysis import (
    AnalysisError,
    CallFacts,
    analysis_messages,
    conversation,
    extractive_analysis,
    parse_analysis,
)
from phonebot.agents.spec import AnalysisSpec
from phonebot.ai.providers import chosen_providers
from phonebot.config import Settings
from phonebot.records.call_log import CallLog
from phonebot.records.events import backoff_s

OPENAI_BASE_URL = "https://api.openai.com/v1"
# Tries of the one request, and the wait before try n+1: BACKOFF_S * 2**(n-1), shortened by
# up to half at random (so analyses failing together don't retry in lockstep).
ATTEMPTS = 3
BACKOFF_S = 1.0
BACKOFF_CAP_S = 30.0
# HTTP statuses worth another try (besides 5xx): timeout, conflict, rate limit. Any other
# 4xx (a wrong key, a model that doesn't exist) would fail the same way again.
RETRY_STATUSES = frozenset({408, 409, 429})
# At shutdown, once the calls have drained: how long analyses still running may finish
# before each is cut short (and stores its extractive analysis instead).
SHUTDOWN_WAIT_S = 5.0
CUT_SHORT = "cut short: the server shut down"


class RequestFailed(Exception):
    """One try of the request failed; `reason` is a status or a kind, never a body (it
    may quote the call), and `retry` whether another try may do better."""

    def __init__(self, reason: str, retry: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry


@dataclass(frozen=True)
class ChatEndpoint:
    """The OpenAI-compatible chat completions endpoint the call's LLM uses."""

    base_url: str
    model: str
    api_key: str = field(repr=False)  # never in a log line or a traceback
    timeout_s: float

    @classmethod
    def of(cls, settings: Settings) -> ChatEndpoint:
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else ""
        return cls(
            base_url=settings.openai_base_url or OPENAI_BASE_URL,
            model=settings.openai_model,
            # Local OpenAI-compatible servers (Ollama, vLLM) accept any key, as for calls.
            api_key=key or "not-needed",
            timeout_s=settings.llm_timeout_s,
        )

    async def complete(self, client: httpx.AsyncClient, messages: list[dict[str, str]]) -> str:
        """One non-streamed chat completion; its text, or RequestFailed.

        JSON mode (`response_format: json_object`) asks for a JSON object only
        (https://platform.openai.com/docs/guides/structured-outputs#json-mode); the prompt
        says "JSON", which the mode requires.
        """
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": 0,
            "response_format": {"type": "json_object"},
        }
        headers = {"Authorization": f"Bearer {self.api_key}"}
        try:
            response = await client.post(
                f"{self.base_url}/chat/completions", json=body, headers=headers,
                timeout=self.timeout_s,
            )  # fmt: skip
        except httpx.TimeoutException:
            raise RequestFailed("timed out") from None
        except httpx.HTTPError as error:
            raise RequestFailed(type(error).__name__) from None
        status = response.status_code
        if status >= 300:
            raise RequestFailed(f"HTTP {status}", status >= 500 or status in RETRY_STATUSES)
        try:
            text = response.json()["choices"][0]["message"]["content"]
        except (ValueError, LookupError, TypeError):
            raise RequestFailed("not a chat completion") from None
        if not isinstance(text, str):
            raise RequestFailed("a completion without text")
        return text


@asynccontextmanager
async def _client_or_own(client: httpx.AsyncClient | None) -> AsyncIterator[httpx.AsyncClient]:
    """`client` as it is (the pool outlives the analysis), or one closed afterwards."""
    if client is not None:
        yield client
        return
    async with httpx.AsyncClient() as own:
        yield own


async def llm_analysis(
    spec: AnalysisSpec,
    facts: CallFacts,
    endpoint: ChatEndpoint,
    *,
    call_sid: str = "",
    client: httpx.AsyncClient | None = None,
    attempts: int = ATTEMPTS,
    base_backoff_s: float = BACKOFF_S,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """The LLM's analysis of the call, retried; the extractive one (with `error`) when
    every try failed. `attempts` in the result counts the requests made. `client`: the
    process's pool (phonebot.ai.http_pool); None: a client of its own for this analysis."""
    messages, rng = analysis_messages(spec, facts), rng or random.Random()
    error, attempt = "", 0
    async with _client_or_own(client) as client:
        for attempt in range(1, attempts + 1):
            retry = True
            try:
                text = await endpoint.complete(client, messages)
                return {**parse_analysis(text, spec, facts), "attempts": attempt}
            except RequestFailed as failure:
                error, retry = failure.reason, failure.retry
            except AnalysisError as bad:
                error = f"bad answer: {bad}"
            if not retry or attempt == attempts:
                break
            logger.info(f"Call {call_sid}: analysis try {attempt} failed ({error}); retrying")
            await asyncio.sleep(backoff_s(attempt, rng, base_backoff_s, BACKOFF_CAP_S))
    tries = f"{attempt} {'try' if attempt == 1 else 'tries'}"
    logger.warning(
        f"Call {call_sid}: the LLM's analysis failed after {tries} ({error});"
        " storing the extractive analysis"
    )
    fallback = extractive_analysis(spec, facts, error=f"{error} (after {tries})")
    return {**fallback, "attempts": attempt}


@dataclass(frozen=True)
class PostCallAnalysis:
    """One ended call's analysis, ready to run: its spec, what the call saw, its settings
    (the agent's: which LLM) and its log (where the result goes)."""

    spec: AnalysisSpec
    facts: CallFacts
    settings: Settings
    call_log: CallLog
    client: httpx.AsyncClient | None = None  # the process's pool (None: its own client)

    @property
    def call_sid(self) -> str:
        return self.call_log.call_sid

    async def analyse(self) -> dict[str, Any]:
        """With the call's LLM when it is OpenAI-compatible, else extractive."""
        if chosen_providers(self.settings).llm != "openai":
            return {**extractive_analysis(self.spec, self.facts), "attempts": 0}
        endpoint = ChatEndpoint.of(self.settings)
        return await llm_analysis(
            self.spec, self.facts, endpoint, call_sid=self.call_sid, client=self.client
        )

    async def run(self) -> dict[str, Any]:
        """Analyse and store the result. Never raises but for cancellation, and even then
        (a shutdown cutting it short) the extractive analysis is stored first."""
        try:
            analysis = await self.analyse()
        except asyncio.CancelledError:
            self._store({**extractive_analysis(self.spec, self.facts, CUT_SHORT), "attempts": 0})
            raise
        except Exception as error:  # a bug here must not lose the call's analysis
            logger.exception(f"Call {self.call_sid}: post-call analysis failed")
            reason = f"analysis failed: {type(error).__name__}"
            analysis = {**extractive_analysis(self.spec, self.facts, reason), "attempts": 0}
        self._store(analysis)
        return analysis

    def _store(self, analysis: dict[str, Any]) -> None:
        success = (analysis.get("success") or {}).get("value")
        logger.info(
            f"Call {self.call_sid} analyzed ({analysis['method']}"
            f"{', ' + analysis['error'] if analysis.get('error') else ''}): success={success}"
        )
        self.call_log.analyzed(self.facts.agent, analysis)


def post_call_analysis(
    agent: Agent,
    settings: Settings,
    call_log: CallLog,
    *,
    direction: str,
    messages: list[Any],
    end_reason: str,
    duration_s: float,
    client: httpx.AsyncClient | None = None,
) -> PostCallAnalysis | None:
    """The analysis of a call that just ended, or None: its agent asks for none, or the
    call leaves no record to put it on (records off)."""
    if agent.analysis is None or not call_log.enabled:
        return None
    facts = CallFacts(
        agent=agent.name,
        direction=direction,
        messages=conversation(messages),
        end_reason=end_reason,
        duration_s=duration_s,
        outcomes=dict(call_log.outcomes),
    )
    return PostCallAnalysis(agent.analysis, facts, settings, call_log, client)


class AnalysisJobs:
    """The app's post-call analyses still running (its services' `analyses`): started as
    calls end, so no call waits for one; at shutdown, after the calls have drained, given
    `SHUTDOWN_WAIT_S` to finish (`drain`)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def submit(self, analysis: PostCallAnalysis) -> None:
        """Run `analysis` in the background (a task of the app's loop, kept until done)."""
        task = asyncio.get_running_loop().create_task(
            analysis.run(), name=f"analysis-{analysis.call_sid}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float = SHUTDOWN_WAIT_S) -> int:
        """Wait at most `timeout_s` for the running analyses, then cut the rest short (each
        stores its extractive analysis); returns how many were cut short."""
        if not self._tasks:
            return 0
        logger.info(f"Shutdown: waiting up to {timeout_s:g} s for {len(self)} call analyses")
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            logger.warning(
                f"Shutdown: {len(pending)} call analyses cut short; their records hold the"
                " extractive analysis"
            )
        return len(pending)
