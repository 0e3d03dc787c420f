"""The offline recogniser: Whisper tiny.en, checked, shared, off the event loop, honest on noise.

Caller speech here is what the emulator's callers speak: Piper's joe with its noise off (the
same audio every run), through the phone channel (8 kHz, G.711 mu-law round trip).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import AsyncMock

import numpy as np
import pytest
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    StartFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.stt_service import SegmentedSTTService
from pipecat.tests.utils import run_test

from phonebot.ai.offline import piper_voice, stt, whisper
from phonebot.ai.offline.channel import phone_channel
from phonebot.ai.offline.responder import OFFLINE_FALLBACK, OfflineResponder, Reply
from phonebot.ai.offline.stt import (
    OfflineSTTService,
    normalize_transcript,
    transcribe,
    word_errors,
)
from phonebot.ai.offline.whisper import TINY_EN_SHA256, ModelFileError, WhisperFiles
from phonebot.ai.providers import build_services
from phonebot.emulator.client import load_transcriber
from tests.conftest import make_settings, shipped_agent

# Held-in caller sentences: ordinary requests, numbers spoken as digits and as words.
CALLER = [
    "Could somebody call me back tomorrow afternoon after two o'clock?",
    "My order number is 4 5 6 7 and it still hasn't arrived.",
    "What are your opening hours on Saturday?",
    "Can I change the delivery address on my order?",
    "Please cancel my appointment on Friday morning.",
    "I'd like to move my booking to next Tuesday at ten.",
]
RATE = 8000
FRAME_BYTES = 320  # 20 ms at 8 kHz


def caller(text: str) -> bytes:
    return phone_channel(piper_voice.synthesize_at(text, RATE, deterministic=True), RATE)


def noise(kind: str, seconds: float = 2.0) -> bytes:
    """Two seconds of a turn with no speech in it, through the phone channel."""
    t = np.arange(int(seconds * RATE)) / RATE
    samples = {
        "silence": np.zeros_like(t),
        "hiss": np.random.default_rng(0).normal(0, 300, t.size),
        "hum": 800 * np.sin(2 * np.pi * 60 * t) + 400 * np.sin(2 * np.pi * 120 * t),
        "dial tone": 1500 * (np.sin(2 * np.pi * 350 * t) + np.sin(2 * np.pi * 440 * t)),
    }[kind]
    return phone_channel(samples.astype(np.int16).tobytes(), RATE)


def test_word_errors_count_substitutions_deletions_and_insertions() -> None:
    said = ["a", "b", "c"]
    assert word_errors(said, ["a", "b", "c"]) == 0
    assert word_errors(said, ["a", "x", "c", "d"]) == 2  # one swapped, one added
    assert word_errors(said, []) == 3


def word_accuracy(said: str, heard: str) -> float:
    """1 - word error rate, both sides normalised."""
    ref, hyp = normalize_transcript(said).split(), normalize_transcript(heard).split()
    return 1 - word_errors(ref, hyp) / len(ref)


def turn(pcm: bytes) -> list[Frame]:
    """One caller turn as the VAD and the transport hand it to the STT."""
    audio = [
        InputAudioRawFrame(audio=pcm[i : i + FRAME_BYTES], sample_rate=RATE, num_channels=1)
        for i in range(0, len(pcm), FRAME_BYTES)
    ]
    return [VADUserStartedSpeakingFrame(), *audio, VADUserStoppedSpeakingFrame()]


# ------------------------------------------------------------------ the model's files


@pytest.fixture(scope="module")
def tampered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the packaged tiny.en directory with one byte of model.bin flipped."""
    directory = tmp_path_factory.mktemp("tiny-en") / "model"
    shutil.copytree(whisper.packaged_model().directory, directory)
    weights = directory / "model.bin"
    with weights.open("r+b") as file:
        file.seek(weights.stat().st_size // 2)  # inside the weights, not the header
        byte = file.read(1)
        file.seek(-1, 1)
        file.write(bytes([byte[0] ^ 0xFF]))
    return directory


def test_the_packaged_model_is_the_pinned_one() -> None:
    files = whisper.packaged_model()
    assert files.sha256 == TINY_EN_SHA256
    whisper.verify_model_files(files)  # raises if the bytes differ


def test_a_model_whose_bytes_differ_is_refused_with_both_hashes(tampered: Path) -> None:
    actual = piper_voice.file_sha256(tampered / "model.bin")
    with pytest.raises(ModelFileError) as refused:
        whisper.load_model(WhisperFiles(tampered, TINY_EN_SHA256))
    message = str(refused.value)
    assert str(tampered / "model.bin") in message
    assert TINY_EN_SHA256 in message and actual in message and actual != TINY_EN_SHA256


async def test_the_server_does_not_start_on_a_tampered_model(
    tampered: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lifespan's warm-up (`start_decoder_pool`) loads the packaged model: it raises."""
    monkeypatch.setattr(whisper, "packaged_model", lambda: WhisperFiles(tampered, TINY_EN_SHA256))
    for _ in range(2):  # a failed load is not cached: it fails again for whoever asks next
        with pytest.raises(ModelFileError, match="SHA-256"):
            await stt.start_decoder_pool()


def test_a_users_model_directory_is_used_as_it_is(tampered: Path) -> None:
    """OFFLINE_STT_MODEL names the user's own model: no pinned hash to check it against."""
    heard = transcribe(caller(CALLER[2]), RATE, model=str(tampered))
    assert word_accuracy(CALLER[2], heard) >= 0.8, heard


@pytest.mark.parametrize("missing", ["model.bin", "tokenizer.json"])
def test_a_model_directory_missing_a_file_is_a_clear_error(tmp_path: Path, missing: str) -> None:
    for name in {"model.bin", "tokenizer.json"} - {missing}:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ModelFileError, match=f"{tmp_path} has no {missing}.*OFFLINE_STT_MODEL"):
        stt.warm_up(str(tmp_path))


async def test_offline_stt_model_reaches_the_calls_recogniser(tmp_path: Path) -> None:
    """OFFLINE_STT_MODEL set to a directory with no model: each turn reports why."""
    settings = make_settings(offline_stt_model=str(tmp_path))
    service = build_services(settings, shipped_agent("general")).stt
    down, up = await run_test(
        service,
        frames_to_send=turn(caller(CALLER[2])),
        pipeline_params=PipelineParams(audio_in_sample_rate=RATE),
    )
    errors = [f for f in [*down, *up] if isinstance(f, ErrorFrame)]
    assert errors and "has no model.bin" in errors[0].error
    assert not any(isinstance(f, TranscriptionFrame) for f in down)


# ------------------------------------------------------------------ one model, shared


def test_one_model_per_process_loaded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[WhisperFiles] = []

    def slow_load(files: WhisperFiles) -> object:
        loads.append(files)
        time.sleep(0.2)  # calls starting together all ask while it loads
        return object()

    monkeypatch.setattr(whisper, "load_model", slow_load)
    monkeypatch.setattr(whisper, "_models", {})  # this test's cache, not the process's
    files = WhisperFiles(Path("/nowhere/shared-test"), None)
    got: list[object] = []
    threads = [
        threading.Thread(target=lambda: got.append(whisper.shared_model(files)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1 and len(got) == 4 and all(model is got[0] for model in got)


# ------------------------------------------------------------------ what it hears


async def test_caller_sentences_over_the_phone_are_heard_in_a_pipeline() -> None:
    """Each turn one transcript, in order; silence and noise turns none; >= 90 % of words."""
    frames: list[Frame] = []
    for sentence in CALLER[:3]:
        frames += turn(caller(sentence))
    frames += turn(noise("silence")) + turn(noise("hum"))
    for sentence in CALLER[3:]:
        frames += turn(caller(sentence))
    down, _ = await run_test(
        OfflineSTTService(),
        frames_to_send=frames,
        pipeline_params=PipelineParams(audio_in_sample_rate=RATE),
    )
    heard = [f.text for f in down if isinstance(f, TranscriptionFrame)]
    assert len(heard) == len(CALLER), heard
    scores = [word_accuracy(said, text) for said, text in zip(CALLER, heard, strict=True)]
    assert sum(scores) / len(scores) >= 0.9, list(zip(CALLER, heard, strict=True))
    # Whisper's own text, as a cloud STT would give it: capitals, punctuation, digits.
    assert heard[1].startswith("My order number is 4567"), heard[1]


@pytest.mark.parametrize("kind", ["silence", "hiss", "hum", "dial tone"])
def test_silence_and_noise_are_heard_as_nothing(kind: str) -> None:
    assert transcribe(noise(kind), RATE) == ""


def speech_shaped_noise(text: str, seed: int) -> bytes:
    """A caller sentence's spectrum with random phases: as loud and as coloured as speech,
    with no word in it."""
    pcm = piper_voice.synthesize_at(text, RATE, deterministic=True)
    spectrum = np.abs(np.fft.rfft(np.frombuffer(pcm, dtype=np.int16)))
    phases = np.exp(2j * np.pi * np.random.default_rng(seed).random(spectrum.size))
    samples = np.fft.irfft(spectrum * phases, n=len(pcm) // 2)
    return phone_channel(np.clip(samples, -32768, 32767).astype(np.int16).tobytes(), RATE)


def test_noise_shaped_like_speech_is_not_heard_as_thank_you(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whisper writes "Thank you." over such noise, sure of its text but not of any speech
    (no-speech probability 0.85-0.92, speech at most 0.32): the window is dropped."""
    model = whisper.shared_model()
    decode = model.transcribe
    raw: list[str] = []

    def spy(*args, **kwargs):
        segments, info = decode(*args, **kwargs)
        segments = list(segments)
        raw.extend(segment.text.strip() for segment in segments)
        return iter(segments), info

    monkeypatch.setattr(model, "transcribe", spy)
    for seed in range(3):
        assert transcribe(speech_shaped_noise(CALLER[2], seed), RATE) == ""
    assert "Thank you." in raw  # what there was to drop


class _Segments:
    """A stand-in WhisperModel: returns ``texts`` as segments and records its options."""

    def __init__(self, *texts: str) -> None:
        self.texts = texts
        self.options: dict = {}

    def transcribe(self, audio: np.ndarray, **options):
        self.options = options
        segments = [SimpleNamespace(text=f" {t}", no_speech_prob=0.1) for t in self.texts]
        return iter(segments), None


def test_text_with_no_word_in_it_is_dropped() -> None:
    audio = np.zeros(16000, dtype=np.float32)
    assert whisper.recognise(_Segments(". . . . . . . .", "Hello?"), audio) == "Hello?"
    assert whisper.recognise(_Segments("...", " - "), audio) == ""


def test_a_turns_tokens_are_capped_by_its_length() -> None:
    """No temperature fallback breaks a decode that loops: the cap ends it, a fast talker's
    turn (~5 tokens a second) never reaches it."""
    model = _Segments("Hello.")
    whisper.recognise(model, np.zeros(3 * 16000, dtype=np.float32))
    assert model.options["max_new_tokens"] == whisper.TOKENS_BASE + 3 * whisper.TOKENS_PER_SECOND
    assert model.options["temperature"] == 0.0
    speech = caller(CALLER[0])  # ~4 s, the longest held-in sentence
    tokens = whisper.shared_model().hf_tokenizer.encode(" " + CALLER[0]).ids
    assert len(tokens) * 2 < whisper.TOKENS_BASE + whisper.TOKENS_PER_SECOND * len(speech) / 16000


def offline_reply(agent_name: str, said: str) -> Reply:
    """What the offline responder does with ``said``, after its greeting."""
    messages = [
        {"role": "system", "content": "prompt"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": said},
    ]
    agent = shipped_agent(agent_name)
    return OfflineResponder(agent=agent).reply_to(LLMContext(messages=messages))


@pytest.mark.parametrize(
    ("agent", "said", "expected"),
    [
        ("general", "I want to speak to a person.", Reply("", "transfer_call", {})),
        ("general", "What are your hours?", "hours"),
        ("summer_sale", "Yes.", "yes"),
        ("summer_sale", "No.", "no"),
    ],
)
def test_the_offline_responder_understands_whispers_punctuation(
    agent: str, said: str, expected: Reply | str
) -> None:
    """Whisper writes what a cloud STT writes ("Yes.", "your hours?"), and the keyword
    answers still match it."""
    heard = transcribe(caller(said), RATE)
    assert heard == said  # as written: capital, punctuation
    if isinstance(expected, Reply):
        assert offline_reply(agent, heard) == expected
        return
    answers = {k: a.answer for a in shipped_agent(agent).answers for k in a.keywords}
    assert offline_reply(agent, heard) == Reply(answers[expected])


# ------------------------------------------------------------------ off the event loop


async def _max_loop_gap(work: Awaitable[object]) -> tuple[float, float]:
    """Run ``work`` beside a 10 ms ticker: (longest tick gap, duration of the work) in s."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await work
    duration = time.perf_counter() - started
    done.set()
    await ticker
    return max(gaps), duration


async def test_decoding_keeps_the_event_loop_running() -> None:
    """CTranslate2 releases the GIL: a decode on the decoding threads does not stall the loop
    that paces every call's audio."""
    stt.warm_up()
    speech = b"".join(caller(sentence) for sentence in CALLER[:3])
    gap, duration = await _max_loop_gap(stt.transcribe_in_thread(speech, RATE))
    assert duration > 0.15, "the decode must be long enough to have stalled the loop"
    assert gap < 0.1, (gap, duration)


async def test_the_service_starts_without_waiting_for_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loading the model (~0.3 s, more on a busy machine) must not hold up a call's start."""
    loading = threading.Event()
    release = threading.Event()

    def slow_warm_up(model: str | None = None) -> None:
        loading.set()
        release.wait(5)

    monkeypatch.setattr(stt, "warm_up", slow_warm_up)
    monkeypatch.setattr(SegmentedSTTService, "start", AsyncMock())  # Pipecat's part
    try:
        started = time.perf_counter()
        await OfflineSTTService().start(StartFrame())
        assert time.perf_counter() - started < 0.5
        assert await asyncio.to_thread(loading.wait, 5)  # the load was handed to the threads
    finally:
        release.set()


async def test_the_emulator_hears_the_bot_with_the_same_recogniser() -> None:
    """`python -m phonebot.call` prints what the bot said (the bot's voice, with Piper's
    noise), transcribed off the emulator's event loop, which paces the caller's audio.

    Piper's noise makes every rendition of the line different, and Whisper ended one in
    80 after its second sentence (word accuracy 0.67; the others 0.96-1.0), so the median
    of three renditions is held to 0.9: one such miss passes, a recogniser that mishears
    the bot does not."""
    transcriber = load_transcriber()
    assert transcriber is not None
    try:
        await transcriber(bytes(1600))  # the model loaded
        renditions = [
            phone_channel(piper_voice.synthesize_at(OFFLINE_FALLBACK, RATE), RATE)
            for _ in range(3)
        ]
        gap, duration = await _max_loop_gap(transcriber(renditions[0]))
        heard = [await transcriber(bot) for bot in renditions]
    finally:
        transcriber.close()
    median = sorted(word_accuracy(OFFLINE_FALLBACK, text) for text in heard)[1]
    assert median >= 0.9, heard
    assert duration > 0.15 and gap < 0.1, (gap, duration)


# ------------------------------------------------------------------ comparable text


@pytest.mark.parametrize(
    ("said", "written"),
    [
        ("My order number is four five six seven", "My order number is 4567."),
        ("my number ends in 3 4 1 2", "My number ends in 3-4-1-2."),
        ("after two o'clock", "After 2 o'clock?"),
        ("a table for two at seven thirty", "A table for 2 at 7:30."),
        ("it costs one thousand five hundred dollars", "It costs $1,500."),
        ("one hundred and five", "105"),
        ("on the twenty first of March", "On the 21st of March."),
        ("next Tuesday at ten", "Next Tuesday at 10."),
        ("OK, thanks", "Okay, thanks."),
    ],
)
def test_normalize_transcript_makes_words_and_digits_comparable(said: str, written: str) -> None:
    assert normalize_transcript(said) == normalize_transcript(written)


def test_normalize_transcript_keeps_different_numbers_apart() -> None:
    assert normalize_transcript("four five six") != normalize_transcript("four five seven")
    assert normalize_transcript("two o'clock") != normalize_transcript("ten o'clock")
    assert normalize_transcript("It's 1,500 or 105!") == "it's 1500 or 105"
