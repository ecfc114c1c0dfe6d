"""Box data sets (VOC, YOLO, CSV): what is read, what is wrong, how fields are split; detection metrics."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import real_folder
from PIL import Image

from bloodcell.cli import main
from bloodcell.data.boxes import canonical, discover_boxes, format_summary, summary
from bloodcell.errors import BloodcellError
from bloodcell.metrics import best_threshold, box_iou, detection_scores, differential


def field(path, size=(200, 150)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (230, 190, 200)).save(path)
    return path


def yolo(root, rows_by_image, classes=("WBC", "RBC", "Platelet"), split="train"):
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "classes.txt").write_text("\n".join(classes) + "\n")
    for name, rows in rows_by_image.items():
        field(root / "images" / split / f"{name}.jpg")
        if rows is not None:
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{name}.txt").write_text("\n".join(rows) + "\n")
    return root


def test_yolo_rows_become_pixel_boxes_with_one_spelling_per_class(tmp_path):
    root = yolo(tmp_path / "y", {"a": ["0 0.5 0.5 0.2 0.4", "1 0.1 0.1 0.1 0.1"]})
    bs = discover_boxes(root)
    assert bs.layout == "yolo" and bs.classes == ["wbc", "rbc", "platelet"]
    (f,) = bs.fields
    assert f.split == "train" and (f.width, f.height) == (200, 150)
    np.testing.assert_allclose(f.boxes[0], [80, 45, 120, 105], atol=1e-3)
    assert f.labels == ["wbc", "rbc"]


def test_every_kind_of_bad_box_is_reported_and_dropped_or_clipped(tmp_path):
    root = yolo(tmp_path / "y", {
        "a": ["0 0.5 0.5 0.2 0.2", "0 0.5 0.5 0.2 0.2",  # a repeat
              "7 0.5 0.5 0.1 0.1",  # a class classes.txt does not name
              "1 0.5 0.5 0 0.1",  # no area
              "1 1.5 1.5 0.1 0.1",  # wholly outside
              "1 0.98 0.5 0.2 0.2",  # reaching out: clipped
              "x y"],  # not a row
        "b": None})  # an image with no box file
    bs = discover_boxes(root)
    kinds = {p.kind for p in bs.problems}
    assert kinds == {"duplicate_box", "unknown_class", "empty_box", "box_outside", "box_clipped", "bad_row",
                     "no_box_file"}
    (f,) = bs.fields  # b is left out: a missing box file is no proof of an empty field
    assert f.labels == ["wbc", "rbc"]
    assert f.boxes[1, 2] == 200  # clipped to the image's right edge
    text = format_summary(summary(bs))
    assert "no box file" in text and "warning" in text


def test_a_yolo_folder_without_classes_txt_is_one_clear_error(tmp_path):
    root = yolo(tmp_path / "y", {"a": ["0 0.5 0.5 0.2 0.2"]})
    (root / "labels" / "classes.txt").unlink()
    with pytest.raises(BloodcellError, match="classes.txt"):
        discover_boxes(root)


def test_voc_layout_reads_boxes_and_field_types(tmp_path):
    root = tmp_path / "voc"
    field(root / "JPEGImages" / "BloodImage_00001.jpg", (640, 480))
    field(root / "JPEGImages" / "BloodImage_00002.jpg", (640, 480))
    (root / "Annotations").mkdir()
    (root / "Annotations" / "BloodImage_00001.xml").write_text(
        "<annotation><size><width>640</width><height>480</height></size>"
        "<object><name>WBC</name><bndbox><xmin>10</xmin><ymin>20</ymin><xmax>110</xmax><ymax>140</ymax></bndbox></object>"
        "<object><name>Platelets</name><bndbox><xmin>300</xmin><ymin>300</ymin><xmax>320</xmax><ymax>318</ymax></bndbox></object>"
        "</annotation>")
    (root / "labels.csv").write_text(",Image,Category\n,1,NEUTROPHIL\n,2,\"LYMPHOCYTE, MONOCYTE\"\n")
    bs = discover_boxes(root)
    assert bs.layout == "voc" and bs.classes == ["wbc", "platelet"]
    assert [p.kind for p in bs.problems] == ["no_box_file"]
    assert bs.field_types[str(root / "JPEGImages" / "BloodImage_00001.jpg")] == ["neutrophil"]
    assert bs.field_types[str(root / "JPEGImages" / "BloodImage_00002.jpg")] == ["lymphocyte", "monocyte"]


@pytest.mark.parametrize("header,row,units", [
    ("image,x0,y0,x1,y1,label", "f.jpg,20,30,60,90,WBC", "auto"),
    ("image,x0_frac,y0_frac,x1_frac,y1_frac,label", "f.jpg,0.1,0.2,0.3,0.6,WBC", "auto"),
    ("image,x0,y0,x1,y1,label", "f.jpg,0.1,0.2,0.3,0.6,WBC", "fractions"),
])
def test_csv_boxes_in_pixels_or_fractions(tmp_path, header, row, units):
    field(tmp_path / "f.jpg")
    (tmp_path / "boxes.csv").write_text(f"{header}\n{row}\n")
    (f,) = discover_boxes(tmp_path / "boxes.csv", units=units).fields
    np.testing.assert_allclose(f.boxes[0], [20, 30, 60, 90], atol=1e-3)


def test_csv_header_that_names_no_box_is_one_clear_error(tmp_path):
    (tmp_path / "boxes.csv").write_text("file,label\na.jpg,WBC\n")
    with pytest.raises(BloodcellError, match="image,x0,y0,x1,y1,label"):
        discover_boxes(tmp_path / "boxes.csv")


def test_fields_without_a_split_are_split_by_field_the_same_way_every_time(tmp_path):
    rows = "\n".join(f"f{i}.jpg,1,1,9,9,wbc" for i in range(60))
    for i in range(60):
        field(tmp_path / f"f{i}.jpg", (20, 20))
    (tmp_path / "b.csv").write_text("image,x0,y0,x1,y1,label\n" + rows)
    a = {f.path: f.split for f in discover_boxes(tmp_path / "b.csv").fields}
    b = {f.path: f.split for f in discover_boxes(tmp_path / "b.csv").fields}
    assert a == b and set(a.values()) == {"train", "val", "test"}


def test_canonical_names():
    assert canonical(" White  Blood Cell ") == "wbc" and canonical("Platelets") == "platelet"
    assert canonical("Lymphocyte") == "lymphocyte"


def test_data_check_reads_a_box_set(tmp_path, capsys):
    root = yolo(tmp_path / "y", {"a": ["0 0.5 0.5 0.2 0.2", "0 0.5 0.5 0.2 0.2"]})
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "yolo boxes" in out and "repeating another box" in out


def test_real_box_sets_read_as_their_readme_counts():
    raabin = discover_boxes(real_folder("smears", "raabin"))
    assert sum(f.count("wbc") for f in raabin.fields) == 261
    assert {s: len(raabin.split(s)) for s in ("train", "val", "test")} == {"train": 175, "val": 50, "test": 25}
    bccd = discover_boxes(real_folder("blood-cells", "dataset-master"))
    # measured: this copy's VOC files box red cells only; 24 images have no box file
    assert bccd.classes == ["rbc"] and len(bccd.fields) == 343
    assert len(bccd.field_types) > 300


# -- detection metrics -----------------------------------------------------------------------------


def test_box_iou_against_hand_figures():
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10], [20, 20, 30, 30]]))
    np.testing.assert_allclose(iou, [[50 / 150, 0]])


def test_ap_precision_recall_against_a_hand_worked_case():
    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30]])
    dets = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [21, 21, 31, 31]])
    s = detection_scores([(dets, np.array([0.9, 0.8, 0.7]), truth)], threshold=0.75)
    # ranks: hit (P 1, R .5), miss, hit (P 2/3, R 1): AP = .5 x 1 + .5 x 2/3
    assert s["ap50"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert (s["precision"], s["recall"]) == (0.5, 0.5)  # the two above 0.75: one hit, one miss
    assert best_threshold([(dets, np.array([0.9, 0.8, 0.7]), truth)]) == 0.05


def test_a_box_is_matched_once_only():
    truth = np.array([[0, 0, 10, 10]])
    dets = np.array([[0, 0, 10, 10], [0, 0, 10, 10]])
    s = detection_scores([(dets, np.array([0.9, 0.8]), truth)], threshold=0.5)
    assert s["matched"] == 1 and s["precision"] == 0.5


def test_differential_counts_percentages_and_wilson_intervals():
    d = differential(["neutrophil"] * 60 + ["lymphocyte"] * 40, ["lymphocyte", "neutrophil", "monocyte"])
    rows = {r["class"]: r for r in d["classes"]}
    assert rows["neutrophil"]["count"] == 60 and rows["neutrophil"]["percent"] == 60.0
    lo, hi = rows["neutrophil"]["ci95"]
    assert 49 < lo < 51 and 69 < hi < 71  # Wilson at 60/100
    assert rows["monocyte"]["ci95"][0] == 0.0 and rows["monocyte"]["ci95"][1] > 3
    assert d["cells"] == 100 and d["cells_needed"]["5"] > d["cells_needed"]["10"] > 0
    assert differential([], ["a"])["note"] == "no white cell found"


def test_a_cell_boxed_to_another_extent_is_found_by_centres_but_not_at_iou_half():
    truth = np.array([[100, 100, 300, 300]])  # the cell with its pale cytoplasm
    det = np.array([[150, 150, 250, 250]])  # its nucleus: IoU 0.25
    by_iou = detection_scores([(det, np.array([0.9]), truth)], 0.5)
    by_centre = detection_scores([(det, np.array([0.9]), truth)], 0.5, criterion="centre")
    assert by_iou["recall"] == 0 and by_centre["recall"] == 1
    beside = np.array([[300, 100, 500, 300]])  # a neighbour touching it: not the same cell
    assert detection_scores([(beside, np.array([0.9]), truth)], 0.5, criterion="centre")["recall"] == 0


def test_a_label_table_is_not_taken_for_a_box_table(tmp_path):
    from bloodcell.data.boxes import is_box_source

    (tmp_path / "labels.csv").write_text("path,label\na.jpg,WBC\n")
    (tmp_path / "boxes.csv").write_text("image,x0_frac,y0_frac,x1_frac,y1_frac,label\n")
    assert not is_box_source(tmp_path / "labels.csv") and is_box_source(tmp_path / "boxes.csv")
