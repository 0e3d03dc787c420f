"""`search_knowledge` on a call: the agent's passages for the LLM's query, recorded.

Knowledge small enough for the system prompt is already there (`Agent.system_prompt`), so
the function exists only for knowledge too big for it (`KnowledgeBase.searched`), the same
condition under which `call_tools` offers the LLM its schema. The result goes back to the
LLM (Pipecat's function-call path: `result_callback` adds a tool message and runs the LLM
again), which answers the caller in its own words; the call's transcript gets a function
entry with the query and the passages, as `CallControl`'s functions record theirs.
"""

from __future__ import annotations

import asyncio
import time

from pipecat.services.llm_service import FunctionCallParams, LLMService

from phonebot.agents.knowledge import SEARCH_KNOWLEDGE, KnowledgeBase
from phonebot.records.call_log import CallLog

PASSAGES_PER_SEARCH = 3
# Told to the LLM when nothing matches, so it says so rather than making an answer up.
NOTHING_FOUND = (
    "Nothing we have written down matches. Tell the caller you don't know, and offer to "
    "take a message for the team."
)


def register_knowledge_search(
    llm: LLMService, knowledge: KnowledgeBase | None, records: CallLog
) -> None:
    """Register `search_knowledge` on the call's LLM when the agent's knowledge is searched
    (too big for the prompt); with no knowledge, or a small one, there is nothing to do."""
    if knowledge is None or not knowledge.searched():
        return
    llm.register_function(SEARCH_KNOWLEDGE, KnowledgeSearch(knowledge, records).run)


class KnowledgeSearch:
    """The `search_knowledge` function of one call: its agent's knowledge, its record."""

    def __init__(self, knowledge: KnowledgeBase, records: CallLog) -> None:
        self._knowledge = knowledge
        self._records = records

    def result_for(self, query: str) -> dict:
        """The best passages for `query`, or none and what to tell the caller instead."""
        passages = self._knowledge.search(query, PASSAGES_PER_SEARCH)
        if not passages:
            return {"passages": [], "note": NOTHING_FOUND}
        return {"passages": [passage.as_result() for passage in passages]}

    async def run(self, params: FunctionCallParams) -> None:
        """The handler Pipecat calls. The query runs in a thread: over the largest files
        allowed it takes milliseconds, which the call's 20 ms audio clock should not lose
        (sqlite3 lets go of the GIL while SQLite works)."""
        query = params.arguments.get("query")
        started = time.monotonic()
        result = await asyncio.to_thread(self.result_for, query if isinstance(query, str) else "")
        took = round(time.monotonic() - started, 3)
        self._records.function_call(SEARCH_KNOWLEDGE, params.arguments, result, duration_s=took)
        await params.result_callback(result)
