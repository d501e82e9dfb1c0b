"""Regenerate docs/playground.png (the README's picture of the playground): the embedded default
model serves `glipv2 serve`, headless Chromium opens /playground, captions the first bundled
example and screenshots the page.

    .venv/bin/python docs/make_playground.py

Needs the `browser` extra (Playwright) and Chromium (`apt-get install chromium`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.local_server import local_server

DOCS = Path(__file__).resolve().parent


def main() -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("no chromium on PATH: apt-get install chromium")
    with local_server() as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"{url}/playground")
        page.wait_for_selector("#output[data-status=idle]")
        page.select_option("#task", "caption")
        page.click("#run")
        page.wait_for_selector("#output[data-status=done]", timeout=120_000)
        page.screenshot(path=DOCS / "playground.png")
        browser.close()
    print(f"wrote {DOCS / 'playground.png'}")


if __name__ == "__main__":
    main()
