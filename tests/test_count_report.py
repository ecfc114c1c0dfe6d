"""The count report (report/count.py): one self-contained page whose table, boxes and gallery say what
the records and differential.json say, escaped, and whole when a field is missing or unreadable; and,
in headless Chromium, what a technologist sees."""

from __future__ import annotations

import base64
import io
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from bloodcell.report import count as report
from bloodcell.report.count import write_count_report

CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
HOSTILE = "<script>alert(1)</script>"


def field_jpeg(path: Path, size=(320, 240)) -> str:
    """A pinkish field with a purple disc, as a JPEG."""
    im = Image.new("RGB", size, (236, 200, 205))
    w, h = size
    ImageDraw.Draw(im).ellipse((w * 0.4, h * 0.35, w * 0.6, h * 0.65), fill=(110, 60, 150))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", quality=85)
    return str(path)


def crop_jpeg(out: Path, rel: str, shade: int) -> str:
    """A 64 x 64 cell crop under out, returned as the path relative to out."""
    im = Image.new("RGB", (64, 64), (230, 190, 200))
    ImageDraw.Draw(im).ellipse((14, 14, 50, 50), fill=(shade, 50, 140))
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    im.save(out / rel, "JPEG")
    return rel


def cell(out: Path, name: str, label: str, prob: float, box, second="lymphocyte") -> dict:
    rest = (1 - prob) / (len(CLASSES) - 1)
    return {"box": list(box), "score": 0.9, "label": label, "prob": prob, "second": second,
            "second_prob": rest, "probs": {c: prob if c == label else rest for c in CLASSES},
            "crop": crop_jpeg(out, f"cells/{name}.jpg", int(60 + 150 * prob))}


def example(tmp_path: Path):
    """Slide 'A': two fields drawn, one whose file is gone, one that failed; slide HOSTILE: one field
    in a folder named like a script tag (a '/' cannot be in a file name, so the tag spans a folder)."""
    out = tmp_path / "count"
    out.mkdir()
    src = tmp_path / "fields"
    rbc = [{"class": "rbc", "score": 0.8, "box": [10.0, 10.0, 40.0, 40.0]},
           {"class": "rbc", "score": 0.7, "box": [250.0, 150.0, 280.0, 180.0]},
           {"class": "platelet", "score": 0.6, "box": [100.0, 200.0, 108.0, 208.0]}]
    a0 = {"slide": "A", "image": field_jpeg(src / "a0.jpg"), "field": 0, "width": 320, "height": 240, "error": "",
          "counts": {"wbc": 3, "rbc": 2, "platelet": 1}, "others": rbc,
          "cells": [cell(out, "a0_0", "neutrophil", 0.91, (128, 84, 192, 156)),
                    cell(out, "a0_1", "neutrophil", 0.55, (20, 120, 70, 170), "monocyte"),
                    cell(out, "a0_2", "lymphocyte", 0.70, (220, 30, 270, 80), "neutrophil")]}
    a1 = {"slide": "A", "image": field_jpeg(src / "a1.jpg", (960, 720)), "field": 1, "width": 960, "height": 720,
          "error": "", "counts": {"wbc": 2}, "others": [],
          "cells": [cell(out, "a1_0", "neutrophil", 0.75, (400, 300, 560, 420)),
                    cell(out, "a1_1", "monocyte", 0.40, (700, 100, 840, 240), "lymphocyte")]}
    a2 = {"slide": "A", "image": str(src / "gone.jpg"), "field": 2, "width": 320, "height": 240, "error": "",
          "counts": {"wbc": 1}, "others": [], "cells": [cell(out, "a2_0", "eosinophil", 0.97, (50, 50, 100, 100))]}
    a3 = {"slide": "A", "image": str(src / "broken.jpg"), "field": 3, "width": 0, "height": 0,
          "error": "not an image (cannot identify image file)", "counts": {}, "others": [], "cells": []}
    h0 = {"slide": HOSTILE, "image": field_jpeg(src / "<script>alert(1)<" / "script>.jpg"), "field": 0,
          "width": 320, "height": 240, "error": "", "counts": {"wbc": 1}, "others": [],
          "cells": [cell(out, "h0_0", "neutrophil", 0.8, (100, 80, 160, 150))]}
    diff = {"classes": CLASSES, "model": "runs/best.pt", "detector": "runs/det.pt", "slides": [
        {"slide": "A", "fields": 3, "failed": 1, "mean_prob": 0.7133, "cells": 6,
         "classes": [{"class": "neutrophil", "count": 3, "percent": 50.0, "ci95": [18.8, 81.2]},
                     {"class": "lymphocyte", "count": 1, "percent": 16.7, "ci95": [3.0, 56.4]},
                     {"class": "monocyte", "count": 1, "percent": 16.7, "ci95": [3.0, 56.4]},
                     {"class": "eosinophil", "count": 1, "percent": 16.7, "ci95": [3.0, 56.4]}],
         "cells_needed": {"5": 385, "10": 97}, "note": "6 cells: +-10 points needs 97 cells, +-5 points 385"},
        {"slide": HOSTILE, "fields": 1, "failed": 0, "mean_prob": 0.8, "cells": 1,
         "classes": [{"class": c, "count": int(c == "neutrophil"), "percent": 100.0 if c == "neutrophil" else 0.0,
                      "ci95": [20.7, 100.0] if c == "neutrophil" else [0.0, 79.3]} for c in CLASSES],
         "cells_needed": {"5": 385, "10": 97}, "note": "1 cells"}]}
    return out, [a0, a1, a2, a3, h0], diff


