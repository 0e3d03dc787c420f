"""Log setup that keeps secrets out of the logs, in text or JSON.

Pipecat logs the parsed `start` message (with the stream token) at DEBUG, and any library
may one day print a header or a URL with a key in it. Rather than trusting every call
site, a loguru patcher masks every configured secret and every `token` value in every
record before it is written.

LOG_FORMAT=json writes each record as one JSON object on one line, for log collectors
(Loki, Elasticsearch, Cloud Logging): time, level, message, logger, module, function,
line, process, and `call_sid` when the record is about a call: bound with
`logger.bind(call_sid=...)`, or else the first CallSid in the message ("Call CA…: …",
which is how every call's lines are written). Loguru's own `serialize=True` would dump
its whole record (file paths, thread, elapsed, …) nested under "record"; a collector
wants flat, stable fields.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from datetime import UTC
from urllib.parse import urlsplit

from loguru import logger
from sqlalchemy.engine import make_url

from phonebot.config import Settings
from phonebot.log_start import take_held
from phonebot.provider_faults import not_logged_twice

TOKEN_VALUE = re.compile(r"""(['"]?token['"]?\s*[:=]\s*['"]?)([0-9a-fA-F]{8,})""")
CALL_SID_IN_TEXT = re.compile(r"\bCA[0-9a-fA-F]{32}\b")
ORIGIN = "origin"  # extra: (logger, module, function, line) of a routed or replayed record
ORIGIN_TIME = "origin_time"  # extra: when a replayed record was first logged


def secret_values(settings: Settings) -> list[str]:
    """Every configured secret, and the passwords inside DATABASE_URL and REDIS_URL."""
    fields = (
        settings.twilio_auth_token,
        settings.twilio_webhook_shared_key,
        settings.stream_secret,
        settings.dialout_api_key,
        settings.admin_api_key,
        settings.events_webhook_secret,
        settings.metrics_token,
        settings.openai_api_key,
        settings.deepgram_api_key,
        settings.cartesia_api_key,
    )
    values = [f.get_secret_value() for f in fields if f]
    values.append(make_url(settings.database_url.get_secret_value()).password or "")
    if settings.redis_url:
        values.append(urlsplit(settings.redis_url.get_secret_value()).password or "")
    return [value for value in values if len(value) >= 6]


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return TOKEN_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)[:4]}…", text)


def configure_logging(settings: Settings) -> None:
    """Send loguru to stderr at LOG_LEVEL, in LOG_FORMAT, with secrets masked."""
    secrets = secret_values(settings)

    def patch(record) -> None:
        record["message"] = redact(record["message"], secrets)

    logger.remove()
    logger.configure(patcher=patch)
    # Pipecat's own copies of provider errors are dropped: the call logs each once.
    level = settings.log_level.upper()
    if settings.log_format == "json":
        logger.add(sys.stderr, level=level, filter=not_logged_twice, format=json_line(secrets))
    else:
        logger.add(sys.stderr, level=level, filter=not_logged_twice)
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.INFO, force=True)
    # uvicorn's own loggers may carry handlers of their own (its default log config, used by
    # an embedded uvicorn) that stop their records short of the root: send them through ours,
    # so every line has our format (JSON included).
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # Python's warnings (a library's DeprecationWarning) print to stderr on their own;
    # through logging they become records like any other, and JSON ones in JSON mode.
    logging.captureWarnings(settings.log_format == "json")
    for record in take_held():  # logged at import, before there were settings (log_start)
        origin = (record["name"], record["module"], record["function"], record["line"])
        replay = logger.bind(**{ORIGIN: origin, ORIGIN_TIME: record["time"]})
        replay.log(record["level"].name, record["message"])


def json_line(secrets: list[str]):
    """A loguru format function writing each record as one JSON object on one line.

    The object is built here and handed to loguru through `extra` ("{extra[json]}"), so
    loguru adds nothing around it; the exception's traceback goes inside it ("exception")
    rather than on lines of its own that a collector would take for separate records.
    """

    def format_record(record) -> str:
        record["extra"]["json"] = json.dumps(
            json_fields(record, secrets), default=str, ensure_ascii=False
        )
        return "{extra[json]}\n"

    return format_record


def json_fields(record, secrets: list[str]) -> dict:
    """The flat fields of one record (its message already masked by the patcher)."""
    extra = {k: v for k, v in record["extra"].items() if k != "json"}
    when = extra.pop(ORIGIN_TIME, None) or record["time"]
    where = extra.pop(ORIGIN, None) or (
        record["name"],
        record["module"],
        record["function"],
        record["line"],
    )
    fields = {
        "time": when.astimezone(UTC).isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "message": record["message"],
        **dict(zip(("logger", "module", "function", "line"), where, strict=True)),
        "process": os.getpid(),
    }
    call_sid = extra.pop("call_sid", None) or call_sid_in(record["message"])
    if call_sid:
        fields["call_sid"] = str(call_sid)
    for key, value in extra.items():  # other bound fields, masked like the message
        fields.setdefault(key, redact(str(value), secrets))
    if record["exception"] is not None:
        kind, error, trace = record["exception"]
        text = "".join(traceback.format_exception(kind, error, trace))
        fields["exception"] = redact(text, secrets)
    return fields


def call_sid_in(message: str) -> str | None:
    """The first CallSid a log message names, if any."""
    match = CALL_SID_IN_TEXT.search(message)
    return match.group(0) if match else None


class _ToLoguru(logging.Handler):
    """Route stdlib logging (uvicorn, twilio, aiohttp) through loguru and its redaction."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        origin = (record.name, record.module, record.funcName, record.lineno)
        routed = logger.bind(**{ORIGIN: origin})
        routed.opt(exception=record.exc_info).log(level, record.getMessage())
