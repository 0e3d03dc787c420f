"""The benchmark's figures as Markdown, for the docs to include (`load.py --markdown PATH`).

Figures in the docs are generated, never pasted: a reader can rerun the exact command on
the machine described and compare. The file says when, where and how it was made.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from load_cluster import HeldTarget
from load_report import (
    MARKS,
    OUTSIDE_WARN_CORES,
    MachineBudget,
    StepResult,
    fmt,
    fmt_range,
    taken_cores,
)
from load_stats import SLOW_TURN_S, STAGES, StopRule

from phonebot.config import shown_setting

NAMES = {
    "ours-instant": "ours",
    "baseline-instant": "baseline",
    "ours-offline": "ours offline",
    "ours-norecords": "ours, records off",
    "ours-variant": "ours with --compare-env",
    "ours-1proc": "ours, 1 process",
    "ours-2proc": "ours, 2 processes",
    "ours-3proc": "ours, 3 processes",
    "ours-4proc": "ours, 4 processes",
}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1/5/15-minute load average: a busy shared machine shows here, next to the figures."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_description(
    argv: Sequence[str] | None = None, compared: Mapping[str, str] | None = None
) -> dict:
    """What a reader needs to reproduce the figures: hardware, software, the command, and
    the settings `--compare-env` put on top of ours (`compared`)."""
    args = [shown_argument(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pipecat": package_version("pipecat-ai"),
        "command": shlex.join([".venv/bin/python", "bench/load.py", *args]),
        "load_average_start": load_average(),
        "compare_env": shown_settings(compared or {}),
    }


def shown_settings(settings: Mapping[str, str]) -> dict[str, str]:
    """Settings as the benchmark prints them: a secret's value masked, so a key passed
    with `--server-env` / `--compare-env` doesn't end up in a published page."""
    return {name: shown_setting(name, value) for name, value in settings.items()}


def shown_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Parsed options as the JSON records them: `--server-env` / `--compare-env` masked."""
    options = dict(vars(args))
    for name in ("server_env", "compare_env"):
        if isinstance(options.get(name), Mapping):
            options[name] = shown_settings(options[name])
    return options


def shown_argument(arg: str) -> str:
    """One command-line argument as printed: `NAME=VALUE` (or `--flag=NAME=VALUE`) with a
    secret setting's value masked; anything else unchanged."""
    flag, assignment = arg.split("=", 1) if arg.startswith("--") and "=" in arg else ("", arg)
    name, equals, value = assignment.partition("=")
    if not equals:
        return arg
    shown = f"{name}={shown_setting(name, value)}"
    return f"{flag}={shown}" if flag else shown


def settings_text(settings: Mapping[str, str], quote: str = "") -> str:
    """`NAME=VALUE` pairs as a shell would take them (each in `quote` for Markdown). Only
    formats: give it settings already masked (`shown_settings`), masked once."""
    return " ".join(
        f"{quote}{shlex.quote(f'{name}={value}')}{quote}" for name, value in settings.items()
    )


def compared_line(machine: dict) -> str | None:
    """What "ours with --compare-env" ran with, under the reply tables: the series' name
    can't say it, and a reader comparing pairs needs it next to the figures."""
    compared = machine.get("compare_env")  # masked by `machine_description`
    if not compared:
        return None
    return (
        f"{NAMES['ours-variant']}: ours with {settings_text(compared, '`')} on top, "
        "interleaved with ours, the order turned at every repeat."
    )


def label(name: str) -> str:
    """A series' name for a reader ("ours-instant burst" -> "ours burst")."""
    series, _, pattern = name.partition(" ")
    return f"{NAMES.get(series, series)} {pattern}".rstrip()


def step_row(step: StepResult) -> str:
    cells = [
        f"{label(step.series)}, {step.n}",
        str(len(step.runs)),
        fmt(step.calls_up_mean, ".1f"),
        f"{step.calls_ok} / {step.failed} / {step.dropped}",
        str(step.turns),
        f"{fmt(step.p50)} ({fmt_range(step.p50_spread)})",
        f"{fmt(step.p95)} ({fmt_range(step.p95_spread)})",
        f"{fmt(step.greeting_p50)} / {fmt(step.greeting_p95)}",
        fmt(step.slow_share, ".0%"),
        fmt(step.underrun_share, ".2%"),
        fmt(step.cpu_per_call_min),
        f"{step.rss_peak_mb:.0f} MB",
        f"{fmt(step.rss_per_call_mb, '.1f')} MB",
    ]
    return "| " + " | ".join(cells) + " |"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items())


TABLE_HEAD = (
    "| server, N | runs | calls up | ok / fail / drop | turns | reply p50 s (runs) "
    "| reply p95 s (runs) | greeting p50 / p95 s "
    f"| turns > {SLOW_TURN_S:g} s | underrun | CPU s per call-min | RSS peak | RSS per call |\n"
    + "| --- " * 13
    + "|"
)
PATTERN_TITLES = {
    "burst": "**Burst**: N calls start within one second, each a ~25 s scripted conversation; "
    "figures over the whole run.",
    "steady": "**Steady**: Poisson arrivals keeping about N calls up (calls up: the mean "
    "measured), calls of 100-140 s with a caller turn every 6-10 s; turns, greetings and CPU "
    "inside the measured window only.",
}


def pattern_tables(series: dict[str, list[StepResult]], note: str) -> list[str]:
    """One table per arrival pattern, every series' steps of that pattern in it."""
    patterns = list(dict.fromkeys(s.pattern for steps in series.values() for s in steps))
    lines: list[str] = []
    for pattern in patterns:
        if len(patterns) > 1 or pattern != "burst":
            lines += [PATTERN_TITLES.get(pattern, pattern), ""]
        lines.append(TABLE_HEAD)
        lines += [
            step_row(step) for steps in series.values() for step in steps if step.pattern == pattern
        ]
        lines.append("")
    return [*lines, note, ""]


