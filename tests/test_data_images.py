"""data.images: decoding and resizing one image file."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_image

from bloodcell.data.images import CELL_FIT, CELL_FIT_MIN, cell_box, load_image


@pytest.mark.parametrize("resize", ["squash", "crop", "pad", "cell", "cellfit"])
def test_load_image_modes_sizes(tmp_path, resize):
    p = write_image(tmp_path / "wide.jpg", size=(320, 240))
    arr = load_image(str(p), 48, resize)
    assert arr.shape == (48, 48, 3) and arr.dtype == np.uint8


def smear(radius: int, centre=(180, 120), size=(320, 240)) -> np.ndarray:
    """A pink frame with one violet 'nucleus' disc: what cell_box looks for."""
    w, h = size
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = (230, 180, 190)
    ys, xs = np.ogrid[:h, :w]
    rgb[(ys - centre[1]) ** 2 + (xs - centre[0]) ** 2 <= radius ** 2] = (120, 60, 190)
    return rgb


def test_cell_box_centres_on_the_stain_and_cellfit_sizes_to_it():
    for fit in (False, True):
        left, top, right, bottom = cell_box(smear(30), fit=fit)
        assert right - left == bottom - top  # square
        assert abs((left + right) / 2 - 180) <= 3 and abs((top + bottom) / 2 - 120) <= 3  # centred
    assert cell_box(smear(30))[2] - cell_box(smear(30))[0] == round(0.8 * 240)  # cell: fixed side
    sides = [(lambda b: b[2] - b[0])(cell_box(smear(r), fit=True)) for r in (20, 30, 40)]
    # cellfit: side ~ CELL_FIT x sqrt(stained area) = CELL_FIT x r sqrt(pi): twice the cell, twice the side
    for r, side in zip((20, 30, 40), sides, strict=True):
        assert abs(side - CELL_FIT * r * np.pi ** 0.5) <= 0.06 * side, (r, side)
    assert sides[0] < sides[1] < sides[2]
    assert cell_box(smear(4), fit=True)[2] - cell_box(smear(4), fit=True)[0] == round(CELL_FIT_MIN * 240)
    big = cell_box(smear(200, centre=(160, 120)), fit=True)
    assert big == (40, 0, 280, 240)  # never larger than the frame's short side, always inside it
    blank = np.full((240, 320, 3), 200, np.uint8)  # no stain: the centre square, at the fixed side
    assert cell_box(blank, fit=True) == (64, 24, 256, 216)
