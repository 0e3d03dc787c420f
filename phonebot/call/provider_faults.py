"""What a call does when its STT, LLM or TTS provider fails.

A provider that answers 500, times out or breaks off its stream must not leave the caller
in silence, flood the log, or touch any other call. Pipecat already turns every such
failure into an `ErrorFrame` that reaches the `PipelineWorker` (its services catch their
exceptions, and a transient 5xx or timeout does not make a service unusable). This module
decides what the caller hears and what the log says:

- One failure *episode* per provider per caller turn: the first error is logged once, at
  ERROR, with the CallSid, the provider kind and a short reason (status code, "timed out";
  never a response body); further errors of the same episode are only counted. The full
  error text is kept at DEBUG.
- The caller hears `PROVIDER_ERROR_PHRASE` instead of what was left of the failed reply,
  and the call goes on: the next turn works as soon as the provider does. When the TTS is
  what failed it cannot speak, so the apology is played from audio rendered once per
  process with the offline espeak-ng engine.
- After `MAX_PROVIDER_FAILURES` failed turns in a row of one provider, or when Pipecat
  marks a service unusable (bad credentials, a TTS that keeps returning no audio), the bot
  says `PROVIDER_FAILURE_GOODBYE` and hangs up through `CallControl.end_call`.
- A provider that works again (a transcript, a complete LLM reply, TTS audio) resets its
  count, so occasional blips over a long call never end it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from loguru import logger
from pipecat.frames.frames import (
    DataFrame,
    ErrorFrame,
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.utils.errors import extract_http_status_code

from phonebot.ai.offline.espeak import synthesize_at, voice_for_language
from phonebot.ai.providers import CallServices
from phonebot.audio import TWILIO_SAMPLE_RATE
from phonebot.call.bot_speech import log_bot_says
from phonebot.call.control import EndReason
from phonebot.call.tasks import CallTasks
from phonebot.config import Settings

if TYPE_CHECKING:
    from phonebot.ops.metrics import Metrics

STT, LLM, TTS = "stt", "llm", "tts"
REASON_MAX_CHARS = 80
DETAIL_MAX_CHARS = 500  # the provider's own message, at DEBUG only
CHUNK_MS = 40

# `CallControl.end_call(closing_line, reason, speak=...)`
EndCall = Callable[..., Awaitable[None]]


# --- what one error says, in a few words --------------------------------------------------

_STATUS_IN_TEXT = re.compile(r"(?:Error code|status)[:=]?\s*(\d{3})", re.IGNORECASE)


def short_reason(frame: ErrorFrame) -> str:
    """A log-sized reason: an HTTP status, "timed out", or the exception's type.

    Provider errors quote the response body ("Error code: 500 - {...}"), which may be huge
    or echo the request; only its status is kept.
    """
    exception = frame.exception
    status = extract_http_status_code(exception) if exception else None
    if status is None and (match := _STATUS_IN_TEXT.search(frame.error or "")):
        status = int(match.group(1))
    if status is not None:
        return f"HTTP {status}"
    name = type(exception).__name__ if exception else ""
    text = frame.error or ""
    if "timeout" in name.lower() or re.search(r"time(d)? ?out", text, re.IGNORECASE):
        return "timed out"
    if name:
        return name
    first = text.split(" - ", 1)[0].splitlines()[0] if text else "unknown error"
    return first[:REASON_MAX_CHARS]


# --- the apology when the TTS itself is broken --------------------------------------------


@lru_cache(maxsize=16)
def rendered_speech(text: str, language: str) -> bytes:
    """`text` spoken by espeak-ng as 8 kHz 16-bit PCM, rendered once per process.

    espeak-ng needs no network and takes milliseconds, so it still speaks when the call's
    TTS provider cannot.
    """
    return synthesize_at(text, TWILIO_SAMPLE_RATE, voice=voice_for_language(language))


@dataclass
class PlayAudio(DataFrame):
    """Ask the `ApologyPlayer` to play this audio as one bot utterance."""

    audio: bytes = b""
    sample_rate: int = TWILIO_SAMPLE_RATE


class ApologyPlayer(FrameProcessor):
    """Between the TTS and `transport.output()`: plays audio that bypasses the TTS.

    The audio goes out framed like TTS output (started, audio, stopped), so the output
    transport reports the bot speaking and stopping, the user-idle timer and barge-in work,
    and `CallControl` can wait for it to be played.
    """

    async def play(self, audio: bytes, sample_rate: int = TWILIO_SAMPLE_RATE) -> None:
        await self.queue_frame(PlayAudio(audio=audio, sample_rate=sample_rate))

    async def cut_reply(self) -> None:
        """Drop what is left of the bot's current reply, in the TTS and on the way out.

        Sent from here, between the TTS and the output, the interruption reaches both.
        """
        await self.broadcast_interruption()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, PlayAudio):
            await self._play(frame)
        else:
            await self.push_frame(frame, direction)

    async def _play(self, frame: PlayAudio) -> None:
        context_id = f"apology-{frame.id}"
        await self.push_frame(TTSStartedFrame(context_id=context_id, append_to_context=False))
        size = max(2, frame.sample_rate * CHUNK_MS // 1000 * 2)
        for start in range(0, len(frame.audio), size):
            chunk = frame.audio[start : start + size]
            await self.push_frame(TTSAudioRawFrame(chunk, frame.sample_rate, 1, context_id))
        await self.push_frame(TTSStoppedFrame(context_id=context_id))


# --- per-provider bookkeeping ------------------------------------------------------------


@dataclass
class ProviderHealth:
    """One provider's failures on this call."""

    kind: str
    failing: bool = False  # an episode is open: more errors are counted, not logged
    failures_in_row: int = 0  # episodes since the provider last worked
    episodes: int = 0
    errors: int = 0

    def recovered(self) -> None:
        self.failing = False
        self.failures_in_row = 0


