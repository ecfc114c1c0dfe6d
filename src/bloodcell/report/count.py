"""The count report: DIR/report.html of a ``bloodcell count`` folder, what a technologist reviews.

Per slide: the differential (count, percent and Wilson 95 % interval per class, the note on how many
cells the precision needs, fields counted and failed), the percentages as bars with their intervals
as whiskers (inline SVG), the fields with their boxes drawn (a JPEG thumbnail under an SVG overlay in
the field's own pixels: white cells strong and named, red cells and platelets thin and faint; the
first MAX_FIELDS), and the gallery of white cells by predicted class, least sure first (the
MAX_CELLS least sure of a slide), the runner-up on hover. The fields that could not be read are
listed under their slide. One self-contained page: every image a base64 JPEG, no script, nothing
fetched; every name from a file or a class is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path

from PIL import Image

from bloodcell.data.images import open_image, to_rgb
from bloodcell.report.document import Block, Cell, Table, render_html, table_html
from bloodcell.report.figures import PALETTE
from bloodcell.runfiles import atomic_write

FIELD_SIDE = 480  # a field thumbnail's longest side, px
THUMB = 96  # a gallery cell's side, px
MAX_FIELDS = 30  # fields drawn per slide
MAX_CELLS = 2000  # gallery cells per slide
SHOWN = 360  # about the width a field is shown at, px: sizes its labels
UNSURE = 0.6  # a gallery cell below this probability is marked for a second look
FOOTER = ("Built by `bloodcell count` from differential.json and the field records. Boxes are drawn in "
          "the field's own pixels; the gallery puts the least sure cells of each class first.")

CSS = """
.summary{color:var(--muted);font-size:.9rem;margin:.2em 0 .8em}
.diff{display:flex;flex-wrap:wrap;gap:10px 28px;align-items:flex-start}
.chart{max-width:100%;height:auto}
.chart text{font-size:12px;fill:var(--fg)}
.chart .tick{fill:var(--muted);font-size:11px}
.chart .grid{stroke:#e5e7eb}
.chart .whisker{stroke:#1f2328;stroke-width:1.4}
.failed{color:#9a3412;font-size:.88rem}
.fields{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px;margin:10px 0}
.field{margin:0}
.frame{position:relative;line-height:0;border-radius:6px;overflow:hidden;background:#e5e7eb}
.frame img{display:block;width:100%;height:auto}
.frame .ph{display:flex;align-items:center;justify-content:center;line-height:1.4;color:#4b5563;
 font-size:.85rem}
.frame svg{position:absolute;inset:0;width:100%;height:100%}
.box{fill:none;vector-effect:non-scaling-stroke}
.box.wbc{stroke:#00c853;stroke-width:2.5}
.box.rbc{stroke:#b91c1c;stroke-opacity:.35;stroke-width:1}
.box.platelet{stroke:#6d28d9;stroke-opacity:.5;stroke-width:1}
.tag{fill:#064e3b;stroke:#fff;paint-order:stroke;font-weight:700}
.field figcaption{font-size:.8rem;line-height:1.35;word-break:break-all}
h4{font-size:.98rem;margin:1.2em 0 .4em}
.cells{display:flex;flex-wrap:wrap;gap:8px}
.cell{margin:0;width:104px;text-align:center;font-size:.75rem;line-height:1.3}
.cell img,.cell .ph{display:block;width:96px;height:96px;margin:0 auto 2px;border-radius:4px;
 object-fit:cover;background:#e5e7eb;border:2px solid transparent}
.cell.unsure img{border-color:#d97706}
.cell.unsure figcaption{color:#b45309;font-weight:600}
"""


def write_count_report(out: Path, records: list[dict], diff: dict, title: str = "bloodcell count") -> Path:
    """Write out/'report.html' (self-contained: every image inline) and return its path."""
    out = Path(out)
    classes = list(diff.get("classes") or [])
    sdiffs = {s["slide"]: s for s in diff.get("slides", [])}
    names = list(dict.fromkeys([*sdiffs, *(r["slide"] for r in records)]))
    blocks, nav = [], []
    for k, name in enumerate(names, 1):
        anchor = f"slide-{k}"
        nav.append((anchor, name))
        mine = [r for r in records if r["slide"] == name]
        blocks += slide_blocks(anchor, name, sdiffs.get(name, {}), mine, classes, out)
    fields = sum(1 for r in records if not r.get("error"))
    sub = " · ".join(x for x in (f"model: `{diff['model']}`" if diff.get("model") else "",
                                 f"detector: `{diff['detector']}`" if diff.get("detector") else "",
                                 f"{len(names)} slide(s), {fields} field(s) counted") if x)
    page = render_html(blocks, title, sub, nav=nav if len(names) > 1 else (), footer=FOOTER, css=CSS)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write(out / "report.html", page)


def slide_blocks(anchor: str, name: str, sd: dict, recs: list[dict], classes: list[str], out: Path) -> list:
    """One slide's section: differential table and chart, fields not counted, fields, gallery."""
    labels = [c["label"] for r in recs for c in r.get("cells", [])]
    names = list(dict.fromkeys([*classes, *(r["class"] for r in sd.get("classes", [])), *labels]))
    colour = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(names)}
    detected: dict[str, int] = {}
    for r in recs:
        for c, n in (r.get("counts") or {}).items():
            detected[c] = detected.get(c, 0) + int(n)
    counted = sd.get("fields", sum(1 for r in recs if not r.get("error")))
    failed = sd.get("failed", sum(1 for r in recs if r.get("error")))
    bits = [f"{counted} field(s) counted", f"{failed} failed"]
    if sd.get("mean_prob") is not None:
        bits.append(f"mean probability {sd['mean_prob']:.2f}")
    if detected:
        bits.append("detected: " + ", ".join(f"{n:,} {c}" for c, n in detected.items()))
    parts = [f'<p class="summary">{html.escape(" · ".join(bits))}</p>', '<div class="diff">',
             table_html(diff_table(sd, colour, f"{anchor}-table")), bar_chart(sd, colour), "</div>"]
    if sd.get("note"):
        parts.append(f'<p class="note">{html.escape(sd["note"])}</p>')
    bad = [r for r in recs if r.get("error")]
    if bad:
        parts.append('<ul class="failed">' + "".join(
            f"<li>not counted: {html.escape(str(r['image']))}: {html.escape(str(r['error']))}</li>" for r in bad)
            + "</ul>")
    good = [r for r in recs if not r.get("error")]
    more = f" (the first {MAX_FIELDS}; {len(good) - MAX_FIELDS} more not shown)" if len(good) > MAX_FIELDS else ""
    parts.append(f"<h3>Fields{more}</h3>")
    parts.append('<div class="fields">' + "".join(field_html(r) for r in good[:MAX_FIELDS]) + "</div>")
    parts.append(gallery_html(recs, names, colour, out))
    body = "\n".join(parts)
    return [Block("html", "", html=f'<section class="slide" id="{anchor}" data-slide="{html.escape(name)}">'
                                   f"<h2>Slide {html.escape(name)}</h2>\n{body}\n</section>")]


def _pct(x) -> str:
    return "–" if x is None else f"{x:.1f} %"


def diff_table(sd: dict, colour: dict, tid: str) -> Table:
    """Class, count, percent and the Wilson 95 % interval; the total last."""
    rows = []
    for r in sd.get("classes", []):
        ci = r.get("ci95")
        sw = f'<span class="swatch" style="background:{colour[r["class"]]}"></span>'
        rows.append([Cell(r["class"], sw + html.escape(r["class"])), f"{r['count']:,}", _pct(r.get("percent")),
                     f"{ci[0]:.1f}–{ci[1]:.1f} %" if ci else "–"])
    rows.append(["all white cells", f"{sd.get('cells', 0):,}", "100.0 %" if sd.get("cells") else "–", ""])
    return Table(["Class", "Count", "Percent", "95 % interval (Wilson)"], rows, numeric={1, 2, 3}, id=tid,
                 compact=True)


def bar_chart(sd: dict, colour: dict) -> str:
    """The percentages as horizontal bars, each 95 % interval a whisker, each bar labelled."""
    rows = [r for r in sd.get("classes", []) if r.get("percent") is not None]
    if not rows:
        return '<p class="note">No white cell found: nothing to chart.</p>'
    left, plot, right, row, top = 130, 300, 160, 26, 8
    hi = max(max(r["percent"], (r.get("ci95") or [0, 0])[1]) for r in rows)
    xmax = min(100, max(10, math.ceil(hi / 10) * 10))
    step = next(s for s in (5, 10, 20, 25) if xmax / s <= 6)
    x = lambda v: left + plot * v / xmax  # noqa: E731
    h = top + row * len(rows) + 22
    svg = [f'<svg class="chart" role="img" aria-label="percent of white cells per class, with 95 % intervals" '
           f'width="{left + plot + right}" height="{h}" viewBox="0 0 {left + plot + right} {h}">']
    for t in range(0, xmax + 1, step):
        svg.append(f'<line class="grid" x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{h - 18}"/>'
                   f'<text class="tick" x="{x(t):.1f}" y="{h - 4}" text-anchor="middle">{t} %</text>')
    for i, r in enumerate(rows):
        y, name = top + i * row, html.escape(r["class"])
        ci = r.get("ci95")
        end = x(max(r["percent"], ci[1] if ci else 0))
        label = _pct(r["percent"]) + (f" ({ci[0]:.1f}–{ci[1]:.1f})" if ci else "")
        svg.append(f'<g class="bar" data-class="{name}"><text x="{left - 8}" y="{y + 17}" text-anchor="end">'
                   f'{name}</text><rect x="{left}" y="{y + 5}" width="{x(r["percent"]) - left:.1f}" height="15" '
                   f'fill="{colour[r["class"]]}"><title>{name}: {label}</title></rect>')
        if ci:
            a, b, m = x(ci[0]), x(ci[1]), y + 12.5
            svg.append(f'<path class="whisker" d="M{a:.1f} {m}H{b:.1f}M{a:.1f} {m - 5}v10M{b:.1f} {m - 5}v10"/>')
        svg.append(f'<text x="{end + 6:.1f}" y="{y + 17}">{label}</text></g>')
    return "".join(svg) + "</svg>"


def _jpeg_uri(path: Path, side: int) -> tuple[str, int, int] | None:
    """A picture file as a data: URI of a JPEG whose longest side is at most ``side``, and its full
    size; None when it cannot be read (moved, truncated, not an image)."""
    try:
        with open_image(path) as im:
            size = im.size
            im.draft("RGB", (side, side))  # JPEG: decode at a fraction of the size, much faster
            im = to_rgb(im)
            im.thumbnail((side, side), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=82)
    except Exception:  # noqa: BLE001 - any unreadable picture is a placeholder, never a failed report
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), *size


def _kind(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "_"


def field_html(rec: dict) -> str:
    """A field's thumbnail (or a placeholder) under an SVG of its boxes in the field's own pixels."""
    pic = _jpeg_uri(Path(rec["image"]), FIELD_SIDE)
    w = int(rec.get("width") or (pic[1] if pic else 0) or 400)
    h = int(rec.get("height") or (pic[2] if pic else 0) or 300)
    name = html.escape(Path(str(rec["image"])).name)
    if pic:
        under = f'<img src="{pic[0]}" alt="field {rec.get("field", "")}: {name}">'
    else:
        under = f'<div class="ph" style="aspect-ratio:{w}/{h}">image not readable</div>'
    scale = SHOWN / w  # screen px per field px: the thumbnail fills its grid cell, about SHOWN px wide
    font = 12 / scale
    boxes, tags = [], []
    for o in rec.get("others") or []:
        x0, y0, x1, y1 = o["box"]
        boxes.append(f'<rect class="box {_kind(str(o["class"]))}" x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" '
                     f'height="{y1 - y0:.1f}"/>')
    for c in rec.get("cells") or []:
        x0, y0, x1, y1 = c["box"]
        lab = html.escape(c["label"])
        tip = f"{lab} {c['prob']:.2f} (runner-up {html.escape(c.get('second', ''))} {c.get('second_prob', 0):.2f})"
        boxes.append(f'<rect class="box wbc" data-label="{lab}" x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" '
                     f'height="{y1 - y0:.1f}"><title>{tip}</title></rect>')
        ty = y0 - font * 0.3 if y0 > font * 1.2 else y1 + font
        at = f'x="{x1:.1f}" text-anchor="end"' if x0 > 0.6 * w else f'x="{max(x0, 0):.1f}"'
        tags.append(f'<text {at} y="{ty:.1f}">{lab}</text>')
    svg = (f'<svg viewBox="0 0 {w} {h}" preserveAspectRatio="none" aria-hidden="true">{"".join(boxes)}'
           f'<g class="tag" font-size="{font:.1f}" stroke-width="{3 / scale:.1f}">{"".join(tags)}</g></svg>')
    counts = rec.get("counts") or {}
    tally = ", ".join(f"{n} {html.escape(str(c))}" for c, n in counts.items()) or "nothing detected"
    return (f'<figure class="field" data-field="{rec.get("field", "")}"><div class="frame">{under}{svg}</div>'
            f'<figcaption title="{html.escape(str(rec["image"]))}">field {rec.get("field", "")} · {name} · '
            f'{tally}</figcaption></figure>')


def gallery_html(recs: list[dict], names: list[str], colour: dict, out: Path) -> str:
    """The white cells by predicted class (in the classifier's order), least sure first in each."""
    cells = sorted((c for r in recs for c in r.get("cells") or []), key=lambda c: c["prob"])
    head = "<h3>White cells by class, least sure first</h3>"
    if len(cells) > MAX_CELLS:
        head += (f'<p class="note">Showing the {MAX_CELLS:,} least sure of {len(cells):,} white cells '
                 f"(cells.csv lists them all).</p>")
        cells = cells[:MAX_CELLS]
    if not cells:
        return head + '<p class="note">No white cell found on this slide.</p>'
    parts = [head]
    for cls in names:
        mine = [c for c in cells if c["label"] == cls]
        if not mine:
            continue
        name = html.escape(cls)
        parts.append(f'<div class="group" data-class="{name}"><h4><span class="swatch" style="background:'
                     f'{colour[cls]}"></span>{name} · {len(mine):,}</h4><div class="cells">')
        for c in mine:
            pic = _jpeg_uri(out / str(c.get("crop", "")), THUMB) if c.get("crop") else None
            img = f'<img src="{pic[0]}" alt="{name}">' if pic else '<div class="ph"></div>'
            tip = html.escape(f"runner-up: {c.get('second', '')} {c.get('second_prob', 0):.2f}")
            unsure = " unsure" if c["prob"] < UNSURE else ""
            parts.append(f'<figure class="cell{unsure}" data-label="{name}" data-prob="{c["prob"]:.4f}" '
                         f'title="{tip}">{img}<figcaption>{name} {c["prob"]:.2f}</figcaption></figure>')
        parts.append("</div></div>")
    return "".join(parts)
