"""A report as a list of blocks, and the one renderer pair: render_html (a self-contained page) and
render_md (Markdown, its figures as PNG files beside it). Both render the same blocks, so the two
files hold the same tables.

Blocks: ``Block`` (a heading, a paragraph, a note, a banner, preformatted text or raw HTML),
``Table``, ``Figure`` (PNG bytes), ``Details`` (a folded block of preformatted text) and
``Columns`` (blocks side by side where the screen is wide). Text is Markdown-light: **bold** and
`code` become <strong> and <code> in HTML; everything else is escaped.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from bloodcell.runfiles import atomic_write


@dataclass
class Cell:
    """A table cell: Markdown/plain text and, where it differs, its HTML."""

    text: str
    html: str | None = None


@dataclass
class Table:
    headers: list[str]
    rows: list[list]
    numeric: set[int] = field(default_factory=set)  # right-aligned columns
    id: str | None = None
    caption: str | None = None
    compact: bool = False  # as wide as its content, not the page
    marked: set[int] = field(default_factory=set)  # rows (by index) drawn highlighted: class "best"


@dataclass
class Figure:
    name: str  # file stem in figures/
    png: bytes
    alt: str
    caption: str = ""

    @property
    def width(self) -> int:
        """The PNG's width in pixels (from its header): shown at that size, narrower on small screens."""
        return int.from_bytes(self.png[16:20], "big")


@dataclass
class Block:
    kind: str  # h2, h3, p, note, pre, banner, html
    text: str
    html: str | None = None
    id: str | None = None


@dataclass
class Details:
    """Preformatted text folded under a one-line summary (HTML ``<details>``)."""

    summary: str
    text: str


@dataclass
class Columns:
    """Blocks side by side on a wide screen, one under the other on a narrow one."""

    items: list


def stylesheet(name: str = "style.css") -> str:
    """A stylesheet shipped beside this module (report/*.css)."""
    return resources.files("bloodcell.report").joinpath(name).read_text(encoding="utf-8")


def inline(text: str) -> str:
    """Escape, then **bold** and `code` to HTML."""
    s = html.escape(text, quote=False)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def _md_cell(c) -> str:
    text = c.text if isinstance(c, Cell) else str(c)
    return text.replace("|", "\\|").replace("\n", " ")


def _html_cell(c) -> str:
    return c.html if isinstance(c, Cell) and c.html is not None else html.escape(
        c.text if isinstance(c, Cell) else str(c))


