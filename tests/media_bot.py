"""A scripted bot on the far end of a Media Stream, for the emulator's and the load
benchmark's tests: it answers each time the caller has spoken and then gone quiet."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable

from websockets.asyncio.server import ServerConnection

from phonebot import audio


async def after_each_caller_turn(
    ws: ServerConnection, quiet_frames: int, reply: Callable[[], Awaitable[None]]
) -> None:
    """Await `reply()` each time the caller's media turns silent for `quiet_frames` 20 ms
    frames after speech, until the stream closes."""
    spoke, quiet = False, 0
    async for message in ws:
        data = json.loads(message)
        if data["event"] != "media":
            continue
        pcm = audio.ulaw_to_pcm16(base64.b64decode(data["media"]["payload"]))
        if not audio.is_silent(pcm):
            spoke, quiet = True, 0
        elif spoke and (quiet := quiet + 1) == quiet_frames:
            spoke = False
            await reply()
