"""`python -m phonebot.agents check`: the agent files checked from a terminal, before a
start or a reload.

    python -m phonebot.agents check               # AGENTS_DIR (environment or ./.env)
    python -m phonebot.agents check --dir agents/

Prints every agent that loads (what picks it, its tools and where they go, its knowledge,
outcome fields and analysis, its file and version), then every problem exactly as the
server would report it (file:line: field: what is wrong), including those of the agents
together (two that could tie on one call, not exactly one default). Exit status: 0 no
problem (the server would start with these files, a reload would take them), 1 any
problem, 2 a bad command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from phonebot.agents.agent import Agent
from phonebot.agents.loader import AgentFileError, agent_files, load_agent_file, load_agents
from phonebot.agents.registry import AgentInfo, describe_agent
from phonebot.config import Settings, get_settings

LABEL_WIDTH = 12


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m phonebot.agents", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="list the agents and every problem; exit 1 on any")
    check.add_argument("--dir", type=Path, help="the agents' folder (default: AGENTS_DIR)")
    return parser


def check_agents(directory: Path, settings: Settings) -> tuple[list[Agent], list[str]]:
    """The agents that load, and every problem: the server's own check (`load_agents`),
    and when it refuses, each file on its own so the good ones can still be shown."""
    try:
        return list(load_agents(directory, settings).agents), []
    except AgentFileError as error:
        problems = error.problems
    agents = []
    for path in agent_files(directory) if directory.is_dir() else []:
        try:
            agents.append(load_agent_file(path, settings))
        except AgentFileError:
            continue  # its problems are among those of load_agents
    return agents, problems


def agent_lines(info: AgentInfo) -> list[str]:
    """One agent, a line per aspect: a reader sees what picks it and what it can do."""
    title = f"{info.name} — {info.description}" if info.description else info.name
    rows = [("picked by", info.picked_by)]
    tools = [f"{t.name}  {t.kind}  {t.target}  (timeout {t.timeout_s:g} s"
             f"{', filler' if t.filler else ''})" for t in info.tools]  # fmt: skip
    rows += [("tools" if i == 0 else "", tool) for i, tool in enumerate(tools)]
    rows += [] if tools else [("tools", "none")]
    if info.knowledge is not None:
        use = "in the prompt" if info.knowledge.use == "prompt" else "searched"
        files = ", ".join(info.knowledge.files) or "(empty)"
        rows.append(("knowledge", f"{files}: {info.knowledge.passages} passages, {use}"))
    if info.outcome_fields:
        fields = [f"{f.name} ({'/'.join(f.values)})" if f.values else f.name
                  for f in info.outcome_fields]  # fmt: skip
        rows.append(("outcomes", ", ".join(fields)))
    rows.append(("analysis", _analysis(info)))
    rows.append(("file", f"{shown(Path(info.source))}  (version {info.version})"))
    return [title] + [f"  {label:<{LABEL_WIDTH}}{value}" for label, value in rows]


def _analysis(info: AgentInfo) -> str:
    return "no" if info.analysis is None else f"yes; {info.analysis.described()}"


def shown(path: Path) -> Path:
    """A path as the reader would type it: relative to the working directory when inside."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def report(directory: Path, agents: list[Agent], problems: list[str], out: TextIO) -> None:
    out.write(f"Agents in {shown(directory)}/:\n\n")
    for agent in agents:
        out.write("\n".join(agent_lines(describe_agent(agent))) + "\n\n")
    if not agents:
        out.write("(none loads)\n\n")
    if not problems:
        out.write(f"{len(agents)} agent{'' if len(agents) == 1 else 's'}, no problems.\n")
        return
    out.write(f"{len(problems)} problem(s); the server would refuse these files:\n")
    out.write("".join(f"  {problem}\n" for problem in problems))


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = get_settings()
    directory = args.dir if args.dir is not None else Path(settings.agents_dir)
    agents, problems = check_agents(directory, settings)
    report(directory, agents, problems, out or sys.stdout)
    return 1 if problems else 0
