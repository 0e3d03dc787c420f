"""Shared fixtures: settings built in the test, never from a developer's environment."""

from __future__ import annotations

import pytest

from phonebot.config import Settings

AUTH_TOKEN = "test-auth-token-0123456789abcdef"
ACCOUNT_SID = "AC" + "0" * 32
DIALOUT_KEY = "test-dialout-key-abcdef"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop every setting from the real environment so tests see only what they pass."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def make_settings(**overrides) -> Settings:
    values = {
        "twilio_account_sid": ACCOUNT_SID,
        "twilio_auth_token": AUTH_TOKEN,
        "twilio_phone_number": "+15550001111",
        "dialout_api_key": DIALOUT_KEY,
        "stream_secret": "test-stream-secret",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings() -> Settings:
    return make_settings()
