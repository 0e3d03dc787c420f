"""Serving one Twilio Media Stream: verify it, admit it, build its call and run it.

`serve_call` is what the server's `WS /ws` (phonebot.web.media) and Pipecat Cloud's
`bot(runner_args)` (bot.py) both call, so the same code runs self-hosted and on Pipecat
Cloud. `run_bot` builds and runs a call that has already been verified.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import WebSocket
from pipecat.transports.base_transport import BaseTransport

from phonebot.agents.loader import load_agents
from phonebot.agents.selection import AgentSet
from phonebot.ai.providers import build_services
from phonebot.call.deps import CallDeps
from phonebot.call.phone_call import PhoneCall
from phonebot.config import Settings, for_agent, get_settings
from phonebot.ops.metrics import INVALID_STREAM, STREAM
from phonebot.records.recording_store import call_recorder
from phonebot.twilio.stream import (
    CallSession,
    StreamRejected,
    TwilioMarkSerializer,
    accept_twilio_stream,
    reject_stream,
    twilio_transport,
)
from phonebot.twilio.stream_guard import Handshake


async def serve_call(
    websocket: WebSocket,
    settings: Settings,
    *,
    admit: Callable[[CallSession], Awaitable[str | None]] | None = None,
    handshake: Handshake | None = None,
    deps: CallDeps | None = None,
) -> None:
    """Verify a Twilio stream and run its call; a rejected stream is closed, costing nothing.

    `admit` (the server's admission control) may still turn a verified call away, saying
    why: its token was already used, the server is full or shutting down, or the shared
    state can't be reached to check. `handshake` is what a Pipecat runner already parsed
    from the websocket, if it did. `deps` is everything the call needs from its app (the
    app's, or the Pipecat Cloud session's); the stream's refusals count in its metrics.
    """
    deps = deps or CallDeps()
    metrics = deps.metrics
    try:
        call = await accept_twilio_stream(websocket, settings, handshake)
    except StreamRejected as rejection:
        if metrics is not None:
            metrics.call_refused(INVALID_STREAM, STREAM)
        await reject_stream(websocket, str(rejection))
        return
    if admit is not None and (refusal := await admit(call)):
        if metrics is not None:
            metrics.call_refused(refusal, STREAM)
        await reject_stream(websocket, refusal)
        return
    if metrics is not None:
        metrics.call_admitted(STREAM)
    transport, serializer = twilio_transport(websocket, call, settings)
    await run_bot(transport, call, settings, serializer, deps)


async def run_bot(
    transport: BaseTransport,
    session: CallSession,
    settings: Settings | None = None,
    serializer: TwilioMarkSerializer | None = None,
    deps: CallDeps | None = None,
) -> None:
    """Run one call's pipeline until the call ends.

    `serializer` is what lets a transfer keep the caller on the line; without it
    (another transport) the bot simply doesn't offer transfers. `deps` is what the call
    borrows from its app (records, running calls, AMD verdicts, metrics); None: nothing.
    """
    deps = deps or CallDeps()
    settings = settings or get_settings()
    agent = call_agents(deps, settings).select(session.parameters)
    settings = for_agent(settings, agent)
    # RECORD_CALLS: a stereo WAV of the call (phonebot.records.recording); announced.
    recorder = call_recorder(deps.records, session.call_sid, settings)
    agent = agent.announcing_recording() if recorder else agent
    services = build_services(settings, agent, deps.http)
    call = PhoneCall(
        transport,
        session,
        settings,
        agent,
        services,
        serializer=serializer,
        recorder=recorder,
        deps=deps,
    )
    await call.run()


def call_agents(deps: CallDeps, settings: Settings) -> AgentSet:
    """The agents in use: the app's (reloadable), else AGENTS_DIR read now (a test, or a
    Pipecat Cloud session whose bot() was given none)."""
    if deps.agents is not None:
        return deps.agents.current
    return load_agents(Path(settings.agents_dir), settings)
