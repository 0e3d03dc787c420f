"""The Twilio side of a Media Stream: a scripted caller on a websocket.

`MediaStreamCaller` connects to the stream URL from the TwiML, sends `connected` and
`start`, then does two things at once, like Twilio's media edge:

- sends one 20 ms μ-law `media` frame per slot of an absolute clock (frame k leaves at
  t0 + (k+1)·20 ms, so pacing never drifts), filled from the caller script (speech,
  silence, DTMF events, waits), and
- receives the bot's `media` into a playout buffer drained at 8000 samples/s, honours
  `clear` (drops what has not played) and echoes each `mark` once the audio queued before
  it has played.

Everything lands in a `CallResult` on one sample clock: both audio tracks, events, bot
utterances and per-turn response latency.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import importlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
from loguru import logger
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from phonebot.audio import (
    FRAME_SAMPLES,
    SILENCE_RMS,
    TWILIO_SAMPLE_RATE,
    ULAW_SILENCE,
    array_to_pcm16,
    pcm16_to_array,
    resample_array,
    ulaw_decode,
    ulaw_encode,
)
from phonebot.emulator.errors import (
    CallFailedError,
    ExpectationError,
    NoBotAudioError,
    StreamClosedError,
    StreamConnectError,
)
from phonebot.emulator.ids import new_account_sid, new_call_sid, new_stream_sid
from phonebot.emulator.keytones import KeyToneListener
from phonebot.emulator.result import (
    CallEvent,
    CallResult,
    ClearRecord,
    CloseInfo,
    MarkRecord,
    Utterance,
)
from phonebot.emulator.script import (
    Dtmf,
    Hangup,
    Menu,
    Pause,
    Speak,
    WaitForBot,
    WaitForHangup,
    words_of,
)
from phonebot.emulator.timeline import (
    LateMediaWatch,
    Playback,
    Segment,
    SpeechTracker,
    Track,
    onset_before,
    response_latency,
)
from phonebot.emulator.twiml import Verb, run_after_stream

if TYPE_CHECKING:  # annotations only
    from phonebot.emulator.script import Step

RATE = TWILIO_SAMPLE_RATE
FRAME = FRAME_SAMPLES
FRAME_S = FRAME / RATE
UTTERANCE_GAP_S = 0.4
# A speech menu's timeout running out while the bot's words are being recognised waits this
# much longer for them (a decode takes ~0.6 s; more on a busy machine).
HEARING_GRACE_S = 5.0
# A pause in the bot's media this long after a `clear` ends what is charged to it as the
# interrupted reply's tail (see timeline.LateMediaWatch).
LATE_MEDIA_GAP_S = 0.25
# A frame slot the caller's own event loop reached this late is the caller's stall, not the
# server's: the frames it owed went out late, and bot audio that came meanwhile was only
# read (and timed) when it woke. Jitter on a loaded 2-core test machine reaches tens of ms.
CALLER_STALL_S = 0.05
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

EventCallback = Callable[[CallEvent], None]
# How the called side hears what the bot says to a menu that asks for a spoken choice:
# 8 kHz 16-bit PCM and the words the menu listens for in, words out (empty PCM: get ready).
Hear = Callable[[bytes, Sequence[str]], Awaitable[str]]


class _HangupRequested(Exception):
    """Internal: end the call now (REST update, max duration); not a failure."""

    def __init__(self, reason: str, ended_by: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.ended_by = ended_by


class _ServerHungUp(Exception):
    """Internal: the server closed the stream while the script expected it to."""


def spoken_choice(said: str, choices: Iterable[str]) -> str | None:
    """The first of `choices` whose words are all in `said`."""
    words = words_of(said)
    for choice in choices:
        if (wanted := words_of(choice)) and wanted <= words:
            return choice
    return None


async def hear_offline(pcm: bytes, choices: Sequence[str] = ()) -> str:
    """What the bot said, by the offline recogniser the server's STT uses (Whisper tiny.en),
    on its decoding threads: the 20 ms frame clock keeps its pace meanwhile. The menu's
    `choices` are its hints, as a speech menu listens for its own words (a grammar): tiny.en
    hears Piper's "Billing." as "building." without them. Empty `pcm` only loads the model."""
    stt = await asyncio.to_thread(_offline_recogniser)
    return await stt.transcribe_in_thread(pcm, RATE, hints=choices) if pcm else ""


