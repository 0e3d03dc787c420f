"""Pins every Pipecat private attribute phonebot touches (phonebot.pipecat_compat).

Each test builds the Pipecat object fresh and checks what we rely on: the attribute exists
with the expected type, an overridden private method still exists with the same signature
and is still called. A Pipecat upgrade that renames or reshapes one fails here, not on a
call. The last tests check that no Pipecat subclass of ours overrides a private member of
Pipecat without registering it, and that importing the server emits no Pipecat
deprecation warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from openai import AsyncOpenAI
from pipecat.audio.resamplers.base_audio_resampler import BaseAudioResampler
from pipecat.audio.turn.smart_turn.base_smart_turn import BaseSmartTurn
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.audio.vad.silero import SileroOnnxModel, SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADState
from pipecat.frames.frames import EndFrame
from pipecat.processors.aggregators.dtmf_aggregator import DTMFAggregator
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.services.tts_service import TTSService
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams
from pipecat.utils.text.base_text_filter import BaseTextFilter
from starlette.websockets import WebSocket, WebSocketState
from uvicorn.protocols.utils import ClientDisconnected

import phonebot
from phonebot import pipecat_compat as compat
from phonebot.ai.inference import SharedSileroVADAnalyzer, SharedSmartTurnAnalyzer
from phonebot.ai.offline.stt import OfflineSTTService
from phonebot.ai.offline.tts import OfflineTTSService
from phonebot.ai.voice_text import voice_text_filters
from phonebot.twilio.stream import TwilioMarkSerializer
from phonebot.twilio.transport import barge_in_transport

ROOT = Path(__file__).resolve().parent.parent
CALL_SID, STREAM_SID = "CA" + "1" * 32, "MZ" + "2" * 32


def twilio_serializer(cls: type[TwilioFrameSerializer] = TwilioFrameSerializer, **params):
    return cls(
        stream_sid=STREAM_SID,
        call_sid=CALL_SID,
        account_sid="AC" + "0" * 32,
        auth_token="secret-token",
        base_url="http://127.0.0.1:9",
        params=cls.InputParams(**params),
    )


# ------------------------------------------------------------------ Twilio serializer


async def test_the_serializer_internals_we_read_are_there():
    serializer = twilio_serializer(sample_rate=16000)
    await serializer.setup(None)

    assert isinstance(compat.serializer_params(serializer), TwilioFrameSerializer.InputParams)
    assert compat.serializer_call(serializer) == (CALL_SID, STREAM_SID)
    assert compat.serializer_rest_account(serializer) == (
        "AC" + "0" * 32,
        "secret-token",
        "http://127.0.0.1:9",
    )
    twilio_rate, pipeline_rate, resampler = compat.serializer_input_audio(serializer)
    assert (twilio_rate, pipeline_rate) == (8000, 16000)
    assert isinstance(resampler, BaseAudioResampler)


async def test_turning_auto_hang_up_off_through_the_params_still_stops_the_hang_up():
    calls: list[str] = []

    class Recording(TwilioFrameSerializer):
        async def _hang_up_call(self) -> None:
            calls.append("hang up")

    kept = twilio_serializer(Recording, auto_hang_up=True)
    compat.serializer_params(kept).auto_hang_up = False  # what a transfer does
    await kept.serialize(EndFrame())
    assert calls == []
    await twilio_serializer(Recording, auto_hang_up=True).serialize(EndFrame())
    assert calls == ["hang up"]  # Pipecat still ends the call through `_hang_up_call`


def test_our_hang_up_override_matches_pipecat_s():
    ours, theirs = TwilioMarkSerializer._hang_up_call, TwilioFrameSerializer._hang_up_call
    assert inspect.iscoroutinefunction(theirs)
    assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters)


# ------------------------------------------------------------------------- analyzers


def test_the_shared_vad_sets_up_exactly_what_pipecat_s_constructor_does():
    pipecat_vad, shared = SileroVADAnalyzer(), SharedSileroVADAnalyzer()

    # A new piece of state in Pipecat's __init__ would be missing from ours.
    ours = {"_vad_batcher", "_batched_confidence", "_vad_idle_since"}
    assert set(vars(shared)) - set(vars(pipecat_vad)) == ours
    assert set(vars(pipecat_vad)) <= set(vars(shared))
    assert isinstance(compat.silero_model(pipecat_vad), SileroOnnxModel)
    assert (
        compat.silero_model(shared).session
        is compat.silero_model(SharedSileroVADAnalyzer()).session
    )
    assert compat.silero_model(shared) is not compat.silero_model(SharedSileroVADAnalyzer())


def test_the_vad_s_synchronous_analysis_is_still_there():
    vad = SharedSileroVADAnalyzer()
    vad.set_sample_rate(8000)
    assert not inspect.iscoroutinefunction(SileroVADAnalyzer._run_analyzer)
    assert list(inspect.signature(SileroVADAnalyzer._run_analyzer).parameters) == ["self", "buffer"]
    assert compat.run_silero(vad, bytes(512)) == VADState.QUIET


def test_the_shared_smart_turn_sets_up_exactly_what_pipecat_s_constructor_does():
    pipecat_turn, shared = LocalSmartTurnAnalyzerV3(), SharedSmartTurnAnalyzer()

    assert set(vars(shared)) == set(vars(pipecat_turn))
    assert isinstance(compat.smart_turn_session(pipecat_turn), onnxruntime.InferenceSession)
    assert compat.smart_turn_session(shared) is compat.smart_turn_session(SharedSmartTurnAnalyzer())
    # Pipecat runs the model on `_model_executor`, and cleans up only its own `_executor`.
    assert isinstance(inspect.getattr_static(BaseSmartTurn, "_model_executor"), property)
    assert "self._model_executor" in inspect.getsource(BaseSmartTurn)
    assert (
        shared._executor is None
        and shared._model_executor is SharedSmartTurnAnalyzer()._model_executor
    )


# ---------------------------------------------------------------------------- keypad


async def test_the_keypad_aggregator_s_entry_and_flush_are_still_there():
    aggregator = DTMFAggregator()
    assert compat.keypad_entry(aggregator) == ""
    flush = DTMFAggregator._flush_aggregation
    assert inspect.iscoroutinefunction(flush)
    assert list(inspect.signature(flush).parameters) == ["self"]


# -------------------------------------------------------------------------- services


@pytest.mark.parametrize(
    "module, name",
    [
        ("pipecat.services.openai.llm", "OpenAILLMService"),
        ("pipecat.services.openai.stt", "OpenAISTTService"),
        ("pipecat.services.openai.tts", "OpenAITTSService"),
    ],
)
def test_openai_services_keep_their_client_where_we_bound_it(module, name):
    service = getattr(importlib.import_module(module), name)(api_key="sk-test")
    assert isinstance(service._client, AsyncOpenAI)
    compat.bound_openai_client(service, 2.5)
    assert (service._client.timeout, service._client.max_retries) == (2.5, 0)


def test_stt_services_still_carry_the_user_id():
    assert compat.stt_user_id(OfflineSTTService()) == ""


def test_tts_services_still_keep_their_text_filters():
    filters = voice_text_filters("support")
    tts = OfflineTTSService(text_filters=filters)
    assert compat.tts_text_filters(tts) == filters
    assert all(isinstance(f, BaseTextFilter) for f in compat.tts_text_filters(tts))


def test_the_registered_overrides_exist_in_pipecat_with_our_signatures():
    for (module, name), members in compat.OVERRIDDEN.items():
        pipecat_class = getattr(importlib.import_module(module), name)
        for member in members:
            static = inspect.getattr_static(pipecat_class, member, None)
            declared = member in getattr(pipecat_class, "__annotations__", {})
            assert static is not None or declared, f"{name}.{member} is gone"
    ours, theirs = OfflineTTSService._update_settings, TTSService._update_settings
    assert inspect.signature(ours).parameters.keys() == inspect.signature(theirs).parameters.keys()
    assert "_settings" in TTSService.__annotations__


async def test_a_silent_callee_can_still_be_decided_a_person():
    """`assume_conversation` reads a fresh detector's decision and transcript and calls its
    decision step: all three still there, and the step still fires Pipecat's event."""
    from pipecat.extensions.voicemail.voicemail_detector import VoicemailDetector

    from phonebot.ai.offline.greetings import KeywordGreetingClassifier

    detector = VoicemailDetector(classifier=KeywordGreetingClassifier())
    fired: list[object] = []

    async def on_person(processor) -> None:
        fired.append(processor)

    detector.add_event_handler("on_conversation_detected", on_person)
    assert detector._decision is None and detector._transcript == []
    assert await compat.assume_conversation(detector)
    await asyncio.sleep(0.05)  # Pipecat runs async handlers as tasks
    assert detector._decision == "conversation" and fired == [detector]
    assert not await compat.assume_conversation(detector)  # decided: nothing more