def budget_table(series: dict[str, list[StepResult]], cores: int) -> list[str]:
    """Each step's CPU per call-minute on the machine, split between the server and the
    benchmark's own callers and AI emulator, which share its cores; the cores all three
    used; and about how many calls the cores would carry at that cost (`MachineBudget`)."""
    rows = []
    for steps in series.values():
        for step in steps:
            if (budget := MachineBudget.of(step)) is None:
                continue
            cells = [
                f"{label(step.series)} {step.pattern}, {step.n}",
                f"{budget.server:.2f}",
                f"{budget.load_generator:.2f}",
                fmt(budget.ai_services),
                f"{budget.total:.2f}",
                fmt(budget.cores_used),
                f"~{budget.calls_at_this_cost(cores)}",
            ]
            rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "The machine's CPU, shared: CPU seconds per call-minute of the server, of the "
        f"benchmark's callers and of its instant AI emulator, which all ran on these {cores} "
        f"cores; the cores the three used together; and about how many calls the {cores} "
        "cores would carry, every core busy, if each call-minute cost what it did at that "
        "step (an estimate: a call-minute costs less as N grows):",
        "",
        "| series, N | server | callers | AI emulator | total | cores used "
        f"| calls {cores} cores would carry at this cost |",
        "| --- " * 7 + "|",
        *rows,
        "",
    ]


def stage_rows(series: dict[str, list[StepResult]]) -> list[str]:
    """The server's turn-timing summary per step (only servers that log it: ours)."""
    rows = []
    for steps in series.values():
        for step in steps:
            summary = step.server_turns
            if not summary:
                continue
            stages = [
                f"{fmt(fig['p50'])} / {fmt(fig['p95'])}" if fig["n"] else "–"
                for fig in summary["stages"].values()
            ]
            name = f"{label(step.series)} {step.pattern}"
            cells = [f"{name}, {step.n}", str(summary["turns"]), *stages]
            cells += [_counts(summary["verdicts"]), _counts(summary["rules"])]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def render(
    series: dict[str, list[StepResult]],
    machine: dict,
    stops: dict[str, str],
    targets: Sequence[dict],
    rule: StopRule | HeldTarget,
    duration_s: float,
    section: Sequence[str] = (),
) -> str:
    """The whole Markdown file: provenance, the table, why each series stopped, targets
    (and a mode's own `section`, e.g. `--processes`' held calls, after the table)."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "<!-- Generated by bench/load.py --markdown; do not edit by hand. -->",
        f"Measured {when} on {machine['cpu_model']} ({machine['cores']} cores), "
        f"Python {machine['python']}, Pipecat {machine['pipecat']}, {machine['platform']}; "
        f"load average {machine.get('load_average_start')} at the start, "
        f"{duration_s:.0f} s in all:",
        "",
        "```bash",
        machine["command"],
        "```",
        "",
        *pattern_tables(series, _note(series)),
    ]
    if compared := compared_line(machine):
        lines += [compared, ""]
    if section:
        lines += [*section, ""]
    if outside := outside_line(series):
        lines += [outside, ""]
    lines += budget_table(series, machine["cores"] or 1)
    timing = stage_rows(series)
    if timing:
        lines += [
            "Where the reply time went, from the server's turn-timing log lines "
            "(p50 / p95, seconds after the caller's speech ended):",
            "",
            "| server, N | turns | " + " | ".join(STAGES.values()) + " | verdicts | rules |",
            "| --- " * (len(STAGES) + 4) + "|",
            *timing,
            "",
        ]
    title = "Stop rule" if isinstance(rule, StopRule) else "Target"
    lines += [f"{title}: {rule.describe()}", ""]
    lines += [f"- {label(name)}: {reason}" for name, reason in stops.items()]
    if targets:
        lines += ["", "Targets (ours, instant services):", ""]
        lines += [f"- **{MARKS[t['met']]}**: {t['target']}: {t['detail']}" for t in targets]
    return "\n".join(lines) + "\n"


def outside_line(series: dict[str, list[StepResult]]) -> str | None:
    """How much CPU went elsewhere during the runs (other processes, other guests), and
    which runs that disturbed: a reader's way to weigh the figures."""
    taken = [
        (f"{label(name)} N = {step.n} run {run.run}", taken_cores(run))
        for name, steps in series.items()
        for step in steps
        for run in step.runs
        if run.outside_cores is not None
    ]
    if not taken:
        return None
    disturbed = [f"{where} ({cores:.2f})" for where, cores in taken if cores > OUTSIDE_WARN_CORES]
    most = max(cores for _, cores in taken)
    verdict = (
        f"disturbed: {', '.join(disturbed)}"
        if disturbed
        else f"no run over {OUTSIDE_WARN_CORES} cores"
    )
    return (
        "CPU taken from the benchmark during the runs (processes outside it, and steal): "
        f"at most {most:.2f} cores; {verdict}."
    )


def _note(series: dict[str, list[StepResult]]) -> str:
    """What the tables' figures are, under them."""
    processes = {step.server_processes for steps in series.values() for step in steps}
    note = (
        "p50 / p95 are pooled over every turn of every run; in brackets the lowest and "
        "highest of the runs' own figures. Greeting: stream start -> first bot audio. CPU and "
        "RSS: the server's processes (RSS per call: (peak - idle) / N)."
    )
    if processes != {1}:
        note += f" Server processes per series: {', '.join(map(str, sorted(processes)))}."
    if any(name.startswith("baseline") for name in series):
        note += " Ours and the baseline ran interleaved, run by run."
    return note


def write_markdown(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
