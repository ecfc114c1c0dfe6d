"""Render a compare folder's report.html in headless Chromium: check every image decodes, screenshot it.

Usage:
    python bench/screenshot_report.py runs/compare            # -> runs/compare/report.png
    python bench/screenshot_report.py runs/compare --width 420  # a phone-width look

Uses Playwright for Python with the system Chromium (/usr/bin/chromium; never `playwright install`).
Every request other than the file itself is blocked and counted, so a report that reaches out to
the network fails here as well as in tests/test_report_compare.py. Exit status 1 when an image
fails to decode or any external request was attempted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHECK_IMAGES = """() => {
  const imgs = Array.from(document.images);
  return {n: imgs.length, ok: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
          width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight};
}"""


def main() -> int:
    """Screenshot DIR/report.html to DIR/report.png (full page) and report broken images."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="compare folder holding report.html")
    ap.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels (default 1280)")
    ap.add_argument("--out", help="PNG path (default DIR/report.png)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    page_path = Path(args.dir).resolve() / "report.html"
    if not page_path.is_file():
        print(f"error: {page_path} not found (run 'bloodcell report {args.dir}' first)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else page_path.with_name("report.png")

    from playwright.sync_api import sync_playwright

    url = page_path.as_uri()
    external: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        page = browser.new_page(viewport={"width": args.width, "height": 900})

        def route(r):
            if r.request.url == url or r.request.url.startswith("data:"):
                return r.continue_()
            external.append(r.request.url)
            return r.abort()

        page.route("**/*", route)
        page.goto(url, wait_until="load")
        info = page.evaluate(CHECK_IMAGES)
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    print(f"{info['ok']}/{info['n']} images decoded (naturalWidth > 0); page {info['width']} x "
          f"{info['height']} px at viewport width {args.width}; external requests: {len(external)}")
    for u in external[:5]:
        print(f"  blocked: {u}")
    if info["width"] > args.width:
        print(f"warning: page is wider ({info['width']} px) than the viewport: horizontal scrolling")
    print(out)
    return 0 if info["ok"] == info["n"] and not external else 1


if __name__ == "__main__":
    sys.exit(main())
