"""bloodcell review: the cells read from a count folder or a predict CSV, the order they are shown in,
the API that writes every decision at once (and refuses what it should), the label table it writes
as training reads it, and the page in Chromium."""

from __future__ import annotations

import csv
import errno
import random
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bloodcell.cli import main
from bloodcell.data.layouts import discover
from bloodcell.inference.review import Cell, read_cells, review_order
from bloodcell.serve.review import create_review_app

CLASSES = ["LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


def count_folder(root: Path, n: int = 12, fields: int = 4, slides: int = 1) -> Path:
    """A folder as 'bloodcell count --out' writes it: cells.csv (n cells of the three classes, each
    with its own probability) and a small JPEG crop per cell."""
    head = ["slide", "image", "cell", "x0", "y0", "x1", "y1", "score", "label", "prob", "second", "second_prob",
            "crop", *[f"p_{c}" for c in CLASSES]]
    rows = []
    for i in range(n):
        slide, field = f"slide{i % slides}", f"/fields/slide{i % slides}/f{i % fields}.png"
        crop = Path("cells") / slide / f"{i % fields:05d}_f_{i}.jpg"
        (root / crop).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (40 + 17 * (i % 12), 90, 160)).save(root / crop, quality=80)
        label, second = CLASSES[i % 3], CLASSES[(i + 1) % 3]
        prob = round(0.34 + 0.6 * ((i * 7) % n) / n, 4)
        p = {c: round((1 - prob) / 2, 4) for c in CLASSES} | {label: prob}
        rows.append(dict(zip(head, [slide, field, i, 0, 0, 10, 10, 0.9, label, prob, second, p[second], crop.as_posix(),
                                    *[p[c] for c in CLASSES]], strict=True)))
    with open(root / "cells.csv", "w", newline="") as f:
        w = csv.DictWriter(f, head)
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return count_folder(tmp_path / "counts")


def label_table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- reading and ordering ---------------------------------------------------------------------------


def test_a_count_folder_gives_its_classes_from_the_p_columns_and_each_crop_as_a_cell(folder) -> None:
    (folder / "cells" / "slide0" / "00001_f_1.jpg").unlink()
    found = read_cells(folder)
    assert found.classes == CLASSES
    assert len(found.cells) == 11 and "00001_f_1.jpg" in found.skipped[0]
    c = next(c for c in found.cells if c.id == "cells/slide0/00000_f_0.jpg")
    assert (c.label, c.field, c.slide) == ("LYMPHOCYTE", "/fields/slide0/f0.png", "slide0") and 0 < c.prob < 1


def test_a_predict_csv_gives_the_images_under_the_folder(tmp_path) -> None:
    root = tmp_path / "crops"
    root.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(root / name)
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    head = ["path", "class", "probability", "p_BAND", "p_SEG", "error"]
    rows = [[str(root / "a.png"), "SEG", "0.8", "0.2", "0.8", ""],  # absolute
            ["b.png", "BAND", "0.6", "0.6", "0.4", ""],  # relative to the folder
            ["c.png", "", "", "", "", "not an image"],  # failed: left out
            [str(tmp_path / "outside.png"), "SEG", "0.9", "0.1", "0.9", ""]]  # not under the folder
    with open(root / "preds.csv", "w", newline="") as f:
        csv.writer(f).writerows([head, *rows])
    found = read_cells(root, predictions=root / "preds.csv")
    assert found.classes == ["BAND", "SEG"]
    assert [(c.id, c.label, c.prob, c.second, c.second_prob) for c in found.cells] == [
        ("a.png", "SEG", 0.8, "BAND", 0.2), ("b.png", "BAND", 0.6, "SEG", 0.4)]
    assert len(found.skipped) == 2


def test_review_order_is_least_sure_first_taking_turns_over_classes_then_fields() -> None:
    cells = [Cell("a1", "A", 0.31, field="f1"), Cell("a2", "A", 0.32, field="f1"), Cell("a3", "A", 0.33, field="f1"),
             Cell("a4", "A", 0.35, field="f2"), Cell("b1", "B", 0.38, field="f1"), Cell("a5", "A", 0.91, field="f1"),
             Cell("b2", "B", 0.05, field="f1")]
    ids = [cells[i].id for i in review_order(cells)]
    # band 0.0-0.1 first; in band 0.3-0.4 A and B take turns, and within A fields f1 and f2 do
    assert ids == ["b2", "a1", "b1", "a4", "a2", "a3", "a5"]
    shuffled = random.Random(0).sample(cells, len(cells))
    assert [shuffled[i].id for i in review_order(shuffled)] == ids  # the input's order does not matter
    # one band: turns over everything; tiny bands: plain ascending probability
    assert [cells[i].id for i in review_order(cells, band=1.0)] == ["b2", "a1", "a4", "b1", "a2", "a3", "a5"]
    assert [cells[i].prob for i in review_order(cells, band=1e-6)] == sorted(c.prob for c in cells)


