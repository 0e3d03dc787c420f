"""Who may talk to this server: Twilio signatures, per-call stream tokens, the dial-out key.

Three doors, three checks:
- `POST /` and `POST /outbound` are Twilio's webhooks: the `X-Twilio-Signature` must
  validate against the auth token, computed over the URL as Twilio saw it.
- `WS /ws` is opened by whoever has the stream URL, which is not a secret. The TwiML we
  hand out carries a `token` Parameter: an HMAC over the CallSid, an expiry
  (STREAM_TOKEN_TTL_S) and every other parameter, and the stream is dropped before any
  paid service starts unless `start.callSid` and `start.customParameters` match it and it
  has not expired. The token is single-use (`phonebot.state.admission.CallAdmission`), and
  so is each signed webhook (`phonebot.state.replays.ReplayGuard`, checked after the
  signature), across processes. Its expiry is in the token itself, so no cache has to
  outlive it.
- `POST /dialout` spends money; it needs `Authorization: Bearer $DIALOUT_API_KEY`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NoReturn

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from twilio.request_validator import (
    HMAC_SHA1,
    HMAC_SHA256,
    RequestValidator,
    get_signature_algorithm,
)

from phonebot.config import Settings
from phonebot.http_guards import key_matches

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


def external_base_url(request: Request, public_url: str | None = None) -> str:
    """This server's scheme and host as the outside world (Twilio) reaches it.

    Behind ngrok or a reverse proxy the app sees `http://127.0.0.1:8000`, while Twilio
    uses `https://abc.ngrok.app`; the proxy tells us the outside scheme and host in
    `X-Forwarded-Proto` / `X-Forwarded-Host`. `PUBLIC_URL`, when set, wins outright.
    """
    if public_url:
        return public_url
    proto = request.headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    host = request.headers.get("x-forwarded-host") or request.headers.get("host")
    host = (host or request.url.netloc).split(",")[0].strip()
    return f"{proto}://{host}"


SIGNATURE_HEADER = "x-twilio-signature"
SIGNATURE_SETTINGS_HEADER = "x-twilio-webhooks-signature-settings"


def signed_url_candidates(request: Request, public_url: str | None = None) -> list[str]:
    """Every URL Twilio may have signed for this request, most likely first.

    Twilio signs the URL configured on the number exactly as written
    (https://www.twilio.com/docs/usage/security#validating-requests): the outside base
    (`external_base_url`), the path as sent, and the raw query string (not re-encoded:
    `%20` and `+` must stay as they came). An HTTP request always has a path, so a number
    configured as `https://abc.ngrok.app` (no slash) reaches us as `/` but was signed
    without it: for the root path both forms are tried. `RequestValidator.validate` then
    tries each with and without the default port.
    """
    base = external_base_url(request, public_url)
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else request.url.path
    query = request.scope.get("query_string", b"").decode("latin-1")
    suffix = f"?{query}" if query else ""
    candidates = [f"{base}{path}{suffix}"]
    if path == "/":
        candidates.append(f"{base}{suffix}")
    return candidates


def twilio_signature_is_valid(
    secret: str,
    url: str | Iterable[str],
    form: Mapping[str, str],
    signature: str | None,
    algorithm: str = HMAC_SHA1,
) -> bool:
    """Twilio's own validator over each candidate URL (it also tries with/without port)."""
    if not signature:
        return False
    validator = RequestValidator(secret)
    urls = [url] if isinstance(url, str) else list(url)
    return any(_validates(validator, u, form, signature, algorithm) for u in urls)


def _validates(
    validator: RequestValidator, url: str, form: Mapping[str, str], signature: str, algorithm: str
) -> bool:
    """One candidate URL; a URL twilio's validator can't parse (a crafted `Host:
    bot.example.com:abc` makes its port lookup raise ValueError) is simply not signed."""
    try:
        return validator.validate(url, dict(form), signature, algorithm)
    except ValueError:
        return False


def checks_webhook_signatures(settings: Settings) -> bool:
    """Whether this server verifies X-Twilio-Signature at all."""
    if settings.webhook_auth == "external":
        return False
    return settings.twilio_auth_token is not None or settings.twilio_webhook_shared_key is not None


def signing_key(request: Request, settings: Settings) -> tuple[str, str]:
    """(secret, algorithm) the request says it was signed with, or a 403 saying what to set.

    Twilio signs with the account's auth token (HMAC-SHA1) unless a Webhooks signing rule
    matches the URL; then it signs with the rule's SharedKey and algorithm and says so in
    `X-Twilio-Webhooks-Signature-Settings: key=<SharedKey id>,algorithm=HMAC_SHA256`
    (https://www.twilio.com/docs/usage/webhooks/webhook-shared-keys). The header and its
    algorithm are read by twilio's own `get_signature_algorithm`.
    """
    header = request.headers.get(SIGNATURE_SETTINGS_HEADER)
    if header is None:
        if settings.twilio_auth_token is None:
            refuse_webhook(
                request,
                "403 webhook signed with the account auth token (no "
                "X-Twilio-Webhooks-Signature-Settings header), but TWILIO_AUTH_TOKEN is "
                "unset: set it",
            )
        return settings.twilio_auth_token.get_secret_value(), HMAC_SHA1
    shown = printable(header)
    algorithm = get_signature_algorithm(header).upper()
    if algorithm not in (HMAC_SHA1, HMAC_SHA256):
        refuse_webhook(
            request,
            f"403 webhook signed with {printable(algorithm)} (X-Twilio-Webhooks-Signature-"
            f"Settings: {shown}), which this twilio library can't check: use HMAC_SHA256 "
            "in the Webhook Setting, or upgrade twilio",
        )
    if settings.twilio_webhook_shared_key is None:
        refuse_webhook(
            request,
            f"403 webhook signed with a Twilio SharedKey (X-Twilio-Webhooks-Signature-"
            f"Settings: {shown}), but TWILIO_WEBHOOK_SHARED_KEY is unset: set it to that "
            "SharedKey's secret",
        )
    return settings.twilio_webhook_shared_key.get_secret_value(), algorithm


def printable(value: str, limit: int = 120) -> str:
    """A header value safe for one log line: no control characters, bounded length."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in value)
    return cleaned[:limit] + ("…" if len(cleaned) > limit else "")


async def require_twilio_signature(request: Request) -> None:
    """Dependency for Twilio webhooks: 403 unless signed, when signatures are checked.

    A request with no signature header is refused before its body is read: the cheapest
    possible answer to a flood of unsigned requests. Every 403 is logged with its reason
    (`refuse_webhook`), never bare.
    """
    settings: Settings = request.app.state.settings
    if not checks_webhook_signatures(settings):
        return
    signature = request.headers.get(SIGNATURE_HEADER)
    if not signature:
        refuse_webhook(request, "403 unsigned webhook (no X-Twilio-Signature)")
    secret, algorithm = signing_key(request, settings)
    form = await request.form()
    urls = signed_url_candidates(request, settings.public_url)
    fields = {key: str(value) for key, value in form.items()}
    if not twilio_signature_is_valid(secret, urls, fields, signature, algorithm):
        which = "TWILIO_WEBHOOK_SHARED_KEY" if algorithm == HMAC_SHA256 else "TWILIO_AUTH_TOKEN"
        refuse_webhook(
            request,
            f"403 badly signed webhook (checked over {urls[0]}, with and without the "
            f"trailing slash and port; {which} and PUBLIC_URL must match the number's "
            "webhook URL)",
        )


def refuse_webhook(request: Request, what: str) -> NoReturn:
    """403, noted in the app's flood-proof rejection log (phonebot.http_guards.RejectionLog).

    `what` says why and what to configure; it is the log line, and the answer's detail
    except under ENV=production, where the answer stays generic.
    """
    rejections = getattr(request.app.state, "rejections", None)
    if rejections is not None:
        rejections.note(f"{what} to {request.url.path}")
    if request.app.state.settings.env == "production":
        # The reason (which URL was checked, which key is unset) is for the operator's log,
        # not for whoever sent the request.
        raise HTTPException(status.HTTP_403_FORBIDDEN, "X-Twilio-Signature is missing or invalid")
    raise HTTPException(
        status.HTTP_403_FORBIDDEN, f"X-Twilio-Signature is missing or invalid: {what[4:]}"
    )


class UnsafeConfiguration(ValueError):
    """Settings this server must not start with; the message names what to set."""


def production_auth_problem(settings: Settings) -> str | None:
    """Why ENV=production must not start with these settings, or None.

    Without STREAM_SECRET or TWILIO_AUTH_TOKEN the stream token is signed with a random
    per-process secret the bot on Pipecat Cloud can't know, so every call would be
    refused; without TWILIO_AUTH_TOKEN (or a SharedKey) no webhook is authenticated,
    unless WEBHOOK_AUTH=external says a gateway in front does it.
    """
    if settings.env != "production":
        return None
    missing = []
    if settings.stream_secret is None and settings.twilio_auth_token is None:
        missing.append(
            "STREAM_SECRET (the stream token key, the same as the bot's on Pipecat Cloud)"
        )
    if settings.webhook_auth == "twilio" and not checks_webhook_signatures(settings):
        missing.append(
            "TWILIO_AUTH_TOKEN (to check Twilio's webhook signatures; or WEBHOOK_AUTH=external "
            "when a gateway in front of this server authenticates them)"
        )
    if not missing:
        return None
    return "ENV=production refuses to start: set " + " and ".join(missing)


def scaling_problem(settings: Settings) -> str | None:
    """Why several processes must not start with these settings, or None.

    With WORKERS > 1 (or REDIS_URL, which means other processes share the calls) a call's
    webhook and its media stream may reach different processes: the stream token must be
    signed with a secret they all know (a random per-process one would refuse every such
    stream), and replays, call slots, rate limits and AMD verdicts must be shared (Redis).
    """
    several = settings.workers > 1 or settings.redis_url is not None
    if settings.workers > 1 and settings.redis_url is None:
        return (
            f"WORKERS={settings.workers} refuses to start without REDIS_URL: several processes "
            "must share replays, call slots, rate limits and AMD verdicts (set REDIS_URL="
            "redis://host:6379/0, or run WORKERS=1)"
        )
    if several and settings.stream_secret is None and settings.twilio_auth_token is None:
        why = f"WORKERS={settings.workers}" if settings.workers > 1 else "REDIS_URL"
        return (
            f"{why} refuses to start without STREAM_SECRET or TWILIO_AUTH_TOKEN: a call's "
            "stream may reach another process than its webhook, and only a secret every "
            "process shares can verify its stream token (set STREAM_SECRET to the same "
            "random string on every process)"
        )
    return None


# Secrets people choose (rather than Twilio issuing them) that ENV=production wants long:
# a key of 16 random characters is beyond guessing even without the lockout of
# `phonebot.http_guards`; a 1-character one falls to the 10th guess.
MIN_SECRET_LENGTH = 16
CHOSEN_SECRETS = (
    "admin_api_key", "dialout_api_key", "metrics_token", "stream_secret",
    "events_webhook_secret",
)  # fmt: skip


def short_secret_problem(settings: Settings) -> str | None:
    """Why ENV=production must not start with a guessable secret, or None: the first of
    CHOSEN_SECRETS that is set but shorter than MIN_SECRET_LENGTH, named (never shown)."""
    if settings.env != "production":
        return None
    for name in CHOSEN_SECRETS:
        value = getattr(settings, name)
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_LENGTH:
            return (
                f"ENV=production refuses to start: {name.upper()} is shorter than "
                f"{MIN_SECRET_LENGTH} characters (use a random one, e.g. "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
    return None


def require_safe_configuration(settings: Settings) -> None:
    """Raise `UnsafeConfiguration` for settings the server must not run with."""
    if problem := (
        production_auth_problem(settings)
        or short_secret_problem(settings)
        or scaling_problem(settings)
    ):
        raise UnsafeConfiguration(problem)


_bearer = HTTPBearer(auto_error=False)


async def require_dialout_key(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> None:
    """Dependency for `/dialout`: 503 when no key is configured, 401 on a wrong key, 429
    while the client is locked out after AUTH_FAILURE_LIMIT wrong keys (right key or not:
    `phonebot.http_guards.refuse_locked_out`). A request without a key is no guess."""
    settings: Settings = request.app.state.settings
    if settings.dialout_api_key is None or not settings.dialout_api_key.get_secret_value():
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "dial-out disabled")
    given = credentials.credentials if credentials else None
    if await key_matches(request, given, settings.dialout_api_key.get_secret_value()):
        return
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        "Authorization: Bearer <DIALOUT_API_KEY> required",
        headers={"WWW-Authenticate": "Bearer"},
    )
