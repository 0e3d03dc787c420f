"""Pipecat Cloud's entry point: `bot(runner_args)` runs one Twilio call, as the server's `/ws` does.

A call, from here down:

- `phonebot.call.serve.serve_call` verifies the stream and admits it;
- `phonebot.call.serve.run_bot` picks the persona and services and builds the call;
- `phonebot.call.phone_call.PhoneCall` holds the call's parts and answers its events;
- `phonebot.call.pipeline.call_pipeline` puts the parts in order:

    transport.input() → STT → keypad digits → user aggregator (Silero VAD + Smart Turn) → LLM → TTS
        → transport.output() → turn timer → assistant aggregator
"""

from __future__ import annotations

# First: loguru's default handler without local variables in tracebacks (phonebot.ops.log_start).
import phonebot.ops.log_start  # noqa: F401  # isort: skip

from pipecat.runner.types import RunnerArguments

from phonebot.call.deps import CallDeps
from phonebot.call.serve import serve_call
from phonebot.config import get_settings
from phonebot.ops.logs import mask_secrets
from phonebot.records.service import session_records
from phonebot.state import AmdVerdicts, TransferVerdicts, build_state


async def bot(runner_args: RunnerArguments) -> None:
    """Pipecat Cloud's entry point (a `WebSocketRunnerArguments` for Twilio calls).

    Pipecat's runners hand over the accepted websocket unread (`pipecat.runner.run`), and
    the handshake is read here as in `/ws`; a runner that parsed it first (through
    `create_transport`, which fills `call_data`) is taken at its word, then checked.
    There is no app here: the session opens its own records when DATABASE_URL is a
    shared database (`phonebot.records.service.session_records`), and, with REDIS_URL,
    reads answering-machine verdicts that the webhook servers' `/amd` stored in Redis.
    With no app to run it in the background, the call's post-call analysis (agents with
    `analysis:`) runs once the call has ended, before the session's records close
    (`phonebot.call.analysis`): the caller has hung up by then, only the session waits.
    """
    handshake = None
    if runner_args.call_data is not None:
        transport_type = getattr(runner_args, "transport_type", None) or "unknown"
        handshake = (transport_type, runner_args.call_data)
    websocket = runner_args.websocket  # type: ignore[attr-defined]
    settings = get_settings()
    mask_secrets(settings)  # the runner owns the log handlers here; no secret reaches them
    # Without REDIS_URL no /amd callback can reach this session: don't wait for one.
    shared = build_state(settings) if settings.redis_url is not None else None
    try:
        async with session_records(settings) as records:
            verdicts = AmdVerdicts(shared) if shared is not None else None
            # A warm transfer needs the shared state too: the person's verdict reaches the
            # webhook server's processes, or another session.
            transfers = TransferVerdicts(shared) if shared is not None else None
            deps = CallDeps(records=records, verdicts=verdicts, transfers=transfers)
            await serve_call(websocket, settings, handshake=handshake, deps=deps)
    finally:
        if shared is not None:
            await shared.close()