def test_review_order_bands_rise_and_certain_cells_share_the_last_band() -> None:
    rng = random.Random(1)
    cells = [Cell(f"c{i}", rng.choice("ABC"), rng.choice([0.3, 0.999, 1.0, rng.random()]), field=rng.choice("xyz"))
             for i in range(300)]
    probs = [cells[i].prob for i in review_order(cells)]
    bands = [min(int(p * 10 + 1e-9), 9) for p in probs]
    assert sorted(review_order(cells)) == list(range(300)) and bands == sorted(bands)


def test_the_random_order_is_a_seeded_shuffle_of_sure_and_unsure_cells_alike() -> None:
    rng = random.Random(2)
    cells = [Cell(f"c{i}", rng.choice("AB"), rng.random(), field=rng.choice("xyz")) for i in range(200)]
    first = [cells[i].id for i in review_order(cells, order="random")]
    assert sorted(first) == sorted(c.id for c in cells)
    assert [cells[i].id for i in review_order(cells, order="random", seed=0)] == first  # the seed fixes it
    assert [cells[i].id for i in review_order(cells, order="random", seed=1)] != first
    shuffled = rng.sample(cells, len(cells))
    assert [shuffled[i].id for i in review_order(shuffled, order="random")] == first  # not the input's order
    head = [next(c for c in cells if c.id == i).prob for i in first[:50]]
    assert min(head) < 0.2 and max(head) > 0.8  # the first cells shown span sure and unsure
    with pytest.raises(ValueError, match="unknown review order"):
        review_order(cells, order="surest")


# --- the API ----------------------------------------------------------------------------------------


def test_a_correction_is_in_labels_csv_when_the_answer_comes_and_a_new_page_shows_it(folder) -> None:
    client = TestClient(create_review_app(folder))
    data = client.get("/api/cells").json()
    assert data["classes"] == CLASSES and len(data["cells"]) == 12
    assert [c["rank"] for c in data["cells"]] == list(range(12))
    first = data["cells"][0]
    assert first["prob"] == min(c["prob"] for c in data["cells"]) and first["decision"] is None
    img = client.get("/crops/" + first["id"])
    assert img.status_code == 200 and img.content == (folder / first["id"]).read_bytes()

    to = next(c for c in CLASSES if c != first["label"])
    r = client.post("/api/label", json={"cell": first["id"], "label": to})
    assert r.status_code == 200 and r.json()["decisions"] == 1
    assert label_table(folder / "labels.csv") == [{"path": first["id"], "label": to,
                                                  "group": first["field"], "split": "train", "source": "review"}]
    other = data["cells"][1]["id"]
    assert client.post("/api/label", json={"cell": other, "label": "not_wbc"}).status_code == 200
    assert [r["path"] for r in label_table(folder / "labels.csv")] == [first["id"]]  # not a class: not there
    review = {r["path"]: r for r in label_table(folder / "review.csv")}
    assert review[other]["label"] == "not_wbc" and review[first["id"]]["predicted"] == first["label"]

    again = {c["id"]: c["decision"] for c in TestClient(create_review_app(folder)).get("/api/cells").json()["cells"]}
    assert again[first["id"]] == to and again[other] == "not_wbc"
    assert sum(v is not None for v in again.values()) == 2
    shuffled = TestClient(create_review_app(folder, order="random", seed=3)).get("/api/cells").json()
    assert shuffled["order"] == "random" and [c["id"] for c in shuffled["cells"]] != [c["id"] for c in data["cells"]]
    assert {c["id"]: c["decision"] for c in shuffled["cells"]} == again  # the same decisions, another order
    assert client.post("/api/label", json={"cell": first["id"], "label": None}).status_code == 200  # taken back
    assert label_table(folder / "labels.csv") == []


