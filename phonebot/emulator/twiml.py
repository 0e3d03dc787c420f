"""Reading the TwiML a server answers with, the way Twilio would act on it.

Parsed with `defusedxml` because the document comes over the network: entity expansion and
external entities are refused. Only what the emulator acts on is modelled: the
`<Connect><Stream>` (URL and `<Parameter>`s) it streams to, plus `<Say>`, `<Pause>`,
`<Hangup>`, `<Dial>` and friends, reported so a test or the CLI can show them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
class TwiML:
    """A parsed `<Response>`; `stream` is None when it has no `<Connect><Stream>`."""

    verbs: tuple[Verb, ...]
    stream: StreamTarget | None
    raw: str

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
        """Targets of every `<Dial>`: its text, or its `<Number>`/`<Client>`/`<Sip>` children."""
        targets: list[str] = []
        for verb in self.verbs:
            if verb.name == "Dial":
                nested = [child.text for child in verb.children if child.text]
                targets.extend(nested or ([verb.text] if verb.text else []))
        return targets

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
    return TwiML(verbs=verbs, stream=_find_stream(verbs), raw=raw)
