"""Every place phonebot reaches into Pipecat's private attributes, in one module.

Pipecat (1.14, pinned in requirements.txt) gives no public way to do a few things a phone
line needs: bound an OpenAI client's timeout, reuse one ONNX session for every call's VAD
and Smart Turn analyzer, decode a Twilio `media` message that was already parsed, or
replace the serializer's single-attempt hang-up. Those touches of names that start with
`_` live here, each in one small function saying why, and `tests/test_pipecat_compat.py`
pins each against a freshly built Pipecat object (the attribute exists with the expected
type, an overridden method still exists with the same signature and is still called), so
a Pipecat upgrade that changes one fails a test instead of a call.

Private methods our subclasses override cannot be routed through a function (Python looks
them up by name on the class); they are listed in `OVERRIDDEN` instead, which the tests
check against Pipecat and against every Pipecat subclass in the project.
"""

from __future__ import annotations

import asyncio
import functools
import math
from typing import TYPE_CHECKING, Any

from loguru import logger
from starlette.websockets import WebSocketDisconnect
from uvicorn.protocols.utils import ClientDisconnected

if TYPE_CHECKING:  # Only for types: importing this module must stay cheap.
    import onnxruntime
    from pipecat.audio.resamplers.base_audio_resampler import BaseAudioResampler
    from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
    from pipecat.audio.vad.silero import SileroOnnxModel, SileroVADAnalyzer
    from pipecat.audio.vad.vad_analyzer import VADAnalyzer
    from pipecat.extensions.voicemail.voicemail_detector import VoicemailDetector
    from pipecat.processors.aggregators.dtmf_aggregator import DTMFAggregator
    from pipecat.serializers.twilio import TwilioFrameSerializer
    from pipecat.services.stt_service import STTService
    from pipecat.services.tts_service import TTSService
    from pipecat.utils.text.base_text_filter import BaseTextFilter

# Pipecat class (module, name) → the private members our subclasses of it override.
OVERRIDDEN: dict[tuple[str, str], frozenset[str]] = {
    # phonebot.twilio.stream.TwilioMarkSerializer: the end-of-call hang-up, with retries.
    ("pipecat.serializers.twilio", "TwilioFrameSerializer"): frozenset({"_hang_up_call"}),
    # phonebot.ai.inference.turn.SharedSmartTurnAnalyzer: the shared inference threads.
    ("pipecat.audio.turn.smart_turn.base_smart_turn", "BaseSmartTurn"): frozenset(
        {"_model_executor"}
    ),
    # phonebot.ai.offline.tts.OfflineTTSService: the settings hook and its typed settings.
    ("pipecat.services.tts_service", "TTSService"): frozenset({"_update_settings", "_settings"}),
    # phonebot.ai.offline.greetings.KeywordGreetingClassifier: the hook every classifier
    # implements (abstract in Pipecat: its public `choice`/`ask` call it).
    ("pipecat.classifiers.base_classifier", "BaseClassifier"): frozenset({"_ask"}),
}


# ------------------------------------------------------------------ Twilio serializer


def serializer_params(serializer: TwilioFrameSerializer) -> TwilioFrameSerializer.InputParams:
    """The serializer's `InputParams`, whose `auto_hang_up` a transfer turns off mid-call."""
    return serializer._params


def serializer_call(serializer: TwilioFrameSerializer) -> tuple[str | None, str]:
    """(CallSid, StreamSid) the serializer was built with."""
    return serializer._call_sid, serializer._stream_sid


def serializer_rest_account(serializer: TwilioFrameSerializer) -> tuple[str, str, str | None]:
    """(account SID, auth token, REST base URL) for our own hang-up of the call."""
    return serializer._account_sid or "", serializer._auth_token or "", serializer._base_url


def serializer_input_audio(
    serializer: TwilioFrameSerializer,
) -> tuple[int, int, BaseAudioResampler]:
    """(Twilio's rate, the pipeline's input rate, the input resampler) for `ulaw_to_pcm`.

    Pipecat's `deserialize` takes the message text; we decode `media` from the message
    our guard already parsed, so we call `ulaw_to_pcm` with what `deserialize` would.
    """
    return serializer._twilio_sample_rate, serializer._sample_rate, serializer._input_resampler