class RecoveryWatch:
    """Notices a provider working again: a transcript, a clean LLM reply, TTS audio.

    An LLM reply counts only when no error came between its start and end frames, since a
    broken stream pushes some text before it fails.

    It hooks the three services' own pushes (Pipecat's synchronous `on_before_push_frame`,
    so frames are seen in the order pushed) rather than being a worker observer: with any
    observer, Pipecat's worker queues every push of every processor in the pipeline to it,
    a cost paid on each of the call's frames (see `phonebot.call.pipeline_cost`).
    """

    def __init__(self, faults: ProviderFaults, services: CallServices):
        self._faults = faults
        self._llm = services.llm
        self._llm_reply_clean = False
        services.stt.add_event_handler("on_before_push_frame", self._on_stt_push)
        services.llm.add_event_handler("on_before_push_frame", self._on_llm_push)
        services.tts.add_event_handler("on_before_push_frame", self._on_tts_push)

    def _on_stt_push(self, stt: FrameProcessor, frame: Frame) -> None:
        if isinstance(frame, TranscriptionFrame):
            self._faults.recovered(STT)

    def _on_tts_push(self, tts: FrameProcessor, frame: Frame) -> None:
        if isinstance(frame, TTSAudioRawFrame):
            self._faults.recovered(TTS)

    def _on_llm_push(self, llm: FrameProcessor, frame: Frame) -> None:
        if isinstance(frame, LLMFullResponseStartFrame):
            self._llm_reply_clean = True
        elif isinstance(frame, ErrorFrame) and frame.processor is self._llm:
            self._llm_reply_clean = False  # the LLM's own error, not one it passes upstream
        elif isinstance(frame, LLMFullResponseEndFrame) and self._llm_reply_clean:
            self._faults.recovered(LLM)


# --- the handler ---------------------------------------------------------------------------


