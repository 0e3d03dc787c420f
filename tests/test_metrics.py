"""GET /metrics: the series, their labels, its token, multiprocess mode, event-loop lag."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from phonebot.ai.offline.espeak import synthesize_at
from phonebot.emulator import Hangup, Speak, WaitForBot, dial_in
from phonebot.emulator.errors import NoStreamError
from phonebot.ops.metrics import (
    CAPACITY,
    DRAINING,
    INVALID_STREAM,
    OTHER,
    PROCESS_CAPACITY,
    REPLAY,
    STATE_UNAVAILABLE,
    LoopLagMonitor,
    Metrics,
    refusal_reason,
)
from phonebot.state import StateUnavailable, StreamGate, build_app_state
from phonebot.web.metrics import router
from phonebot.web.services import AppServices
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, make_settings
from tests.live_server import LiveServer, ai_api_process, instant_services_env

pytest_plugins = ["tests.redis_server"]

ROOT = Path(__file__).resolve().parent.parent
CALLER, OUR_NUMBER = "+15557654321", "+15550001111"


def sample(text: str | bytes, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None when it isn't there."""
    if isinstance(text, bytes):
        text = text.decode()
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return found.value
    return None


def scrape(metrics: Metrics) -> str:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return body.decode()


# --- the series -----------------------------------------------------------------------------


def test_every_series_is_there_from_the_start_with_no_call_content():
    text = scrape(Metrics())
    assert sample(text, "phonebot_calls_live") == 0
    assert sample(text, "phonebot_calls_admitted_total", stage="stream") == 0
    assert sample(text, "phonebot_calls_admitted_total", stage="webhook") == 0
    for provider in ("stt", "llm", "tts"):
        assert sample(text, "phonebot_provider_errors_total", provider=provider) == 0
    assert sample(text, "phonebot_state_errors_total") == 0
    assert sample(text, "phonebot_reply_latency_seconds_count") == 0
    assert sample(text, "phonebot_event_loop_lag_seconds_count") == 0
    assert sample(text, "process_resident_memory_bytes") > 0  # for soak tests and dashboards


def test_counts_move_and_two_apps_in_one_process_do_not_collide():
    first, second = Metrics(), Metrics()  # each app owns its registry
    first.call_started()
    first.call_admitted("webhook")
    first.call_refused("at capacity: 2 concurrent calls (MAX_CONCURRENT_CALLS)", "webhook")
    first.observe_reply_latency(0.45)
    first.observe_reply_latency(2.2)
    first.provider_error("llm")
    first.state_error()
    text = scrape(first)
    assert sample(text, "phonebot_calls_live") == 1
    assert sample(text, "phonebot_calls_admitted_total", stage="webhook") == 1
    assert sample(text, "phonebot_calls_refused_total", stage="webhook", reason=CAPACITY) == 1
    assert sample(text, "phonebot_reply_latency_seconds_count") == 2
    assert sample(text, "phonebot_reply_latency_seconds_bucket", le="0.5") == 1
    assert sample(text, "phonebot_reply_latency_seconds_bucket", le="2.5") == 2
    assert sample(text, "phonebot_provider_errors_total", provider="llm") == 1
    assert sample(text, "phonebot_state_errors_total") == 1
    first.call_refused("shared state unavailable, the stream token can't be checked", "stream")
    text = scrape(first)
    # Not counted again: the Redis error was counted where it happened (the state's on_error).
    assert sample(text, "phonebot_state_errors_total") == 1
    refused = sample(text, "phonebot_calls_refused_total", stage="stream", reason=STATE_UNAVAILABLE)
    assert refused == 1
    assert sample(scrape(second), "phonebot_calls_live") == 0
    first.call_ended()
    assert sample(scrape(first), "phonebot_calls_live") == 0


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [
        ("at capacity: 20 concurrent calls (MAX_CONCURRENT_CALLS)", CAPACITY),
        ("this process is at capacity (MAX_CALLS_PER_PROCESS=10)", PROCESS_CAPACITY),
        ("the server is shutting down", DRAINING),
        ("stream token already used for CallSid=CA00", REPLAY),
        ("shared state unavailable: Redis unreachable", STATE_UNAVAILABLE),
        (CAPACITY, CAPACITY),
        ("something new", OTHER),
    ],
    ids=["capacity", "process", "draining", "replay", "state", "label", "other"],
)
def test_a_refusal_text_becomes_one_of_a_few_reasons(refusal, reason):
    assert refusal_reason(refusal) == reason


