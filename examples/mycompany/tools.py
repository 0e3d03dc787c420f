"""Python tools for the example agent (examples/agents/orders.yaml).

An agent file names one as `python: mycompany.tools:lookup_customer`; the server imports
it, so `mycompany` must be importable: run the server with `PYTHONPATH=examples`. The LLM
sees the function's type hints and docstring as the tool's parameters. A parameter
annotated `ToolCallContext` gets the call (its CallSid, agent and parameters such as the
caller's number) and is not shown to the LLM. A plain function like this one runs in a
worker thread, so a slow database query doesn't stall the call's audio; `async def` works
too.
"""

from __future__ import annotations

from phonebot.agents.tools import ToolCallContext

# Stands in for your customer database. +15550001111 is the number the call emulator
# (`python -m phonebot.call`) calls from.
CUSTOMERS = {
    "+15550001111": {"name": "Ada Lovelace", "tier": "gold", "open_orders": ["A-1001"]},
    "+15557654321": {"name": "Alan Turing", "tier": "standard", "open_orders": []},
}


def lookup_customer(phone: str | None = None, call: ToolCallContext | None = None) -> dict:
    """Find the customer by phone number, with their open orders.

    Args:
        phone: The customer's phone number in E.164 form, e.g. +15551234567. Leave it out
            to look up the number the caller is calling from.
    """
    number = phone or (call.parameters.get("caller_id") if call else None)
    customer = CUSTOMERS.get(number or "")
    if customer is None:
        return {"found": False, "phone": number}
    return {"found": True, "phone": number, **customer}