@pytest.mark.parametrize("body, status", [
    ({"cell": "cells/slide0/nope.jpg", "label": "MONOCYTE"}, 404),
    ({"cell": "../outside.jpg", "label": "MONOCYTE"}, 404),
    ({"cell": "/etc/passwd", "label": "MONOCYTE"}, 404),
    ({"cell": "cells.csv", "label": "MONOCYTE"}, 404),
    ({"cell": "cells/slide0/00000_f_0.jpg", "label": "BASOPHIL"}, 422),
    ({"cell": "cells/slide0/00000_f_0.jpg", "label": 3}, 422),
    ({"cell": "cells/slide0/00000_f_0.jpg"}, 422),
    ("cell=cells/slide0/00000_f_0.jpg&label=MONOCYTE", 415),
])
def test_a_hostile_post_is_4xx_and_writes_nothing(folder, body, status) -> None:
    (folder.parent / "outside.jpg").write_bytes(b"x")
    client = TestClient(create_review_app(folder))
    assert client.post("/api/label", json={"cell": "cells/slide0/00003_f_3.jpg", "label": "unsure"}).status_code == 200
    before = {p: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    if isinstance(body, str):
        r = client.post("/api/label", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    else:
        r = client.post("/api/label", json=body)
    assert r.status_code == status and "detail" in r.json()
    assert {p: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("path", ["../outside.jpg", "..%2Foutside.jpg", "%2e%2e/outside.jpg", "cells.csv",
                                  "cells/slide0/", "review.csv", "%2Fetc%2Fpasswd"])
def test_only_the_cells_images_are_served(folder, path) -> None:
    (folder.parent / "outside.jpg").write_bytes(b"secret")
    assert TestClient(create_review_app(folder)).get("/crops/" + path).status_code == 404


def test_a_failed_write_keeps_the_files_as_they_were_and_says_not_saved(folder, monkeypatch) -> None:
    client = TestClient(create_review_app(folder))
    cell = "cells/slide0/00000_f_0.jpg"
    assert client.post("/api/label", json={"cell": cell, "label": "MONOCYTE"}).status_code == 200
    before = (folder / "labels.csv").read_bytes(), (folder / "review.csv").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("bloodcell.runfiles.os.replace", full)  # atomic_write's last step
    r = client.post("/api/label", json={"cell": cell, "label": "NEUTROPHIL"})
    assert r.status_code == 507 and "not saved" in r.json()["detail"]
    monkeypatch.undo()
    assert ((folder / "labels.csv").read_bytes(), (folder / "review.csv").read_bytes()) == before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # no half-written file left
    assert {c["id"]: c["decision"] for c in client.get("/api/cells").json()["cells"]}[cell] == "MONOCYTE"


def test_the_labels_file_is_a_label_table_training_reads_without_the_marks(folder) -> None:
    client = TestClient(create_review_app(folder))
    cells = client.get("/api/cells").json()["cells"]
    wanted = {}
    for k, c in enumerate(cells):
        label = ["not_wbc", "unsure", c["label"], CLASSES[k % 3]][k % 4]
        assert client.post("/api/label", json={"cell": c["id"], "label": label}).status_code == 200
        wanted[str(folder / c["id"])] = (label, c["field"])
    src = discover(folder / "labels.csv")
    assert not [p for p in src.problems if p.fatal]
    assert "not_wbc" not in src.classes and "unsure" not in src.classes
    got = {it.path: (src.classes[it.label], it.group) for it in src.items}
    assert got == {p: (lab, f"group/{field}") for p, (lab, field) in wanted.items()
                   if lab not in ("not_wbc", "unsure")}
    assert len(got) == 6


def test_a_labels_csv_not_written_by_a_review_is_not_overwritten(folder) -> None:
    (folder / "labels.csv").write_text("path,label\nx.jpg,A\n")
    with pytest.raises(Exception, match="not written by a review"):
        create_review_app(folder)
    assert (folder / "labels.csv").read_text() == "path,label\nx.jpg,A\n"


def test_a_folder_with_nothing_to_review_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    assert main(["review", str(tmp_path), "--no-browser"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bloodcell: error: ") and "cells.csv" in err[0]
    assert main(["review", str(tmp_path), "--predictions", "nope.csv", "--no-browser"]) == 2
    (tmp_path / "cells.csv").write_text("slide,image\n")
    assert main(["review", str(tmp_path), "--no-browser"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("bloodcell: error: ") for e in err)


# --- the page in Chromium -----------------------------------------------------------------------------




def _written_after(path: Path, cell: str, label: str, t0_ns: int, timeout: float = 5.0) -> float:
    """Seconds from ``t0_ns`` (time.time_ns) to the write that put ``cell`` in labels.csv as ``label``:
    the file's modification time, once the file holds it (the kernel's clock for file times is
    coarse: a few milliseconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and any(r["path"] == cell and r["label"] == label for r in label_table(path)):
            return (path.stat().st_mtime_ns - t0_ns) / 1e9
        time.sleep(0.002)
    raise AssertionError(f"{path} never held {cell} as {label}")


@pytest.mark.slow
def test_a_person_clicks_a_cell_presses_a_number_and_sees_and_saves_it(browser, folder) -> None:
    from bloodcell.serve.app import serving

    with serving(create_review_app(folder)) as url:
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector(".cell", timeout=10_000)
        assert page.locator(".cell").count() == 12
        assert page.locator("#legend li").nth(1).inner_text().split() == ["2", "MONOCYTE"]
        lymph = page.locator("section[data-label='LYMPHOCYTE'] .cell")
        assert lymph.count() == 4
        shown = [float(t.split()[0]) for t in lymph.locator(".p").all_inner_texts()]
        assert shown == sorted(shown)  # least sure first
        assert "12 cells, least sure first" in page.locator("#where").inner_text()
        mono_corrected = page.locator("#diff tr[data-label='MONOCYTE'] td.corr b")
        assert mono_corrected.inner_text() == "4"

        cell = lymph.first
        cell_id = cell.get_attribute("data-id")
        cell.click()
        assert "sel" in cell.get_attribute("class")
        t0 = time.time_ns()
        page.keyboard.press("2")
        latency = _written_after(folder / "labels.csv", cell_id, "MONOCYTE", t0)
        moved = page.locator(f"section[data-label='MONOCYTE'] .cell[data-id='{cell_id}']")
        assert moved.count() == 1 and lymph.count() == 3
        assert mono_corrected.inner_text() == "5"
        assert page.locator("#diff tr[data-label='LYMPHOCYTE'] td.corr b").inner_text() == "3"
        assert page.locator("#diff tr[data-label='LYMPHOCYTE'] td.pre b").inner_text() == "4"
        assert "reviewed 1 of 12" in page.locator("#progress").inner_text()
        assert page.locator("#diff tr[data-label='MONOCYTE'] td.lab b").inner_text() == "1"  # labelled so far
        assert page.locator("#diff tr[data-label='LYMPHOCYTE'] td.lab b").inner_text() == "0"
        print(f"\nkey press to labels.csv written: {1000 * latency:.1f} ms")
        assert latency < 1.0

        page.keyboard.press("x")  # the next cell, selected on its own: not a white cell
        page.wait_for_function("() => document.querySelectorAll(\"section[data-label='not_wbc'] .cell\").length == 1")
        page.reload()
        page.wait_for_selector(f"section[data-label='MONOCYTE'] .cell[data-id='{cell_id}']", timeout=10_000)
        assert page.locator("section[data-label='not_wbc'] .cell").count() == 1  # nothing lost on reload
        assert "error" not in (page.locator("#status").get_attribute("class") or "") and not errors
        page.close()


@pytest.mark.slow
def test_two_thousand_cells_load_and_a_key_updates_the_page_at_once(browser, tmp_path) -> None:
    from bloodcell.serve.app import serving

    folder = count_folder(tmp_path / "big", n=2000, fields=200, slides=2)
    with serving(create_review_app(folder)) as url:
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        t0 = time.perf_counter()
        page.goto(url + "/")
        page.wait_for_function("() => document.querySelectorAll('.cell').length == 2000 && "
                               "document.querySelector('#progress').textContent.length > 0")
        load = time.perf_counter() - t0
        page.locator("section[data-label='NEUTROPHIL'] .cell").nth(5).click()
        cell_id = page.locator(".cell.sel").get_attribute("data-id")
        # the key's own work (handler: the cell moved, the differential redrawn, the save sent), and
        # until the frame after it has been drawn, measured inside the page; the file by its time
        t0 = time.time_ns()
        handler_ms, frame_ms = page.evaluate("""() => new Promise(done => {
            const t = performance.now();
            document.dispatchEvent(new KeyboardEvent('keydown', {key: '1', bubbles: true}));
            const handled = performance.now() - t;
            requestAnimationFrame(() => setTimeout(() => done([handled, performance.now() - t]), 0));
        })""")
        written = _written_after(folder / "labels.csv", cell_id, "LYMPHOCYTE", t0)
        assert page.locator(f"section[data-label='LYMPHOCYTE'] .cell[data-id='{cell_id}']").count() == 1
        loaded = page.evaluate("() => [...document.images].filter(i => i.complete && i.naturalWidth).length")
        print(f"\n2000 cells: page loaded in {1000 * load:.0f} ms ({loaded} images fetched, lazily); key handled in "
              f"{handler_ms:.1f} ms, next frame drawn after {frame_ms:.1f} ms; labels.csv written {1000 * written:.1f} "
              "ms after the key")
        assert load < 5 and frame_ms < 1000 and written < 2 and loaded < 1000  # a busy 2-core machine: ~10x slower
        page.close()