def table_html(t: Table) -> str:
    """A table in a horizontally scrolling wrapper (narrow screens)."""
    def cls(i: int) -> str:
        return ' class="num"' if i in t.numeric else ""

    head = "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(t.headers))
    body = "\n".join(("<tr class=\"best\">" if j in t.marked else "<tr>")
                     + "".join(f"<td{cls(i)}>{_html_cell(c)}</td>" for i, c in enumerate(r))
                     + "</tr>" for j, r in enumerate(t.rows))
    idattr = (f' id="{t.id}"' if t.id else "") + (' class="compact"' if t.compact else "")
    cap = f"<caption>{inline(t.caption)}</caption>" if t.caption else ""
    wrap = "table-wrap compact" if t.compact else "table-wrap"
    return (f'<div class="{wrap}"><table{idattr}>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>\n{body}\n</tbody></table></div>")


def table_md(t: Table) -> str:
    """A GitHub-flavoured Markdown table (a marked row's first cell in bold)."""
    align = ["---:" if i in t.numeric else ":---" for i in range(len(t.headers))]
    lines = ["| " + " | ".join(_md_cell(h) for h in t.headers) + " |", "| " + " | ".join(align) + " |"]
    for j, r in enumerate(t.rows):
        cells = [_md_cell(c) for c in r]
        if j in t.marked and cells:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return ("*" + t.caption + "*\n\n" if t.caption else "") + "\n".join(lines)


def block_html(b) -> str:
    """One block as HTML."""
    if isinstance(b, Table):
        return table_html(b)
    if isinstance(b, Figure):
        uri = "data:image/png;base64," + base64.b64encode(b.png).decode("ascii")
        w = f' width="{b.width}"' if b.width else ""
        cap = f"<figcaption>{inline(b.caption)}</figcaption>" if b.caption else ""
        return f'<figure><img src="{uri}" alt="{html.escape(b.alt)}"{w}>{cap}</figure>'
    if isinstance(b, Details):
        return (f"<details><summary>{inline(b.summary)}</summary>"
                f"<pre><code>{html.escape(b.text)}</code></pre></details>")
    if isinstance(b, Columns):
        return '<div class="columns">' + "".join(f"<div>{block_html(x)}</div>" for x in b.items) + "</div>"
    if b.kind in ("h2", "h3"):
        idattr = f' id="{b.id}"' if b.id else ""
        return f"<{b.kind}{idattr}>{b.html or html.escape(b.text)}</{b.kind}>"
    if b.kind == "pre":
        return f"<pre><code>{html.escape(b.text)}</code></pre>"
    if b.kind == "html":
        return b.html or ""
    cls = {"note": ' class="note"', "banner": ' class="banner" role="alert"'}.get(b.kind, "")
    idattr = f' id="{b.id}"' if b.id else ""
    return f"<p{cls}{idattr}>{inline(b.text)}</p>"


def render_html(blocks: list, title: str, sub: str = "", *, nav=(), footer: str = "",
                doc_title: str | None = None, css: str = "") -> str:
    """One self-contained HTML page: ``nav`` is (id, label) pairs, ``footer`` and ``sub`` are
    Markdown-light text, ``doc_title`` the browser's title (default: ``title``), ``css`` rules added
    after style.css."""
    parts = [block_html(b) for b in blocks]
    links = " ".join(f'<a href="#{i}">{html.escape(t)}</a>' for i, t in nav)
    head = f"<header><h1>{html.escape(title)}</h1>"
    head += f'<div class="sub">{inline(sub)}</div>' if sub else ""
    head += f"<nav>{links}</nav>" if nav else ""
    foot = f"<footer>{inline(footer)}</footer>\n" if footer else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(doc_title or title)}</title>\n<style>\n{stylesheet()}{css}</style>\n"
            f"</head>\n<body>\n<main>\n{head}</header>\n" + "\n".join(parts)
            + f"\n{foot}</main>\n</body>\n</html>\n")


def block_md(b, figdir: Path) -> str:
    """One block as Markdown; a figure is written to figdir and linked relatively."""
    if isinstance(b, Table):
        return table_md(b)
    if isinstance(b, Figure):
        atomic_write(figdir / f"{b.name}.png", b.png)
        cap = f"\n\n*{b.caption}*" if b.caption else ""
        return f"![{b.alt}]({figdir.name}/{b.name}.png){cap}"
    if isinstance(b, Details):
        return f"{b.summary}\n\n```\n{b.text.rstrip()}\n```"
    if isinstance(b, Columns):
        return "\n\n".join(block_md(x, figdir) for x in b.items)
    if b.kind == "h2":
        return f"## {b.text}"
    if b.kind == "h3":
        return f"### {b.text}"
    if b.kind == "pre":
        return f"```\n{b.text}\n```"
    if b.kind == "banner":
        return f"> ⚠️ {b.text}"
    if b.kind == "note":
        return f"*{b.text}*" if "*" not in b.text else b.text
    return b.text


def render_md(blocks: list, title: str, sub: str, figdir: Path) -> str:
    """Markdown with the same tables; figures written to figdir and linked relatively."""
    figdir.mkdir(parents=True, exist_ok=True)
    return "\n\n".join([f"# {title}", sub, *(block_md(b, figdir) for b in blocks)]) + "\n"