class Elements(HTMLParser):
    """Every start tag as (tag, attrs), in document order."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def having(self, tag: str, cls: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag and (not cls or cls in (a.get("class") or "").split())]


def sections(page: str) -> list[str]:
    """The page cut at each slide's section (the header first)."""
    return re.split(r'<section class="slide"', page)


@pytest.fixture
def built(tmp_path):
    out, records, diff = example(tmp_path)
    path = write_count_report(out, records, diff)
    return path, path.read_text(encoding="utf-8"), records


def test_page_is_one_self_contained_file(built) -> None:
    path, page, _ = built
    assert path.name == "report.html" and page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I)
    assert "<link" not in page and "<script" not in page and "@import" not in page
    srcs = [a["src"] for t, a in Elements(page).tags if "src" in a]
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert [p.name for p in path.parent.iterdir() if p.suffix == ".tmp"] == []


def test_differential_numbers_and_note_appear(built) -> None:
    _, page, _ = built
    a = sections(page)[1]
    table = re.search(r'<table id="slide-1-table".*?</table>', a, re.S).group(0)
    rows = {re.sub(r"<[^>]+>", "", r[0]): r[1:] for r in
            (re.findall(r"<td[^>]*>(.*?)</td>", tr) for tr in re.findall(r"<tr>(.*?)</tr>", table)) if r}
    assert rows["neutrophil"] == ["3", "50.0 %", "18.8–81.2 %"]
    assert rows["lymphocyte"] == ["1", "16.7 %", "3.0–56.4 %"]
    assert rows["all white cells"][0] == "6"
    assert "+-10 points needs 97 cells" in a and "3 field(s) counted · 1 failed" in a
    bars = Elements(a).having("g", "bar")
    assert [b["data-class"] for b in bars] == CLASSES  # a bar per class, each labelled
    assert "50.0 % (18.8–81.2)" in a and 'class="whisker"' in a
    assert '<nav><a href="#slide-1">A</a>' in page  # a table of contents: two slides


def test_one_box_per_white_cell_in_field_pixels(built) -> None:
    _, page, records = built
    fields = [f for f in re.findall(r'<figure class="field".*?</figure>', sections(page)[1], re.S)]
    shown = [r for r in records if r["slide"] == "A" and not r["error"]]
    assert len(fields) == len(shown) == 3
    for html_, rec in zip(fields, shown, strict=True):
        el = Elements(html_)
        wbc, rbc, plt = el.having("rect", "wbc"), el.having("rect", "rbc"), el.having("rect", "platelet")
        assert len(wbc) == len(rec["cells"]) and len(rbc) + len(plt) == len(rec["others"])
        assert [float(r["x"]) for r in wbc] == [c["box"][0] for c in rec["cells"]]
        assert [r["data-label"] for r in wbc] == [c["label"] for c in rec["cells"]]
        assert el.having("svg", "")[0]["viewbox"] == f"0 0 {rec['width']} {rec['height']}"
    big = Elements(fields[1]).having("img", "")[0]["src"].split(",", 1)[1]
    assert Image.open(io.BytesIO(base64.b64decode(big))).size == (480, 360)  # 960 x 720, longest side 480


def test_gallery_groups_by_class_least_sure_first(built) -> None:
    _, page, _ = built
    cells = Elements(sections(page)[1]).having("figure", "cell")
    labels = [c["data-label"] for c in cells]
    assert list(dict.fromkeys(labels)) == CLASSES  # classes in the classifier's order
    for cls in CLASSES:
        probs = [float(c["data-prob"]) for c in cells if c["data-label"] == cls]
        assert probs == sorted(probs)
    assert [float(c["data-prob"]) for c in cells if c["data-label"] == "neutrophil"] == [0.55, 0.75, 0.91]
    assert "runner-up: monocyte" in cells[0]["title"] and "unsure" in cells[0]["class"]
    assert all("src" in a for t, a in Elements(sections(page)[1]).tags if t == "img")


