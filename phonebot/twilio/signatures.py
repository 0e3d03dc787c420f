"""Twilio's webhook signatures: whether a request to `POST /`, `/outbound`, `/amd` or
`/status` was sent by Twilio.

The `X-Twilio-Signature` must validate against the auth token (or a Webhooks SharedKey),
computed over the URL as Twilio saw it: the outside base URL (`external_base_url`, behind
ngrok or a proxy) and every form of it Twilio may have signed (`signed_url_candidates`).
Each signed webhook is then accepted once (`phonebot.state.replays.ReplayGuard`).

`check_twilio_signature` says why a request is refused (`WebhookRefused`); the app's
dependency `phonebot.web.auth.require_twilio_signature` turns that into the 403 and the
rejection log's line, so this module knows nothing of the app.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fastapi import Request
from starlette.requests import HTTPConnection
from twilio.request_validator import (
    HMAC_SHA1,
    HMAC_SHA256,
    RequestValidator,
    get_signature_algorithm,
)

from phonebot.config import Settings


def external_base_url(request: HTTPConnection, public_url: str | None = None) -> str:
    """This server's scheme and host as the outside world (Twilio) reaches it.

    Behind ngrok or a reverse proxy the app sees `http://127.0.0.1:8000`, while Twilio
    uses `https://abc.ngrok.app`; the proxy tells us the outside scheme and host in
    `X-Forwarded-Proto` / `X-Forwarded-Host`. `PUBLIC_URL`, when set, wins outright. On a
    websocket (`/ws`) the address is the HTTP one its `ws`/`wss` scheme stands for.
    """
    if public_url:
        return public_url
    proto = request.headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    proto = {"ws": "http", "wss": "https"}.get(proto, proto)
    host = request.headers.get("x-forwarded-host") or request.headers.get("host")
    host = (host or request.url.netloc).split(",")[0].strip()
    return f"{proto}://{host}"


SIGNATURE_HEADER = "x-twilio-signature"
SIGNATURE_SETTINGS_HEADER = "x-twilio-webhooks-signature-settings"


class WebhookRefused(Exception):
    """A webhook that is not Twilio's as far as we can tell; `what` ("403 ...") says why and
    what to configure, for the operator's log (never shown to the sender in production)."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


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
    """(secret, algorithm) the request says it was signed with, or `WebhookRefused` saying
    what to set.

    Twilio signs with the account's auth token (HMAC-SHA1) unless a Webhooks signing rule
    matches the URL; then it signs with the rule's SharedKey and algorithm and says so in
    `X-Twilio-Webhooks-Signature-Settings: key=<SharedKey id>,algorithm=HMAC_SHA256`
    (https://www.twilio.com/docs/usage/webhooks/webhook-shared-keys). The header and its
    algorithm are read by twilio's own `get_signature_algorithm`.
    """
    header = request.headers.get(SIGNATURE_SETTINGS_HEADER)
    if header is None:
        if settings.twilio_auth_token is None:
            raise WebhookRefused(
                "403 webhook signed with the account auth token (no "
                "X-Twilio-Webhooks-Signature-Settings header), but TWILIO_AUTH_TOKEN is "
                "unset: set it",
            )
        return settings.twilio_auth_token.get_secret_value(), HMAC_SHA1
    shown = printable(header)
    algorithm = get_signature_algorithm(header).upper()
    if algorithm not in (HMAC_SHA1, HMAC_SHA256):
        raise WebhookRefused(
            f"403 webhook signed with {printable(algorithm)} (X-Twilio-Webhooks-Signature-"
            f"Settings: {shown}), which this twilio library can't check: use HMAC_SHA256 "
            "in the Webhook Setting, or upgrade twilio",
        )
    if settings.twilio_webhook_shared_key is None:
        raise WebhookRefused(
            f"403 webhook signed with a Twilio SharedKey (X-Twilio-Webhooks-Signature-"
            f"Settings: {shown}), but TWILIO_WEBHOOK_SHARED_KEY is unset: set it to that "
            "SharedKey's secret",
        )
    return settings.twilio_webhook_shared_key.get_secret_value(), algorithm


def printable(value: str, limit: int = 120) -> str:
    """A header value safe for one log line: no control characters, bounded length."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in value)
    return cleaned[:limit] + ("…" if len(cleaned) > limit else "")


async def check_twilio_signature(request: Request, settings: Settings) -> None:
    """Raise `WebhookRefused` unless the request is signed, when signatures are checked.

    A request with no signature header is refused before its body is read: the cheapest
    possible answer to a flood of unsigned requests. Every refusal says why.
    """
    if not checks_webhook_signatures(settings):
        return
    signature = request.headers.get(SIGNATURE_HEADER)
    if not signature:
        raise WebhookRefused("403 unsigned webhook (no X-Twilio-Signature)")
    secret, algorithm = signing_key(request, settings)
    form = await request.form()
    urls = signed_url_candidates(request, settings.public_url)
    fields = {key: str(value) for key, value in form.items()}
    if not twilio_signature_is_valid(secret, urls, fields, signature, algorithm):
        which = "TWILIO_WEBHOOK_SHARED_KEY" if algorithm == HMAC_SHA256 else "TWILIO_AUTH_TOKEN"
        raise WebhookRefused(
            f"403 badly signed webhook (checked over {urls[0]}, with and without the "
            f"trailing slash and port; {which} and PUBLIC_URL must match the number's "
            "webhook URL)"
        )
