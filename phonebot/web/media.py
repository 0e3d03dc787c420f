"""`WS /ws`: Twilio Media Streams, each stream one call through the bot's pipeline.

A stream runs its call only once admitted: its single-use stream token verified, a slot
free, the server not draining (`phonebot.state.StreamGate`). The call gets what it needs
from the app's services: the record writer, the running calls (for the drain), the AMD
verdicts, where warm transfers meet, the server's public address, the metrics, and the
jobs its post-call analysis runs in after it.
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from phonebot.call.deps import CallDeps
from phonebot.call.serve import serve_call
from phonebot.state import StreamGate
from phonebot.twilio.signatures import external_base_url
from phonebot.web.services import Services

router = APIRouter()


@router.websocket("/ws")
async def media_stream(websocket: WebSocket, services: Services) -> None:
    """A stream runs its call only once admitted (single-use token, capacity, drain)."""
    await websocket.accept()
    services.active_streams += 1
    gate = StreamGate(services.admission)
    try:
        records = services.records
        writer = records.writer if records.enabled else None  # None: no per-call record work
        deps = CallDeps(
            agents=services.agents,
            records=writer,
            calls=services.calls,
            verdicts=services.amd_verdicts,
            transfers=services.transfer_verdicts,
            base_url=external_base_url(websocket, services.settings.public_url),
            metrics=services.metrics,
            analyses=services.analyses,
            http=services.http,
        )
        await serve_call(websocket, services.settings, admit=gate, deps=deps)
    finally:
        await gate.release()
        services.active_streams -= 1
