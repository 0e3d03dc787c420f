"""One phone call: the parts its pipeline is made of, and what it does on the pipeline's events.

`phonebot.call.serve.run_bot` builds a `PhoneCall` and runs it; `call_pipeline`
(phonebot.call.pipeline) puts its processors in order. Its collaborators are attributes, set
once in `__init__` in the order they depend on each other, and its Pipecat event handlers
are methods registered in one place (`_register_handlers`), the way LiveKit's `Agent`
classes and Pipecat's examples read.
"""

from __future__ import annotations

import asyncio

from loguru import logger
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import ErrorFrame
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    AssistantTurnStoppedMessage,
    LLMAssistantAggregator,
    LLMContextAggregatorPair,
    LLMUserAggregator,
    UserTurnStoppedMessage,
)
from pipecat.transports.base_transport import BaseTransport
from pipecat.turns.user_start import BaseUserTurnStartStrategy
from pipecat.turns.user_stop import BaseUserTurnStopStrategy
from pipecat.workers.runner import WorkerRunner

from phonebot.agents.agent import Agent, ivr_goal, opening_line
from phonebot.ai.providers import CallServices, greeting_classifier
from phonebot.call.agent_tools import register_agent_tools
from phonebot.call.analysis import PostCallAnalysis, post_call_analysis
from phonebot.call.bot_speech import BotSpeechLog
from phonebot.call.control import CallControl, EndReason
from phonebot.call.deps import CallDeps
from phonebot.call.ivr import MenuNavigation
from phonebot.call.knowledge_search import register_knowledge_search
from phonebot.call.opener import CallOpener
from phonebot.call.pipeline import call_pipeline
from phonebot.call.playout import HeardTurns, PlayoutTracker
from phonebot.call.provider_faults import LLM, STT, TTS, ApologyPlayer, ProviderFaults
from phonebot.call.tools import (
    END_CALL,
    END_CALL_TOOL,
    OPT_OUT,
    RECORD_OUTCOME,
    TRANSFER_CALL,
    call_tools,
)
from phonebot.call.turns import TurnTimeline, TurnTimer, user_turn_params
from phonebot.call.voicemail import AnsweringMachineScreen, GreetingCheck
from phonebot.call.warm_transfer import Briefing, WarmTransfer
from phonebot.config import Settings
from phonebot.records.call_log import CallLog, ReplyLatencies
from phonebot.records.recording import CallRecorder
from phonebot.twilio.stream import CallSession, TwilioMarkSerializer

# The longest a call's end waits to tell a warm transfer's other call about it.
CALL_OVER_TIMEOUT_S = 5.0
# A phone's call-screening assistant asks who is calling and why before ringing the person.
SCREENING_STYLE = (
    "If an automated call-screening assistant answers and asks who is calling or why, "
    "your first reply is instead only your name and the reason for the call, in one "
    "sentence; give your first reply below when the person picks up."
)


def system_prompt(agent: Agent, session: CallSession, briefing: Briefing) -> str:
    """The agent's instructions plus how this call opens (a warm transfer's person is only
    briefed)."""
    if briefing.active:
        return briefing.instructions(agent)
    opening = opening_line(agent, session.parameters)
    if session.direction == "outbound":
        return (
            f"{agent.system_prompt()} {SCREENING_STYLE} You placed this call and the callee "
            f"has just picked up. Your first reply must be exactly: {opening}"
        )
    return f"{agent.system_prompt()} You have already greeted the caller with: {opening}"


