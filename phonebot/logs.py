"""Log setup that keeps secrets out of the logs.

Pipecat logs the parsed `start` message (with the stream token) at DEBUG, and any library
may one day print a header or a URL with a key in it. Rather than trusting every call
site, a loguru patcher masks every configured secret and every `token` value in every
record before it is written.
"""

from __future__ import annotations

import logging
import re
import sys

from loguru import logger
from sqlalchemy.engine import make_url

from phonebot.config import Settings
from phonebot.provider_faults import not_logged_twice

TOKEN_VALUE = re.compile(r"""(['"]?token['"]?\s*[:=]\s*['"]?)([0-9a-fA-F]{8,})""")


def secret_values(settings: Settings) -> list[str]:
    """Every configured secret, and the password inside DATABASE_URL."""
    fields = (
        settings.twilio_auth_token,
        settings.twilio_webhook_shared_key,
        settings.stream_secret,
        settings.dialout_api_key,
        settings.admin_api_key,
        settings.events_webhook_secret,
        settings.openai_api_key,
        settings.deepgram_api_key,
        settings.cartesia_api_key,
    )
    values = [f.get_secret_value() for f in fields if f]
    values.append(make_url(settings.database_url.get_secret_value()).password or "")
    return [value for value in values if len(value) >= 6]


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return TOKEN_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)[:4]}…", text)


def configure_logging(settings: Settings) -> None:
    """Send loguru to stderr at LOG_LEVEL, with secrets masked."""
    secrets = secret_values(settings)

    def patch(record) -> None:
        record["message"] = redact(record["message"], secrets)

    logger.remove()
    logger.configure(patcher=patch)
    # Pipecat's own copies of provider errors are dropped: the call logs each once.
    logger.add(sys.stderr, level=settings.log_level.upper(), filter=not_logged_twice)
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.INFO, force=True)


class _ToLoguru(logging.Handler):
    """Route stdlib logging (uvicorn, twilio, aiohttp) through loguru and its redaction."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info).log(level, record.getMessage())
