"""Screenshot of a report's gallery in headless Chromium (``make docs-figures``):
``python docs/screenshot.py REPORT/index.html OUT.png``. Needs the playwright client (the test
extras) and Debian's chromium."""

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def main(index: Path, out: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("needs Debian's chromium: apt-get install chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 760})
        page.goto(index.resolve().as_uri())
        page.wait_for_load_state("load")
        page.locator("h2", has_text="Gallery").scroll_into_view_if_needed()
        page.evaluate("document.querySelector('.gallery').scrollIntoView()")
        page.screenshot(path=str(out))
        browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
