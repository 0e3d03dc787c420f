"""Screenshots of the calls page for the docs: docs/img/calls-ui.png (the call log) and
docs/img/calls-ui-call.png (one call), from demo calls in a throw-away database.

    .venv/bin/python bench/screenshot_ui.py [--out docs/img]

Needs Debian's Chromium (`apt-get install chromium`) and Playwright's Python package
(tests/requirements.txt); nothing else is downloaded. The demo calls are the ones the
browser tests use (tests/browser.py), written through the real RecordWriter.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser import (  # noqa: E402
    HOSTILE_SID,
    RICH_SID,
    ServedApp,
    chromium,
    chromium_executable,
    records_app,
    seed_calls,
)
from tests.conftest import make_settings  # noqa: E402

KEY = "demo-admin-key-for-screenshots"
MAX_BYTES = 200_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    executable = chromium_executable()
    if executable is None:
        sys.exit("Chromium not found: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="phonebot-screenshot-") as scratch:
        folder = Path(scratch)
        settings = make_settings(
            database_url=f"sqlite:///{folder / 'calls.db'}", admin_api_key=KEY
        )

        async def seed(records) -> None:
            await seed_calls(records, folder)
            # The hostile-input call is for the escaping test, not for the docs.
            await records.store.delete(HOSTILE_SID)

        with ServedApp(records_app(settings, seed)) as served:
            shoot(executable, served.base_url, args.out)


def shoot(executable: str, base_url: str, out: Path) -> None:
    with chromium(executable, viewport={"width": 1100, "height": 640}) as context:
        page = context.new_page()
        page.goto(f"{base_url}/calls/ui")
        page.fill("input[name=key]", KEY)
        page.click("button[type=submit]")
        page.wait_for_selector("table.calls tbody tr[data-call-sid]")
        save(page.screenshot(full_page=True), out / "calls-ui.png")
        page.click(f"tr[data-call-sid='{RICH_SID}'] a")
        page.wait_for_selector("ol.transcript")
        page.wait_for_function("document.querySelector('audio').readyState >= 1")
        save(page.screenshot(full_page=True), out / "calls-ui-call.png")


def save(png: bytes, path: Path) -> None:
    """Write the PNG, reduced to a 256-colour palette when Pillow is there (UI
    screenshots have few colours; this keeps them well under MAX_BYTES)."""
    try:
        from PIL import Image

        image = Image.open(io.BytesIO(png)).convert("RGB")
        buffer = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            buffer, "PNG", optimize=True
        )
        png = buffer.getvalue()
    except ImportError:
        pass
    path.write_bytes(png)
    size = len(png)
    note = "" if size <= MAX_BYTES else f"  (over {MAX_BYTES // 1000} KB: shrink the page)"
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    print(f"{shown}: {size // 1000} KB{note}")


if __name__ == "__main__":
    main()