@lru_cache(maxsize=1)
def _offline_recogniser() -> Any:
    """The offline STT module, its model loaded. Imported on first use, on a thread: most
    emulated callers (a load test's hundreds) never meet a speech menu, and the import and
    the model's load would stall the 20 ms clock of every call on the loop."""
    stt = importlib.import_module("phonebot.ai.offline.stt")
    stt.warm_up()
    return stt


def note_stall(stalls: list[tuple[float, float]], start: float, end: float) -> None:
    """Add the span [start, end) in which the caller's loop ran nothing to `stalls`.

    `start` is the slot before the late one: the loop last ran about then. The catch-up
    frames after a stall are late too, so a span overlapping the last one extends it.
    """
    if stalls and start <= stalls[-1][1]:
        stalls[-1] = (stalls[-1][0], max(end, stalls[-1][1]))
    else:
        stalls.append((start, end))


def _frames(seconds: float) -> int:
    return max(0, math.ceil(seconds / FRAME_S - 1e-9))


SILENCE_PAYLOAD = base64.b64encode(bytes([ULAW_SILENCE]) * FRAME).decode()


@dataclass(frozen=True)
class SpeechFrames:
    """Caller speech cut into 20 ms frames, ready to send: done once per utterance.

    A load test runs the same few utterances on many calls at 50 frames/s each, so the
    resampling, μ-law encoding, base64 and frame energy are computed here once and
    shared, instead of per frame per call.
    """

    samples: np.ndarray  # (frames, 160) int16; the last frame zero-padded
    levels: list[float]  # RMS of each frame, for the caller's speech segmentation
    payloads: list[str]  # base64 μ-law of each frame, as the `media` message carries it
    duration: float  # seconds of speech before padding


