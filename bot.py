"""The phone bot: one Pipecat pipeline per call.

    transport.input() → STT → keypad digits → user aggregator (Silero VAD + Smart Turn) → LLM → TTS
        → transport.output() → turn timer → assistant aggregator

phonebot.turns decides when a caller's turn has ended and logs where each reply's time went.

`bot(runner_args)` is Pipecat Cloud's entry point and what `server.py`'s `/ws` calls, so
the same code runs self-hosted and on Pipecat Cloud. `run_bot(transport, call)` builds
and runs the pipeline for a call that has already been verified.
"""

from __future__ import annotations

# First: loguru's default handler without local variables in tracebacks (phonebot.log_start).
import phonebot.log_start  # noqa: F401  # isort: skip

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import WebSocket
from loguru import logger
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.runner.types import RunnerArguments
from pipecat.transports.base_transport import BaseTransport
from pipecat.turns.user_turn_strategies import UserTurnStrategies
from pipecat.workers.runner import WorkerRunner

from phonebot.barge_in import vad_params
from phonebot.bot_speech import BotSpeechLog
from phonebot.call_control import (
    END_CALL_TOOL,
    OPT_OUT_TOOL,
    RECORD_OUTCOME,
    TRANSFER_TOOL,
    CallControl,
    EndReason,
    PlayoutTracker,
    record_outcome_tool,
)
from phonebot.config import Settings, for_persona, get_settings
from phonebot.inference import SharedSileroVADAnalyzer
from phonebot.keypad import keypad_aggregator
from phonebot.logs import mask_secrets
from phonebot.metrics import INVALID_STREAM, STREAM, Metrics
from phonebot.personas import Persona, opening_line, select_persona
from phonebot.pipeline_cost import InputAudioStop
from phonebot.provider_faults import LLM, STT, TTS, ApologyPlayer, ProviderFaults
from phonebot.providers import build_services
from phonebot.records.call_log import CallLog, ReplyLatencies
from phonebot.records.recording_store import call_recorder
from phonebot.records.service import session_records
from phonebot.records.writer import RecordWriter
from phonebot.session import (
    CallSession,
    StreamRejected,
    TwilioMarkSerializer,
    accept_twilio_stream,
    reject_stream,
    twilio_transport,
)
from phonebot.shutdown import ActiveCalls
from phonebot.state import AmdVerdicts, build_state
from phonebot.stream_guard import Handshake
from phonebot.turns import TurnTimeline, TurnTimer, phone_turn_stop
from phonebot.voicemail import AnsweringMachineScreen

PHONE_SAMPLE_RATE = 8000


def system_prompt(persona: Persona, call: CallSession) -> str:
    """The persona's instructions plus how this call opens."""
    opening = opening_line(persona, call.parameters)
    if call.direction == "outbound":
        return (
            f"{persona.system_prompt()} You placed this call and the callee has just "
            f"picked up. Your first reply must be exactly: {opening}"
        )
    return f"{persona.system_prompt()} You have already greeted the caller with: {opening}"


def call_tools(
    settings: Settings, serializer: TwilioMarkSerializer | None, persona: Persona | None = None
) -> list:
    """The functions the LLM may call: hang up and opt out always; transfer when there is a
    target; record_outcome when the persona has outcome fields."""
    can_transfer = bool(settings.transfer_target) and serializer
    tools = [END_CALL_TOOL, TRANSFER_TOOL] if can_transfer else [END_CALL_TOOL]
    outcome_tool = record_outcome_tool(persona) if persona is not None else None
    return [*tools, OPT_OUT_TOOL, *([outcome_tool] if outcome_tool else [])]


def user_turn_params(
    settings: Settings, timeline: TurnTimeline | None = None
) -> LLMUserAggregatorParams:
    """Silero VAD hears speech; Pipecat's bundled Smart Turn model and the transcript's
    last words decide the turn ended (phonebot.turns; `timeline` records its timings).

    Both analyzers run on process-wide ONNX sessions (phonebot.inference), so a call adds its
    own state but no model. Pipecat's user-idle timer (started when the bot stops speaking)
    drives re-prompts.
    """
    return LLMUserAggregatorParams(
        vad_analyzer=SharedSileroVADAnalyzer(params=vad_params(settings)),  # barge-in
        user_idle_timeout=settings.silence_timeout_s,
        user_turn_strategies=UserTurnStrategies(stop=[phone_turn_stop(settings, timeline)]),
        # Pipecat's last-resort turn end (5 s after the last speech or transcript) must
        # not cut short a caller we are deliberately waiting for.
        user_turn_stop_timeout=max(5.0, settings.turn_dangling_wait_s + 2.0),
    )