# ---------------------------------------------- no unregistered private override


def pipecat_subclasses() -> list[type]:
    classes = []
    modules = ["bot", *(m.name for m in pkgutil.walk_packages(phonebot.__path__, "phonebot."))]
    for module_name in modules:
        module = importlib.import_module(module_name)
        for cls in vars(module).values():
            ours = inspect.isclass(cls) and cls.__module__ == module_name
            if ours and any(b.__module__.startswith("pipecat.") for b in cls.__mro__[1:]):
                classes.append(cls)
    return classes


def pipecat_private_names(base: type) -> set[str]:
    """Private names a Pipecat class defines or assigns on `self`."""
    names = {n for n in vars(base) if re.fullmatch(r"_[a-z]\w*", n)}
    names |= set(getattr(base, "__annotations__", {}))
    with contextlib.suppress(OSError, TypeError):  # a class without Python source
        names |= set(re.findall(r"self\.(_[a-z]\w*)\s*[:=]", inspect.getsource(base)))
    return names


def test_every_private_pipecat_member_our_subclasses_define_is_registered():
    registered = {name for members in compat.OVERRIDDEN.values() for name in members}
    unregistered = []
    for cls in pipecat_subclasses():
        source = inspect.getsource(cls)
        ours = set(re.findall(r"self\.(_[a-z]\w*)\s*[:=]", source))
        ours |= {n for n in vars(cls) if re.fullmatch(r"_[a-z]\w*", n)}
        ours |= set(cls.__dict__.get("__annotations__", {}))
        pipecat_bases = [b for b in cls.__mro__[1:] if b.__module__.startswith("pipecat.")]
        theirs = set().union(*(pipecat_private_names(b) for b in pipecat_bases))
        shared = (ours & theirs) - registered - {"_abc_impl"}  # set by abc.ABCMeta, not us
        unregistered += [f"{cls.__name__}.{n}" for n in sorted(shared)]
    assert unregistered == [], f"route these through phonebot.pipecat_compat: {unregistered}"