@lru_cache(maxsize=32)
def speech_frames(pcm: bytes, sample_rate: int) -> SpeechFrames:
    """`pcm` (16-bit mono at `sample_rate`) as 8 kHz frames; cached per utterance."""
    samples = resample_array(pcm16_to_array(pcm), sample_rate, RATE)
    count = -(-len(samples) // FRAME)
    padded = np.zeros(count * FRAME, dtype=np.int16)
    padded[: len(samples)] = samples
    frames = padded.reshape(count, FRAME)
    wide = frames.astype(np.float64)
    levels = np.sqrt(np.mean(wide * wide, axis=1)).tolist() if count else []
    codes = ulaw_encode(padded).reshape(count, FRAME)
    payloads = [base64.b64encode(row.tobytes()).decode() for row in codes]
    return SpeechFrames(frames, levels, payloads, len(samples) / RATE)


class MediaStreamCaller:
    """One emulated call over a Twilio Media Stream websocket; see the module docstring.

    Run it with `await caller.run(script)`; read `caller.result` (also returned). The
    REST emulator ends it with `request_hangup()` as Twilio does on `Status=completed`.
    """

    def __init__(
        self,
        url: str,
        *,
        parameters: Mapping[str, str] | None = None,
        call_sid: str | None = None,
        account_sid: str | None = None,
        stream_sid: str | None = None,
        on_event: EventCallback | None = None,
        silence_threshold: float = SILENCE_RMS,
        utterance_gap: float = UTTERANCE_GAP_S,
        connect_timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
        after_stream: Sequence[Verb] | None = None,
        hear: Hear | None = None,
    ) -> None:
        self.url = url
        self._hear = hear or hear_offline  # for menus that ask the bot to say its choice
        self.stream_sid = stream_sid or new_stream_sid()
        self.result = CallResult(
            url=url,
            call_sid=call_sid or new_call_sid(),
            account_sid=account_sid or new_account_sid(),
            stream_sid=self.stream_sid,
            parameters=dict(parameters or {}),
        )
        self._on_event = on_event
        self._connect_timeout = connect_timeout
        self._headers = dict(headers or {})
        # The TwiML after </Connect>: what Twilio runs once the server closes the stream
        # (None: no TwiML known, e.g. a caller pointed straight at a websocket).
        self._after_stream = None if after_stream is None else tuple(after_stream)
        gap = round(utterance_gap * RATE)
        self._caller_track, self._bot_track = Track(), Track()
        self._playback = Playback(self._bot_track)
        self._late_media = LateMediaWatch(round(LATE_MEDIA_GAP_S * RATE))
        self._caller_vad = SpeechTracker(silence_threshold, gap)
        # Keys are caller input too: a wait after `Dtmf` waits for the bot's answer to them.
        self._last_keypress_end = 0
        self._keypresses: list[Segment] = []
        self._bot_vad = SpeechTracker(silence_threshold, gap)
        self._bot_keys = KeyToneListener(RATE)  # keys the bot presses, as in-band tones
        self._ws: ClientConnection | None = None
        # The `media` message's fixed tail, JSON-quoted once (frames are formatted, not dumped).
        self._media_tail = ', "streamSid": ' + json.dumps(self.stream_sid) + "}"
        self._t0: float | None = None
        self._frames_sent = 0
        self._bot_scanned = 0
        self._seq = 0
        self._pending_marks: list[tuple[int, MarkRecord]] = []
        self._bot_starts: list[int] = []
        self._latency: dict[int, float | None] = {}
        self._closed = asyncio.Event()
        self._started = asyncio.Event()
        self._hangup_request: tuple[str, str] | None = None
        self._hanging_up = False
        self._expect_close = False
        self._done = False
        self._max_frames: int | None = None

    # ----------------------------------------------------------------- public API

    @property
    def now(self) -> float:
        """Seconds since the `start` message (0.0 before it)."""
        if self._t0 is None:
            return 0.0
        return asyncio.get_running_loop().time() - self._t0

    @property
    def call_sid(self) -> str:
        return self.result.call_sid

    @property
    def finished(self) -> bool:
        """True once the call is over (hung up, or the stream closed)."""
        return self._done or self._closed.is_set()

    async def run(
        self, script: Iterable[Step], *, max_duration: float | None = None, check: bool = True
    ) -> CallResult:
        """Place the call and play `script`; hangs up (with `stop`) when the script ends.

        `max_duration` caps the call (then hangs up normally). With `check` (default) a
        failure raises a `CallFailedError` whose `.result` has everything recorded;
        otherwise the failure is in `result.error`.
        """
        self._max_frames = None if max_duration is None else _frames(max_duration)
        try:
            await self._run(list(script))
        except CallFailedError as error:
            error.result = self.result
            self.result.error = str(error)
            self.result.ended_by = self.result.ended_by or "error"
            if check:
                raise
        return self.result

    def request_hangup(self, reason: str = "call completed", ended_by: str = "rest") -> None:
        """End the call at the next frame with `stop` + close (Twilio's side hanging up)."""
        if self._hangup_request is None:
            self._hangup_request = (reason, ended_by)

    async def wait_started(self, timeout: float = 10.0) -> None:
        """Return once `start` has been sent (the stream is live)."""
        await asyncio.wait_for(self._started.wait(), timeout)

    async def send_raw(self, message: str | bytes) -> None:
        """Send `message` as is, alongside the script (fault injection: junk, floods).

        Raises websockets' `ConnectionClosed` if the server has closed the stream.
        """
        if self._ws is None:
            raise RuntimeError("the media stream is not open yet")
        await self._ws.send(message)

    async def wait_for_bot_speech(self, timeout: float, *, after: float | None = None) -> float:
        """Wait (while `run` plays in another task) for bot speech starting at/after `after`.

        Returns its start time; raises `NoBotAudioError` after `timeout` seconds.
        """
        ref = round((self.now if after is None else after) * RATE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._bot_vad.spoke_since(ref):
            if loop.time() >= deadline or self.finished:
                raise NoBotAudioError(self._no_audio_message(timeout), self.result)
            await asyncio.sleep(FRAME_S)
        return self._bot_vad.last_voiced_start / RATE

    # ---------------------------------------------------------- connection & run

    async def _run(self, script: list[Step]) -> None:
        ws = await self._connect()
        self._ws = ws
        receiver = asyncio.create_task(self._receive(ws))
        try:
            await self._handshake()
            await self._play(script)
        finally:
            await self._shutdown(receiver)
            try:
                await self._continue_twiml()
            finally:
                self._finalize()

    async def _continue_twiml(self) -> None:
        """After the server closed the stream, run the TwiML after `</Connect>`, as Twilio.

        Twilio goes on with the document when the websocket closes (error 31921's notes):
        the caller hears its `<Say>`, waits out its `<Pause>`, and is hung up at
        `<Hangup/>` or the document's end. Not when the call was already ended via REST
        (a hang-up or a transfer replaces the document), nor when the caller hung up.
        """
        close = self.result.close
        if self._after_stream is None or close is None or close.by != "server":
            return
        if self._hangup_request is not None:
            return
        ended = await run_after_stream(
            self._after_stream, self._emit, lambda: self._hangup_request is not None
        )
        by = "rest" if self._hangup_request is not None else "twiml"
        self._emit("hangup", reason=ended, by=by, send_stop=False)

    async def _connect(self) -> ClientConnection:
        host = urlsplit(self.url).hostname or ""
        try:
            return await connect(
                self.url,
                open_timeout=self._connect_timeout,
                close_timeout=2,
                ping_interval=None,
                compression=None,
                max_size=None,
                additional_headers=self._headers or None,
                proxy=None if host in LOOPBACK_HOSTS else True,
            )
        except InvalidStatus as error:
            status = error.response.status_code
            raise StreamConnectError(
                f"the server refused the media stream {self.url} (HTTP {status})"
            ) from None
        except (OSError, TimeoutError, WebSocketException, ValueError) as error:
            raise StreamConnectError(
                f"could not open the media stream {self.url}: {error or type(error).__name__}"
            ) from None

    async def _handshake(self) -> None:
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        self._t0 = asyncio.get_running_loop().time()
        self.result.started_at = time.time()
        start = {
            "accountSid": self.result.account_sid,
            "streamSid": self.stream_sid,
            "callSid": self.result.call_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
            "customParameters": dict(self.result.parameters),
        }
        await self._send(
            {
                "event": "start",
                "sequenceNumber": self._next_seq(),
                "start": start,
                "streamSid": self.stream_sid,
            }
        )
        self._started.set()
        self._emit("start", stream_sid=self.stream_sid, call_sid=self.result.call_sid)

    async def _play(self, script: list[Step]) -> None:
        try:
            for step in script:
                if self._done:
                    return
                await self._step(step)
            if not self._done:
                await self._hangup("script finished", send_stop=True, ended_by="caller")
        except _HangupRequested as request:
            await self._hangup(request.reason, send_stop=True, ended_by=request.ended_by)

    async def _shutdown(self, receiver: asyncio.Task[None]) -> None:
        """Close our side if still open (e.g. after an error) and let the receiver finish."""
        if not self._hanging_up and not self._closed.is_set():
            await self._hangup("caller error", send_stop=True, ended_by="error")
        try:
            await asyncio.wait_for(receiver, timeout=3)
        except TimeoutError:
            receiver.cancel()

    # ------------------------------------------------------------------ sending

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def _send(self, message: dict[str, Any]) -> None:
        """Send one JSON message; a closed socket becomes the matching call outcome."""
        await self._send_text(json.dumps(message))

    async def _send_text(self, text: str) -> None:
        assert self._ws is not None
        try:
            await self._ws.send(text)
        except ConnectionClosed:
            if not self._hanging_up:
                await self._await_close()

    def _media_message(self, payload: str) -> str:
        """The `media` message for the next frame: exactly `json.dumps` of Twilio's shape.

        Formatted from a template because it is the hot path (50 per second per call).
        """
        self._seq += 1
        chunk = self._frames_sent + 1
        timestamp = self._frames_sent * FRAME_S * 1000
        return (
            f'{{"event": "media", "sequenceNumber": "{self._seq}", "media": '
            f'{{"track": "inbound", "chunk": "{chunk}", "timestamp": "{round(timestamp)}", '
            f'"payload": "{payload}"}}{self._media_tail}'
        )

    def _check(self) -> None:
        """Raise if the call must stop before the next frame (and say why)."""
        if self._hangup_request is not None:
            raise _HangupRequested(*self._hangup_request)
        if self._closed.is_set():
            if self._expect_close:
                raise _ServerHungUp()
            raise StreamClosedError(self._closed_message(), self.result)
        if self._max_frames is not None and self._frames_sent >= self._max_frames:
            raise _HangupRequested("max call duration reached", "max_duration")

    async def _wait_slot(self) -> None:
        """Sleep until the next frame's slot on the absolute clock (no drift)."""
        assert self._t0 is not None
        loop = asyncio.get_running_loop()
        due = (self._frames_sent + 1) * FRAME_S
        delay = self._t0 + due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        now = loop.time() - self._t0
        if now - due >= CALLER_STALL_S:  # the sleep overran, or we came late to it
            note_stall(self.result.caller_stalls, due - FRAME_S, now)

    async def _tick(
        self,
        payload: str = SILENCE_PAYLOAD,
        samples: np.ndarray | None = None,
        level: float = 0.0,
    ) -> None:
        """Send the next 20 ms frame in its time slot: silence, or one of `SpeechFrames`.

        `samples` and `level` are that frame's audio and RMS (None / 0.0 for silence, which
        the caller's track already holds: unwritten samples are silent).
        """
        self._check()
        await self._wait_slot()
        self._check()
        await self._send_text(self._media_message(payload))
        at = self._frames_sent * FRAME
        if samples is not None:
            self._caller_track.write(at, samples)
        self._caller_vad.feed_level(at, at + FRAME, level)
        if level >= self._caller_vad.threshold:
            self._playback.end_reply()
        self._frames_sent += 1
        await self._service()

    async def _await_close(self) -> None:
        """A send failed: let the receiver record the close, then report it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), timeout=2)
        self._check()
        raise StreamClosedError(self._closed_message(), self.result)

    async def _service(self) -> None:
        """Per-frame chores: echo marks whose audio has played, scan played bot audio."""
        now = self._now_sample()
        due = [item for item in self._pending_marks if item[0] <= now]
        for item in due:  # usually none: marks are a few per bot reply
            self._pending_marks.remove(item)
            await self._answer_mark(item[1])
        while (self._bot_scanned + 1) * FRAME <= now:
            self._scan_bot_frame()

    async def _answer_mark(self, mark: MarkRecord) -> None:
        await self._send(
            {
                "event": "mark",
                "sequenceNumber": self._next_seq(),
                "streamSid": self.stream_sid,
                "mark": {"name": mark.name},
            }
        )
        mark.answered = self.now
        self._emit("mark_answered", name=mark.name, delay=mark.answered - mark.received)

    # -------------------------------------------------------------------- steps

    async def _step(self, step: Step) -> None:
        if isinstance(step, Speak):
            await self._speak(step)
        elif isinstance(step, Pause):
            self._emit("pause", seconds=step.seconds)
            await self._silence(step.seconds)
        elif isinstance(step, Dtmf):
            await self._dtmf(step)
        elif isinstance(step, WaitForBot):
            await self._wait_for_bot(step)
        elif isinstance(step, WaitForHangup):
            await self._wait_for_hangup(step)
        elif isinstance(step, Menu):
            await self._menu(step)
        elif isinstance(step, Hangup):
            await self._hangup("caller hung up", send_stop=step.send_stop, ended_by="caller")
        else:
            raise TypeError(f"unknown script step: {step!r}")

    async def _speak(self, step: Speak) -> None:
        speech = speech_frames(bytes(step.pcm), step.sample_rate)
        self._emit(
            "caller_speech",
            t=(self._frames_sent * FRAME) / RATE,
            text=step.text,
            duration=speech.duration,
        )
        for payload, samples, level in zip(
            speech.payloads, speech.samples, speech.levels, strict=True
        ):
            await self._tick(payload, samples, level)

    async def _silence(self, seconds: float) -> None:
        for _ in range(_frames(seconds)):
            await self._tick()

    async def _dtmf(self, step: Dtmf) -> None:
        for digit in step.digits:
            self._check()
            await self._send(
                {
                    "event": "dtmf",
                    "streamSid": self.stream_sid,
                    "sequenceNumber": self._next_seq(),
                    "dtmf": {"track": "inbound_track", "digit": digit},
                }
            )
            # On the frame clock, like caller speech: it goes out between two frames.
            self._last_keypress_end = self._frames_sent * FRAME
            self._keypresses.append(Segment(self._last_keypress_end, self._last_keypress_end))
            t = self._last_keypress_end / RATE
            self.result.dtmf.append((t, digit))
            self._playback.end_reply()
            self._emit("dtmf", t=t, digit=digit)
            await self._silence(step.interval)

    async def _wait_for_bot(self, step: WaitForBot) -> None:
        """Tick silence until the bot has replied to the caller's latest speech or keys."""
        ref = max(self._caller_vad.last_voiced_end, self._last_keypress_end)
        start_limit = self._frames_sent + _frames(step.timeout)
        total_limit = self._frames_sent + _frames(max(step.max_wait, step.timeout))
        self._emit("wait", until=step.until, timeout=step.timeout)
        while True:
            spoke = self._bot_vad.spoke_since(ref)
            if spoke and (step.until == "speech" or self._bot_quiet_for() >= step.quiet):
                return
            if not spoke and self._frames_sent >= start_limit:
                if step.require:
                    raise NoBotAudioError(self._no_audio_message(step.timeout), self.result)
                self._emit("wait_timeout", reason="no bot speech", timeout=step.timeout)
                return
            if self._frames_sent >= total_limit:
                self._emit("wait_timeout", reason="bot still talking", timeout=step.max_wait)
                return
            await self._tick()

    async def _menu(self, step: Menu) -> None:
        """Play a phone menu: its prompt, then the bot's key (heard in its audio, from the
        prompt's start on: menus take a key pressed over them) or, when it has `spoken`
        choices, the bot's words; a listed choice runs its steps, anything else plays the
        prompt again, up to `repeats` times."""
        # The recogniser loads while the prompt plays, not when the bot has answered.
        warming = asyncio.create_task(self._hear(b"", ())) if step.spoken else None
        try:
            for attempt in range(step.repeats + 1):
                keys_before = len(self.result.bot_dtmf)
                said_before = len(self.result.bot_utterances)
                self._emit("menu", prompt=step.prompt.text, attempt=attempt + 1)
                await self._speak(step.prompt)
                choice = await self._wait_for_choice(step, keys_before, said_before)
                if choice is not None:
                    for chosen in choice:
                        await self._step(chosen)
                    return
        finally:
            if warming is not None:
                warming.cancel()
        for fallback in step.otherwise:
            await self._step(fallback)

    async def _wait_for_choice(
        self, step: Menu, keys_before: int, said_before: int
    ) -> Sequence[Step] | None:
        """The steps of the first choice the bot makes after `keys_before` keys and
        `said_before` utterances, waiting up to the menu's `timeout` of our silence (and for
        an utterance being heard when it runs out): a key (one not listed: None at once)
        or, on a menu with `spoken` choices, an utterance whose words hold one (others are
        let by, as a speech menu waits for a choice)."""
        hearing: asyncio.Task[str] | None = None
        frames = _frames(step.timeout) + (_frames(HEARING_GRACE_S) if step.spoken else 0)
        try:
            for frame in range(frames):
                if len(self.result.bot_dtmf) > keys_before:
                    key = self.result.bot_dtmf[keys_before][1]
                    self._emit("menu_choice" if key in step.options else "menu_retry", key=key)
                    return step.options.get(key)
                utterances = self.result.bot_utterances
                if hearing is None and step.spoken and len(utterances) > said_before:
                    pcm, choices = utterances[said_before].pcm, tuple(step.spoken)
                    hearing = asyncio.create_task(self._hear(pcm, choices))
                if hearing is not None and hearing.done():
                    word = self._heard_choice(hearing, step)
                    if word is not None:
                        return step.spoken[word]
                    hearing, said_before = None, said_before + 1
                if hearing is None and frame >= _frames(step.timeout):
                    break  # the grace is only for an utterance being heard
                await self._tick()
        finally:
            if hearing is not None:
                hearing.cancel()
        self._emit("menu_retry", key=None)
        return None

    def _heard_choice(self, hearing: asyncio.Task[str], step: Menu) -> str | None:
        """The choice in what `hearing` heard, or None; a recogniser that failed is one
        line in the call's events (`menu_heard` with its error), not the script's end."""
        try:
            said = hearing.result()
        except Exception as error:  # noqa: BLE001 (the menu just did not understand)
            self._emit("menu_heard", said="", error=f"{type(error).__name__}: {error}")
            return None
        if (word := spoken_choice(said, step.spoken)) is not None:
            self._emit("menu_choice", said=said, word=word)
            return word
        self._emit("menu_heard", said=said)
        return None

    async def _wait_for_hangup(self, step: WaitForHangup) -> None:
        """Tick silence until the server ends the call; `ExpectationError` if it doesn't."""
        self._expect_close = True
        try:
            await self._silence(step.timeout)
        except _ServerHungUp:
            self.result.ended_by = self.result.ended_by or "server"
            self._done = True
            return
        except _HangupRequested as request:
            if request.ended_by != "rest":
                raise
            await self._hangup(request.reason, send_stop=True, ended_by="rest")
            return
        finally:
            self._expect_close = False
        raise ExpectationError(f"the bot did not hang up within {step.timeout:g} s", self.result)

    async def _hangup(self, reason: str, *, send_stop: bool, ended_by: str) -> None:
        """Twilio ending the call: `stop` (unless an abrupt drop), then close the socket."""
        if self._hanging_up:
            return
        self._hanging_up = True
        self._done = True
        self.result.ended_by = self.result.ended_by or ended_by
        if self._ws is not None and not self._closed.is_set():
            if send_stop:
                await self._send(
                    {
                        "event": "stop",
                        "sequenceNumber": self._next_seq(),
                        "streamSid": self.stream_sid,
                        "stop": {
                            "accountSid": self.result.account_sid,
                            "callSid": self.result.call_sid,
                        },
                    }
                )
                self._emit("stop_sent")
            await self._ws.close(1000)
        self._emit("hangup", reason=reason, by=ended_by, send_stop=send_stop)

    # ---------------------------------------------------------------- receiving

    async def _receive(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                self._handle(message)
        except ConnectionClosed:
            pass
        except Exception:  # a bug here must not hang the call; it is logged and recorded
            logger.exception("media stream receiver failed")
        finally:
            self._record_close(ws)

    def _record_close(self, ws: ClientConnection) -> None:
        by = "caller" if self._hanging_up else "server"
        info = CloseInfo(self.now, by, ws.close_code, ws.close_reason or "")
        self.result.close = info
        if by == "server" and self._hangup_request is None:
            self.result.ended_by = self.result.ended_by or "server"
        self._closed.set()
        self._emit("closed", by=by, code=info.code, reason=info.reason)

    def _handle(self, message: str | bytes) -> None:
        if self._hanging_up:
            return
        try:
            data = json.loads(message)
            event = data["event"]
        except (ValueError, TypeError, KeyError):
            self._emit("bad_message", message=str(message)[:200])
            return
        handler = {"media": self._on_media, "clear": self._on_clear, "mark": self._on_mark}
        if event not in handler:
            self.result.unknown_events.append(str(event))
            self._emit("unknown_event", event=event)
            return
        if data.get("streamSid") != self.stream_sid:
            self.result.streamsid_mismatches += 1
            self._emit("streamsid_mismatch", event=event, got=data.get("streamSid"))
            return
        handler[event](data)

    def _on_media(self, data: dict[str, Any]) -> None:
        try:
            payload = base64.b64decode(data["media"]["payload"], validate=True)
        except (KeyError, TypeError, binascii.Error):
            self._emit("bad_message", message="media without a valid base64 payload")
            return
        if not payload:
            return
        samples = ulaw_decode(np.frombuffer(payload, dtype=np.uint8))
        if self.result.first_bot_audio is None:
            self.result.first_bot_audio = self.now
        now = self._now_sample()
        self._playback.enqueue(now, samples)
        cleared = self._late_media.media(now)
        if cleared is not None:  # still the interrupted reply: Twilio plays it
            record = self.result.clears[cleared]
            self.result.clears[cleared] = replace(
                record,
                late_media=record.late_media + 1,
                late_audio=record.late_audio + len(samples) / RATE,
            )

    def _on_clear(self, data: dict[str, Any]) -> None:
        now = self._now_sample()
        dropped = self._playback.clear(now) / RATE
        onset = onset_before(self._caller_vad.all_segments(), now)
        onset_t = None if onset is None else onset / RATE
        self.result.clears.append(ClearRecord(now / RATE, dropped, caller_onset=onset_t))
        self._late_media.cleared(len(self.result.clears) - 1, now)
        # Twilio answers outstanding marks right away when the buffer is cleared.
        self._pending_marks = [(now, mark) for _, mark in self._pending_marks]
        self._emit("clear", dropped=dropped)

    def _on_mark(self, data: dict[str, Any]) -> None:
        name = str((data.get("mark") or {}).get("name", ""))
        now = self._now_sample()
        due = max(now, self._playback.end)
        mark = MarkRecord(name, now / RATE, due / RATE)
        self.result.marks.append(mark)
        self._pending_marks.append((due, mark))
        self._emit("mark", name=name, due=due / RATE)

    # ------------------------------------------------------------------ analysis

    def _now_sample(self) -> int:
        return max(0, int(self.now * RATE))

    def _bot_quiet_for(self) -> float:
        """Seconds of played bot audio since its last voiced frame."""
        return (self._bot_scanned * FRAME - self._bot_vad.last_voiced_end) / RATE

    def _scan_bot_frame(self) -> None:
        start = self._bot_scanned * FRAME
        level = self._bot_track.rms(start, start + FRAME)
        frame = self._bot_track.view(start, start + FRAME)
        if press := self._bot_keys.feed(frame, start, level):
            self.result.bot_dtmf.append(press)
            self._emit("bot_dtmf", t=press[0], digit=press[1])
        started, ended = self._bot_vad.feed_level(start, start + FRAME, level)
        self._bot_scanned += 1
        if ended is not None:
            self._bot_utterance_ended(ended)
        if started is not None:
            self._bot_utterance_started(started)

    def _bot_utterance_started(self, segment: Segment) -> None:
        previous = self._bot_starts[-1] if self._bot_starts else None
        caller = sorted(self._caller_vad.all_segments() + self._keypresses, key=lambda s: s.end)
        samples = response_latency(caller, segment.start, previous)
        latency = None if samples is None else samples / RATE
        self._bot_starts.append(segment.start)
        self._latency[segment.start] = latency
        self._emit("bot_speech_start", t=segment.start / RATE, latency=latency)

    def _bot_utterance_ended(self, segment: Segment) -> None:
        pcm = array_to_pcm16(self._bot_track.view(segment.start, segment.end))
        utterance = Utterance(
            index=len(self.result.bot_utterances),
            start=segment.start / RATE,
            end=segment.end / RATE,
            latency=self._latency.get(segment.start),
            pcm=pcm,
        )
        self.result.bot_utterances.append(utterance)
        self._emit("bot_utterance", t=utterance.start, utterance=utterance)

    def _finalize(self) -> None:
        """Close open segments and build the recording (only audio that actually played)."""
        end = self._now_sample() if self._t0 is not None else 0
        while (self._bot_scanned + 1) * FRAME <= end:
            self._scan_bot_frame()
        last = self._bot_vad.flush()
        if last is not None:
            self._bot_utterance_ended(last)
        self._caller_vad.flush()
        result = self.result
        result.duration = end / RATE
        result.bot_audio_received = self._playback.received / RATE
        result.bot_audio_dropped = (self._playback.dropped + self._playback.pending(end)) / RATE
        result.bot_chunks = self._playback.chunks
        result.late_bot_chunks = self._playback.late_chunks
        result.bot_underrun = self._playback.underrun / RATE
        result.bot_long_gaps = self._playback.long_gaps
        result.bot_underrun_spans = [(a / RATE, b / RATE) for a, b in self._playback.underrun_spans]
        result.caller_audio = self._caller_track.view(0, self._frames_sent * FRAME)
        result.bot_audio = self._bot_track.view(0, end)
        result.caller_segments = [(s.start / RATE, s.end / RATE) for s in self._caller_vad.segments]

    # -------------------------------------------------------------------- events

    def _emit(self, kind: str, t: float | None = None, **data: Any) -> None:
        event = CallEvent(self.now if t is None else t, kind, data)
        self.result.events.append(event)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # an observer's bug must not break the call
                logger.exception("on_event callback failed")

    def _closed_message(self) -> str:
        close = self.result.close
        if close is None:
            return "the server closed the media stream before the caller's script finished"
        reason = f" {close.reason!r}" if close.reason else ""
        return (
            f"the server closed the media stream at {close.t:.2f} s (code {close.code}"
            f"{reason}) before the caller's script finished"
        )

    def _no_audio_message(self, timeout: float) -> str:
        received = self._playback.received / RATE
        detail = "nothing received" if received == 0 else f"{received:.1f} s received, all silent"
        if self.result.streamsid_mismatches:
            detail += f"; {self.result.streamsid_mismatches} messages ignored for a wrong streamSid"
        return f"no audio from the bot within {timeout:g} s ({detail})"
