"""Screenshot of the review page for the README (docs/review.png): the built-in models count a
slide, a person moves the least sure cell of the largest group with a number key and labels the next
one as shown (Enter), then the page is captured.

Usage:
    python bench/screenshot_review.py                       # the slide bloodcell ships (3 PBC fields)
    python bench/screenshot_review.py --slide FIELDS_FOLDER --out docs/review.png

Needs Chromium (Debian: apt-get install chromium) and the playwright Python package.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from screenshot_serve import ARGS  # Chromium's headless flags, as the serve screenshot takes them

from bloodcell.cli import main as cli
from bloodcell.models.builtin import builtin_dir
from bloodcell.serve.app import serving
from bloodcell.serve.review import create_review_app


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide", default=str(builtin_dir() / "examples" / "slide"), help="a folder of fields")
    ap.add_argument("--out", default="docs/review.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        counted = Path(tmp) / "count"
        if cli(["count", args.slide, "--out", str(counted), "--no-progress"]) != 0:
            raise SystemExit("count failed")
        with serving(create_review_app(counted)) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(url + "/")
            page.wait_for_selector(".cell", timeout=10_000)
            biggest = max(page.locator("section[data-label]").all(), key=lambda s: s.locator(".cell").count())
            biggest.locator(".cell").first.click()
            page.keyboard.press("5")  # moved to the fifth class
            page.keyboard.press("Enter")  # the next cell: right as shown
            page.wait_for_timeout(300)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=False)
            browser.close()
    print(f"wrote {args.out}")
    return Path(args.out)


if __name__ == "__main__":
    main()
