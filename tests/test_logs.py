"""Secrets never reach the log."""

from __future__ import annotations

from loguru import logger

from phonebot.logs import configure_logging, redact, secret_values
from phonebot.security import call_token
from tests.conftest import AUTH_TOKEN, DIALOUT_KEY, make_settings


def test_redact_masks_configured_secrets_and_stream_tokens():
    token = call_token("CA" + "1" * 32, b"secret")
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


def test_every_secret_setting_and_the_database_password_are_masked():
    settings = make_settings(
        admin_api_key="admin-key-0123456789",
        events_webhook_secret="events-secret-0123456789",
        twilio_webhook_shared_key="shared-key-0123456789",
        database_url="postgresql://phonebot:db-password-0123@db.example/phonebot",
    )
    line = " ".join(
        ["admin-key-0123456789", "events-secret-0123456789", "shared-key-0123456789"]
        + ["postgresql://phonebot:db-password-0123@db.example/phonebot"]
    )
    cleaned = redact(line, secret_values(settings))
    for secret in ("admin-key", "events-secret", "shared-key", "db-password"):
        assert secret not in cleaned
    assert "db.example/phonebot" in cleaned
