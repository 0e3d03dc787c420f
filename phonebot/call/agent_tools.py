"""The agent file's tools on a call: registered on the LLM, run, spoken for, recorded.

Each tool is registered with `cancel_on_interruption=False`: a caller's "uh-huh" while a
booking is being made must not cancel it halfway. In Pipecat 1.14 that also makes the call
asynchronous (`LLMService.register_function`): the LLM is not held while the tool runs,
its context gets a "still running" placeholder, and the result replaces the placeholder
(the usual tool message) when nobody spoke in the meantime, or arrives as a message of
its own when the conversation moved on; either way the LLM then runs again and answers.

A tool that hasn't answered after FILLER_AFTER_S has its `filler` said (once), so the
caller isn't left in silence; the answer follows when the tool's result comes back
(Pipecat holds the new reply until the filler has been spoken). Running the tool, its
argument check, timeout and failure rules are `phonebot.agents.tools.run_tool`'s.
"""

from __future__ import annotations

import asyncio

from loguru import logger
from pipecat.frames.frames import TTSSpeakFrame
from pipecat.pipeline.worker import PipelineWorker
from pipecat.services.llm_service import FunctionCallParams, LLMService
from pydantic import SecretStr

from phonebot.agents.agent import Agent
from phonebot.agents.spec import ToolSpec
from phonebot.agents.tools import PythonTool, ToolCallContext, run_tool
from phonebot.records.call_log import CallLog
from phonebot.twilio.stream import CallSession
from phonebot.twilio.stream_token import TOKEN_PARAMETER

# How long a tool may take before its filler is said: about the pause after which a
# caller starts wondering whether the line dropped.
FILLER_AFTER_S = 1.0
# Pipecat's own deadline for a function call, past the tool's timeout: only a backstop,
# since `run_tool` answers by its `timeout_s` (a timed-out call is cancelled by Pipecat).
PIPECAT_DEADLINE_MARGIN_S = 5.0


def register_agent_tools(
    llm: LLMService,
    agent: Agent,
    session: CallSession,
    worker: PipelineWorker,
    records: CallLog,
    secret: SecretStr | None,
) -> None:
    """Register each of the agent's tools on the call's LLM (nothing for an agent without
    tools); warn once for the call when its HTTP tools go out unsigned."""
    if secret is None and any(tool.kind == "http" for tool in agent.tools):
        logger.warning(
            f"Call {session.call_sid}: TOOLS_WEBHOOK_SECRET is not set: agent {agent.name}'s "
            "HTTP tools are called without an X-Phonebot-Signature"
        )
    parameters = {k: v for k, v in session.parameters.items() if k != TOKEN_PARAMETER}
    for tool in agent.tools:
        call = ToolCallContext(session.call_sid, agent.name, tool.name, parameters)
        runner = AgentTool(tool, call, worker, records, secret, agent.python_tools.get(tool.name))
        llm.register_function(
            tool.name,
            runner.run,
            cancel_on_interruption=False,
            timeout_secs=tool.timeout_s + PIPECAT_DEADLINE_MARGIN_S,
        )


class AgentTool:
    """One tool of one call: its spec, the call it runs for, where fillers go, its record."""

    def __init__(
        self,
        tool: ToolSpec,
        call: ToolCallContext,
        worker: PipelineWorker,
        records: CallLog,
        secret: SecretStr | None,
        python: PythonTool | None = None,
    ) -> None:
        self.tool = tool
        self.python = python  # a Python tool, built when its file loaded
        self.call = call
        self._worker = worker
        self._records = records
        self._secret = secret

    async def run(self, params: FunctionCallParams) -> None:
        """The handler Pipecat calls: run the tool (its filler said if it is slow), record
        the call in the transcript, and give the LLM the result."""
        filler = asyncio.create_task(self._filler_later()) if self.tool.filler else None
        secret = self._secret.get_secret_value() if self._secret is not None else None
        try:
            outcome = await run_tool(self.tool, params.arguments, self.call, secret, self.python)
        finally:
            if filler is not None:
                filler.cancel()  # the tool answered (or failed) first: no filler
        self._records.function_call(
            self.tool.name,
            params.arguments,
            outcome.result,
            error=outcome.error,
            duration_s=outcome.duration_s,
        )
        await params.result_callback(outcome.result)

    async def _filler_later(self) -> None:
        """Say the filler once, if the tool is still running after FILLER_AFTER_S."""
        await asyncio.sleep(FILLER_AFTER_S)
        await self._worker.queue_frame(TTSSpeakFrame(str(self.tool.filler)))