async def test_every_refusal_the_admission_gives_has_its_own_reason():
    """Pinned against phonebot.state's real texts: rewording one can't turn it into "other"."""
    settings = make_settings(max_concurrent_calls=2, max_calls_per_process=1)
    admission = build_app_state(settings).admission
    try:
        assert await admission.admit_stream("CA-live") is None
        assert refusal_reason(await admission.admit_stream("CA-live")) == REPLAY
        assert refusal_reason(await admission.admit_stream("CA-second")) == PROCESS_CAPACITY
        assert await admission.reserve("CA-reserved") is None
        assert refusal_reason(await admission.reserve("CA-over")) == CAPACITY
        admission.start_draining()
        assert refusal_reason(await admission.reserve("CA-late")) == DRAINING
    finally:
        await admission.close()

    class Unreachable:
        async def admit_stream(self, call_sid: str) -> str | None:
            raise StateUnavailable("Redis did not answer within 0.5 s")

    gate_refusal = await StreamGate(Unreachable())(type("Call", (), {"call_sid": "CA-x"}))
    assert refusal_reason(gate_refusal) == STATE_UNAVAILABLE


# --- GET /metrics and its token -------------------------------------------------------------


@dataclass
class Counts:
    live: int
    reserved: int
    process_live: int = 0


class FakeAdmission:
    def __init__(self, counts: Counts | Exception):
        self.answer = counts

    async def counts(self, counted: bool = True) -> Counts:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def metrics_app(admission: FakeAdmission | None = None, **settings) -> FastAPI:
    app = FastAPI()
    given = {"admission": admission} if admission is not None else {}
    app.state.services = AppServices.build(make_settings(**settings), **given)
    app.include_router(router)
    return app


def test_metrics_is_prometheus_text_with_admission_counts_read_at_scrape():
    admission = FakeAdmission(Counts(live=3, reserved=2))
    client = TestClient(metrics_app(admission))
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert sample(response.text, "phonebot_admission_calls_live") == 3
    assert sample(response.text, "phonebot_admission_calls_reserved") == 2

    admission.answer = StateUnavailable("Redis unreachable")  # the scrape still answers
    response = client.get("/metrics")
    assert response.status_code == 200
    assert sample(response.text, "phonebot_admission_calls_live") == 3  # the last known


def test_metrics_token_when_set_is_required_as_a_bearer_token():
    client = TestClient(metrics_app(metrics_token="scrape-token-0123"))
    assert client.get("/metrics").status_code == 401
    wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert "METRICS_TOKEN" in wrong.json()["detail"]
    right = client.get("/metrics", headers={"Authorization": "Bearer scrape-token-0123"})
    assert right.status_code == 200
    assert TestClient(metrics_app()).get("/metrics").status_code == 200  # unset: open


# --- event-loop lag -------------------------------------------------------------------------


async def test_loop_lag_is_how_late_a_sleep_wakes_up():
    lags: list[float] = []
    monitor = asyncio.create_task(LoopLagMonitor(lags.append, interval_s=0.05).run())
    try:
        await asyncio.sleep(0.2)
        quiet = list(lags)
        time.sleep(0.3)  # a blocking call on the loop: the next wake-up is ~0.3 s late
        await asyncio.sleep(0.1)
    finally:
        monitor.cancel()
    assert quiet and max(quiet) < 0.1
    assert max(lags) >= 0.2


