"""Minimal ctypes binding to the libespeak-ng shipped by the ``espeakng_loader`` wheel.

Why ctypes rather than a wrapper package: the wheel already bundles the shared library and its
voice data, so the bot gets a working offline voice with no system packages, no downloads and no
extra dependencies.

libespeak-ng keeps all of its state in globals and is not thread-safe, so every call into it goes
through one module-level lock and the engine is initialised lazily, exactly once per process, in
``AUDIO_OUTPUT_SYNCHRONOUS`` mode: ``espeak_Synth`` then runs the synthesis on the calling thread
and hands the samples to our callback before it returns, so no espeak-owned thread ever calls
back into Python.
"""

from __future__ import annotations

import ctypes
import threading

import espeakng_loader
from loguru import logger

from phonebot.audio import resample_pcm16

__all__ = [
    "DEFAULT_RATE_WPM",
    "DEFAULT_VOICE",
    "available_languages",
    "native_sample_rate",
    "synthesize",
    "synthesize_at",
    "voice_for_language",
]

DEFAULT_VOICE = "en-us"
DEFAULT_RATE_WPM = 165

# Constants from espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit()
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000  # natural pause after the text, so consecutive sentences don't run together
_POS_CHARACTER = 1
_PARAM_RATE = 1
_EE_OK = 0
_MIN_RATE_WPM, _MAX_RATE_WPM = 80, 450

# int callback(short *wav, int numsamples, espeak_EVENT *events); returning 1 aborts synthesis.
_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

# Preferred espeak-ng language for a bare ISO 639-1 code.
_LANGUAGE_ALIASES = {"en": "en-us", "fr": "fr-fr", "zh": "cmn"}


class _VoiceStruct(ctypes.Structure):
    """``espeak_VOICE``; ``languages`` is a packed list, so it is read by hand."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


class _Engine:
    """The process-wide espeak-ng instance. Only ever used while holding ``_lock``."""

    def __init__(self) -> None:
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._declare_signatures()
        data_path = espeakng_loader.get_data_path().encode()
        rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {rate})")
        self.sample_rate: int = rate
        self._chunks: list[bytes] = []
        # Kept on the instance: ctypes callbacks must outlive every call that may invoke them.
        self._callback = _SynthCallback(self._on_samples)
        self._lib.espeak_SetSynthCallback(self._callback)
        self._voice: str | None = None
        self._rate: int | None = None
        self._languages: dict[str, str] | None = None
        logger.debug(f"espeak-ng initialised at {rate} Hz")

    def _declare_signatures(self) -> None:
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_VoiceStruct))

    def _on_samples(self, wav: ctypes._Pointer, num_samples: int, _events: int) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(ctypes.string_at(wav, num_samples * 2))
        return 0

    def _configure(self, voice: str, rate_wpm: int) -> None:
        """Switch voice/rate only when they change: loading a voice re-reads its dictionary."""
        if voice != self._voice:
            self._set_voice(voice)
            self._voice = voice
            self._rate = None  # a voice change resets the rate
        rate = min(max(rate_wpm, _MIN_RATE_WPM), _MAX_RATE_WPM)
        if rate != self._rate:
            self._lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
            self._rate = rate

    def _set_voice(self, voice: str) -> None:
        """Accept a voice name/file ("en-us", "gmw/en-US") or any language espeak lists ("en-gb").

        ``espeak_SetVoiceByName`` only knows voice names and files, and several languages (en-gb,
        fr-fr, zh) live in files named differently, so fall back to the language table.
        """
        if self._lib.espeak_SetVoiceByName(voice.encode()) == _EE_OK:
            return
        identifier = self.languages().get(voice.strip().lower().replace("_", "-"))
        if identifier is None or self._lib.espeak_SetVoiceByName(identifier.encode()) != _EE_OK:
            raise ValueError(f"unknown espeak-ng voice {voice!r}")

    def synth(self, text: str, voice: str, rate_wpm: int) -> bytes:
        self._configure(voice, rate_wpm)
        data = text.encode("utf-8") + b"\0"
        buffer = ctypes.create_string_buffer(data, len(data))
        self._chunks = []
        flags = _CHARS_UTF8 | _ENDPAUSE
        err = self._lib.espeak_Synth(buffer, len(data), 0, _POS_CHARACTER, 0, flags, None, None)
        chunks, self._chunks = self._chunks, []
        if err != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed with code {err}")
        return b"".join(chunks)

    def languages(self) -> dict[str, str]:
        """Map every language espeak-ng can speak to the identifier of a voice for it."""
        if self._languages is None:
            self._languages = self._list_languages()
        return dict(self._languages)

    def _list_languages(self) -> dict[str, str]:
        result: dict[str, str] = {}
        voices = self._lib.espeak_ListVoices(None)
        i = 0
        while voices[i]:
            voice = voices[i].contents
            identifier = (voice.identifier or b"").decode()
            for language in _unpack_languages(voice.languages):
                result.setdefault(language, identifier)
            i += 1
        return result


def _unpack_languages(address: int | None) -> list[str]:
    """Decode espeak's packed ``<priority byte><name>\\0 ... \\0`` language list."""
    names: list[str] = []
    offset = 0
    while address:
        if ctypes.string_at(address + offset, 1) == b"\0":
            break
        name = ctypes.string_at(address + offset + 1)
        names.append(name.decode().lower())
        offset += len(name) + 2
    return names


