"""The block document: one set of blocks, rendered to a self-contained HTML page and to Markdown."""

from __future__ import annotations

import io

from PIL import Image

from bloodcell.report.document import Block, Columns, Details, Figure, Table, render_html, render_md


def tiny_png(width: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, 20), "#0072B2").save(buf, format="PNG")
    return buf.getvalue()


def test_new_blocks_render_in_html_and_markdown(tmp_path):
    png = tiny_png()
    blocks = [Block("h2", "Part", id="part"),
              Table(["n", "text"], [["1", "x|y"], ["2", "z"]], numeric={0}, marked={1}),
              Details("The whole `config`", "key: value\n"),
              Columns([Figure("f", png, alt="a figure"), Block("note", "image_size was fixed at 32")])]
    page = render_html(blocks, "Title", footer="made by `x`", doc_title="browser title", css="tr.best{}")
    assert "<title>browser title</title>" in page and "<h1>Title</h1></header>" in page
    assert "<nav>" not in page and 'class="sub"' not in page  # neither given
    assert "<tr><td class=\"num\">1</td><td>x|y</td></tr>" in page
    assert '<tr class="best"><td class="num">2</td><td>z</td></tr>' in page
    assert ("<details><summary>The whole <code>config</code></summary>"
            "<pre><code>key: value\n</code></pre></details>") in page
    assert '<div class="columns"><div><figure><img src="data:image/png;base64,' in page
    assert 'alt="a figure" width="30"></figure></div><div><p class="note">image_size was fixed at 32</p></div></div>' in page
    assert "<footer>made by <code>x</code></footer>" in page and "tr.best{}</style>" in page

    md = render_md(blocks, "Title", "sub", tmp_path / "figures")
    assert md.startswith("# Title\n\nsub\n\n## Part\n\n")
    assert "| 1 | x\\|y |" in md and "| **2** | z |" in md  # the marked row in bold
    assert "The whole `config`\n\n```\nkey: value\n```" in md
    assert "![a figure](figures/f.png)" in md and "*image_size was fixed at 32*" in md
    assert (tmp_path / "figures" / "f.png").read_bytes() == png
