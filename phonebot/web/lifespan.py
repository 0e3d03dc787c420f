"""The app's lifespan: what starts before the first request and stops after the last call.

Start: the models and thread pools (so the first caller doesn't pay for them), the
records (migrations), the event-loop lag monitor and the campaign scheduler; then the
heap built so far is frozen (`phonebot.ops.heap`). Stop, once
the calls have drained (`phonebot.web.shutdown` runs before the lifespan ends): their
post-call analyses (a bounded wait), then the same, backwards, writing the calls' last
queued records.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from loguru import logger

from phonebot import __version__
from phonebot.ai.inference import load_shared_models
from phonebot.ai.inference.turn import SMART_TURN_THREADS, smart_turn_executor
from phonebot.ai.providers import ProviderChoice, chosen_providers
from phonebot.ops.diagnostics import resource_usage_log
from phonebot.ops.heap import freeze_startup_heap, thaw_heap
from phonebot.ops.threads import start_every_thread, started_default_executor
from phonebot.twilio.signatures import checks_webhook_signatures
from phonebot.web.agents_api import reload_on_sighup
from phonebot.web.services import AppServices, app_services


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the app's services, serve, then stop them (the app's `lifespan`)."""
    services = app_services(app)
    providers = chosen_providers(services.settings)
    log_configuration(services, providers)
    offline_stt = providers.stt == "offline"
    await warm_up_models(offline_stt, services.settings.offline_stt_model)
    if providers.tts == "offline":
        await warm_up_offline_voice(services)
    await services.records.start()
    services.metrics.start_loop_lag()
    if services.campaigns is not None:  # the scheduler, after the migrations
        await services.campaigns.start(services.admission)
    frozen = freeze_startup_heap()  # last: everything started is long-lived
    logger.info(f"Start-up heap frozen: {frozen} objects the garbage collector skips")
    try:
        # LOG_RESOURCE_USAGE: RSS, fds, threads, tasks on a timer and on SIGUSR1 (soak);
        # SIGHUP reloads the agent files.
        async with resource_usage_log(services.settings), reload_on_sighup(services.agents):
            yield
    finally:
        # Calls have drained by now: their analyses get a bounded wait (one cut short stores
        # its extractive analysis), then their last writes are queued, and written here.
        await services.analyses.drain()
        await services.metrics.stop_loop_lag()
        if services.campaigns is not None:
            await services.campaigns.stop()
        await services.records.stop()
        await services.admission.close()
        await services.shared.close()
        await services.http.aclose()
        thaw_heap()


def log_configuration(services: AppServices, providers: ProviderChoice) -> None:
    """One line per choice an operator should see at startup, and each door left open."""
    settings = services.settings
    mode = "offline mode" if providers.offline else "online"
    logger.info(f"Phone bot {__version__} ({mode}): {providers.describe()}")
    loop = type(asyncio.get_running_loop())
    logger.info(f"Event loop: {loop.__module__}.{loop.__qualname__}")
    # The inference pools' size, one thread per core the process may use: fewer than the
    # machine's in a container with a CPU limit or under `taskset` (phonebot.ops.cores).
    logger.info(f"Cores usable: {SMART_TURN_THREADS} of the machine's {os.cpu_count()}")
    if settings.webhook_auth == "external":
        logger.info("WEBHOOK_AUTH=external: webhook signatures are left to your gateway")
    elif not checks_webhook_signatures(settings):
        logger.warning("TWILIO_AUTH_TOKEN unset: webhook signatures are not checked")
    if settings.dialout_api_key is None:
        logger.info("DIALOUT_API_KEY unset: POST /dialout is disabled")
    logger.info(f"Shared state: {services.shared.describe()}")


async def warm_up_models(offline_stt: bool, offline_stt_model: str | None = None) -> None:
    """Start the thread pools, and load the shared VAD / Smart Turn sessions (and the
    offline STT's Whisper model, checked), before the first call.

    Otherwise the first caller pays for it, and the load runs on the event loop that
    every other call's audio pacing shares.
    """
    loop = asyncio.get_running_loop()
    # Every pool thread now, not under the first peak (phonebot.ops.threads).
    loop.set_default_executor(started_default_executor())
    start_every_thread(smart_turn_executor(), SMART_TURN_THREADS)
    await asyncio.to_thread(load_shared_models)
    if offline_stt:
        # Imported only then, as `phonebot.ai.providers` does: faster-whisper and its model
        # are for offline mode alone. A model.bin that fails its SHA-256 check raises here.
        from phonebot.ai.offline.stt import start_decoder_pool

        await start_decoder_pool(offline_stt_model)


async def warm_up_offline_voice(services: AppServices) -> None:
    """Load the offline TTS voice now (Piper: ~1.5 s, ~175 MB once used, once per process).

    A Piper voice file that fails its SHA-256 check raises here, so the server does not
    start on a voice nobody reviewed; missing Piper packages only fall back to espeak-ng.
    """
    from phonebot.ai.offline.tts import load_offline_voice  # offline mode only, as above

    await asyncio.to_thread(load_offline_voice, services.settings)
