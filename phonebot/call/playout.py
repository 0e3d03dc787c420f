"""What Twilio has played: when the bot stops speaking, the echo of our playback marks,
and what the caller heard of each bot turn.

Pipecat's websocket output sends audio ahead of real time (a chunk or so, more in a burst
after a late chunk), so "sent" is not "heard"; `CallControl` (phonebot.call.control) waits
here before it hangs up, and the transcript (`HeardTurns`) says what of each bot turn was
played before the caller cut in or hung up.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import partial

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InputTransportMessageFrame,
    InterruptionFrame,
    LLMAssistantPushAggregationFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    StartFrame,
    TTSStartedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from phonebot.call.watchdog import IdleWatchdog, OnIdle
from phonebot.records.call_log import HeardSpeech
from phonebot.twilio.transport import DEFAULT_CHARS_PER_S, PlayoutLedger, SpokenContext

# Frames on which Pipecat's assistant aggregator ends an open turn
# (`LLMAssistantAggregator._trigger_assistant_turn_stopped`'s callers in 1.14).
_TURN_ENDS = (
    LLMFullResponseEndFrame,
    LLMAssistantPushAggregationFrame,
    InterruptionFrame,
    EndFrame,
    CancelFrame,
)
# Heard this much less than it lasts, a cut context was cut off (not a rounding error).
_CUT_TOLERANCE_S = 0.02
# Turns stopped and not yet claimed by their `on_assistant_turn_stopped` (a few at most).
_TURNS_KEPT = 64


class PlayoutTracker(FrameProcessor):
    """Tells when the bot stops speaking and when Twilio has played what we sent.

    Sits right after `transport.input()`: it sees Twilio's `mark` echoes going downstream
    (our serializer turns them into `InputTransportMessageFrame`s) and the output
    transport's bot-speaking frames coming upstream.

    The same frames feed the call's idle watchdog (phonebot.call.watchdog): with
    `idle_timeout_s`, when neither side has spoken for that long, `on_idle` runs once.
    """

    def __init__(
        self, idle_timeout_s: float | None = None, on_idle: OnIdle | None = None, **kwargs
    ):
        super().__init__(**kwargs)
        self._bot_speaking = False
        self._bot_quiet = asyncio.Event()
        self._bot_quiet.set()
        self._marks: dict[str, asyncio.Event] = {}
        self.watchdog = IdleWatchdog(idle_timeout_s, on_idle)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        self.watchdog.saw(frame)
        if isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
            self._bot_quiet.clear()
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
            self._bot_quiet.set()
        elif isinstance(frame, InputTransportMessageFrame) and _is_mark(frame.message):
            name = frame.message.get("mark", {}).get("name", "")
            self._marks.setdefault(name, asyncio.Event()).set()
            return  # Our own bookkeeping; nothing downstream needs it.
        elif isinstance(frame, StartFrame):
            self.watchdog.start(self)
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self.watchdog.stop(self)
        await self.push_frame(frame, direction)

    async def cleanup(self):
        await super().cleanup()
        await self.watchdog.stop(self)

    @property
    def bot_speaking(self) -> bool:
        return self._bot_speaking

    async def wait_bot_done(self, settle_s: float, timeout: float) -> None:
        """Until the bot has stopped speaking and not started again for `settle_s`.

        Consecutive utterances (a greeting, then a closing line queued behind it) each
        start and stop the bot, so one "stopped" is not the end of what is queued.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._bot_quiet.wait(), deadline - time.monotonic())
            await asyncio.sleep(settle_s)
            if not self._bot_speaking:
                return

    def expect_mark(self, name: str) -> asyncio.Event:
        self._marks[name] = asyncio.Event()
        return self._marks[name]


def _is_mark(message) -> bool:
    return isinstance(message, dict) and message.get("event") == "mark"


# --- what the caller heard of each bot turn ---------------------------------------------


