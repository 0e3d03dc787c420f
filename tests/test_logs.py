"""Secrets never reach the log; LOG_FORMAT=json writes one JSON object per line."""

from __future__ import annotations

import json
import logging

import pytest
from loguru import logger

from phonebot.ops.logs import configure_logging, redact, secret_values
from phonebot.twilio.stream_token import call_token
from tests.conftest import AUTH_TOKEN, DIALOUT_KEY, make_settings


def test_redact_masks_configured_secrets_and_stream_tokens():
    token = call_token("CA" + "1" * 32, b"secret", {"call_type": "inbound"}, 2_000_000_000)
    line = f"auth={AUTH_TOKEN} key={DIALOUT_KEY} body={{'token': '{token}', 'user_id': 'u1'}}"
    cleaned = redact(line, [AUTH_TOKEN, DIALOUT_KEY])
    assert AUTH_TOKEN not in cleaned
    assert DIALOUT_KEY not in cleaned
    assert token not in cleaned
    assert token[:4] in cleaned
    assert "'user_id': 'u1'" in cleaned


def test_configured_logger_masks_every_record(capsys, restore_logging):
    configure_logging(make_settings(openai_api_key="sk-live-abcdefghijklmnop"))
    logger.info("using key sk-live-abcdefghijklmnop and token=" + "ab" * 32)
    err = capsys.readouterr().err
    assert "sk-live-abcdefghijklmnop" not in err
    assert "ab" * 32 not in err
    assert "using key ***" in err


def test_every_secret_setting_and_the_database_and_redis_passwords_are_masked():
    settings = make_settings(
        admin_api_key="admin-key-0123456789",
        events_webhook_secret="events-secret-0123456789",
        twilio_webhook_shared_key="shared-key-0123456789",
        metrics_token="metrics-token-0123456789",
        database_url="postgresql://phonebot:db-password-0123@db.example/phonebot",
        redis_url="redis://:redis-password-0123@redis.example:6379/0",
    )
    line = " ".join(
        ["admin-key-0123456789", "events-secret-0123456789", "shared-key-0123456789"]
        + ["metrics-token-0123456789"]
        + ["postgresql://phonebot:db-password-0123@db.example/phonebot"]
        + ["redis://:redis-password-0123@redis.example:6379/0"]
    )
    cleaned = redact(line, secret_values(settings))
    for secret in (
        "admin-key", "events-secret", "shared-key", "metrics-token", "db-password",
        "redis-password",
    ):
        assert secret not in cleaned
    assert "db.example/phonebot" in cleaned
    assert "redis.example:6379/0" in cleaned


# --- LOG_FORMAT=json ----------------------------------------------------------------------

CALL_SID = "CA" + "0123456789abcdef" * 2


@pytest.fixture(autouse=True)
def uncapture_warnings():
    """JSON mode routes Python's warnings through logging; give them back after."""
    yield
    logging.captureWarnings(False)


def json_lines(text: str) -> list[dict]:
    """Every line of `text` as JSON: a line that isn't one object fails the test."""
    return [json.loads(line) for line in text.splitlines()]


def test_text_is_the_default_format(capsys, restore_logging):
    configure_logging(make_settings())
    logger.info(f"Call {CALL_SID} started")
    err = capsys.readouterr().err
    assert "| INFO" in err
    assert not err.lstrip().startswith("{")


def test_json_logs_are_one_object_per_line_with_the_call_sid(capsys, restore_logging):
    # As uvicorn's default log config leaves its loggers (an embedded uvicorn, e.g. another
    # test's, ran earlier in this process): their records must still come out as JSON.
    logging.getLogger("uvicorn").addHandler(logging.NullHandler())
    logging.getLogger("uvicorn").propagate = False
    configure_logging(make_settings(log_format="json", admin_api_key="admin-key-0123456789"))
    logger.info(f"Call {CALL_SID} started: inbound, key admin-key-0123456789")
    logger.bind(call_sid=CALL_SID, persona="support").warning("bound to a call")
    logger.info("Phone bot ready")
    logging.getLogger("uvicorn.error").warning("from the standard library")
    try:
        raise RuntimeError("boom admin-key-0123456789")
    except RuntimeError:
        logger.exception(f"Call {CALL_SID}: pipeline error\nwith a second line")
    err = capsys.readouterr().err
    assert "admin-key-0123456789" not in err
    started, bound, ready, stdlib, failed = json_lines(err)

    assert started["message"] == f"Call {CALL_SID} started: inbound, key ***"
    assert started["call_sid"] == CALL_SID  # read from the message
    assert started["level"] == "INFO"
    assert started["logger"] == __name__
    assert started["function"] == "test_json_logs_are_one_object_per_line_with_the_call_sid"
    assert started["time"].endswith("+00:00")
    assert isinstance(started["process"], int)

    assert bound["call_sid"] == CALL_SID  # bound with logger.bind
    assert bound["persona"] == "support"
    assert bound["level"] == "WARNING"
    assert "call_sid" not in ready
    assert stdlib["logger"] == "uvicorn.error"
    assert stdlib["message"] == "from the standard library"

    assert failed["call_sid"] == CALL_SID
    assert failed["message"].endswith("with a second line")  # still one line of output
    assert "RuntimeError: boom ***" in failed["exception"]


def test_json_logs_replay_what_was_logged_before_configuration(capsys, restore_logging):
    """Pipecat's import banner comes before the settings; in JSON mode it is held and
    written as JSON (phonebot.ops.log_start), not as the one text line of the log."""
    from phonebot.ops import log_start

    log_start.hold_until_configured()
    logger.info("logged at import time")
    assert capsys.readouterr().err == ""  # held, not written
    configure_logging(make_settings(log_format="json"))
    (line,) = json_lines(capsys.readouterr().err)
    assert line["message"] == "logged at import time"
    assert line["function"] == "test_json_logs_replay_what_was_logged_before_configuration"


def test_log_format_is_checked():
    with pytest.raises(ValueError, match="log_format"):
        make_settings(log_format="yaml")