_lock = threading.Lock()
_engine: _Engine | None = None


def _get_engine() -> _Engine:
    """Create the engine on first use; callers must hold ``_lock``."""
    global _engine
    if _engine is None:
        _engine = _Engine()
    return _engine


def native_sample_rate() -> int:
    """espeak-ng's output rate (22050 Hz with the bundled data)."""
    with _lock:
        return _get_engine().sample_rate


def available_languages() -> dict[str, str]:
    """Languages espeak-ng can speak (lower-case, e.g. ``"en-us"``) -> voice identifier."""
    with _lock:
        return _get_engine().languages()


def voice_for_language(language: str | None) -> str:
    """Pick the espeak-ng voice for a language code such as ``"en"``, ``"es"`` or ``"pt-BR"``.

    Falls back from region to base language, then to English, so an unusual code degrades to a
    voice that still speaks rather than to an error in the middle of a call.
    """
    if not language:
        return DEFAULT_VOICE
    code = str(language).strip().lower().replace("_", "-")
    known = available_languages()
    base = code.split("-")[0]
    # Aliases first: espeak's bare "en" is British, but a phone bot asked for "en" wants en-us.
    for candidate in (_LANGUAGE_ALIASES.get(code), code, _LANGUAGE_ALIASES.get(base), base):
        if candidate and candidate in known:
            return candidate
    logger.warning(f"espeak-ng has no voice for language {language!r}; using {DEFAULT_VOICE}")
    return DEFAULT_VOICE


def synthesize(
    text: str, *, voice: str = DEFAULT_VOICE, rate_wpm: int = DEFAULT_RATE_WPM
) -> tuple[bytes, int]:
    """Speak ``text`` and return ``(pcm, sample_rate)``: 16-bit little-endian mono PCM.

    Blocking and serialised process-wide; call it from a worker thread in async code.
    Raises ValueError for an unknown voice.
    """
    with _lock:
        engine = _get_engine()
        if not text.strip():
            return b"", engine.sample_rate
        return engine.synth(text, voice, rate_wpm), engine.sample_rate


def synthesize_at(
    text: str,
    sample_rate: int,
    *,
    voice: str = DEFAULT_VOICE,
    rate_wpm: int = DEFAULT_RATE_WPM,
) -> bytes:
    """Like :func:`synthesize` but resampled to ``sample_rate`` (e.g. 8000 for the phone)."""
    pcm, native_rate = synthesize(text, voice=voice, rate_wpm=rate_wpm)
    return resample_pcm16(pcm, native_rate, sample_rate)