def test_hostile_names_are_escaped(tmp_path) -> None:
    out, records, diff = example(tmp_path)
    records[0]["cells"][0]["label"] = '<img src=x onerror="alert(2)">'
    diff["classes"] = [*CLASSES, '<img src=x onerror="alert(2)">']
    page = write_count_report(out, records, diff, title="<b>count</b>").read_text()
    assert "<script" not in page and "<img src=x" not in page and "<b>count" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the slide's name and its image's path
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in page
    assert not [a for t, a in Elements(page).tags if any(k.startswith("on") for k in a)]


def test_missing_and_failed_fields_are_shown_not_fatal(built) -> None:
    _, page, records = built
    a = sections(page)[1]
    assert "not counted: " + records[3]["image"] + ": not an image (cannot identify image file)" in a
    gone = re.search(r'<figure class="field" data-field="2">.*?</figure>', a, re.S).group(0)
    assert "image not readable" in gone and "<img" not in gone
    assert len(Elements(gone).having("rect", "wbc")) == 1  # the boxes are still drawn on the placeholder


def test_caps_on_fields_and_cells_are_said(tmp_path, monkeypatch) -> None:
    out, records, diff = example(tmp_path)
    os.remove(out / records[1]["cells"][0]["crop"])  # a crop gone: a placeholder tile
    monkeypatch.setattr(report, "MAX_FIELDS", 2)
    monkeypatch.setattr(report, "MAX_CELLS", 4)
    a = sections(write_count_report(out, records, diff).read_text())[1]
    assert "the first 2; 1 more not shown" in a and a.count('<figure class="field"') == 2
    assert "Showing the 4 least sure of 6 white cells" in a
    assert sorted(float(c["data-prob"]) for c in Elements(a).having("figure", "cell")) == [0.4, 0.55, 0.7, 0.75]


def test_a_slide_without_cells(tmp_path) -> None:
    rec = {"slide": "empty", "image": field_jpeg(tmp_path / "e.jpg"), "field": 0, "width": 320, "height": 240,
           "error": "", "counts": {"wbc": 0, "rbc": 4}, "others": [], "cells": []}
    diff = {"classes": CLASSES, "slides": [{"slide": "empty", "fields": 1, "failed": 0, "mean_prob": None,
            "cells": 0, "classes": [{"class": c, "count": 0, "percent": None, "ci95": None} for c in CLASSES],
            "cells_needed": {"5": 385, "10": 97}, "note": "no white cell found"}]}
    page = write_count_report(tmp_path, [rec], diff).read_text()
    assert "No white cell found on this slide" in page and "nothing to chart" in page and "<nav>" not in page


# --- in a browser ----------------------------------------------------------------------------------





@pytest.mark.slow
def test_what_a_technologist_sees(browser, built) -> None:
    path, _, records = built
    page = browser.new_page(viewport={"width": 1366, "height": 800})
    errors, fetched = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: fetched.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    page.goto(path.as_uri())
    slide = page.locator("#slide-1")
    row = slide.locator("table tbody tr", has_text="neutrophil")
    assert row.locator("td").nth(1).inner_text() == "3" and row.locator("td").nth(2).inner_text() == "50.0 %"
    boxes = page.locator(".field .box.wbc")
    assert boxes.count() == sum(len(r["cells"]) for r in records)
    assert all(boxes.nth(i).is_visible() for i in range(boxes.count()))
    # the first field's first box sits where the cell is: at x0 / width of the drawn field
    frame = page.locator(".field .frame").first.bounding_box()
    box = boxes.first.bounding_box()
    x0, y0 = records[0]["cells"][0]["box"][:2]
    assert abs(box["x"] - (frame["x"] + frame["width"] * x0 / 320)) < 4
    assert abs(box["y"] - (frame["y"] + frame["height"] * y0 / 240)) < 4
    first = slide.locator('.group[data-class="neutrophil"] .cell').first
    assert first.locator("figcaption").inner_text() == "neutrophil 0.55"
    page.wait_for_function("() => [...document.images].every((i) => i.complete && i.naturalWidth > 0)",
                           timeout=10_000)
    assert page.locator("img").count() == 3 + 7  # fields drawn (one is gone) and the crops
    assert page.locator(".ph").count() == 1
    assert not errors and not fetched
    page.close()
