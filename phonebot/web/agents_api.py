"""The agents API: `GET /agents` lists the agents in use, `POST /agents/reload` reads
AGENTS_DIR again; and SIGHUP, which does the same as the POST (`reload_on_sighup`).

Behind `Authorization: Bearer $ADMIN_API_KEY`, like the call records
(`phonebot.web.auth.require_admin_key`: 401 without the key or with a wrong one, 503 while
it is unset). A reload is all or nothing (`phonebot.agents.registry`): a bad file answers
422 with every problem (file:line: field: what is wrong) and the agents in use stay;
calls already running keep the agent they started with either way.

With `server.py --workers N` a request reaches one worker: that worker reloads, answers,
and sends SIGHUP to the supervisor, which forwards it to every worker
(`phonebot.web.workers`), so the whole machine moves to the new files.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, status
from fastapi.responses import JSONResponse
from loguru import logger
from pydantic import BaseModel, Field

from phonebot.agents.registry import (
    AgentInfo,
    AgentRegistry,
    AgentsInfo,
    ReloadResult,
    describe,
    describe_agent,
)
from phonebot.web.auth import require_admin_key
from phonebot.web.services import Services
from phonebot.web.workers import ask_supervisor_to_reload

RELOAD_SIGNAL = signal.SIGHUP
router = APIRouter(prefix="/agents", tags=["agents"], dependencies=[Depends(require_admin_key)])


class ReloadAnswer(BaseModel):
    """What `POST /agents/reload` did."""

    loaded: bool = Field(description="true: the new files are in use; false: the old stay")
    agents: list[AgentInfo] = Field(description="The agents in use after the request")
    problems: list[str] = Field(
        default_factory=list, description="Why the files were refused: file:line: field: …"
    )
    workers_reloading: bool = Field(
        False,
        description="This server runs several workers (--workers N): the supervisor was "
        "asked to reload every one of them (each logs its result)",
    )


@router.get("", response_model=AgentsInfo)
async def list_agents(services: Services) -> AgentsInfo:
    """The agents in use: what picks each one, its tools, knowledge, outcome fields and
    analysis, its file and version."""
    return describe(services.agents.current)


@router.post(
    "/reload",
    response_model=ReloadAnswer,
    responses={422: {"model": ReloadAnswer, "description": "A bad file: the old agents stay"}},
)
async def reload_agents(services: Services) -> JSONResponse:
    """Read AGENTS_DIR again. Calls already running keep their agent; calls that start
    after a successful reload use the new files."""
    result = await reload_in_thread(services.agents)
    fleet = result.loaded and ask_supervisor_to_reload()
    answer = ReloadAnswer(
        loaded=result.loaded,
        agents=[describe_agent(agent) for agent in services.agents.current.agents],
        problems=list(result.problems),
        workers_reloading=fleet,
    )
    code = status.HTTP_200_OK if result.loaded else status.HTTP_422_UNPROCESSABLE_CONTENT
    return JSONResponse(answer.model_dump(mode="json"), status_code=code)


async def reload_in_thread(agents: AgentRegistry) -> ReloadResult:
    """`AgentRegistry.reload` off the event loop: reading the files, indexing knowledge and
    importing Python tools must not hold the audio of live calls."""
    return await asyncio.to_thread(agents.reload)


@asynccontextmanager
async def reload_on_sighup(agents: AgentRegistry) -> AsyncIterator[None]:
    """While the app runs, SIGHUP reloads the agents (`kill -HUP <pid>`, `systemctl
    reload`); the registry logs what was loaded, or every problem and that the old set
    stays. Put back as it was on exit.

    Only the main thread's loop can take a signal (asyncio's `add_signal_handler`): an app
    run elsewhere (a test client's thread) goes without, and says so at debug level.
    """
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task] = set()

    def on_sighup() -> None:
        logger.info(f"SIGHUP: reloading the agents from {agents.directory}")
        task = loop.create_task(reload_in_thread(agents))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    previous = signal.getsignal(RELOAD_SIGNAL) or signal.SIG_DFL  # None: not set from Python
    try:
        loop.add_signal_handler(RELOAD_SIGNAL, on_sighup)
    except (ValueError, RuntimeError, NotImplementedError) as error:
        logger.debug(f"SIGHUP does not reload the agents here: {error}")
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(RELOAD_SIGNAL)
        signal.signal(RELOAD_SIGNAL, previous)  # server.py ignores it outside the lifespan
        await asyncio.gather(*reloads, return_exceptions=True)
