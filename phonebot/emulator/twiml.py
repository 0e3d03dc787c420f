"""Reading the TwiML a server answers with, the way Twilio would act on it.

Parsed with `defusedxml` because the document comes over the network: entity expansion and
external entities are refused. Only what the emulator acts on is modelled: the
`<Connect><Stream>` (URL and `<Parameter>`s) it streams to, the `<Dial><Conference>` room
a call is put in (phonebot.emulator.conference), plus `<Say>`, `<Pause>`, `<Hangup>`,
`<Dial>` and friends, reported so a test or the CLI can show them.

Like Twilio, the emulator goes on with the verbs after `</Connect>` once the media stream
closes (Twilio error 31921's notes; the `<Connect>` docs): `run_after_stream` makes a
`<Pause>` take its time, a `<Say>` take the time it takes to speak, and ends the call at
`<Hangup/>` or at the end of the document.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from phonebot.emulator.errors import NoStreamError, TwiMLError


@dataclass(frozen=True)
class Verb:
    """One top-level TwiML verb, in document order."""

    name: str
    attributes: dict[str, str]
    text: str = ""
    children: tuple[Verb, ...] = ()


@dataclass(frozen=True)
class StreamTarget:
    """A `<Connect><Stream>`: where to open the websocket and the custom parameters."""

    url: str
    parameters: dict[str, str]
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ConferenceTarget:
    """A `<Dial><Conference>`: the room's name and how this participant takes part.

    Twilio's defaults (https://www.twilio.com/docs/voice/twiml/conference#attributes):
    `startConferenceOnEnter` true, `endConferenceOnExit` false, `waitUrl` Twilio's hold
    music (None here), `beep` true.
    """

    name: str
    start_on_enter: bool = True
    end_on_exit: bool = False
    wait_url: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TwiML:
    """A parsed `<Response>`; `stream` / `conference` are None when it has no
    `<Connect><Stream>` / `<Dial><Conference>`."""

    verbs: tuple[Verb, ...]
    stream: StreamTarget | None
    raw: str
    conference: ConferenceTarget | None = None

    @property
    def says(self) -> list[str]:
        """Text of every top-level `<Say>`."""
        return [verb.text for verb in self.verbs if verb.name == "Say"]

    @property
    def pauses(self) -> list[float]:
        """Length in seconds of every `<Pause>` (Twilio's default is 1)."""
        return [float(v.attributes.get("length", "1")) for v in self.verbs if v.name == "Pause"]

    @property
    def has_hangup(self) -> bool:
        """True when the document contains `<Hangup/>`."""
        return any(verb.name == "Hangup" for verb in self.verbs)

    @property
    def dials(self) -> list[str]:
        """Targets of every `<Dial>`: its text, or its `<Number>`/`<Client>`/`<Sip>` children.

        Numbers and addresses dialed only: a `<Conference>` is a room, not a party called
        (see `conference`).
        """
        targets: list[str] = []
        for verb in self.verbs:
            if verb.name == "Dial":
                nested = [c.text for c in verb.children if c.text and c.name != "Conference"]
                room = any(c.name == "Conference" for c in verb.children)
                targets.extend(nested or ([verb.text] if verb.text and not room else []))
        return targets

    @property
    def after_stream(self) -> tuple[Verb, ...]:
        """The verbs after the `<Connect>` holding the stream: what Twilio runs once the
        stream closes (empty when there is no stream)."""
        for index, verb in enumerate(self.verbs):
            if verb.name == "Connect" and any(c.name == "Stream" for c in verb.children):
                return self.verbs[index + 1 :]
        return ()

    @property
    def verb_names(self) -> list[str]:
        """Names of the top-level verbs, e.g. `["Connect", "Pause"]`."""
        return [verb.name for verb in self.verbs]

    def require_stream(self) -> StreamTarget:
        """The stream target, or `NoStreamError` naming the verbs that were there instead."""
        if self.stream is None:
            found = ", ".join(f"<{name}>" for name in self.verb_names) or "empty <Response>"
            raise NoStreamError(f"found: {found}")
        return self.stream

    def describe(self) -> str:
        """One line summarising the document, e.g. `<Connect><Stream url='wss://…'> <Pause>`."""
        parts = []
        for verb in self.verbs:
            if verb.name == "Connect" and self.stream is not None:
                parts.append(f"<Connect><Stream url={self.stream.url!r}>")
                continue
            if verb.name == "Dial" and self.conference is not None:
                parts.append(f"<Dial><Conference {self.conference.name!r}>")
                continue
            text = f" {verb.text[:40]!r}" if verb.text else ""
            parts.append(f"<{verb.name}>{text}")
        return " ".join(parts) or "<Response/>"


def _local_name(tag: str) -> str:
    """Tag without an XML namespace, so `{ns}Response` reads as `Response`."""
    return tag.rsplit("}", 1)[-1]


def _verb(element: Element) -> Verb:
    """Convert an element (recursively) into a `Verb`."""
    return Verb(
        name=_local_name(element.tag),
        attributes={_local_name(k): v for k, v in element.attrib.items()},
        text=(element.text or "").strip(),
        children=tuple(_verb(child) for child in element),
    )


def _find_stream(verbs: tuple[Verb, ...]) -> StreamTarget | None:
    """First `<Connect><Stream>`; a `<Start><Stream>` (one-way fork) does not count."""
    for verb in verbs:
        if verb.name != "Connect":
            continue
        for child in verb.children:
            if child.name == "Stream" and child.attributes.get("url"):
                parameters = {
                    p.attributes["name"]: p.attributes.get("value", "")
                    for p in child.children
                    if p.name == "Parameter" and "name" in p.attributes
                }
                return StreamTarget(child.attributes["url"], parameters, dict(child.attributes))
    return None


def _flag(attributes: dict[str, str], name: str, default: bool) -> bool:
    """A Twilio true/false attribute; anything else keeps the default (Twilio warns, e.g.
    13232 "Invalid startConferenceOnEnter value", https://www.twilio.com/docs/errors/13232)."""
    value = attributes.get(name, "").strip().lower()
    return {"true": True, "false": False}.get(value, default)


def _find_conference(verbs: tuple[Verb, ...]) -> ConferenceTarget | None:
    """The first `<Dial><Conference>` (https://www.twilio.com/docs/voice/twiml/conference)."""
    for verb in verbs:
        if verb.name != "Dial":
            continue
        for child in verb.children:
            if child.name == "Conference" and child.text:
                attributes = dict(child.attributes)
                return ConferenceTarget(
                    name=child.text,
                    start_on_enter=_flag(attributes, "startConferenceOnEnter", True),
                    end_on_exit=_flag(attributes, "endConferenceOnExit", False),
                    wait_url=attributes.get("waitUrl"),
                    attributes=attributes,
                )
    return None


def parse_twiml(text: str | bytes) -> TwiML:
    """Parse a TwiML document; `TwiMLError` if it is not XML or not a `<Response>`."""
    raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    try:
        root = fromstring(raw.strip().encode("utf-8"))
    except (ParseError, DefusedXmlException) as error:
        raise TwiMLError(f"invalid TwiML XML: {error}") from None
    if _local_name(root.tag) != "Response":
        raise TwiMLError(f"TwiML root element is <{_local_name(root.tag)}>, not <Response>")
    verbs = tuple(_verb(child) for child in root)
    return TwiML(
        verbs=verbs, stream=_find_stream(verbs), raw=raw, conference=_find_conference(verbs)
    )


# --- what Twilio does after the stream -------------------------------------------------

# Twilio's <Say> voices speak at roughly 150-180 words a minute; 2.5 words/s errs long.
SAY_WORDS_PER_S = 2.5
MIN_SAY_S = 0.5
POLL_S = 0.02
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

Emit = Callable[..., Any]


def say_seconds(text: str, loop: str | None = None) -> float:
    """How long Twilio takes to speak `text` (`loop` times; 0 means Twilio's cap of 1000)."""
    repeats = int(loop) if loop and loop.isdigit() and int(loop) > 0 else 1
    return max(MIN_SAY_S, len(text.split()) / SAY_WORDS_PER_S) * repeats


def pause_seconds(verb: Verb) -> float:
    """A `<Pause>`'s length in seconds (Twilio's default is 1)."""
    try:
        return max(0.0, float(verb.attributes.get("length", "1")))
    except ValueError:
        return 1.0


async def _wait(seconds: float, stop: Callable[[], bool]) -> bool:
    """Sleep `seconds` unless `stop()` turns true first (then False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        if stop():
            return False
        await asyncio.sleep(min(POLL_S, max(0.0, deadline - loop.time())))
    return not stop()


async def run_after_stream(verbs: Sequence[Verb], emit: Emit, stop: Callable[[], bool]) -> str:
    """Run the TwiML after `</Connect>` as Twilio does; returns how the call ended.

    `emit(kind, **data)` records `say` (text, duration) and `twiml_pause` (seconds)
    events; `stop()` is true once the call was ended another way (REST hang-up). Verbs
    the emulator doesn't model (`<Dial>`, `<Gather>`, `<Redirect>`…) end the run with an
    `twiml_unsupported` event rather than being guessed at.
    """
    for verb in verbs:
        if stop():
            return "hung up via REST"
        if verb.name == "Say":
            seconds = say_seconds(verb.text, verb.attributes.get("loop"))
            emit("say", text=verb.text, duration=seconds)
            if not await _wait(seconds, stop):
                return "hung up via REST"
        elif verb.name == "Pause":
            seconds = pause_seconds(verb)
            emit("twiml_pause", seconds=seconds)
            if not await _wait(seconds, stop):
                return "hung up via REST"
        elif verb.name in ("Hangup", "Reject"):
            return f"<{verb.name}/> after the stream"
        else:
            emit("twiml_unsupported", verb=verb.name)
            return f"<{verb.name}> after the stream (not emulated)"
    return "end of the TwiML after the stream"


def stream_url_refusal(url: str) -> str | None:
    """Why Twilio would refuse to open this `<Stream url>`, or None.

    Twilio streams to `wss://` only: anything else is error 31922 ("Stream - WebSocket -
    URL Schema Not Supported", https://www.twilio.com/docs/api/errors/31922). `ws://` is
    let through on loopback only, where no real Twilio could be and the emulator stands in.
    """
    parts = urlsplit(url)
    if parts.scheme == "wss" or (parts.scheme == "ws" and parts.hostname in LOOPBACK_HOSTS):
        return None
    return (
        f"Twilio error 31922 (Stream - WebSocket - URL Schema Not Supported): <Stream url="
        f"{url!r}> is not wss://; Twilio only streams to wss:// (set the server's PUBLIC_URL "
        "to its public https URL)"
    )
