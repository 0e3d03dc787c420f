"""Offline speech recognition with pocketsphinx and its bundled US-English model.

Why pocketsphinx: its wheel ships an acoustic model, a 134k-word dictionary and a general
language model, so recognition works with no API key and no download. It is far less accurate
than cloud STT on open speech, but restricted to a small vocabulary (the phrases a test expects
the bot to say, or an agent's keywords) it is reliable enough to assert on.

Phone audio is 8 kHz. The bundled acoustic model was trained on 16 kHz audio with a mel
filterbank reaching 6800 Hz; running pocketsphinx at 8 kHz needs a filterbank that stops below
4 kHz, and the model does not survive that mismatch (word accuracy falls from ~35 % to about
0 %, see ``bench/offline_engines.py``). Upsampling the 8 kHz audio to 16 kHz keeps the model's
own front end and is what this module does.

The service decodes in worker processes (see ``_decoder_pool``): pocketsphinx holds the GIL
while it decodes, so in a thread every turn would stall the server's event loop, and with it the
audio pacing of every call, for as long as the decode takes (measured: 0.19 s for 5 s of speech
with a vocabulary, 1.75 s with the general model). ``transcribe`` itself stays a plain blocking
function for scripts, tests and the emulator (which runs it in a process of its own).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import re
import sys
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import cache
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from pipecat.frames.frames import ErrorFrame, Frame, StartFrame, TranscriptionFrame
from pipecat.services.settings import STTSettings
from pipecat.services.stt_service import SegmentedSTTService
from pipecat.transcriptions.language import Language
from pipecat.utils.time import time_now_iso8601
from pipecat.utils.tracing.service_decorators import traced_stt
from pocketsphinx import Decoder, get_model_path
from pocketsphinx.lm import ArpaBoLM

from phonebot.audio import resample_pcm16
from phonebot.pipecat_compat import stt_user_id

__all__ = [
    "MODEL_SAMPLE_RATE",
    "OfflineSTTService",
    "normalize_transcript",
    "shutdown_decoder_pool",
    "squeeze_silence",
    "start_decoder_pool",
    "transcribe",
    "transcribe_in_worker",
    "vocabulary_words",
    "warm_decoder_pool",
    "warm_up",
]

MODEL_SAMPLE_RATE = 16000

# pocketsphinx 5 calls start_stream() deprecated and "not necessary", but it is the one call
# that resets the noise statistics between segments (see _CachedDecoder.decode).
warnings.filterwarnings(
    "ignore", message=r"start_stream\(\) is deprecated", category=DeprecationWarning
)

# Back-off mass of the per-vocabulary LM. Lower keeps decoding closer to the given phrases;
# 0.2 measured best on TTS->phone audio (0.5, the pocketsphinx default, lost ~10 points).
_VOCAB_DISCOUNT_MASS = 0.2
# Building a decoder costs 0.1-0.5 s and a few MB; a handful covers every agent in a process.
_MAX_CACHED_DECODERS = 8
# Silence kept around speech, and what counts as silence (see squeeze_silence): 0.1-0.2 s
# measured best, 0.5 s already cost 5-20 points of word accuracy.
_SILENCE_KEEP_S = 0.15
_SILENCE_FLOOR_DB = -35.0  # relative to the loudest 10 ms frame
_SILENCE_MIN_RMS = 60.0  # about -55 dBFS: never treat quieter frames as speech
# Decoding is CPU-bound and single-threaded: more workers than cores only add memory (each
# worker holds its own dictionary, ~40 MB, and decoders). Two let one call's long decode not
# hold up another's on a multi-core machine.
_POOL_WORKERS = min(2, os.cpu_count() or 1)

_ONES = [
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    *("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen"),
    *("seventeen", "eighteen", "nineteen"),
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_TOKEN = re.compile(r"\d+|[a-z]+(?:'[a-z]+)*")
_ALT_PRONUNCIATION = re.compile(r"\(\d+\)$")
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")


def _number_words(n: int) -> list[str]:
    """Spell 0..999,999,999 the way espeak-ng (en-us) reads it: no "and", no hyphens."""
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        return [_TENS[n // 10]] + ([_ONES[n % 10]] if n % 10 else [])
    for size, name in ((1_000_000, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            rest = n % size
            return _number_words(n // size) + [name] + (_number_words(rest) if rest else [])
    raise AssertionError("unreachable")


def _digits_to_words(digits: str) -> list[str]:
    """Numbers are read as numbers; zero-led or very long ones (codes) digit by digit."""
    if len(digits) <= 9 and not (len(digits) > 1 and digits.startswith("0")):
        return _number_words(int(digits))
    return [_ONES[int(d)] for d in digits]


def normalize_transcript(text: str) -> str:
    """Lower-case words with digits spelled out and punctuation dropped.

    This is the form :func:`transcribe` returns, so compare a reference with a transcript by
    normalising the reference with this function.
    """
    text = _THOUSANDS_SEPARATOR.sub("", text.lower().replace("\u2019", "'"))
    text = _DECIMAL_POINT.sub(" point ", text)
    words: list[str] = []
    for token in _TOKEN.findall(text):
        words.extend(_digits_to_words(token) if token.isdigit() else [token])
    return " ".join(words)


@cache
def _pronunciations() -> dict[str, list[str]]:
    """The bundled dictionary as ``word -> ["word PH ...", "word(2) PH ..."]``, parsed once."""
    entries: dict[str, list[str]] = {}
    path = Path(get_model_path("en-us/cmudict-en-us.dict"))
    for line in path.read_text(encoding="utf-8").splitlines():
        head = line.split(" ", 1)[0]
        entries.setdefault(_ALT_PRONUNCIATION.sub("", head), []).append(line)
    return entries


def vocabulary_words(phrases: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split the words of ``phrases`` into ``(known, unknown)`` against the dictionary."""
    known: dict[str, None] = {}
    unknown: dict[str, None] = {}
    lexicon = _pronunciations()
    for phrase in phrases:
        for word in normalize_transcript(phrase).split():
            (known if word in lexicon else unknown)[word] = None
    return list(known), list(unknown)