async def test_the_app_measures_loop_lag_between_start_and_stop():
    metrics = Metrics()
    metrics.start_loop_lag(interval_s=0.02)
    await asyncio.sleep(0.3)
    await metrics.stop_loop_lag()
    counted = sample(scrape(metrics), "phonebot_event_loop_lag_seconds_count")
    assert counted >= 3
    await asyncio.sleep(0.1)
    assert sample(scrape(metrics), "phonebot_event_loop_lag_seconds_count") == counted


# --- several workers: prometheus-client's multiprocess mode ---------------------------------

WORKER = """
import sys
from phonebot.ops.metrics import Metrics
metrics = Metrics()
assert metrics.multiprocess_dir
metrics.call_started()
metrics.call_admitted("stream")
metrics.call_refused("the server is shutting down", "webhook")
metrics.observe_reply_latency(float(sys.argv[1]))
metrics.provider_error("tts")
print("written", flush=True)
sys.stdin.readline()  # alive until the test says so
"""


def test_two_worker_processes_sum_into_one_scrape(tmp_path: Path, monkeypatch):
    """Two processes write to one PROMETHEUS_MULTIPROC_DIR; any of them answers for both;
    a dead worker's live calls leave the gauge, its counts stay."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, latency],
            cwd=ROOT,
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )  # fmt: skip
        for latency in ("0.4", "1.2")
    ]
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    scraper = Metrics()  # as in the worker that answers the scrape
    try:
        for worker in workers:
            assert worker.stdout.readline().strip() == "written"
        text = scrape(scraper)
        assert sample(text, "phonebot_calls_live") == 2  # livesum
        assert sample(text, "phonebot_calls_admitted_total", stage="stream") == 2
        assert sample(text, "phonebot_calls_refused_total", stage="webhook", reason=DRAINING) == 2
        assert sample(text, "phonebot_reply_latency_seconds_count") == 2
        assert sample(text, "phonebot_reply_latency_seconds_bucket", le="0.5") == 1
        assert sample(text, "phonebot_provider_errors_total", provider="tts") == 2

        first = workers[0]
        first.communicate("\n", timeout=20)
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(first.pid, str(tmp_path))  # what phonebot.web.workers does
        text = scrape(scraper)
        assert sample(text, "phonebot_calls_live") == 1
        assert sample(text, "phonebot_calls_admitted_total", stage="stream") == 2
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.communicate("\n", timeout=20)


# --- provider errors ------------------------------------------------------------------------


async def test_every_provider_error_is_counted_by_provider():
    """ProviderFaults (phonebot.call.provider_faults) counts each error, not only new episodes."""
    from pipecat.frames.frames import ErrorFrame

    from phonebot.ai.providers import build_services
    from phonebot.call.provider_faults import ApologyPlayer, ProviderFaults
    from tests.conftest import shipped_agent

    unreachable = "http://127.0.0.1:9/v1"  # never contacted: the errors are handed in
    settings = make_settings(
        openai_api_key="test", openai_base_url=unreachable, openai_stt_base_url=unreachable,
        openai_tts_base_url=unreachable, max_provider_failures=10,
    )  # fmt: skip
    services = build_services(settings, shipped_agent("general"))
    metrics = Metrics()

    async def end_call(*args, **kwargs) -> None: ...

    faults = ProviderFaults(
        "CA" + "1" * 32, services, settings, ApologyPlayer(), None, end_call, metrics=metrics
    )
    try:
        for processor in (services.llm, services.llm, services.tts):
            assert faults.on_error(ErrorFrame("Error code: 500", processor=processor))
        assert not faults.on_error(ErrorFrame("not a provider's"))
    finally:
        faults.stop()
    text = scrape(metrics)
    assert sample(text, "phonebot_provider_errors_total", provider="llm") == 2
    assert sample(text, "phonebot_provider_errors_total", provider="tts") == 1
    assert sample(text, "phonebot_provider_errors_total", provider="stt") == 0


# --- a real server, scraped during and after an emulated call -------------------------------

QUESTION = "what are your opening hours"


def say(text: str) -> Speak:
    return Speak(synthesize_at(text, 8000), 8000, text)


@pytest.fixture(scope="module")
def ai_api() -> Iterator[str]:
    """The instant AI API emulator (its own process): fast turns, and faults on demand."""
    with ai_api_process() as url:
        yield url


@pytest.fixture(scope="module")
def json_server(ai_api: str, tmp_path_factory) -> Iterator[LiveServer]:
    """Instant services, one call slot (so a second caller is refused) and JSON logs."""
    env = {
        **instant_services_env(ai_api),
        "MAX_CONCURRENT_CALLS": "1",
        "LOG_FORMAT": "json",
        "SILENCE_TIMEOUT_S": "30",  # no re-prompt in the way of the turns below
    }
    live = LiveServer(env, tmp_path_factory.mktemp("metrics-server"))
    yield live
    live.stop()


async def scrape_live(server: LiveServer) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{server.base_url}/metrics")
    assert response.status_code == 200, response.text
    return response.text


async def until_sample(server: LiveServer, name: str, value: float, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = await scrape_live(server)
        if sample(text, name) == value:
            return text
        assert time.monotonic() < deadline, f"{name} never reached {value}:\n{text}"
        await asyncio.sleep(0.1)


async def test_metrics_during_and_after_a_call_and_json_logs(json_server, ai_api):
    """A junk stream refused; one call: live 1 while it runs, a second caller refused for
    capacity, its LLM error counted, its reply latencies in the histogram after; every
    log line JSON."""
    server = json_server
    before = await scrape_live(server)
    assert sample(before, "phonebot_calls_live") == 0
    async with connect(server.base_url.replace("http", "ws") + "/ws") as junk:
        await junk.send("not Twilio")  # refused before it costs anything, and counted
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(junk.recv(), 10)
    refused = await scrape_live(server)
    invalid = sample(refused, "phonebot_calls_refused_total", stage="stream", reason=INVALID_STREAM)
    assert invalid == 1
    dial = await dial_in(f"{server.base_url}/", from_=CALLER, to=OUR_NUMBER)
    script = [
        WaitForBot(timeout=20), say(QUESTION),  # greeting; the turn that meets the LLM fault
        WaitForBot(timeout=20), say(QUESTION),  # the apology; then a normal turn
        WaitForBot(timeout=20, until="speech"), Hangup(),
    ]  # fmt: skip
    fault = {"service": "llm", "kind": "status_500", "times": 1}
    httpx.post(f"{ai_api}/_emulator/faults", json=fault, timeout=5).raise_for_status()
    call = asyncio.create_task(dial.caller().run(script))
    try:
        during = await until_sample(server, "phonebot_calls_live", 1, timeout_s=20)
        assert sample(during, "phonebot_calls_admitted_total", stage="stream") == 1
        assert sample(during, "phonebot_admission_calls_live") == 1
        # The one slot is taken: the next caller hears busy, counted with its reason.
        with pytest.raises(NoStreamError):
            await dial_in(f"{server.base_url}/", from_=CALLER, to=OUR_NUMBER)
        refused = await scrape_live(server)
        busy = sample(refused, "phonebot_calls_refused_total", stage="webhook", reason=CAPACITY)
        assert busy == 1
        result = await asyncio.wait_for(call, 90)
    finally:
        if not call.done():
            call.cancel()
        httpx.delete(f"{ai_api}/_emulator/faults", timeout=5)
    assert len(result.bot_utterances) >= 3, "the bot did not apologise and answer"

    after = await until_sample(server, "phonebot_calls_live", 0, timeout_s=15)
    assert sample(after, "phonebot_reply_latency_seconds_count") >= 1
    assert 0 < sample(after, "phonebot_reply_latency_seconds_sum") < 20
    assert sample(after, "phonebot_calls_admitted_total", stage="webhook") == 1
    assert sample(after, "phonebot_provider_errors_total", provider="llm") >= 1
    assert sample(after, "phonebot_provider_errors_total", provider="stt") == 0
    assert sample(after, "phonebot_event_loop_lag_seconds_count") > 0
    assert_json_logs(server, result.call_sid)


def assert_json_logs(server: LiveServer, call_sid: str) -> None:
    """Every line the server wrote is one JSON object; the call's lines carry its CallSid."""
    assert server.wait_for_log(f"Call {call_sid} ended", timeout_s=10)
    records = []
    for line in list(server.logs):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
    assert records[0]["logger"] == "pipecat"  # Pipecat's import banner, held (log_start)
    about_call = [r for r in records if r.get("call_sid") == call_sid]
    assert any(r["message"].startswith(f"Call {call_sid} started") for r in about_call)
    assert any(r["message"].startswith(f"Call {call_sid} ended") for r in about_call)
    busy = [r for r in records if "busy (" in r["message"]]
    assert busy and busy[0]["call_sid"] != call_sid and busy[0]["level"] == "WARNING"
    errors = [r for r in records if r["level"] in ("ERROR", "CRITICAL")]
    assert errors and all(r["message"].startswith(f"Call {call_sid}: LLM provider") for r in errors)
    assert all(r["call_sid"] == call_sid for r in errors)


