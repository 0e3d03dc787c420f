"""Settings: `.env.example` as shipped is a valid configuration, and `KEY=` means unset."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from phonebot.config import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent


def test_env_example_loads_with_blank_keys_unset(tmp_path: Path, monkeypatch):
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    try:
        settings = get_settings()
    finally:
        get_settings.cache_clear()
    assert settings.twilio_auth_token is None
    assert settings.dialout_api_key is None
    assert settings.public_url is None
    assert settings.transfer_target is None
    assert settings.reprompt_phrase == "Sorry, I didn't catch that. Could you say it again?"
    documented = {line.split("=")[0] for line in (ROOT / ".env.example").read_text().splitlines()
                  if line and not line.startswith("#")}
    assert documented == {name.upper() for name in Settings.model_fields}


@pytest.mark.parametrize("target", ["12345", "sip:nobody", "+1 555 123"])
def test_a_transfer_target_must_be_dialable(target):
    with pytest.raises(ValueError, match="E.164"):
        Settings(transfer_target=target)