def call_worker(pipeline: Pipeline) -> PipelineWorker:
    """The call's worker: phone-rate audio, Pipecat's metrics, and no observers.

    With any observer, Pipecat's worker queues every push of every frame in the pipeline
    to each of them (~14% of the event loop's time at 10 calls, py-spy): turn tracking
    feeds only tracing (off), the idle timeout is PlayoutTracker's, provider recovery is
    watched on the services' own pushes, and RTVI has no client on a phone line.
    """
    return PipelineWorker(
        pipeline,
        params=PipelineParams(
            audio_in_sample_rate=PHONE_SAMPLE_RATE,
            audio_out_sample_rate=PHONE_SAMPLE_RATE,
            enable_metrics=True,
            enable_usage_metrics=True,
        ),
        enable_turn_tracking=False,
        idle_timeout_secs=None,
        enable_rtvi=False,
    )


async def run_bot(
    transport: BaseTransport,
    call: CallSession,
    settings: Settings | None = None,
    serializer: TwilioMarkSerializer | None = None,
    records: RecordWriter | None = None,
    *,
    calls: ActiveCalls | None = None,
    verdicts: AmdVerdicts | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Run one call's pipeline until the call ends.

    `serializer` is what lets a transfer keep the caller on the line; without it
    (another transport) the bot simply doesn't offer transfers. `records` is the app's
    record writer (None: the call leaves no record); the call only enqueues to it.
    `calls` is the app's registry of running calls (so its shutdown can say goodbye),
    `verdicts` where answering-machine verdicts arrive, `metrics` the app's metrics;
    None means the call has none (e.g. a test, or Pipecat Cloud without REDIS_URL).
    """
    persona = select_persona(call.parameters)
    settings = for_persona(settings or get_settings(), persona)
    # RECORD_CALLS: a stereo WAV of the call (phonebot.records.recording); announced.
    recorder = call_recorder(records, call.call_sid, settings)
    persona = persona.announcing_recording() if recorder else persona
    services = build_services(settings, persona)
    BotSpeechLog(call.call_sid, settings).watch(services.llm)  # "Call … bot says: …"
    context = LLMContext(
        messages=[{"role": "system", "content": system_prompt(persona, call)}],
        tools=ToolsSchema(standard_tools=call_tools(settings, serializer, persona)),
    )
    # "Call … turn timing {…}" per turn, at DEBUG (INFO with LOG_TURN_TIMING)
    timeline = TurnTimeline(call.call_sid, "INFO" if settings.log_turn_timing else "DEBUG")
    user_aggregator, assistant_aggregator = LLMContextAggregatorPair(
        context, user_params=user_turn_params(settings, timeline)
    )

    async def end_idle() -> None:
        """No one spoke for the idle timeout: a stuck or abandoned stream (runs once the
        worker and call control below exist; PlayoutTracker's watchdog calls it)."""
        logger.warning(
            f"Call {call.call_sid}: no one spoke for {settings.pipeline_idle_timeout_s:g} s; "
            "ending the idle pipeline"
        )
        control.note_end(EndReason.IDLE)
        await worker.cancel(reason="idle timeout")

    # Pipecat's idle timeout is replaced by this cheaper watchdog (see PlayoutTracker).
    playout = PlayoutTracker(settings.pipeline_idle_timeout_s, on_idle=end_idle)
    apology_player = ApologyPlayer()  # speaks for a broken TTS (phonebot.provider_faults)
    screen = AnsweringMachineScreen(call.call_sid, call.parameters, verdicts=verdicts)

    pipeline = Pipeline(
        [
            transport.input(),
            *([recorder.caller_tap] if recorder else []),  # before InputAudioStop
            playout,
            screen.gate,
            services.stt,
            keypad_aggregator(),
            user_aggregator,
            InputAudioStop(),  # nothing after the user aggregator listens to the caller
            services.llm,
            services.tts,
            apology_player,
            transport.output(),
            *([recorder.bot_tap] if recorder else []),  # the bot's audio as sent
            TurnTimer(timeline, services.llm.name, services.tts.name),  # reply timings
            assistant_aggregator,
        ]
    )
    worker = call_worker(pipeline)
    call_log = CallLog(records, call.call_sid)  # the call's record (phonebot.records)
    control = CallControl(
        worker, context, persona, settings, playout, call, serializer, records=call_log
    )
    services.llm.register_function("end_call", control.end_call_tool)
    services.llm.register_function("transfer_call", control.transfer_call_tool)
    services.llm.register_function("opt_out", control.opt_out_tool)
    services.llm.register_function(RECORD_OUTCOME, control.record_outcome_tool)
    faults = ProviderFaults(
        call.call_sid, services, settings, apology_player, worker, control.end_call, metrics
    )
    opener = CallOpener(worker, opening_line(persona, call.parameters), call.direction, settings)

    @user_aggregator.event_handler("on_user_turn_started")
    async def on_user_turn_started(aggregator, strategy):
        opener.caller_spoke()
        control.caller_spoke()
        faults.caller_turn_started()

    @user_aggregator.event_handler("on_user_turn_idle")
    async def on_user_turn_idle(aggregator):
        await control.on_caller_silent()

    # The transcript, from Pipecat's own finalised turns.
    reply_latencies = ReplyLatencies(timeline.logged)

    @user_aggregator.event_handler("on_user_turn_stopped")
    async def on_user_turn_stopped(aggregator, strategy, message):
        call_log.caller_turn(message.content, message.timestamp)

    @assistant_aggregator.event_handler("on_assistant_turn_stopped")
    async def on_assistant_turn_stopped(aggregator, message):
        latency_s = reply_latencies.next()
        call_log.bot_turn(
            message.content,
            interrupted=message.interrupted,
            started=message.timestamp,
            reply_latency_s=latency_s,
        )
        if metrics is not None and latency_s is not None:
            metrics.observe_reply_latency(latency_s)

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport, client):
        logger.info(
            f"Call {call.call_sid} started: {call.direction}, persona={persona.name}, "
            f"parameters={call.loggable_parameters()}"
        )
        call_log.started(direction=call.direction, persona=persona.name, parameters=call.parameters)
        control.start_duration_limit()
        screen.start(control, persona, converse=opener.start)

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        control.note_end(EndReason.CALLER_HUNG_UP)
        await worker.cancel()

    @worker.event_handler("on_pipeline_error")
    async def on_pipeline_error(worker, error):
        # A provider's failure is apologised for and the call goes on (or ends as a
        # "provider failure"); only other errors mark the call as ended by an error.
        if not faults.on_error(error):
            control.note_end(EndReason.ERROR)

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    if calls is not None:
        calls.add(call.call_sid, control)  # so a server shutdown can say goodbye
    if metrics is not None:
        metrics.call_started()
    try:
        await runner.run()
    finally:
        if metrics is not None:
            metrics.call_ended()
        if calls is not None:
            calls.discard(call.call_sid)
        opener.stop()
        screen.stop()
        control.stop()
        faults.stop()
        if faults_seen := faults.summary():
            logger.info(f"Call {call.call_sid} provider errors: {faults_seen}")
        errors = {kind: faults.health(kind).errors for kind in (STT, LLM, TTS)}
        call_log.ended(control.end_reason or EndReason.ERROR, provider_errors=errors)
        logger.info(
            f"Call {call.call_sid} ended after {control.duration_s():.1f} s "
            f"({control.end_reason or EndReason.ERROR}): {call.direction}, "
            f"parameters={call.loggable_parameters()}"
        )


class CallOpener:
    """Who speaks first.

    Dial-in: the bot greets at once. Dial-out: the callee usually answers with "Hello?",
    and the LLM's first reply (instructed by the system prompt) is the campaign opening;
    if the callee stays silent for `dialout_greeting_delay_s`, the bot opens anyway.
    """

    def __init__(self, worker: PipelineWorker, opening: str, direction: str, settings: Settings):
        self._worker = worker
        self._opening = opening
        self._direction = direction
        self._delay_s = settings.dialout_greeting_delay_s
        self._caller_spoke = False
        self._timer: asyncio.Task | None = None

    async def start(self) -> None:
        if self._direction == "outbound":
            self._timer = asyncio.create_task(self._open_if_silent())
        else:
            await self._speak_opening()

    def caller_spoke(self) -> None:
        self._caller_spoke = True

    def stop(self) -> None:
        if self._timer:
            self._timer.cancel()

    async def _open_if_silent(self) -> None:
        await asyncio.sleep(self._delay_s)
        if not self._caller_spoke:
            await self._speak_opening()

    async def _speak_opening(self) -> None:
        await self._worker.queue_frames([TTSSpeakFrame(self._opening)])


async def serve_call(
    websocket: WebSocket,
    settings: Settings,
    *,
    admit: Callable[[CallSession], Awaitable[str | None]] | None = None,
    handshake: Handshake | None = None,
    records: RecordWriter | None = None,
    calls: ActiveCalls | None = None,
    verdicts: AmdVerdicts | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Verify a Twilio stream and run its call; a rejected stream is closed, costing nothing.

    `admit` (server.py's admission control) may still turn a verified call away, saying
    why: its token was already used, the server is full or shutting down, or the shared
    state can't be reached to check. `handshake` is what a Pipecat runner already parsed
    from the websocket, if it did. Everything else the call needs from its app is passed
    in (see `run_bot`): `records` is the record writer of the app (or of the Pipecat Cloud
    session) the call reports to.
    """
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
    await run_bot(
        transport,
        call,
        settings,
        serializer,
        records=records,
        calls=calls,
        verdicts=verdicts,
        metrics=metrics,
    )


async def bot(runner_args: RunnerArguments) -> None:
    """Pipecat Cloud's entry point (a `WebSocketRunnerArguments` for Twilio calls).

    Pipecat's runners hand over the accepted websocket unread (`pipecat.runner.run`), and
    the handshake is read here as in `/ws`; a runner that parsed it first (through
    `create_transport`, which fills `call_data`) is taken at its word, then checked.
    There is no app here: the session opens its own records when DATABASE_URL is a
    shared database (`phonebot.records.service.session_records`), and, with REDIS_URL,
    reads answering-machine verdicts that the webhook servers' `/amd` stored in Redis.
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
            await serve_call(
                websocket,
                settings,
                handshake=handshake,
                records=records,
                verdicts=AmdVerdicts(shared) if shared is not None else None,
            )
    finally:
        if shared is not None:
            await shared.close()