def _vocabulary_key(vocabulary: Iterable[str] | None) -> tuple[str, ...] | None:
    """Order-independent cache key: the LM only depends on the set of normalised phrases."""
    if vocabulary is None:
        return None
    if isinstance(vocabulary, str):  # a lone phrase, not an iterable of characters
        vocabulary = [vocabulary]
    phrases = {normalize_transcript(p) for p in vocabulary}
    return tuple(sorted(p for p in phrases if p))


def _vocabulary_files(phrases: tuple[str, ...], directory: Path) -> dict[str, str] | None:
    """Write a tiny ARPA LM and a matching dictionary; None if no phrase word is known.

    Words missing from the dictionary are dropped from the phrases (pocketsphinx cannot
    recognise a word it cannot pronounce); the rest of the phrase still shapes the LM.
    """
    _, unknown = vocabulary_words(phrases)
    if unknown:
        logger.debug(f"offline STT: dropping words not in the dictionary: {unknown}")
    missing = set(unknown)
    sentences = [" ".join(w for w in p.split() if w not in missing) for p in phrases]
    sentences = [s for s in sentences if s]
    if not sentences:
        return None
    lm = ArpaBoLM(text="\n".join(sentences), add_start=True, discount_mass=_VOCAB_DISCOUNT_MASS)
    lm.compute()
    arpa = StringIO()
    lm.write(arpa)
    lexicon = _pronunciations()
    words = sorted({w for s in sentences for w in s.split()})
    (directory / "vocab.lm").write_text(arpa.getvalue(), encoding="utf-8")
    dict_text = "\n".join(line for w in words for line in lexicon[w]) + "\n"
    (directory / "vocab.dict").write_text(dict_text, encoding="utf-8")
    return {"lm": str(directory / "vocab.lm"), "dict": str(directory / "vocab.dict")}


def _build_decoder(key: tuple[str, ...] | None) -> Decoder:
    """General decoder for ``None``, otherwise one restricted to the vocabulary's words."""
    if key is None:
        return Decoder(loglevel="ERROR")
    with tempfile.TemporaryDirectory(prefix="phonebot-stt-") as tmp:
        files = _vocabulary_files(key, Path(tmp))
        if files is None:  # _get_decoder already routes such vocabularies to the general key
            return Decoder(loglevel="ERROR")
        # pocketsphinx reads both files completely while initialising, so the directory can go.
        return Decoder(loglevel="ERROR", **files)


