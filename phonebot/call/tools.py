"""The functions a call's LLM may call, as schemas: hang up, transfer, opt out, record outcomes.

What each one does is `CallControl`'s (phonebot.call.control): its `*_tool` methods are
registered under these names.
"""

from __future__ import annotations

from pipecat.adapters.llm.schemas.function_schema import FunctionSchema

from phonebot.agents.agent import Agent
from phonebot.agents.knowledge import SEARCH_KNOWLEDGE_TOOL
from phonebot.agents.tools import tool_schema
from phonebot.config import Settings
from phonebot.twilio.stream import TwilioMarkSerializer

END_CALL = "end_call"
TRANSFER_CALL = "transfer_call"
OPT_OUT = "opt_out"
RECORD_OUTCOME = "record_outcome"

END_CALL_TOOL = FunctionSchema(
    name=END_CALL,
    description=(
        "Hang up. Use it when the caller says goodbye or the conversation is over. Put your "
        "short goodbye in `goodbye`: it is spoken before the line is closed."
    ),
    properties={"goodbye": {"type": "string", "description": "The last thing to say."}},
    required=["goodbye"],
)
TRANSFER_TOOL = FunctionSchema(
    name=TRANSFER_CALL,
    description=(
        "Connect the caller to a person on our team, when they ask for a human or you "
        "cannot help. The hand-off line is spoken for you; say nothing else. A warm "
        "transfer holds the caller while the person is called and told `summary` first; "
        "if they can't take it, you are back with the caller to take a message."
    ),
    properties={
        "summary": {
            "type": "string",
            "description": "One or two sentences for the person: who is calling and what "
            "they need.",
        },
        "warm": {
            "type": "boolean",
            "description": "Brief the person before connecting (default: the agent's setting).",
        },
    },
    required=[],
)
OPT_OUT_TOOL = FunctionSchema(
    name=OPT_OUT,
    description=(
        "The person asks not to be called again (stop calling me, remove me from your "
        "list, do not call). Their number goes on the do-not-call list and the call ends "
        "with a confirmation spoken for you; say nothing else."
    ),
    properties={},
    required=[],
)


def record_outcome_tool(agent: Agent) -> FunctionSchema | None:
    """`record_outcome` with one property per outcome field of the agent (allowed values
    as an enum), or None when the agent records no outcomes."""
    if not agent.outcome_fields:
        return None
    properties = {}
    for spec in agent.outcome_fields:
        prop: dict = {"type": "string", "description": spec.description}
        if spec.values:
            prop["enum"] = list(spec.values)
        properties[spec.name] = prop
    return FunctionSchema(
        name=RECORD_OUTCOME,
        description=(
            "Record what you found out on this call as soon as the person tells you, "
            "then carry on the conversation. Give only the fields you know."
        ),
        properties=properties,
        required=[],
    )


def call_tools(
    settings: Settings, serializer: TwilioMarkSerializer | None, agent: Agent | None = None
) -> list[FunctionSchema]:
    """The functions the LLM may call: hang up and opt out always; transfer when there is a
    target; record_outcome when the agent has outcome fields; the agent file's own tools;
    search_knowledge when its knowledge is too big for the prompt."""
    can_transfer = bool(settings.transfer_target) and serializer
    tools = [END_CALL_TOOL, TRANSFER_TOOL] if can_transfer else [END_CALL_TOOL]
    tools.append(OPT_OUT_TOOL)
    if agent is None:
        return tools
    if (outcome_tool := record_outcome_tool(agent)) is not None:
        tools.append(outcome_tool)
    tools += [tool_schema(spec, agent.python_tools.get(spec.name)) for spec in agent.tools]
    if agent.knowledge is not None and agent.knowledge.searched():
        tools.append(SEARCH_KNOWLEDGE_TOOL)
    return tools