# --- two workers on one port: any of them answers for both ---------------------------------


def test_two_workers_answer_each_scrape_for_the_whole_machine(redis_server, tmp_path: Path):
    """`python server.py --workers 2`: webhooks are taken by both workers (their JSON log
    lines name the process), and every scrape, whichever worker accepts it, counts all.
    With Redis stopped, a caller refused for it is counted as such, and as a state error."""
    env = {
        "WORKERS": "2", "REDIS_URL": redis_server.url, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "STREAM_SECRET": "s" * 32, "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "LOG_FORMAT": "json",
        "MAX_CONCURRENT_CALLS": "100", "CALL_RESERVATION_TTL_S": "5", "SHUTDOWN_GRACE_S": "1",
        # No call is made: OpenAI services that are never contacted start faster than the
        # offline engines (no speech models to load in each worker).
        **instant_services_env("http://127.0.0.1:9"),
    }  # fmt: skip
    started = time.monotonic()
    server = LiveServer(env, tmp_path)
    try:
        serving: set[int] = set()
        while len(serving) < 2:  # both workers up (the second may still be loading models)
            assert time.monotonic() - started < 120, f"only {serving} serve"
            serving.add(httpx.get(f"{server.base_url}/health", timeout=5).json()["pid"])
        answered_by: set[int] = set()
        sent = 0
        while len(answered_by) < 2:
            assert sent < 50, f"every webhook went to one worker: {answered_by}"
            dial = asyncio.run(
                dial_in(f"{server.base_url}/", auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
            )
            sent += 1
            line = f"call {dial.call_sid}: streaming to"
            assert server.wait_for_log(line, timeout_s=10)
            record = next(json.loads(x) for x in list(server.logs) if line in x)
            answered_by.add(record["process"])
        for _ in range(10):  # new connections: the workers race to accept each
            text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
            assert sample(text, "phonebot_calls_admitted_total", stage="webhook") == sent
            assert sample(text, "phonebot_admission_calls_reserved") >= 1  # from Redis
            assert sample(text, "phonebot_calls_live") == 0

        redis_server.stop()  # Redis gone: the next caller hears busy, and it is counted
        with pytest.raises(NoStreamError):
            asyncio.run(
                dial_in(f"{server.base_url}/", auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
            )
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        refused = "phonebot_calls_refused_total"
        assert sample(text, refused, stage="webhook", reason=STATE_UNAVAILABLE) == 1
        assert sample(text, "phonebot_state_errors_total") >= 2  # the webhook, the scrape
        redis_server.start()
    finally:
        server.stop()