class _CachedDecoder:
    """A decoder plus the lock that serialises it (pocketsphinx decoders are not re-entrant)."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.lock = threading.Lock()

    def decode(self, pcm16k: bytes) -> str:
        with self.lock:
            # Every segment is a stream of its own (another call's, or this caller's next
            # turn): reset the noise statistics, which otherwise carry over from whatever this
            # decoder heard last, so that one call's audio changed another's transcript
            # (measured: "yes please" heard as "yes please you" after "I want to speak to a
            # person"), and a worker's transcript depended on which worker decoded it.
            self.decoder.start_stream()
            self.decoder.start_utt()
            self.decoder.process_raw(pcm16k, full_utt=True)
            self.decoder.end_utt()
            hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


_cache: OrderedDict[tuple[str, ...] | None, _CachedDecoder] = OrderedDict()
_cache_lock = threading.Lock()


def _get_decoder(vocabulary: Iterable[str] | None) -> _CachedDecoder:
    """LRU-cached decoder for a vocabulary; built under the lock so it is built only once."""
    key = _vocabulary_key(vocabulary)
    with _cache_lock:
        return _cached_entry(key)


def _cached_entry(key: tuple[str, ...] | None) -> _CachedDecoder:
    """Look up or build the entry for ``key``; the caller holds ``_cache_lock``."""
    entry = _cache.get(key)
    if entry is None:
        if key is not None and not vocabulary_words(key)[0]:
            # Share the general decoder (~100 MB) rather than building a second copy of it.
            logger.warning("offline STT: no vocabulary word is in the dictionary; using general")
            entry = _cached_entry(None)
        else:
            entry = _CachedDecoder(_build_decoder(key))
        _cache[key] = entry
        if len(_cache) > _MAX_CACHED_DECODERS:
            _cache.popitem(last=False)
    _cache.move_to_end(key)
    return entry


def squeeze_silence(pcm: bytes, sample_rate: int) -> bytes:
    """Make every silence around speech ``_SILENCE_KEEP_S`` long ("" if there is no speech).

    pocketsphinx normalises each utterance by its mean cepstrum (batch CMN), so long silences
    drag that mean away from the speech. A VAD segment carries up to ~1.5 s of them (pre-roll
    plus padding), which measurably cut word accuracy from 82 % to 64 % with a vocabulary and
    from 25 % to 6 % without; squeezing them restores it. The threshold is relative to the
    loudest 10 ms frame, so line noise well below the speech is treated as silence. Too little
    silence hurts as well (the decoder needs some at the edges), so missing margins are added.
    """
    hop = max(1, sample_rate // 100)
    samples = np.frombuffer(pcm[: len(pcm) & ~1], dtype=np.int16)
    n = len(samples) // hop
    if n == 0:
        return pcm
    frames = samples[: n * hop].reshape(n, hop)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    threshold = max(_SILENCE_MIN_RMS, float(rms.max()) * 10 ** (_SILENCE_FLOOR_DB / 20))
    voiced = np.flatnonzero(rms > threshold)
    if voiced.size == 0:
        return b""
    index = np.arange(n)
    after = np.clip(np.searchsorted(voiced, index), 0, voiced.size - 1)
    before = np.clip(after - 1, 0, voiced.size - 1)
    distance = np.minimum(np.abs(index - voiced[before]), np.abs(voiced[after] - index))
    keep = round(_SILENCE_KEEP_S * 100)
    # Speech that starts or ends right at the edge (TTS output does) gets its margin added.
    lead = bytes(max(0, keep - int(voiced[0])) * hop * 2)
    tail = bytes(max(0, keep - (n - 1 - int(voiced[-1]))) * hop * 2)
    return lead + frames[distance <= keep].tobytes() + tail


def to_model_rate(pcm: bytes, sample_rate: int) -> bytes:
    """Resample 16-bit mono PCM to the model's 16 kHz (upsampling 8 kHz phone audio)."""
    return resample_pcm16(pcm, sample_rate, MODEL_SAMPLE_RATE)


