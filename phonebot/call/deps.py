"""What a call borrows from the app it runs in: records, the running-calls registry, verdicts,
metrics, the background jobs its post-call analysis runs in.

One object, built by whoever accepts the stream (the server's `/ws`, or `bot()` on Pipecat
Cloud) and handed down unchanged through `serve_call` and `run_bot` (phonebot.call.serve) to
the `PhoneCall`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from phonebot.agents.selection import AgentSet
    from phonebot.ai.http_pool import HttpPool
    from phonebot.call.analysis import PostCallAnalysis
    from phonebot.call.control import CallControl
    from phonebot.ops.metrics import Metrics
    from phonebot.records.writer import RecordWriter
    from phonebot.state import AmdVerdicts, TransferVerdicts


class Agents(Protocol):
    """Where a call finds the agents in use (phonebot.agents.registry.AgentRegistry): read
    once when the call starts, so a reload never changes a live call."""

    @property
    def current(self) -> AgentSet: ...


class CallRegistry(Protocol):
    """The app's running calls (phonebot.web.shutdown.ActiveCalls): a shutdown asks each of
    them to say goodbye."""

    def add(self, call_sid: str, control: CallControl) -> None: ...

    def discard(self, call_sid: str) -> None: ...


class AnalysisRunner(Protocol):
    """Where a call's post-call analysis runs once the call has ended
    (phonebot.call.analysis.AnalysisJobs, the app's): in the background, so neither the
    hang-up nor the call's slot waits for it."""

    def submit(self, analysis: PostCallAnalysis) -> None: ...


@dataclass(frozen=True)
class CallDeps:
    """The app's services a call uses; None where it has none (a test, or Pipecat Cloud
    without a shared database or REDIS_URL).

    `agents` is the app's reloadable agent set (None: AGENTS_DIR is read for the call),
    `records` is the record writer the call only enqueues to (None: the call leaves no
    record), `calls` the registry of running calls, `verdicts` where answering-machine
    verdicts arrive, `metrics` the app's /metrics, `analyses` where post-call analyses run
    (None: the call awaits its own once it has ended, as in Pipecat Cloud's `bot()`),
    `http` the process's HTTP connection pool its AI services and analysis share (None:
    each builds its own client). `transfers` is where warm transfers' verdicts meet
    (None: no warm transfer, a cold one instead) and `base_url` this server as Twilio
    reaches it (a warm transfer's person is called through its webhook; None: PUBLIC_URL).
    """

    agents: Agents | None = None
    records: RecordWriter | None = None
    calls: CallRegistry | None = None
    verdicts: AmdVerdicts | None = None
    transfers: TransferVerdicts | None = None
    base_url: str | None = None
    metrics: Metrics | None = None
    analyses: AnalysisRunner | None = None
    http: HttpPool | None = None
