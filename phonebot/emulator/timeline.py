"""The call's common timeline: sample-indexed tracks, the phone's playout buffer, and
speech segmentation.

Everything is counted in 8 kHz samples from the `start` message, so caller audio, bot
audio and events line up exactly in the stereo recording and in latency figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from phonebot.audio import rms


class Track:
    """A growable int16 buffer addressed by absolute sample index (unwritten = silence)."""

    def __init__(self, capacity: int = 8000 * 60) -> None:
        self._data = np.zeros(capacity, dtype=np.int16)
        self.length = 0

    def _ensure(self, size: int) -> None:
        if size > len(self._data):
            grown = np.zeros(max(size, 2 * len(self._data)), dtype=np.int16)
            grown[: self.length] = self._data[: self.length]
            self._data = grown

    def write(self, at: int, samples: np.ndarray) -> None:
        """Place `samples` starting at sample `at`, overwriting whatever was there."""
        end = at + len(samples)
        self._ensure(end)
        self._data[at:end] = samples
        self.length = max(self.length, end)

    def zero(self, start: int, end: int) -> None:
        """Silence [start, end) — used when a `clear` discards audio that never played."""
        end = min(end, self.length)
        if end > start:
            self._data[start:end] = 0

    def view(self, start: int, end: int) -> np.ndarray:
        """Samples [start, end), zero-padded past what has been written."""
        out = np.zeros(max(0, end - start), dtype=np.int16)
        stop = min(end, self.length)
        if stop > start:
            out[: stop - start] = self._data[start:stop]
        return out

    def rms(self, start: int, end: int) -> float:
        """RMS of samples [start, end) (unwritten = silence) without copying them out.

        The caller scans the bot's track once per 20 ms frame on every call it runs, so
        this skips the copy and, past the written end, numpy altogether (a load test runs
        hundreds of these per second).
        """
        stop = min(end, self.length)
        if stop <= start or end <= start:
            return 0.0
        chunk = self._data[start:stop].astype(np.int64)
        return math.sqrt(float(np.dot(chunk, chunk)) / (end - start))


class Playback:
    """The phone's playout buffer: audio plays in arrival order at 8000 samples/s.

    A chunk arriving at `now` starts playing when the buffer drains (or at once if empty),
    so its place on the timeline is when the callee would actually hear it. That is what
    `clear` truncates and what a `mark` waits for.

    It also measures outbound pacing, as a caller hears it: inside a bot reply (from its
    first chunk until the caller speaks, presses a key or a `clear` comes, see
    `end_reply`), a chunk that arrives after the buffer ran dry is *late* and the silence
    before it is *underrun*. A gap longer than `max_gap` is taken for a new bot turn (a
    re-prompt, say), not a stall, and is only counted in `long_gaps`. `underrun_spans`
    keeps each underrun's [start, end), so a stall can be laid beside the caller's own.
    """

    def __init__(self, track: Track, max_gap: int = 16000) -> None:
        self.track = track
        self.end = 0  # sample where queued audio finishes playing
        self.received = 0
        self.dropped = 0
        self.chunks = 0
        self.long_gaps = 0
        self.underrun_spans: list[tuple[int, int]] = []
        self.max_gap = max_gap
        self._in_reply = False

    def enqueue(self, now: int, samples: np.ndarray) -> int:
        """Queue a chunk; returns the sample at which it starts playing."""
        if self._in_reply and now > self.end:
            self._count_gap(self.end, now)
        self._in_reply = True
        start = max(now, self.end)
        self.track.write(start, samples)
        self.end = start + len(samples)
        self.received += len(samples)
        self.chunks += 1
        return start

    def _count_gap(self, start: int, end: int) -> None:
        if end - start > self.max_gap:
            self.long_gaps += 1
            return
        self.underrun_spans.append((start, end))

    @property
    def late_chunks(self) -> int:
        """Chunks that came after the buffer ran dry mid-reply: one per underrun."""
        return len(self.underrun_spans)

    @property
    def underrun(self) -> int:
        """Samples of silence inside replies, waiting for late audio."""
        return sum(end - start for start, end in self.underrun_spans)

    def end_reply(self) -> None:
        """The caller took the turn: the next chunk starts a new reply, not a late one."""
        self._in_reply = False

    def clear(self, now: int) -> int:
        """Drop everything not yet played at `now`; returns how many samples were dropped."""
        dropped = max(0, self.end - now)
        self.track.zero(now, self.end)
        self.end = min(self.end, now)
        self.dropped += dropped
        self._in_reply = False
        return dropped

    def pending(self, now: int) -> int:
        """Samples queued but not yet played."""
        return max(0, self.end - now)


class LateMediaWatch:
    """Bot media that keeps arriving after a `clear`: the rest of the interrupted reply.

    Twilio's `clear` empties the playout buffer of what was sent before it; whatever the
    server sends after it is played (Twilio Media Streams, "Send a clear message"), so
    a server that goes on sending its interrupted reply talks over the caller. That tail
    comes paced like the reply it belongs to, with no pause after the `clear`, while the
    bot's next turn can only start once the caller's turn is over. So media is charged to
    a `clear` until the bot's media pauses for `gap` samples (or the next `clear`).
    """

    def __init__(self, gap: int) -> None:
        self.gap = gap
        self._clear: int | None = None  # index of the clear being watched
        self._last = 0  # sample at which the last media (or the clear) arrived

    def cleared(self, index: int, now: int) -> None:
        """A `clear` (the `index`-th) arrived at sample `now`."""
        self._clear, self._last = index, now

    def media(self, now: int) -> int | None:
        """Media arrived at `now`: the index of the `clear` it follows, or None."""
        if self._clear is not None and now - self._last >= self.gap:
            self._clear = None
        self._last = now
        return self._clear


def onset_before(segments: list[Segment], sample: int) -> int | None:
    """Start of the latest speech segment that began at or before `sample`, or None."""
    starts = [segment.start for segment in segments if segment.start <= sample]
    return max(starts) if starts else None


@dataclass
class Segment:
    """A stretch of speech, in samples; `end` is the end of its last voiced frame."""

    start: int
    end: int


class SpeechTracker:
    """Frame-energy speech segmentation: voiced frames, joined across gaps < `gap`."""

    def __init__(self, threshold: float, gap: int) -> None:
        self.threshold = threshold
        self.gap = gap
        self.segments: list[Segment] = []
        self.current: Segment | None = None
        self.last_voiced_start = -1
        self.last_voiced_end = 0

    def feed(self, start: int, frame: np.ndarray) -> tuple[Segment | None, Segment | None]:
        """Feed the next contiguous frame; returns (segment started, segment ended)."""
        return self.feed_level(start, start + len(frame), rms(frame))

    def feed_level(
        self, start: int, end: int, level: float
    ) -> tuple[Segment | None, Segment | None]:
        """`feed` for a frame [start, end) whose RMS is already known (or 0.0: silence).

        The caller's own speech is measured once per utterance, not per frame per call.
        """
        ended = None
        voiced = level >= self.threshold
        if self.current is not None and not voiced and end - self.current.end >= self.gap:
            ended = self.flush()
        if not voiced:
            return None, ended
        self.last_voiced_start, self.last_voiced_end = start, end
        if self.current is None:
            self.current = Segment(start, end)
            return self.current, ended
        self.current.end = end
        return None, ended

    def flush(self) -> Segment | None:
        """Close the open segment, if any (end of call)."""
        segment, self.current = self.current, None
        if segment is not None:
            self.segments.append(segment)
        return segment

    def all_segments(self) -> list[Segment]:
        """Closed segments plus the open one."""
        return self.segments + ([self.current] if self.current else [])

    def spoke_since(self, sample: int) -> bool:
        """True when a voiced frame started at or after `sample`."""
        return self.last_voiced_start >= sample


def response_latency(
    caller: list[Segment], bot_start: int, previous_bot_start: int | None
) -> int | None:
    """Samples from the end of the caller's last speech to `bot_start`, or None.

    None when the caller was still talking as the bot started (overlap) or has not spoken
    since the bot's previous turn began (a second bot utterance is not a response).
    """
    last_end = None
    for segment in caller:
        if segment.start < bot_start < segment.end:
            return None
        if segment.end <= bot_start:
            last_end = segment.end
    if last_end is None:
        return None
    if previous_bot_start is not None and last_end <= previous_bot_start:
        return None
    return bot_start - last_end
