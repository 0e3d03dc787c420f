"""The per-turn reply-latency chart of the calls page: an inline SVG drawn on the server.

No charting library and no script: one bar per bot turn that has a reply latency (seconds
from the caller's end of turn to the bot's reply), in the order of the call, with the call's
p50 and p95 as dashed lines. Every piece of text is escaped (Markup.format).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from markupsafe import Markup

from phonebot.records.models import TranscriptEntryOut

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 76, 14, 34
NICE_STEPS = (0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
MAX_TICKS = 5
MAX_X_LABELS = 24


def tick_step(top: float) -> float:
    """The smallest nice step that covers `top` in at most MAX_TICKS ticks."""
    for step in NICE_STEPS:
        if top / step <= MAX_TICKS:
            return step
    return math.ceil(top / MAX_TICKS)


def latency_chart(
    entries: Sequence[TranscriptEntryOut], p50: float | None = None, p95: float | None = None
) -> Markup | None:
    """The chart's SVG, or None when no bot turn has a reply latency."""
    turns = [e for e in entries if e.kind == "bot" and e.reply_latency_s is not None]
    if not turns:
        return None
    latencies = [float(e.reply_latency_s) for e in turns]
    step = tick_step(max([*latencies, p95 or 0.0, 0.001]))
    y_max = step * math.ceil(max([*latencies, p95 or 0.0, 0.001]) / step)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def y(seconds: float) -> float:
        return TOP + plot_h - plot_h * seconds / y_max

    parts = [_axes(step, y_max, y, plot_w)]
    slot = plot_w / len(turns)
    label_every = math.ceil(len(turns) / MAX_X_LABELS)
    for index, (entry, latency) in enumerate(zip(turns, latencies, strict=True)):
        parts.append(_bar(index, entry, latency, slot, y, label_every))
    for name, value in (("p50", p50), ("p95", p95)):
        if value is not None:
            parts.append(_marker(name, value, y, plot_w))
    return Markup(
        '<svg class="latency-chart" role="img" viewBox="0 0 {w} {h}" width="{w}" height="{h}"'
        ' xmlns="http://www.w3.org/2000/svg"><title>Reply latency per bot turn</title>{body}'
        "</svg>"
    ).format(w=WIDTH, h=HEIGHT, body=Markup("").join(parts))


def _axes(step: float, y_max: float, y, plot_w: float) -> Markup:
    ticks = []
    for i in range(round(y_max / step) + 1):
        value = i * step
        ticks.append(
            Markup(
                '<line class="grid" x1="{x1}" x2="{x2}" y1="{y:.1f}" y2="{y:.1f}"'
                ' stroke="#ddd"/><text class="tick" x="{tx}" y="{ty:.1f}" text-anchor="end"'
                ' font-size="11">{label}s</text>'
            ).format(x1=LEFT, x2=LEFT + plot_w, y=y(value), tx=LEFT - 6, ty=y(value) + 4,
                     label=f"{value:g}")
        )
    caption = Markup(
        '<text class="axis-label" x="{x}" y="{y}" text-anchor="middle" font-size="11">'
        "bot turn</text>"
    ).format(x=LEFT + plot_w / 2, y=HEIGHT - 4)
    return Markup("").join([*ticks, caption])


def _bar(index: int, entry: TranscriptEntryOut, latency: float, slot: float, y,
         label_every: int) -> Markup:
    width = max(2.0, slot * 0.6)
    x = LEFT + index * slot + (slot - width) / 2
    top = y(latency)
    classes = "bar interrupted" if entry.interrupted else "bar"
    at = f" at {entry.at_s:.1f} s" if entry.at_s is not None else ""
    tooltip = f"turn {index + 1}{at}: {latency:.2f} s" + (
        " (interrupted)" if entry.interrupted else ""
    )
    bar = Markup(
        '<rect class="{cls}" data-seq="{seq}" data-latency="{latency}" x="{x:.1f}" y="{y:.1f}"'
        ' width="{w:.1f}" height="{h:.1f}" fill="#3b6fd8"><title>{tip}</title></rect>'
    ).format(cls=classes, seq=entry.seq, latency=f"{latency:g}", x=x, y=top, w=width,
             h=y(0) - top, tip=tooltip)
    if index % label_every:
        return bar
    label = Markup(
        '<text class="tick" x="{x:.1f}" y="{y:.1f}" text-anchor="middle" font-size="11">'
        "{n}</text>"
    ).format(x=x + width / 2, y=y(0) + 14, n=index + 1)
    return bar + label


def _marker(name: str, value: float, y, plot_w: float) -> Markup:
    return Markup(
        '<line class="{name}" x1="{x1}" x2="{x2}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c0392b"'
        ' stroke-dasharray="4 3"/><text class="marker-label" x="{tx}" y="{ty:.1f}"'
        ' font-size="11">{name} {value:.2f}s</text>'
    ).format(name=name, x1=LEFT, x2=LEFT + plot_w, y=y(value), tx=LEFT + plot_w + 4,
             ty=y(value) + 4, value=value)
