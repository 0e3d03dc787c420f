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
from urllib.parse import unquote, urlsplit

from loguru import logger
from sqlalchemy.engine import make_url

from phonebot.config import Settings
from phonebot.ops.log_start import take_held

# A stream token ("<expiry>.<hex HMAC>", phonebot.twilio.stream_token) wherever it is printed as a
# `token` value (Pipecat logs the parsed `start` message at DEBUG): all but 4 characters go.
TOKEN_VALUE = re.compile(r"""(['"]?token['"]?\s*[:=]\s*['"]?)([0-9a-fA-F][0-9a-fA-F.]{7,})""")
CALL_SID_IN_TEXT = re.compile(r"\bCA[0-9a-fA-F]{32}\b")
ORIGIN = "origin"  # extra: (logger, module, function, line) of a routed or replayed record
ORIGIN_TIME = "origin_time"  # extra: when a replayed record was first logged

# --- logging: Pipecat's own copy of each error --------------------------------------------

# Pipecat logs every ErrorFrame where it is pushed (at ERROR, with the provider's full
# message) and again where the worker receives it; `ProviderFaults.on_error` logs each
# failure once, with the CallSid (`phonebot.call.provider_faults`), so those copies are
# dropped here.
_WORKER = "pipecat.pipeline.worker"
_WORKER_ECHO = "Something went wrong"
_PIPECAT_DUPLICATES = {
    ("pipecat.processors.frame_processor", "push_error_frame"),
    (_WORKER, "_handle_unusable_processor"),
}


def not_logged_twice(record: dict) -> bool:
    """Loguru filter: False for Pipecat's duplicate of an error `ProviderFaults` logs."""
    where = (record["name"], record["function"])
    if where in _PIPECAT_DUPLICATES:
        return False
    return not (where[0] == _WORKER and _WORKER_ECHO in record["message"])


def secret_values(settings: Settings) -> list[str]:
    """Every configured secret, whatever its length, and the passwords inside DATABASE_URL
    and REDIS_URL (as written in the URL and decoded), longest first so a secret that
    contains another is masked whole."""
    fields = (
        settings.twilio_auth_token,
        settings.twilio_webhook_shared_key,
        settings.stream_secret,
        settings.dialout_api_key,
        settings.admin_api_key,
        settings.events_webhook_secret,
        settings.tools_webhook_secret,
        settings.metrics_token,
        settings.openai_api_key,
        settings.deepgram_api_key,
        settings.cartesia_api_key,
    )
    values = [f.get_secret_value() for f in fields if f]
    database_url = settings.database_url.get_secret_value()
    values += [make_url(database_url).password or "", urlsplit(database_url).password or ""]
    if settings.redis_url:
        redis_url = settings.redis_url.get_secret_value()
        values += [urlsplit(redis_url).password or "", unquote(urlsplit(redis_url).password or "")]
    return sorted({value for value in values if value}, key=len, reverse=True)


# A secret shorter than this is masked only where it stands alone (not inside a longer word
# or number): a 2-letter key masked inside every word would garble the whole log. Such a
# secret is refused under ENV=production anyway (`phonebot.web.safety.short_secret_problem`).
SHORT_SECRET = 6


def redact(text: str, secrets: list[str]) -> str:
    """Mask each secret (a short one where it stands alone), and stream tokens to 4 chars."""
    for secret in secrets:
        if len(secret) >= SHORT_SECRET:
            text = text.replace(secret, "***")
        else:
            text = re.sub(rf"(?<![0-9A-Za-z]){re.escape(secret)}(?![0-9A-Za-z])", "***", text)
    return TOKEN_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)[:4]}…", text)


def configure_logging(settings: Settings) -> None:
    """Send loguru to stderr at LOG_LEVEL, in LOG_FORMAT, with secrets masked."""
    secrets = secret_values(settings)

    logger.remove()
    mask_secrets(settings)
    # Pipecat's own copies of provider errors are dropped: the call logs each once. No
    # handler prints a frame's local variables (loguru's `diagnose`): one crafted request
    # that raised would otherwise write every key in the crashed frames to the log.
    line = json_line(secrets) if settings.log_format == "json" else text_line(secrets)
    logger.add(
        sys.stderr,
        level=settings.log_level.upper(),
        filter=not_logged_twice,
        format=line,
        diagnose=False,
        backtrace=False,
    )
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


def mask_secrets(settings: Settings) -> None:
    """Mask every configured secret and stream token in every record's message, whatever
    handlers there are (also where someone else owns them: the bot on Pipecat Cloud)."""
    secrets = secret_values(settings)

    def patch(record) -> None:
        record["message"] = redact(record["message"], secrets)

    logger.configure(patcher=patch)


# Loguru's default text format, with the exception (if any) already masked in `extra`.
TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <8}</level> | "
    "<cyan>{name}</cyan>:<cyan>{function}</cyan>:<cyan>{line}</cyan> - <level>{message}</level>"
)


def text_line(secrets: list[str]):
    """A loguru format function for text logs whose traceback is masked like the JSON one.

    Loguru's own `{exception}` would print the traceback as it is (an exception's text can
    hold a URL with a key, a header, a token); here it is formatted by `traceback` (no
    local variables) and passed through `redact` first.
    """

    def format_record(record) -> str:
        if record["exception"] is None:
            return TEXT_FORMAT + "\n"
        record["extra"]["masked_exception"] = exception_text(record, secrets)
        return TEXT_FORMAT + "\n{extra[masked_exception]}"

    return format_record


def exception_text(record, secrets: list[str]) -> str:
    """The record's traceback, formatted without local variables, secrets masked."""
    kind, error, trace = record["exception"]
    return redact("".join(traceback.format_exception(kind, error, trace)), secrets)


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
    extra = {k: v for k, v in record["extra"].items() if k not in ("json", "masked_exception")}
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
        fields["exception"] = exception_text(record, secrets)
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