# ------------------------------------------------------------------------ quiet start


def test_importing_the_bot_and_the_server_emits_no_pipecat_deprecation_warning():
    probe = (
        "import json, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import bot, server\n"
        "print(json.dumps([[str(w.message), w.filename] for w in caught\n"
        "                  if issubclass(w.category, DeprecationWarning)]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    caught = json.loads(result.stdout.strip().splitlines()[-1])
    pipecat = [m for m, _ in caught if "is deprecated since" in m]  # Pipecat's wording
    ours = [(m, f) for m, f in caught if Path(f).is_relative_to(ROOT) and ".venv" not in f]
    assert pipecat == [] and ours == []


def test_what_the_shared_model_tests_read_is_there():
    from pipecat.turns.user_stop import TurnAnalyzerUserTurnStopStrategy

    vad, turn = SileroVADAnalyzer(), LocalSmartTurnAnalyzerV3()
    assert compat.silero_state(compat.silero_model(vad)) is not None
    strategy = TurnAnalyzerUserTurnStopStrategy(turn_analyzer=turn)
    assert compat.stop_strategy_turn_analyzer(strategy) is turn
    result = compat.predict_endpoint(turn, np.zeros(16000, dtype=np.float32))
    assert set(result) >= {"prediction", "probability"}


def closing_socket(error: Exception | None) -> WebSocket:
    """Starlette's own websocket, accepted, over an ASGI `send` whose close fails with
    `error` (None: closes). Starlette turns the server's OSError into its own
    `WebSocketDisconnect(1006)` (empty message), which is what Pipecat's client sees."""

    async def receive() -> dict:
        return {"type": "websocket.disconnect", "code": 1006}

    async def send(message: dict) -> None:
        if error is not None:
            raise error

    socket = WebSocket({"type": "websocket", "path": "/ws", "headers": []}, receive, send)
    socket.client_state = socket.application_state = WebSocketState.CONNECTED
    return socket


@pytest.mark.parametrize(
    ("error", "level"),
    [
        (ClientDisconnected(), "DEBUG"),
        (ConnectionResetError(104, "reset"), "DEBUG"),
        (TimeoutError(), "ERROR"),  # an OSError too, but not a connection already gone
        (RuntimeError("boom"), "ERROR"),
        (None, None),
    ],
)
async def test_closing_a_socket_the_far_end_already_closed_is_not_an_error(error, level, logs):
    """Pipecat's client logs any failed close at ERROR; a connection already gone
    (uvicorn's `ClientDisconnected` when Twilio closed first, a reset) is a DEBUG line,
    anything else (a timeout too) still Pipecat's ERROR."""
    transport = barge_in_transport(closing_socket(error), FastAPIWebsocketParams())
    await transport._client.disconnect()
    await asyncio.sleep(0)  # the close task's done callback
    closing = [line for line in logs if "clos" in line]
    if level is None:
        assert closing == [], closing
    else:
        assert [line.split(" ", 1)[0] for line in closing] == [level], closing
