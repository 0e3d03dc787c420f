"""Twilio conference rooms, as the REST emulator plays them for a warm transfer.

A warm transfer (phonebot.call.warm_transfer) puts the person who accepted in a room to
wait (`<Dial><Conference startConferenceOnEnter="false">`), then the caller, whose entering
starts the conference; either one leaving ends it for both (`endConferenceOnExit`).
`ConferenceRoom` keeps the rules of one room and nothing else: who is in it, when it
started and ended, and what happened, so they unit-test without a loop or a socket. The
emulator (phonebot.emulator.rest) applies their consequences to the calls: it completes
the calls a room drops.

The rules, from https://www.twilio.com/docs/voice/twiml/conference#attributes:

- A participant who joins a conference that has not started waits, hearing the `waitUrl`
  (Twilio's hold music without one), until a participant with `startConferenceOnEnter`
  true is there with someone else: then the conference starts. A participant alone waits
  whatever its `startConferenceOnEnter` (there is no one to talk to).
- When a participant with `endConferenceOnExit` true leaves (hangs up, is completed via
  REST, or is redirected to other TwiML), the conference ends and every other participant
  drops out: their `<Dial>` ends. The last participant leaving ends it too.
- A room's name can be used again once it ended: that is a new conference, with its own
  ConferenceSid (https://www.twilio.com/docs/voice/api/conference-resource).

No audio is modelled: a room says who would hear whom, not what they say.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

# What the hold music is recorded as when a participant has no `waitUrl` (Twilio plays its
# own, https://www.twilio.com/docs/voice/twiml/conference#attributes-waiturl).
DEFAULT_WAIT = "default"
EventKind = Literal["join", "leave", "start", "end", "wait"]


class RoomEvent(NamedTuple):
    """One thing that happened in a room: `call_sid` is None for the room's own `start` and
    `end`; `detail` is the hold music for `wait` and the reason for `leave` / `end`."""

    t: float
    call_sid: str | None
    kind: EventKind
    detail: str = ""


@dataclass(frozen=True)
class Participant:
    """A call in a room, with the `<Conference>` attributes it joined with."""

    call_sid: str
    start_on_enter: bool = True
    end_on_exit: bool = False
    wait_url: str | None = None


@dataclass
class ConferenceRoom:
    """One conference, from its first participant to its end; see the module docstring.

    `clock` stamps the events (`time.monotonic` by default; a test may pass its own).
    """

    name: str
    clock: Callable[[], float] = time.monotonic
    participants: dict[str, Participant] = field(default_factory=dict)
    started_at: float | None = None
    ended_at: float | None = None
    events: list[RoomEvent] = field(default_factory=list)
    # Every call that ever joined, in order (participants who left included).
    joined: list[str] = field(default_factory=list)

    @property
    def started(self) -> bool:
        return self.started_at is not None

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    @property
    def waiting(self) -> list[str]:
        """Calls in the room hearing hold music: all of them until the conference starts."""
        return [] if self.started else list(self.participants)

    def kinds(self) -> list[str]:
        """The events' kinds in order, e.g. `["join", "wait", "join", "start"]`."""
        return [event.kind for event in self.events]

    def join(
        self,
        call_sid: str,
        *,
        start_on_enter: bool = True,
        end_on_exit: bool = False,
        wait_url: str | None = None,
    ) -> None:
        """`call_sid` enters: the conference starts if it now can, else the call waits.

        `ValueError` for a room that ended (the emulator opens a new one under the same
        name) or a call already in it.
        """
        if self.ended:
            raise ValueError(f"conference {self.name!r} has ended; a new one must be opened")
        if call_sid in self.participants:
            raise ValueError(f"call {call_sid} is already in conference {self.name!r}")
        self.participants[call_sid] = Participant(call_sid, start_on_enter, end_on_exit, wait_url)
        self.joined.append(call_sid)
        self._record(call_sid, "join")
        if self.started:
            return
        if self._can_start():
            self.started_at = self._record(None, "start")
        else:
            self._record(call_sid, "wait", wait_url or DEFAULT_WAIT)

    def leave(self, call_sid: str, reason: str = "left") -> list[str]:
        """`call_sid` leaves (hung up, completed, redirected); returns the calls the room
        drops because of it: everyone else when it had `endConferenceOnExit`, else none.

        The room ends when such a participant leaves or when it is left empty. A call not
        in the room leaves nothing.
        """
        participant = self.participants.pop(call_sid, None)
        if participant is None:
            return []
        self._record(call_sid, "leave", reason)
        if not participant.end_on_exit and self.participants:
            return []
        dropped = list(self.participants)
        why = f"conference ended: {call_sid} left with endConferenceOnExit" if dropped else ""
        for other in dropped:
            self._record(other, "leave", why)
        self.participants.clear()
        self.ended_at = self._record(None, "end", why or "last participant left")
        return dropped

    def _can_start(self) -> bool:
        """Someone with `startConferenceOnEnter` is there, and not alone."""
        present = self.participants.values()
        return len(self.participants) >= 2 and any(p.start_on_enter for p in present)

    def _record(self, call_sid: str | None, kind: EventKind, detail: str = "") -> float:
        now = self.clock()
        self.events.append(RoomEvent(now, call_sid, kind, detail))
        return now


__all__ = ["DEFAULT_WAIT", "ConferenceRoom", "Participant", "RoomEvent"]
