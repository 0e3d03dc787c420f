"""A call's pipeline, top to bottom, and the worker that runs it:

    transport.input() → STT → keypad digits → user aggregator (Silero VAD + Smart Turn) → LLM → TTS
        → transport.output() → turn timer → assistant aggregator

The parts are the `PhoneCall`'s (phonebot.call.phone_call); this is only their order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker

from phonebot.audio import TWILIO_SAMPLE_RATE
from phonebot.call.pipeline_cost import InputAudioStop
from phonebot.twilio.keypad import keypad_aggregator

if TYPE_CHECKING:
    from phonebot.call.phone_call import PhoneCall


def call_pipeline(call: PhoneCall) -> PipelineWorker:
    """The call's processors in the order the caller's audio flows, in the worker that runs
    them. The recorder's taps (RECORD_CALLS) sit next to the transport they listen to."""
    transport, services, recorder = call.transport, call.services, call.recorder
    checking = call.greeting_check
    pipeline = Pipeline(
        [
            transport.input(),
            *([recorder.caller_tap] if recorder else []),  # before InputAudioStop
            call.playout,  # playback marks and the idle watchdog
            call.screen.gate,  # answering-machine screening (dial-outs that ask for it)
            services.stt,
            *([checking.detector] if checking.detector else []),  # machine_detection "bot"
            *([call.briefing.keys] if call.briefing.keys else []),  # a warm transfer's 1 / 2
            keypad_aggregator([*call.agent.keypad, *call.agent.menu]),  # declared: at once
            call.user_aggregator,
            InputAudioStop(),  # nothing after the user aggregator listens to the caller
            call.navigation.stage,  # the LLM; on a dial-out with a goal, it navigates menus first
            services.tts,
            *([checking.gate] if checking.gate else []),  # holds the bot's words till then
            call.apology_player,  # speaks for a broken TTS (phonebot.call.provider_faults)
            transport.output(),
            *([recorder.bot_tap] if recorder else []),  # the bot's audio as sent
            call.turn_timer,  # reply timings
            call.assistant_aggregator,
        ]
    )
    return call_worker(pipeline)


def call_worker(pipeline: Pipeline) -> PipelineWorker:
    """The call's worker: phone-rate audio, Pipecat's metrics, and no observers.

    With any observer, Pipecat's worker queues every push of every frame in the pipeline
    to each of them (~14% of the event loop's time at 10 calls, py-spy): turn tracking
    feeds only tracing (off), the idle timeout is the call's own watchdog, provider recovery
    is watched on the services' own pushes, and RTVI has no client on a phone line.
    """
    return PipelineWorker(
        pipeline,
        params=PipelineParams(
            audio_in_sample_rate=TWILIO_SAMPLE_RATE,
            audio_out_sample_rate=TWILIO_SAMPLE_RATE,
            enable_metrics=True,
            enable_usage_metrics=True,
        ),
        enable_turn_tracking=False,
        idle_timeout_secs=None,
        enable_rtvi=False,
    )
