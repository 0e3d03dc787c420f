"""Settings this server refuses to start with, each refusal naming what to set.

ENV=production without the secrets that authenticate webhooks and streams, a guessable
chosen secret, or several processes without the shared state and secret they need
(`require_safe_configuration`, run by `create_app` and, before the workers start, by
server.py).
"""

from __future__ import annotations

from phonebot.config import Settings
from phonebot.twilio.signatures import checks_webhook_signatures


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
# `phonebot.web.guards`; a 1-character one falls to the 10th guess.
MIN_SECRET_LENGTH = 16
CHOSEN_SECRETS = (
    "admin_api_key", "dialout_api_key", "metrics_token", "stream_secret",
    "events_webhook_secret",
    "tools_webhook_secret",
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