def transcribe(pcm: bytes, sample_rate: int, *, vocabulary: Iterable[str] | None = None) -> str:
    """Transcribe 16-bit mono PCM; returns normalised lower-case words ("" for silence).

    Blocking (roughly 0.05-0.3 s per second of audio). With ``vocabulary`` (phrases or
    sentences) the decoder only knows those words, which makes assertions on expected speech
    reliable; without it the general 134k-word model is used.
    """
    speech = squeeze_silence(pcm, sample_rate)
    if len(speech) < 2:
        return ""
    text = _get_decoder(vocabulary).decode(to_model_rate(speech, sample_rate))
    return normalize_transcript(text)


def warm_up(vocabulary: Iterable[str] | None = None) -> None:
    """Build (and cache) the decoder now, so the first utterance is not delayed by it."""
    _get_decoder(vocabulary)


_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _exit_when_orphaned(parent_sentinel: int) -> None:
    """End this worker once its parent has died, however it died.

    A pool's workers otherwise outlive a server that was killed (SIGKILL, the OOM killer):
    each worker holds the write end of the call queue too, so it never sees the queue close
    and would wait for work forever, keeping its ~100-150 MB.
    """
    multiprocessing.connection.wait([parent_sentinel])
    os._exit(0)


def _worker_init() -> None:
    """Worker process set-up: follow the parent's death, warnings only on stderr, and the
    dictionary parsed once.

    The dictionary (~40 MB) is what every vocabulary decoder is built from; decoders are then
    built on a worker's first request for a vocabulary and kept in its LRU cache.
    """
    parent = multiprocessing.parent_process()
    if parent is not None and parent.sentinel is not None:
        threading.Thread(target=_exit_when_orphaned, args=(parent.sentinel,), daemon=True).start()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    _pronunciations()


def _decoder_pool() -> ProcessPoolExecutor:
    """The process-wide decoding pool, created on first use.

    "spawn", not "fork": the server has threads (uvicorn, Pipecat's executors, ONNX Runtime),
    and a forked child can inherit a lock that one of them held, and then hang. A spawned
    worker re-imports the main module (``server.py``, so ~150 MB of RSS per worker instead of
    ~100 MB); the stdlib's "forkserver" does the same, so it would be no lighter.
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(
                _POOL_WORKERS,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
            )
        return _pool


def _discard_pool(broken: ProcessPoolExecutor) -> None:
    """Drop a pool whose worker died, so the next request starts a fresh one."""
    global _pool
    with _pool_lock:
        if _pool is broken:
            _pool = None
    broken.shutdown(wait=False, cancel_futures=True)


def shutdown_decoder_pool(wait: bool = True) -> None:
    """Stop the workers; a later request starts new ones.

    `wait=True` (tests) lets a decode in progress finish. `wait=False` is for the server's
    exit, after its calls have drained: the workers are ended at once. Otherwise the stdlib's
    exit hook joins them, and a worker still starting (importing the server, parsing the
    dictionary: ~10 s on a loaded machine) holds the exit until it is ready to be told to
    stop. A worker whose parent was killed exits by itself (``_exit_when_orphaned``).
    """
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is None:
        return
    if wait:
        pool.shutdown(wait=True, cancel_futures=True)
        return
    # Python 3.11's executor has no public way to end its workers (3.14 adds
    # terminate_workers()), so its process table is read directly; nothing is lost: no call
    # is left to decode for.
    workers = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.terminate()


def _submit(fn: Any, *args: Any, **kwargs: Any) -> tuple[ProcessPoolExecutor, Future]:
    """Hand ``fn`` to the pool; a pool found broken (a worker died since) is replaced first."""
    pool = _decoder_pool()
    try:
        return pool, pool.submit(fn, *args, **kwargs)
    except BrokenProcessPool:
        _discard_pool(pool)
        pool = _decoder_pool()
        return pool, pool.submit(fn, *args, **kwargs)


async def _in_pool(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` in the pool. A worker's death fails only the requests in flight then."""
    pool, future = _submit(fn, *args, **kwargs)
    try:
        return await asyncio.wrap_future(future)
    except BrokenProcessPool:
        _discard_pool(pool)
        raise


async def transcribe_in_worker(
    pcm: bytes, sample_rate: int, *, vocabulary: Iterable[str] | None = None
) -> str:
    """:func:`transcribe` in a worker process, so the event loop keeps running meanwhile."""
    return await _in_pool(transcribe, pcm, sample_rate, vocabulary=_vocabulary_key(vocabulary))