# ------------------------------------------------------------------ websocket transport


def replace_websocket_output(transport: Any, output_class: type) -> Any:
    """Put an `output_class` (a FastAPIWebsocketOutputTransport subclass) in the transport.

    `FastAPIWebsocketTransport.__init__` builds its output processor from its private
    `_client`, `_params` and `_output_name` and keeps it in `_output`, with no factory to
    override; replacing `_output` before the pipeline is built is the only way to put a
    subclass in its place (phonebot.twilio.transport).
    """
    output = output_class(
        transport, transport._client, transport._params, name=transport._output_name
    )
    transport._output = output
    return output


def quiet_close_after_the_far_end(transport: Any) -> None:
    """A websocket Twilio already closed is not an error to close again.

    When a call ends from both sides at once (our REST hang-up, or the caller's, makes
    Twilio close the stream while the pipeline's end closes it too), the socket is gone
    before Pipecat's client closes it: uvicorn raises `ClientDisconnected` (an OSError),
    Starlette's `WebSocket.send` turns that into `WebSocketDisconnect(1006)` (no
    message), and Pipecat's done callback for the close (`_on_close_done`, bound when
    the close starts) logs "exception while closing the websocket: " at ERROR: a line
    per such call that says nothing went wrong. A close that fails because the
    connection is already gone becomes a DEBUG line naming the error; any other failure
    (a timeout among them, which Python counts as an OSError too) still goes to
    Pipecat's callback.
    """
    client = transport._client
    client._on_close_done = functools.partial(_close_done, client, client._on_close_done)


def _close_done(client: Any, pipecat_callback: Any, task: asyncio.Task) -> None:
    error = None if task.cancelled() else task.exception()
    if error is not None and _already_closed(error):
        logger.debug(f"{client}: the websocket was already closed by the far end ({error!r})")
        return
    pipecat_callback(task)


def _already_closed(error: BaseException) -> bool:
    """The connection was gone: uvicorn's `ClientDisconnected` or a reset / broken pipe,
    raised as is or as the cause of Starlette's `WebSocketDisconnect(1006)`."""
    if isinstance(error, WebSocketDisconnect) and error.code == 1006:
        error = error.__context__ or error
    return isinstance(error, (ClientDisconnected, ConnectionError))


# ------------------------------------------------------------------------- analyzers


def silero_model(analyzer: SileroVADAnalyzer) -> SileroOnnxModel:
    """The analyzer's ONNX wrapper (its `session` is what every call shares)."""
    return analyzer._model


def init_silero_state(analyzer: SileroVADAnalyzer, model: SileroOnnxModel) -> None:
    """What `SileroVADAnalyzer.__init__` sets after `VADAnalyzer.__init__`, minus the load."""
    analyzer._model = model
    analyzer._windows_since_reset = 0
    analyzer._low_confidence_windows = 0


def run_silero(analyzer: SileroVADAnalyzer, buffer: bytes) -> Any:
    """One synchronous VAD analysis (what Pipecat runs in its per-call thread)."""
    return analyzer._run_analyzer(buffer)


def take_vad_pending_audio(analyzer: VADAnalyzer, buffer: bytes) -> bytes:
    """The audio the analyzer holds back (less than a window) followed by `buffer`; the
    analyzer's own hold-back is emptied (`keep_vad_pending_audio` puts the rest back)."""
    audio = analyzer._vad_buffer + buffer
    analyzer._vad_buffer = b""
    return audio


def keep_vad_pending_audio(analyzer: VADAnalyzer, rest: bytes) -> None:
    """Hold back `rest` (less than a window) for the next analysis, as Pipecat does."""
    analyzer._vad_buffer = rest


def vad_state(analyzer: VADAnalyzer) -> Any:
    """The analyzer's current `VADState` (what an analysis of too little audio returns)."""
    return analyzer._vad_state