class HeardTurns:
    """Which TTS contexts each of the assistant aggregator's turns spoke, and how much of
    them the caller heard (from the output's `PlayoutLedger`).

    Pipecat's `on_assistant_turn_stopped` gives only the text already played: the words
    spoken so far with a TTS that times its words (Cartesia, the offline voice), the
    sentences whose audio had all gone out with one that does not (OpenAI's), so a turn
    cut off during its first sentence may have no text at all.
    The ledger knows the whole text and the playout; this says which of its contexts
    make up the turn being reported.

    It watches the frames the aggregator processes (its `on_before_process_frame` event,
    run in line, in order) and marks turns where the aggregator does: a turn opens at
    `LLMFullResponseStartFrame` or at a `TTSStartedFrame` whose text goes into the
    context, gathers the contexts started while it is open, and ends at the frames in
    `_TURN_ENDS`. The aggregator's event runs later, in a task of its own, so ended turns
    wait here, oldest first, for `turn_stopped`.
    """

    def __init__(self, ledger: PlayoutLedger | None) -> None:
        self._ledger = ledger
        self._open = False
        self._contexts: list[str] = []
        self._ended: deque[list[str]] = deque(maxlen=_TURNS_KEPT)
        self._seen: deque[str] = deque(maxlen=_TURNS_KEPT)

    def watch(self, aggregator: FrameProcessor) -> None:
        if self._ledger is not None:
            aggregator.add_event_handler("on_before_process_frame", self._on_frame)

    def _on_frame(self, aggregator: FrameProcessor, frame: Frame) -> None:
        if isinstance(frame, LLMFullResponseStartFrame):
            self._open = True
        elif isinstance(frame, TTSStartedFrame) and frame.append_to_context:
            self._open = True
            if frame.context_id:
                self._contexts.append(frame.context_id)
                self._seen.append(frame.context_id)
        elif isinstance(frame, _TURN_ENDS):
            if self._open:
                self._ended.append(self._contexts)
            self._open, self._contexts = False, []

    def turn_stopped(self, interrupted: bool) -> Callable[[], HeardSpeech | None] | None:
        """For the turn the aggregator just reported: how to tell what of it was heard,
        once its audio has played or been cut (None: nothing to tell)."""
        if self._ledger is None:
            return None
        contexts = self._ended.popleft() if self._ended else []
        if not contexts and interrupted:
            # Cut before any of its audio passed the output: the reply that was next.
            contexts = [c for c in self._ledger.last_cut if c not in self._seen][:1]
        if not contexts:
            return None
        return partial(self._heard, contexts)

    def _heard(self, context_ids: Sequence[str]) -> HeardSpeech | None:
        assert self._ledger is not None
        contexts = [c for c in map(self._ledger.context, context_ids) if c is not None]
        if not contexts:
            return None
        return heard_speech(contexts, self._ledger.now(), self._ledger.chars_per_s())


def heard_speech(
    contexts: Sequence[SpokenContext], now: float, chars_per_s: float = DEFAULT_CHARS_PER_S
) -> HeardSpeech:
    """What `contexts` (one turn's, in order) said, and what of it was heard by `now`
    (`chars_per_s`: the voice's speed, for text whose audio was cut before it was made)."""
    heard: list[str] = []
    heard_s = spoken_s = 0.0
    cut = False
    for context in contexts:
        played, lasts = context.heard_s(now), context.spoken_s(chars_per_s)
        if not cut and (words := heard_text(context, played, chars_per_s)):
            heard.append(words)
        heard_s += min(played, lasts)
        spoken_s += lasts
        cut = cut or (context.cut_at is not None and played < lasts - _CUT_TOLERANCE_S)
    return HeardSpeech(
        text=" ".join(c.text for c in contexts if c.text),
        heard_text=" ".join(heard),
        heard_s=round(heard_s, 2),
        spoken_s=round(spoken_s, 2),
        cut=cut,
        settled=all(c.cut_at is not None or c.done(now) for c in contexts),
    )


def heard_text(
    context: SpokenContext, played_s: float, chars_per_s: float = DEFAULT_CHARS_PER_S
) -> str:
    """The words of `context`'s text that fit in its first `played_s` seconds of audio.

    A part (sentence) whose audio all played is heard whole; in the one being played, the
    words are heard in proportion to its audio (by characters, as speech takes time
    roughly in proportion to letters), and a word counts once its last letter is in. The
    offline voices, like most TTS services without word timings, give no finer signal.
    Always a prefix of `context.text`.
    """
    heard, start = [], 0.0
    for part in context.parts:
        lasts = part.lasts_s(chars_per_s)
        if played_s >= start + lasts - _CUT_TOLERANCE_S:
            heard += [part.text] if part.text else []
            start += lasts
            continue
        if words := words_within(part.text, (played_s - start) / lasts if lasts > 0 else 0.0):
            heard.append(words)
        break
    return " ".join(heard)


def words_within(text: str, share: float) -> str:
    """The longest prefix of `text` made of whole words that ends in its first `share`."""
    limit, end = share * len(text), 0
    for word in re.finditer(r"\S+", text):
        if word.end() > limit:
            break
        end = word.end()
    return text[:end]
