"""Screenshot of the ``serve`` web page after uploading a few images, for the README (docs/serve.png).

Usage:
    python bench/screenshot_serve.py --checkpoint runs/cnn4x32 --images a.jpeg b.jpeg c.jpeg
    python bench/screenshot_serve.py --checkpoint runs/cnn4x32   # one TEST image per class from
                                                                 # $BLOODCELL_TEST_DATA/blood-cells

Needs Chromium (Debian: apt-get install chromium) and the playwright Python package.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bloodcell.serve.app import create_app, serving

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


def default_images() -> list[Path]:
    """The first TEST image of each Kaggle class."""
    root = os.environ.get("BLOODCELL_TEST_DATA")
    if not root:
        raise SystemExit("give --images, or set BLOODCELL_TEST_DATA to the folder holding blood-cells/")
    base = Path(root) / "blood-cells" / "dataset2-master" / "images" / "TEST"
    return [sorted((base / c).glob("*.jpeg"))[5] for c in sorted(p.name for p in base.iterdir())]


def main(argv: list[str] | None = None) -> Path:
    """python bench/screenshot_serve.py --checkpoint runs/cnn4x32 --out docs/serve.png"""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="run folder or checkpoint")
    ap.add_argument("--images", nargs="*", help="image files to upload (default: one per class)")
    ap.add_argument("--out", default="docs/serve.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    images = [Path(p) for p in args.images] if args.images else default_images()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with serving(create_app(args.checkpoint)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
        page.goto(url + "/")
        page.wait_for_selector("#model:has-text('px')")
        for i, img in enumerate(reversed(images), 1):  # newest card first: upload in reverse
            page.set_input_files("#file-input", str(img))
            page.wait_for_function(f"() => document.querySelectorAll('.card:not(.pending)').length >= {i}")
        page.wait_for_function("() => [...document.querySelectorAll('img')].every(i => i.complete)")
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