def _warm_worker(keys: tuple[tuple[str, ...] | None, ...]) -> None:
    for key in keys:
        warm_up(key)


def _log_failure(future: Future) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        logger.warning(f"offline STT: worker warm-up failed: {error!r}")


def warm_decoder_pool(*vocabularies: Iterable[str] | None) -> list[Future]:
    """Start every worker now and build these vocabularies' decoders in each; don't wait.

    Starting a worker takes 1-3 s (a fresh interpreter importing this module, and the main
    module: see ``_decoder_pool``), so it should not wait for a call's first utterance. One
    job per worker, submitted together, starts them all. Each worker builds its own decoders;
    usually each takes one job, but one still starting may leave both to the other and then
    builds the decoder on its first utterance (0.1-0.5 s, in the worker, not on the loop).
    """
    keys = tuple(_vocabulary_key(v) for v in vocabularies)
    futures = [_submit(_warm_worker, keys)[1] for _ in range(_POOL_WORKERS)]
    for future in futures:
        future.add_done_callback(_log_failure)
    return futures


async def start_decoder_pool(*vocabularies: Iterable[str] | None) -> None:
    """:func:`warm_decoder_pool`, awaited: for a server's start-up (no vocabulary needed)."""
    await asyncio.gather(*(asyncio.wrap_future(f) for f in warm_decoder_pool(*vocabularies)))


class OfflineSTTService(SegmentedSTTService):
    """Pipecat STT on pocketsphinx: transcribes each VAD-delimited segment in a worker process.

    Needs a VAD upstream (as every ``SegmentedSTTService`` does). English only: the bundled
    model is US English.
    """

    def __init__(
        self,
        *,
        vocabulary: Iterable[str] | None = None,
        settings: STTSettings | None = None,
        **kwargs: Any,
    ) -> None:
        """Create the service.

        Args:
            vocabulary: Optional phrases to restrict recognition to (e.g. an agent's keywords
                and expected answers). None uses the general English model.
            settings: Standard Pipecat STT settings; only ``language`` English is meaningful.
            **kwargs: Passed to ``SegmentedSTTService`` (e.g. ``sample_rate``).
        """
        default_settings = STTSettings(model="pocketsphinx-en-us", language=Language.EN)
        if settings is not None:
            default_settings.apply_update(settings)
        kwargs.setdefault("ttfs_p99_latency", 1.0)
        super().__init__(settings=default_settings, **kwargs)
        self._vocabulary = _vocabulary_key(vocabulary)

    @property
    def wants_wav_segments(self) -> bool:
        """Receive raw 16-bit PCM: pocketsphinx reads samples, not a WAV container."""
        return False

    def can_generate_metrics(self) -> bool:
        """Processing time is measured around each segment's decode."""
        return True

    async def start(self, frame: StartFrame) -> None:
        """Have the workers build this vocabulary's decoder before the first utterance.

        Not awaited: the call (and its greeting) must not wait for worker processes to start.
        A failure is only logged; an utterance gets a fresh pool if a worker died.
        """
        await super().start(frame)
        try:
            warm_decoder_pool(self._vocabulary)
        except Exception as e:  # e.g. the interpreter is shutting down
            logger.warning(f"{self}: offline STT warm-up not started: {e}")

    @traced_stt
    async def _handle_transcription(
        self, transcript: str, is_final: bool, language: Language | None = None
    ) -> None:
        """Tracing hook (the decorator records the transcript)."""

    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame, None]:
        """Transcribe one speech segment (raw 16-bit PCM at ``self.sample_rate``)."""
        await self.start_processing_metrics()
        try:
            text = await transcribe_in_worker(audio, self.sample_rate, vocabulary=self._vocabulary)
        except Exception as e:  # a decoder failure must not kill the pipeline
            await self.stop_processing_metrics()
            yield ErrorFrame(error=f"{self}: offline transcription failed: {e}")
            return
        await self.stop_processing_metrics()
        if not text:
            return
        await self._handle_transcription(text, True, Language.EN)
        logger.debug(f"{self}: transcription [{text}]")
        yield TranscriptionFrame(text, stt_user_id(self), time_now_iso8601(), Language.EN)