class PhoneCall:
    """One verified call, from its pipeline's start to the record of how it ended.

    `session` is the call as Twilio's stream announced it; `agent` and `settings` are
    already the agent's; `recorder` is None unless the call is recorded; `deps` is what
    the call borrows from its app (phonebot.call.deps).
    """

    def __init__(
        self,
        transport: BaseTransport,
        session: CallSession,
        settings: Settings,
        agent: Agent,
        services: CallServices,
        *,
        serializer: TwilioMarkSerializer | None = None,
        recorder: CallRecorder | None = None,
        deps: CallDeps | None = None,
    ):
        self.transport = transport
        self.session = session
        self.settings = settings
        self.agent = agent
        self.services = services
        self.serializer = serializer  # without it (another transport), no transfers
        self.recorder = recorder
        self.deps = deps or CallDeps()
        call_sid = session.call_sid
        # The person a warm transfer calls is only briefed: the LLM may hang up, nothing else
        # (a summary holds the caller's words; none of them may reach a tool on this call).
        self.briefing = Briefing(session.parameters, settings, self.deps.transfers)
        instructions = {"role": "system", "content": system_prompt(agent, session, self.briefing)}
        tools = [END_CALL_TOOL] if self.briefing.active else call_tools(settings, serializer, agent)
        self.context = LLMContext(messages=[instructions], tools=ToolsSchema(standard_tools=tools))
        # A dial-out with a goal first gets through the phone menu that answers (its stage
        # sits in the LLM's place; without a goal, the stage is the LLM).
        goal = ivr_goal(agent, session.parameters)
        self.navigation = MenuNavigation(call_sid, goal, services.llm, settings, instructions)
        self.bot_speech = BotSpeechLog(call_sid, settings)  # "Call … bot says: …"
        self.bot_speech.watch(self.navigation.speaker)
        # "Call … turn timing {…}" per turn, at DEBUG (INFO with LOG_TURN_TIMING)
        self.timeline = TurnTimeline(call_sid, "INFO" if settings.log_turn_timing else "DEBUG")
        aggregators = LLMContextAggregatorPair(
            self.context, user_params=user_turn_params(settings, self.timeline)
        )
        self.user_aggregator: LLMUserAggregator = aggregators.user()
        self.assistant_aggregator: LLMAssistantAggregator = aggregators.assistant()
        # What the caller heard of each bot turn, from the Twilio output's playout ledger.
        self.heard_turns = HeardTurns(getattr(transport.output(), "ledger", None))
        # Pipecat's idle timeout is replaced by this cheaper watchdog (phonebot.call.watchdog).
        self.playout = PlayoutTracker(settings.pipeline_idle_timeout_s, on_idle=self.end_idle)
        self.apology_player = ApologyPlayer()  # speaks for a broken TTS
        verdicts = self.deps.verdicts  # dial-outs that asked for answering-machine detection
        self.screen = AnsweringMachineScreen(call_sid, session.parameters, verdicts=verdicts)
        # `machine_detection: "bot"`: the bot itself tells a person from a voicemail greeting
        self.greeting_check = GreetingCheck(
            call_sid, session.parameters, lambda: greeting_classifier(services),
            silent_after_s=settings.dialout_greeting_delay_s,
        )  # fmt: skip
        self.turn_timer = TurnTimer(self.timeline, services.llm.name, services.tts.name)
        self.worker = call_pipeline(self)  # the parts above in order; the parts below need it
        self.call_log = CallLog(self.deps.records, call_sid)  # the call's record
        self.control = CallControl(
            self.worker, self.context, agent, settings, self.playout, session, serializer,
            records=self.call_log, warm=self._warm_transfer(),
        )  # fmt: skip
        self.faults = ProviderFaults(
            call_sid,
            services,
            settings,
            self.apology_player,
            self.worker,
            self.control.end_call,
            self.deps.metrics,
        )
        opening = opening_line(agent, session.parameters)
        opening = self.briefing.opening(agent) if self.briefing.active else opening
        self.opener = CallOpener(self.worker, opening, session.direction, settings)
        self.briefing.bind(call_sid, self.worker, self.control)
        self.navigation.bind(self.worker, self.control, self.context)
        self.greeting_check.bind(self.control, agent, self.call_log)
        self.reply_latencies = ReplyLatencies(self.timeline.logged)  # for the transcript
        self._register_handlers()

    def _warm_transfer(self) -> WarmTransfer | None:
        """The caller's side of warm transfers, when the person's call can reach it: the
        shared verdicts and this server's address (PUBLIC_URL, or the stream's host)."""
        base_url = self.deps.base_url or self.settings.public_url
        if self.deps.transfers is None or not base_url or self.briefing.active:
            return None
        return WarmTransfer(
            self.settings, self.session, self.agent, self.deps.transfers, base_url,
            self.call_log, self.screen.gate.set_muted,
        )  # fmt: skip

    def _register_handlers(self) -> None:
        """The functions the LLM may call and the Pipecat events the call answers, all here."""
        llm, control = self.services.llm, self.control
        llm.register_function(END_CALL, control.end_call_tool)
        llm.register_function(TRANSFER_CALL, control.transfer_call_tool)
        llm.register_function(OPT_OUT, control.opt_out_tool)
        llm.register_function(RECORD_OUTCOME, control.record_outcome_tool)
        register_agent_tools(
            llm, self.agent, self.session, self.worker, self.call_log,
            self.settings.tools_webhook_secret,
        )  # fmt: skip
        register_knowledge_search(llm, self.agent.knowledge, self.call_log)
        user, assistant = self.user_aggregator, self.assistant_aggregator
        user.add_event_handler("on_user_turn_started", self.on_user_turn_started)
        user.add_event_handler("on_user_turn_idle", self.on_user_turn_idle)
        user.add_event_handler("on_user_turn_stopped", self.on_user_turn_stopped)
        assistant.add_event_handler("on_assistant_turn_stopped", self.on_assistant_turn_stopped)
        self.heard_turns.watch(assistant)
        self.transport.add_event_handler("on_client_connected", self.on_client_connected)
        self.transport.add_event_handler("on_client_disconnected", self.on_client_disconnected)
        self.worker.add_event_handler("on_pipeline_error", self.on_pipeline_error)

    # --- the call's life ----------------------------------------------------------------

    async def run(self) -> None:
        """Run the pipeline until the call ends, then stop what the call started."""
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(self.worker)
        if self.deps.calls is not None:
            self.deps.calls.add(self.session.call_sid, self.control)  # a shutdown says goodbye
        if self.deps.metrics is not None:
            self.deps.metrics.call_started()
        try:
            await runner.run()
        finally:
            await self._call_over()
            analysis = self._finish()
        if analysis is not None:  # no app to run it in the background: now, the call over
            await analysis.run()

    async def _call_over(self) -> None:
        """Tell the other call of a warm transfer under way that this one has ended (never
        holding up the teardown for long: the shared state may be slow or down)."""
        try:
            async with asyncio.timeout(CALL_OVER_TIMEOUT_S):
                await self.briefing.call_over()
                await self.control.call_over()
        except Exception as error:  # noqa: BLE001 (the call is over whatever happens)
            logger.warning(f"Call {self.session.call_sid}: transfer not told of the end: {error}")

    def _finish(self) -> PostCallAnalysis | None:
        """Cancel the call's timers and tasks; log and record how it ended; start its
        post-call analysis in the app's jobs, or return it when there are none."""
        if self.deps.metrics is not None:
            self.deps.metrics.call_ended()
        if self.deps.calls is not None:
            self.deps.calls.discard(self.session.call_sid)
        self.opener.stop()
        self.briefing.stop()
        self.navigation.stop()
        self.greeting_check.stop()
        self.screen.stop()
        self.control.stop()
        self.faults.stop()
        call = self.session
        if faults_seen := self.faults.summary():
            logger.info(f"Call {call.call_sid} provider errors: {faults_seen}")
        errors = {kind: self.faults.health(kind).errors for kind in (STT, LLM, TTS)}
        end_reason = self.control.end_reason or EndReason.ERROR
        self.call_log.ended(end_reason, provider_errors=errors)
        logger.info(
            f"Call {call.call_sid} ended after {self.control.duration_s():.1f} s "
            f"({end_reason}): {call.direction}, parameters={call.loggable_parameters()}"
        )
        analysis = post_call_analysis(
            self.agent, self.settings, self.call_log, direction=call.direction,
            messages=self.context.get_messages(), end_reason=end_reason,
            duration_s=self.control.duration_s(),
            client=self.deps.http.web if self.deps.http is not None else None,
        )  # fmt: skip
        if analysis is not None and self.deps.analyses is not None:
            self.deps.analyses.submit(analysis)  # in the background: nothing waits for it
            return None
        return analysis

    async def end_idle(self) -> None:
        """No one spoke for the idle timeout: a stuck or abandoned stream (the watchdog in
        `playout` calls it)."""
        logger.warning(
            f"Call {self.session.call_sid}: no one spoke for "
            f"{self.settings.pipeline_idle_timeout_s:g} s; ending the idle pipeline"
        )
        self.control.note_end(EndReason.IDLE)
        await self.worker.cancel(reason="idle timeout")

    # --- Pipecat's events -----------------------------------------------------------------

    async def on_client_connected(self, transport: BaseTransport, client: object) -> None:
        call, agent = self.session, self.agent
        logger.info(
            f"Call {call.call_sid} started: {call.direction}, agent={agent.name}@{agent.version}, "
            f"parameters={call.loggable_parameters()}"
        )
        self.call_log.started(
            direction=call.direction, persona=agent.name, parameters=call.parameters
        )
        self.control.start_duration_limit()
        self.screen.start(self.control, agent, converse=self.converse)

    async def converse(self) -> None:
        """Past any answering-machine screening: open the conversation (with a phone-menu
        goal, first listen for a menu: the opener only speaks to a silent callee)."""
        self.navigation.start()
        self.greeting_check.start()
        self.briefing.start()
        await self.opener.start()

    async def on_client_disconnected(self, transport: BaseTransport, client: object) -> None:
        self.control.note_end(EndReason.CALLER_HUNG_UP)
        await self.worker.cancel()

    async def on_user_turn_started(
        self, aggregator: LLMUserAggregator, strategy: BaseUserTurnStartStrategy | None
    ) -> None:
        self.opener.caller_spoke()
        self.greeting_check.callee_spoke()
        self.control.caller_spoke()
        self.faults.caller_turn_started()

    async def on_user_turn_idle(self, aggregator: LLMUserAggregator) -> None:
        """The callee said nothing for SILENCE_TIMEOUT_S after the bot: a re-prompt (never to
        a phone menu, which may take its time to answer: IVR_TIMEOUT_S bounds it)."""
        if self.navigation.at_a_menu:
            return
        await self.control.on_caller_silent()

    async def on_user_turn_stopped(
        self,
        aggregator: LLMUserAggregator,
        strategy: BaseUserTurnStopStrategy | None,
        message: UserTurnStoppedMessage,
    ) -> None:
        """The caller's side of the transcript, from Pipecat's own finalised turns."""
        self.call_log.caller_turn(message.content, message.timestamp)
        self.navigation.callee_said(message.content)

    async def on_assistant_turn_stopped(
        self, aggregator: LLMAssistantAggregator, message: AssistantTurnStoppedMessage
    ) -> None:
        """The bot's side of the transcript, with how long the caller waited for it and,
        for a turn cut off by the caller or a hang-up, its whole text and what was heard."""
        latency_s = self.reply_latencies.next()
        self.call_log.bot_turn(
            message.content,
            interrupted=message.interrupted,
            started=message.timestamp,
            reply_latency_s=latency_s,
            heard=self.heard_turns.turn_stopped(message.interrupted),
        )
        if self.deps.metrics is not None and latency_s is not None:
            self.deps.metrics.observe_reply_latency(latency_s)

    async def on_pipeline_error(self, worker: PipelineWorker, error: ErrorFrame) -> None:
        # A provider's failure is apologised for and the call goes on (or ends as a
        # "provider failure"); only other errors mark the call as ended by an error.
        if not self.faults.on_error(error):
            self.control.note_end(EndReason.ERROR)