def run_vad_window(analyzer: VADAnalyzer, window: bytes, *, settle: bool) -> Any:
    """Pipecat's `_run_analyzer` on exactly one window.

    Pipecat scores every window of a buffer in a loop and only then checks whether the
    start or stop count has been reached. Analysing a buffer window by window (to await
    each window's batched score) must check only after the buffer's last window
    (`settle`), or the verdicts would differ; so for the others the counts are set out
    of reach for the duration of the call.
    """
    if settle:
        return analyzer._run_analyzer(window)
    start, stop = analyzer._vad_start_frames, analyzer._vad_stop_frames
    analyzer._vad_start_frames = analyzer._vad_stop_frames = math.inf
    try:
        return analyzer._run_analyzer(window)
    finally:
        analyzer._vad_start_frames, analyzer._vad_stop_frames = start, stop


def reset_silero_if_due(analyzer: SileroVADAnalyzer, confidence: float) -> None:
    """Pipecat's model reset check, run after each scored window (resets every ~2 s of
    quiet), for a confidence scored outside `voice_confidence`."""
    analyzer._maybe_reset_model(confidence)


def smart_turn_session(analyzer: LocalSmartTurnAnalyzerV3) -> onnxruntime.InferenceSession:
    """The analyzer's ONNX session."""
    return analyzer._session


def init_smart_turn_state(
    analyzer: LocalSmartTurnAnalyzerV3, session: onnxruntime.InferenceSession, log_data: bool
) -> None:
    """What `LocalSmartTurnAnalyzerV3.__init__` sets after `BaseSmartTurn.__init__`."""
    analyzer._log_data = log_data
    analyzer._session = session


# -------------------------------------------------------------------------- keypad


def keypad_entry(aggregator: DTMFAggregator) -> str:
    """The keys of the entry the aggregator is collecting ("" between entries)."""
    return aggregator._aggregation


async def end_keypad_entry(aggregator: DTMFAggregator) -> None:
    """Hand the entry on now, as `#` would (phonebot.twilio.keypad: a declared key is
    answered at once; Pipecat ends an entry only on `#`, its timeout or the call's end)."""
    await aggregator._flush_aggregation()


# -------------------------------------------------------------------------- voicemail


async def assume_conversation(detector: VoicemailDetector) -> bool:
    """Decide "a person" for a voicemail detector that has heard nothing yet, through its
    own decision step (the held-back speech is released, `on_conversation_detected`
    fires): Pipecat decides only after hearing something, so a callee who says nothing
    would have the bot's opening held for good (phonebot.call.voicemail). False when it
    had decided or heard something already."""
    if detector._decision or detector._transcript:
        return False
    await detector._decide("conversation")
    return True


# -------------------------------------------------------------------------- services


def bound_openai_client(service: Any, timeout_s: float) -> None:
    """Rebuild an OpenAI service's `AsyncOpenAI` client with a timeout and no retries.

    Pipecat builds the client itself with the SDK defaults (600 s, two retries) and takes
    no client options.
    """
    service._client = service._client.with_options(timeout=timeout_s, max_retries=0)


def stt_user_id(service: STTService) -> str:
    """The user id Pipecat's STT services put on their `TranscriptionFrame`s."""
    return service._user_id


def tts_text_filters(service: TTSService) -> list[BaseTextFilter]:
    """The text filters a TTS service runs (for tests of what `build_services` wired)."""
    return list(service._text_filters)


# -------------------------------------------------- read by tests of the shared models


def silero_state(model: SileroOnnxModel) -> Any:
    """The wrapper's recurrent state, which must be each call's own."""
    return model._state


def predict_endpoint(analyzer: LocalSmartTurnAnalyzerV3, audio: Any) -> dict[str, Any]:
    """One synchronous Smart Turn prediction (`{"prediction", "probability"}`)."""
    return analyzer._predict_endpoint(audio)


def stop_strategy_turn_analyzer(strategy: Any) -> Any:
    """The turn analyzer a `TurnAnalyzerUserTurnStopStrategy` was built with."""
    return strategy._turn_analyzer
