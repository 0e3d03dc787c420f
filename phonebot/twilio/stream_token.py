"""Per-call stream tokens: who may open `WS /ws`, and for which call.

The stream URL is not a secret: whoever has it can open the websocket. So the TwiML we hand
out carries a `token` Parameter, an HMAC over the CallSid, an expiry (STREAM_TOKEN_TTL_S)
and every other parameter, and the stream is dropped before any paid service starts
unless `start.callSid` and `start.customParameters` match it and it has not expired.
The token is single-use (`phonebot.state.admission.CallAdmission`), across processes; its
expiry is in the token itself, so no cache has to outlive it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

TOKEN_PARAMETER = "token"
TOKEN_VERSION = "2"


@dataclass(frozen=True)
class StreamTokenCheck:
    """The verdict on a stream token; `problem` is safe to log (no token, no secret)."""

    ok: bool
    problem: str = ""


def covered_parameters(parameters: Mapping[str, str]) -> dict[str, str]:
    """The stream parameters a token vouches for: every one but the token itself.

    Names that start with `_` are the hosting platform's, not ours (Pipecat Cloud routes on
    `_pipecatCloudServiceHost` and may consume it); no caller can set one
    (`twiml.PARAMETER_NAME` starts with a letter), and the call drops them once verified.
    """
    return {
        name: value
        for name, value in parameters.items()
        if name != TOKEN_PARAMETER and not name.startswith("_")
    }


def parameters_digest(parameters: Mapping[str, str]) -> str:
    """SHA-256 of the covered parameters, canonical (sorted names, exact values)."""
    canonical = json.dumps(
        sorted(covered_parameters(parameters).items()), ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _token_mac(call_sid: str, expires_at: int, digest: str, secret: bytes) -> str:
    message = f"phonebot stream token v{TOKEN_VERSION}\n{call_sid}\n{expires_at}\n{digest}"
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def call_token(
    call_sid: str,
    secret: bytes,
    parameters: Mapping[str, str],
    expires_at: float,
) -> str:
    """The stream token for one call: `<expiry>.<HMAC>`, bound to its CallSid, its expiry
    (Unix seconds) and every parameter it was issued with (`covered_parameters`).

    So a token can't open a stream for another call, after `STREAM_TOKEN_TTL_S`, or with
    a parameter added, removed or changed; single use is the admission's job.
    """
    expires = int(expires_at)
    return f"{expires}.{_token_mac(call_sid, expires, parameters_digest(parameters), secret)}"


def verify_call_token(
    call_sid: str | None,
    parameters: Mapping[str, str],
    secret: bytes,
    now: float | None = None,
) -> StreamTokenCheck:
    """Whether `parameters[token]` was minted by us for this CallSid and these parameters,
    and has not expired. Constant-time on bytes: a non-ASCII token is just invalid (a
    `str` compare_digest would raise on it)."""
    token = parameters.get(TOKEN_PARAMETER)
    if not call_sid or not token:
        return StreamTokenCheck(False, "none given")
    expires, _, mac = token.partition(".")
    if not (token.isascii() and expires.isdigit() and len(expires) <= 12 and mac):
        return StreamTokenCheck(False, "malformed")
    expected = _token_mac(call_sid, int(expires), parameters_digest(parameters), secret)
    if not hmac.compare_digest(expected.encode(), mac.encode()):
        return StreamTokenCheck(False, "another call's, or parameters changed since issued")
    if int(expires) <= (time.time() if now is None else now):
        return StreamTokenCheck(False, "expired: STREAM_TOKEN_TTL_S")
    return StreamTokenCheck(True)