class ProviderFaults:
    """One call's handling of provider errors: one log line, an apology, or a hang-up."""

    def __init__(
        self,
        call_sid: str,
        services: CallServices,
        settings: Settings,
        player: ApologyPlayer,
        worker: PipelineWorker,
        end_call: EndCall,
        metrics: Metrics | None = None,
    ):
        self._call_sid = call_sid
        self._metrics = metrics  # the app's /metrics: every provider error, by provider
        processors = {STT: services.stt, LLM: services.llm, TTS: services.tts}
        self._kinds = {id(processor): kind for kind, processor in processors.items()}
        self._health = {kind: ProviderHealth(kind) for kind in processors}
        self._settings = settings
        self._player = player
        self._worker = worker
        self._end_call = end_call
        self._giving_up = False
        self._tasks = CallTasks()  # the apology audio's rendering, apologies, the goodbye
        self._recovery = RecoveryWatch(self, services)
        self._tasks.spawn(self._prepare())

    def kind_of(self, processor: FrameProcessor | None) -> str | None:
        return self._kinds.get(id(processor)) if processor is not None else None

    def health(self, kind: str) -> ProviderHealth:
        return self._health[kind]

    async def _prepare(self) -> None:
        """Render the apology and goodbye audio off the event loop, before any failure."""
        for line in (self._settings.provider_error_phrase, self._settings.provider_failure_goodbye):
            await asyncio.to_thread(rendered_speech, line, self._settings.language)

    # --- events ------------------------------------------------------------------------

    def on_error(self, frame: ErrorFrame) -> bool:
        """Handle an `ErrorFrame` that reached the worker; False when it isn't a provider's.

        Synchronous on purpose: Pipecat runs each error's handler as its own task, and the
        decision "is this a new episode" must not interleave with another error's.
        """
        kind = self.kind_of(frame.processor)
        detail = (frame.error or "")[:DETAIL_MAX_CHARS]
        logger.debug(f"Call {self._call_sid}: {kind or frame.processor} error: {detail}")
        if kind is None:
            logger.error(f"Call {self._call_sid}: pipeline error: {short_reason(frame)}")
            return False
        health = self._health[kind]
        health.errors += 1
        if self._metrics is not None:
            self._metrics.provider_error(kind)
        if self._giving_up:
            return True  # the goodbye is under way; nothing more to say or log
        unusable = frame.processor is not None and not frame.processor.is_usable
        new_episode = not health.failing
        if new_episode:
            health.failing = True
            health.episodes += 1
            health.failures_in_row += 1
            logger.error(
                f"Call {self._call_sid}: {kind.upper()} provider failed ({short_reason(frame)}); "
                f"{health.failures_in_row} failed turn(s) in a row"
            )
        if unusable or health.failures_in_row >= self._settings.max_provider_failures:
            self._give_up(kind, "unusable" if unusable else "keeps failing")
        elif new_episode:
            self._tasks.spawn(self._apologise(kind))
        return True

    def caller_turn_started(self) -> None:
        """A new caller turn closes every open episode: a failure in it is news again."""
        for health in self._health.values():
            health.failing = False

    def recovered(self, kind: str) -> None:
        self._health[kind].recovered()

    # --- what the caller hears ----------------------------------------------------------

    def _tts_broken(self, kind: str) -> bool:
        """Whether the apology must bypass the TTS: it is what failed, or it is failing."""
        return kind == TTS or self._health[TTS].failing

    async def _apologise(self, kind: str) -> None:
        """Say the apology instead of what is left of the failed reply.

        A broken LLM stream has already sent some words to the TTS (a sentence, then a
        dangling "How"), and a TTS that failed on a reply's first sentence may still speak
        the later ones: "Could you say that again?" next to half an answer is worse than
        the apology alone. An STT failure has no reply to cut.
        """
        line = self._settings.provider_error_phrase
        if kind in (LLM, TTS):
            await self._player.cut_reply()
        if self._tts_broken(kind):
            await self._play_rendered(line)
        else:
            await self._worker.queue_frames([TTSSpeakFrame(line)])

    async def _play_rendered(self, line: str) -> None:
        audio = await asyncio.to_thread(rendered_speech, line, self._settings.language)
        log_bot_says(self._call_sid, line, self._settings)  # it bypasses the TTS's own line
        await self._player.play(audio)

    def _give_up(self, kind: str, why: str) -> None:
        if self._giving_up:
            return
        self._giving_up = True
        logger.warning(f"Call {self._call_sid}: {kind.upper()} provider {why}; ending the call")
        self._tasks.spawn(self._say_goodbye(kind))

    async def _say_goodbye(self, kind: str) -> None:
        if kind in (LLM, TTS):
            await self._player.cut_reply()
        speak = self._play_rendered if self._tts_broken(kind) else None
        goodbye = self._settings.provider_failure_goodbye
        await self._end_call(goodbye, EndReason.PROVIDER_FAILURE, speak=speak)

    # --- lifetime -----------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel pending apologies when the pipeline is gone."""
        self._tasks.cancel_all()

    def summary(self) -> str | None:
        """One line for the call's end: errors and failed turns per provider, if any."""
        parts = [
            f"{h.kind}={h.errors} error(s) in {h.episodes} failed turn(s)"
            for h in self._health.values()
            if h.errors
        ]
        return ", ".join(parts) or None
