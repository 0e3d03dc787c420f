"""Call recordings: the stereo WAV against the audio that went in, its storage (a folder, or
an S3-compatible bucket served by moto on a free port), retention, the API, and whole calls
through the real server and the Twilio emulator with RECORD_CALLS=true."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import time
import wave
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from pipecat.frames.frames import InputAudioRawFrame, OutputAudioRawFrame

from phonebot.agents.agent import opening_line
from phonebot.audio import tone
from phonebot.records import Records
from phonebot.records.recording import (
    FLUSH_S,
    SETTLE_S,
    CallRecorder,
    StereoTimeline,
)
from phonebot.records.recording_store import Recordings, S3Recordings
from phonebot.web.calls_api import router
from phonebot.web.services import AppServices
from tests.conftest import make_settings, shipped_agent

RATE = 8000
CALLER_HZ, BOT_HZ = 440.0, 1000.0
ADMIN_KEY = "test-admin-key-recordings-0123"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
MOTO_MISSING = "moto[server] not installed (tests/requirements.txt): S3 recording tests skipped"


# --- measuring audio ----------------------------------------------------------------------
def peak_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / RATE)[np.argmax(spectrum)])


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if len(samples) else 0.0


def longest_zero_run(samples: np.ndarray) -> int:
    """Longest run of exact zeros: a gap the recorder wrote into the audio."""
    is_zero = np.concatenate(([False], samples == 0, [False]))
    starts = np.flatnonzero(~is_zero[:-1] & is_zero[1:])
    ends = np.flatnonzero(is_zero[:-1] & ~is_zero[1:])
    return int((ends - starts).max()) if len(starts) else 0


def onset(samples: np.ndarray, threshold: float = 1000.0) -> float:
    """Seconds to the first 10 ms window louder than `threshold` RMS."""
    win = RATE // 100
    for i in range(0, len(samples) - win, win // 2):
        if rms(samples[i : i + win]) > threshold:
            return i / RATE
    raise AssertionError("no audio above the threshold")


def read_stereo(data: bytes) -> tuple[np.ndarray, np.ndarray, wave.Wave_read]:
    with wave.open(io.BytesIO(data), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, RATE)
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
    return frames[:, 0], frames[:, 1], wav


def pcm(samples: np.ndarray) -> bytes:
    return samples.astype("<i2").tobytes()


def source(frequency: float, seconds: float) -> np.ndarray:
    return np.frombuffer(tone(frequency, seconds, RATE, 0.3), dtype=np.int16)


# --- the timeline: a simulated clock, frames as this pipeline delivers them ---------------
def feed(
    timeline: StereoTimeline,
    caller: np.ndarray,
    bot: np.ndarray,
    bot_at: float,
    caller_arrivals: dict[int, float] | None = None,
) -> bytes:
    """Caller audio in 60 ms batches arriving as they end (or at `caller_arrivals[i]`),
    bot audio in 100 ms chunks sent from `bot_at`; returns the stereo frames taken along
    the way (every 0.5 s of simulated time) plus the rest."""
    events = []
    for i in range(len(caller) // 480):
        at = (caller_arrivals or {}).get(i, (i + 1) * 0.06)
        events.append((at, 0, "caller", caller[i * 480 : (i + 1) * 480]))
    for i in range(len(bot) // 800):
        events.append((bot_at + i * 0.1, 1, "bot", bot[i * 800 : (i + 1) * 800]))
    out = bytearray()
    for at, _, side, samples in sorted(events, key=lambda e: (e[0], e[1])):
        if side == "caller":
            timeline.add_caller(pcm(samples), at)
        else:
            timeline.add_bot(pcm(samples), at)
        out += timeline.take_ready(at, 0.5)
    return bytes(out + timeline.take_all())


def tracks(stereo: bytes) -> tuple[np.ndarray, np.ndarray]:
    frames = np.frombuffer(stereo, dtype="<i2").reshape(-1, 2)
    return frames[:, 0], frames[:, 1]


def test_the_caller_is_left_and_the_bot_right_sample_exact_and_aligned():
    caller, bot = source(CALLER_HZ, 3.0), source(BOT_HZ, 1.0)
    left, right = tracks(feed(StereoTimeline(), caller, bot, bot_at=0.9))

    assert np.array_equal(left[: len(caller)], caller)  # the very samples, no gap, no shift
    start = round(0.9 * RATE)
    assert np.array_equal(right[start : start + len(bot)], bot)  # at the moment it was sent
    assert not right[:start].any() and not right[start + len(bot) :].any()
    # Barge-in: the caller and the bot at the same time are both there, overlapping.
    both = slice(start, start + len(bot))
    assert rms(left[both]) > 6000 and rms(right[both]) > 6000


def test_a_burst_of_late_caller_audio_leaves_no_gap_and_no_shift():
    """Twilio's media can arrive late and in a burst (network jitter): 0.3 s of it held up
    and delivered at once. Pipecat's AudioBufferProcessor wrote 180 ms of zeros into the
    caller's tone here (phonebot/records/recording.py); the samples themselves are the
    clock, so nothing moves."""
    caller, bot = source(CALLER_HZ, 3.0), source(BOT_HZ, 2.0)
    late = {i: 1.2 for i in range(15, 21)}  # batches due at 0.96-1.26 s all arrive at 1.2 s
    left, right = tracks(feed(StereoTimeline(), caller, bot, bot_at=0.5, caller_arrivals=late))

    assert longest_zero_run(left[: len(caller)]) <= 2  # a sine's own zero crossings
    assert np.array_equal(left[: len(caller)], caller)
    assert np.array_equal(right[4000 : 4000 + len(bot)], bot)


def test_the_callers_samples_are_the_clock_when_the_clocks_drift():
    """Twilio's 8 kHz is not our monotonic clock: here it runs 0.5 % slow for two minutes
    (0.6 s). The caller's track stays whole, and the bot lands where the caller was."""
    timeline = StereoTimeline()
    caller, bot = source(CALLER_HZ, 120.0), source(BOT_HZ, 0.1)
    out = bytearray()
    for i in range(len(caller) // 480):
        now = (i + 1) * 0.06 * 1.005
        timeline.add_caller(pcm(caller[i * 480 : (i + 1) * 480]), now)
        if i == 1900:
            timeline.add_bot(pcm(bot), now)
        out += timeline.take_ready(now, FLUSH_S)
    left, right = tracks(bytes(out + timeline.take_all()))

    assert np.array_equal(left, caller)
    assert np.array_equal(right[1901 * 480 : 1901 * 480 + 800], bot)


def test_bot_pauses_are_silence_but_late_chunks_play_on():
    bot = source(BOT_HZ, 1.0)
    timeline = StereoTimeline()
    caller = source(CALLER_HZ, 4.0)
    for i in range(len(caller) // 480):
        timeline.add_caller(pcm(caller[i * 480 : (i + 1) * 480]), (i + 1) * 0.06)
        if i == 10:  # 0.66 s: one utterance, its chunks each 30 ms late (jitter, no pause)
            for k in range(5):
                timeline.add_bot(pcm(bot[k * 800 : (k + 1) * 800]), 0.66 + k * 0.13)
        if i == 40:  # 2.46 s: the next utterance, after a pause
            timeline.add_bot(pcm(bot[4000:4800]), 2.46)
    _, right = tracks(timeline.take_all())

    first = round(0.66 * RATE)
    assert np.array_equal(right[first : first + 4000], bot[:4000])  # back to back
    assert not right[first + 4000 : round(2.46 * RATE)].any()
    assert np.array_equal(right[round(2.46 * RATE) : round(2.46 * RATE) + 800], bot[4000:4800])


def test_a_long_call_holds_only_seconds_of_audio():
    timeline = StereoTimeline()
    caller = source(CALLER_HZ, 0.06)
    taken, most = 0, 0
    for i in range(10 * 60 * 1000 // 60):  # ten minutes of 60 ms batches
        now = (i + 1) * 0.06
        timeline.add_caller(pcm(caller), now)
        if i % 5 == 0:
            timeline.add_bot(pcm(source(BOT_HZ, 0.1)), now)
        taken += len(timeline.take_ready(now, FLUSH_S)) // 4
        most = max(most, timeline.caller_end - timeline.written)
    assert most <= (SETTLE_S + FLUSH_S + 0.1) * RATE
    assert taken + len(timeline.take_all()) // 4 == 10000 * RATE // 1000 * 60


# --- the recorder: frames in, a WAV file out, written during the call --------------------
async def test_the_recorder_streams_a_valid_wav_to_disk_during_the_call(tmp_path: Path):
    now = [0.0]
    recorder = CallRecorder("CAtest", tmp_path / "CAtest.wav.part", clock=lambda: now[0])
    caller, bot = source(CALLER_HZ, 6.0), source(BOT_HZ, 1.0)
    sizes = []
    for i in range(len(caller) // 480):
        now[0] = (i + 1) * 0.06
        recorder.add("caller", InputAudioRawFrame(pcm(caller[i * 480 : (i + 1) * 480]), RATE, 1))
        if i in (30, 40):  # two 100 ms chunks, sent at 1.86 and 2.46 s
            recorder.add("bot", OutputAudioRawFrame(pcm(bot[:800]), RATE, 1))
        await asyncio.sleep(0.002)  # the event loop goes on; writes run in a thread
        sizes.append(recorder.file.frames)
    assert 0 < sizes[-1] < len(caller), "nothing was written before the call ended"
    path = await recorder.finish()

    left, right, _ = read_stereo(path.read_bytes())
    assert np.array_equal(left, caller)
    for sent_at in (1.86, 2.46):
        start = round(sent_at * RATE)
        assert np.array_equal(right[start : start + 800], bot[:800])
    assert np.count_nonzero(right) == np.count_nonzero(bot[:800]) * 2  # nothing else
    assert abs(peak_hz(left) - CALLER_HZ) < 5 and abs(peak_hz(right[14880:15680]) - BOT_HZ) < 10
    assert recorder.duration_s == pytest.approx(6.0, abs=0.001)


async def test_nothing_recorded_leaves_no_file(tmp_path: Path):
    recorder = CallRecorder("CAempty", tmp_path / "CAempty.wav.part")
    assert await recorder.finish() is None
    assert list(tmp_path.iterdir()) == []


# --- storage, retention and the API -------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible server on a free loopback port, for this module."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but moto[server] is not installed (tests/requirements.txt)")
        pytest.skip(MOTO_MISSING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client("s3", endpoint_url=endpoint)


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"recordings-{time.monotonic_ns()}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


async def make_records(tmp_path: Path, s3_endpoint: str | None = None, **settings) -> Records:
    records = Records(make_settings(
        database_url=f"sqlite:///{tmp_path / 'records.db'}", admin_api_key=ADMIN_KEY,
        recordings_dir=str(tmp_path / "recordings"), record_calls=True, **settings,
    ))
    if s3_endpoint:
        records.recordings = Recordings(
            records.settings, records.writer, records.sessions,
            s3_client_factory=lambda: s3_client(s3_endpoint),
        )
        records.writer.recordings = records.recordings
    await records.start()
    return records


async def record_a_call(records: Records, call_sid: str, seconds: float = 1.0) -> None:
    """A short call through a recorder from `records` (simulated clock), stored."""
    records.writer.call_started(call_sid, direction="inbound")
    now = [0.0]
    recorder = records.recordings.recorder(call_sid)
    recorder._clock = lambda: now[0]
    caller = source(CALLER_HZ, seconds)
    for i in range(len(caller) // 480):
        now[0] = (i + 1) * 0.06
        recorder.add("caller", InputAudioRawFrame(pcm(caller[i * 480 : (i + 1) * 480]), RATE, 1))
    recorder.stop()  # as the pipeline's end does: stored in the background
    await records.recordings.close()
    await records.writer.flush()


@pytest.fixture
async def api_for():
    clients = []

    async def build(records: Records) -> httpx.AsyncClient:
        app = FastAPI()
        app.state.services = AppServices.build(records.settings, records=records)
        app.include_router(router)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        clients.append((client, records))
        return client

    yield build
    for client, records in clients:
        await client.aclose()
        await records.stop()


async def test_a_file_recording_is_on_the_record_served_and_deleted(tmp_path, api_for):
    records = await make_records(tmp_path)
    await record_a_call(records, "CAfile")
    call = await records.store.get("CAfile")
    path = Path(await records.store.recording_path("CAfile"))
    assert call.has_recording and path == tmp_path / "recordings" / "CAfile.wav"
    assert not list((tmp_path / "recordings").glob("*.part"))

    api = await api_for(records)
    response = await api.get("/calls/CAfile/recording", headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    left, _, _ = read_stereo(response.content)
    assert abs(peak_hz(left) - CALLER_HZ) < 5

    assert (await api.delete("/calls/CAfile", headers=AUTH)).status_code == 204
    assert not path.exists()


async def test_an_s3_recording_is_uploaded_redirected_to_and_deleted(
    tmp_path, api_for, s3_endpoint, bucket
):
    records = await make_records(tmp_path, s3_endpoint, recordings_s3_url=f"s3://{bucket}/calls")
    await record_a_call(records, "CAs3")
    path = await records.store.recording_path("CAs3")
    assert path == f"s3://{bucket}/calls/CAs3.wav"
    assert not list((tmp_path / "recordings").iterdir())  # uploaded, not kept locally

    api = await api_for(records)
    response = await api.get("/calls/CAs3/recording", headers=AUTH)
    assert response.status_code == 307
    async with httpx.AsyncClient() as client:  # the presigned link, without our key
        download = await client.get(response.headers["location"])
    assert download.status_code == 200
    left, _, _ = read_stereo(download.content)
    assert abs(peak_hz(left) - CALLER_HZ) < 5

    assert (await api.delete("/calls/CAs3", headers=AUTH)).status_code == 204
    listing = s3_client(s3_endpoint).list_objects_v2(Bucket=bucket)
    assert listing.get("KeyCount", 0) == 0


async def test_without_s3_configured_old_s3_recordings_are_served_and_new_ones_stay_local(
    tmp_path, api_for, s3_endpoint, bucket
):
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key="old/CAold.wav", Body=b"RIFF")
    records = await make_records(tmp_path, s3_endpoint)  # RECORDINGS_S3_URL unset
    records.writer.call_updated("CAold", recording_path=f"s3://{bucket}/old/CAold.wav")
    await records.writer.flush()
    api = await api_for(records)

    response = await api.get("/calls/CAold/recording", headers=AUTH)
    assert response.status_code == 307
    async with httpx.AsyncClient() as client:
        assert (await client.get(response.headers["location"])).content == b"RIFF"
    await record_a_call(records, "CAnew")
    assert await records.store.recording_path("CAnew") == str(tmp_path / "recordings/CAnew.wav")


async def test_retention_deletes_old_recordings_at_start_and_clears_their_records(tmp_path):
    folder = tmp_path / "recordings"
    folder.mkdir()
    old, new, crashed = folder / "CAold.wav", folder / "CAnew.wav", folder / "CAcrash.wav.part"
    ten_days_ago = time.time() - 10 * 86400
    for path in (old, new, crashed):
        path.write_bytes(b"RIFF")
    for path in (old, crashed):
        os.utime(path, (ten_days_ago, ten_days_ago))
    seed = await make_records(tmp_path)
    seed.writer.call_updated("CAold", recording_path=str(old))
    seed.writer.call_updated("CAnew", recording_path=str(new))
    await seed.writer.flush()
    await seed.stop()

    records = await make_records(tmp_path, recording_retention_days=7)  # expires on start
    try:
        for _ in range(100):
            if not old.exists():
                break
            await asyncio.sleep(0.02)
        assert not old.exists() and not crashed.exists() and new.exists()
        for _ in range(100):
            if (await records.store.recording_path("CAold")) is None:
                break
            await asyncio.sleep(0.02)
        assert await records.store.recording_path("CAold") is None
        assert await records.store.get("CAold") is not None  # the record itself stays
        assert await records.store.recording_path("CAnew") == str(new)
    finally:
        await records.stop()


async def test_retention_in_the_bucket_goes_by_upload_time(tmp_path, s3_endpoint, bucket):
    later = [datetime.now(UTC)]
    records = await make_records(tmp_path, s3_endpoint, recordings_s3_url=f"s3://{bucket}/x")
    await record_a_call(records, "CAkeep")
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key="elsewhere/CAother.wav", Body=b"RIFF")
    store = Recordings(
        make_settings(
            recordings_dir=str(tmp_path / "recordings"), recordings_s3_url=f"s3://{bucket}/x",
            recording_retention_days=30,
        ),
        records.writer, records.sessions,
        s3_client_factory=lambda: s3_client(s3_endpoint), now=lambda: later[0],
    )
    assert await store.expire() == []  # uploaded just now
    later[0] += timedelta(days=31)
    assert await store.expire() == [f"s3://{bucket}/x/CAkeep.wav"]
    keys = [o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["elsewhere/CAother.wav"]  # only under its own prefix
    assert await records.store.recording_path("CAkeep") is None
    await records.stop()


def test_s3_paths_are_split_into_bucket_and_prefix():
    assert S3Recordings("s3://b-1/calls", lambda: None).key("CA1") == "calls/CA1.wav"
    assert S3Recordings("s3://b-1/a/b/", lambda: None).key("CA1") == "a/b/CA1.wav"
    assert S3Recordings("s3://b-1", lambda: None).key("CA1") == "CA1.wav"
    with pytest.raises(ValueError):
        make_settings(recordings_s3_url="https://b-1/calls")


def test_dialin_personas_announce_recordings_only_when_recorded():
    support = shipped_agent("support")
    assert "This call is recorded." not in opening_line(support, {})
    announced = opening_line(support.announcing_recording(), {})
    assert announced.startswith(f"{support.greeting} This call is recorded.")


# --- whole calls through the real server and the emulator --------------------------------
CALLER = "+15557654321"
OUR_NUMBER = "+15550001111"


def align(reference: np.ndarray, recorded: np.ndarray) -> int:
    """Samples by which `recorded` lags `reference` (FFT cross-correlation)."""
    size = 1 << (len(reference) + len(recorded)).bit_length()
    corr = np.fft.irfft(
        np.fft.rfft(recorded.astype(np.float64), size)
        * np.conj(np.fft.rfft(reference.astype(np.float64), size)),
        size,
    )
    lag = int(np.argmax(corr))
    return lag if lag < size // 2 else lag - size


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    a, b = a[:n].astype(np.float64), b[:n].astype(np.float64)
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))


def live_server_env(tmp_path: Path, rest_port: int, **extra: str) -> dict[str, str]:
    from tests.conftest import ACCOUNT_SID, AUTH_TOKEN

    return {
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_PHONE_NUMBER": OUR_NUMBER,
        "TWILIO_API_BASE_URL": f"http://127.0.0.1:{rest_port}",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'live.db'}",
        "ADMIN_API_KEY": ADMIN_KEY,
        "RECORD_CALLS": "true",
        "RECORDINGS_DIR": str(tmp_path / "recordings"),
        **extra,
    }


async def live_call(env: dict[str, str], tmp_path: Path, script: list):
    """Start `server.py` with `env`, make one dial-in call with `script` through the
    emulator; returns (server, result). The caller stops the server."""
    from phonebot.emulator import MediaStreamCaller, TwilioRestEmulator, dial_in
    from tests.conftest import ACCOUNT_SID, AUTH_TOKEN
    from tests.live_server import LiveServer

    rest_port = int(env["TWILIO_API_BASE_URL"].rsplit(":", 1)[1])
    server = LiveServer(env, tmp_path)
    try:
        async with TwilioRestEmulator(
            account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, port=rest_port,
            local_server_url=server.base_url,
        ) as twilio:
            dial = await dial_in(
                f"{server.base_url}/", auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID,
                from_=CALLER, to=OUR_NUMBER,
            )
            caller: MediaStreamCaller = dial.caller()
            twilio.register_call(dial.call_sid, to=OUR_NUMBER, from_=CALLER, caller=caller)
            result = await caller.run(script)
    except BaseException:
        server.stop()
        raise
    return server, result


async def fetch_recording(server, call_sid: str, follow: bool = True) -> httpx.Response:
    """The recording through the API, once the call's end has stored it."""
    async with httpx.AsyncClient(follow_redirects=follow, timeout=10) as client:
        for _ in range(100):
            response = await client.get(
                f"{server.base_url}/calls/{call_sid}/recording", headers=AUTH
            )
            if response.status_code != 404:
                return response
            await asyncio.sleep(0.1)
    raise AssertionError(f"no recording of {call_sid}:\n" + server.log_text()[-3000:])


async def test_a_recorded_call_has_the_caller_left_and_the_bot_right_aligned(tmp_path):
    from phonebot.emulator import Hangup, Pause, Speak, WaitForBot

    env = live_server_env(tmp_path, free_port())
    # The caller's tone starts 1 s into the greeting: both talk at once for a while.
    script = [WaitForBot(until="speech"), Pause(1.0), Speak.tone(1.0, CALLER_HZ), Pause(0.5),
              Hangup()]
    server, result = await live_call(env, tmp_path, script)
    try:
        greeting = opening_line(
            shipped_agent("general").announcing_recording(), {"caller_id": CALLER}
        )
        assert server.bot_lines(result.call_sid)[0] == greeting  # the notice is spoken
        response = await fetch_recording(server, result.call_sid)
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/wav"
        left, right, _ = read_stereo(response.content)
        assert server.error_lines() == []
    finally:
        server.stop()

    # Where each side's audio sits in the recording, against what the emulator sent and
    # played (its own timeline): the caller's left, the bot's right, the same offset.
    caller_lag = align(result.caller_audio, left) / RATE
    bot_lag = align(result.bot_audio, right) / RATE
    print(f"recording lags the emulator: caller {caller_lag:.3f} s, bot {bot_lag:.3f} s")
    assert abs(caller_lag - bot_lag) <= 0.1, f"caller {caller_lag:.3f} s, bot {bot_lag:.3f} s"
    # The caller's tone: same frequency, same level (μ-law is within 0.5 dB), no gap.
    tone_start, tone_end = result.caller_segments[0]
    at = round((tone_start + caller_lag) * RATE)
    heard = left[at : at + round((tone_end - tone_start) * RATE)]
    sent = result.caller_audio[round(tone_start * RATE) : round(tone_end * RATE)]
    assert abs(peak_hz(heard) - CALLER_HZ) < 5
    print(f"tone: {peak_hz(heard):.1f} Hz, level {20 * np.log10(rms(heard) / rms(sent)):+.2f} dB")
    assert abs(20 * np.log10(rms(heard) / rms(sent))) < 0.5
    assert longest_zero_run(heard) <= 2
    # The bot's greeting on the right: the audio the caller heard, with nothing missing.
    # Aligned on its own: under load the playout can pause between the bot's turns, which
    # moves the whole-channel lag above by tens of ms (-0.078 s once) off every one of them.
    first = result.bot_utterances[0]
    played = result.bot_audio[round(first.start * RATE) : round(first.end * RATE)]
    greeting_lag = align(played, right) / RATE - first.start
    assert abs(greeting_lag - caller_lag) <= 0.1, f"greeting {greeting_lag:.3f} s"
    at = round((first.start + greeting_lag) * RATE)
    print(f"greeting similarity {similarity(played, right[at : at + len(played)]):.4f}")
    assert similarity(played, right[at : at + len(played)]) > 0.95
    # Talking over the bot shows as overlap: both channels loud at the tone's start.
    overlap = slice(round((tone_start + caller_lag) * RATE),
                    round((tone_start + caller_lag + 0.2) * RATE))
    assert rms(left[overlap]) > 3000 and rms(right[overlap]) > 300
    # And the whole call is there, not more.
    assert abs(len(left) / RATE - (result.duration - caller_lag)) < 0.5


async def test_a_recorded_call_goes_to_the_bucket_and_the_api_redirects(
    tmp_path, s3_endpoint, bucket
):
    from phonebot.emulator import Hangup, Speak, WaitForBot

    env = live_server_env(
        tmp_path, free_port(), RECORDINGS_S3_URL=f"s3://{bucket}/calls",
        AWS_ENDPOINT_URL=s3_endpoint, **AWS_ENV,
    )
    script = [WaitForBot(until="speech"), Speak.tone(0.5, CALLER_HZ), Hangup()]
    server, result = await live_call(env, tmp_path, script)
    try:
        redirect = await fetch_recording(server, result.call_sid, follow=False)
        assert redirect.status_code == 307
        assert redirect.headers["location"].startswith(f"{s3_endpoint}/{bucket}/calls/")
        async with httpx.AsyncClient() as client:
            download = await client.get(redirect.headers["location"])
        left, right, _ = read_stereo(download.content)
        assert server.error_lines() == []
    finally:
        server.stop()
    at = round(onset(left) * RATE)
    assert rms(right) > 300 and abs(peak_hz(left[at : at + 3200]) - CALLER_HZ) < 5
    assert not list((tmp_path / "recordings").glob("*.wav*"))  # uploaded, nothing left
