"""The web page in headless Chromium: upload an image, see the predicted class and the Grad-CAM overlay;
the test cells of the run, right and wrong, with their maps."""

from __future__ import annotations

import pytest
from test_predict import CLASSES, make_checkpoint, png_bytes
from test_serve import example_run

from bloodcell.inference.predict import Predictor
from bloodcell.serve.app import create_app, serving

pytestmark = pytest.mark.slow




@pytest.mark.slow
def test_upload_shows_class_probabilities_and_overlay(browser, tmp_path) -> None:
    predictor = Predictor(make_checkpoint(tmp_path / "tiny.pt"))
    image = tmp_path / "cell.png"
    image.write_bytes(png_bytes(11, size=(120, 90)))
    notes = tmp_path / "notes.png"
    notes.write_text("this is not an image")
    want = predictor.predict_bytes(image.read_bytes())["class"]
    with serving(create_app(predictor)) as url:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("#model:has-text('cnn4x32')", timeout=10_000)
        page.set_input_files("#file-input", str(image))
        card = page.locator(".card").first
        card.locator(".pred-class").wait_for(timeout=15_000)
        assert card.locator(".pred-class").inner_text() == want
        assert card.locator(".bar").count() == len(CLASSES)
        assert card.locator(".name").inner_text() == "cell.png"
        cam = card.locator("img.cam")
        cam.wait_for(timeout=10_000)
        page.wait_for_function("() => { const i = document.querySelector('.card img.cam');"
                               " return i && i.complete && i.naturalWidth > 0; }", timeout=10_000)
        assert cam.get_attribute("src").startswith("data:image/png;base64,")

        page.set_input_files("#file-input", str(notes))
        error = page.locator(".card").first.locator(".error")
        error.wait_for(timeout=10_000)
        assert "not an image" in error.inner_text()
        assert page.locator(".card").count() == 2 and not errors
        page.close()


@pytest.mark.slow
def test_page_shows_right_and_wrong_test_cells_with_their_maps(browser, tmp_path) -> None:
    run, _ = example_run(tmp_path / "run")
    predictor = Predictor(run, backend="torch")
    with serving(create_app(predictor)) as url:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        want = page.request.get(url + "/examples").json()["examples"]
        page.goto(url + "/")
        page.wait_for_selector("#examples:not([hidden]) .example", timeout=15_000)
        tiles = page.locator("#examples .example")
        assert tiles.count() == len(want) == 15
        for i, e in enumerate(want):  # what each tile says is what the run's predictions file says
            tile = tiles.nth(i)
            assert tile.locator(".label").inner_text() == e["label"]
            assert tile.locator(".pred").inner_text() == e["pred"]
            assert ("wrong" in tile.get_attribute("class")) == (not e["correct"])
            assert tile.locator("img.cam").get_attribute("src") == e["cam_png"]
        page.wait_for_function("() => [...document.querySelectorAll('#examples img')]"
                               ".every((i) => i.complete && i.naturalWidth > 0)", timeout=10_000)
        assert not errors


@pytest.mark.slow
def test_page_asks_for_the_key_and_works_with_an_onnx_file(browser, tmp_path) -> None:
    from bloodcell.inference.export import export_model

    key = "page-key-0123456789abcdef"
    export_model(make_checkpoint(tmp_path / "tiny.pt"), "onnx", tmp_path / "tiny.onnx")
    image = tmp_path / "cell.png"
    image.write_bytes(png_bytes(11, size=(120, 90)))
    want = Predictor(tmp_path / "tiny.pt").predict_bytes(image.read_bytes())["class"]
    with serving(create_app(tmp_path / "tiny.onnx", api_key=key)) as url:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("#key-form:not([hidden])", timeout=10_000)
        assert "unavailable" in page.locator("#model").inner_text()
        page.fill("#api-key", "not the key")
        page.click("#key-form button")
        page.wait_for_selector("#key-error:has-text('refused')", timeout=10_000)
        page.fill("#api-key", key)
        page.click("#key-form button")
        page.wait_for_selector("#model:has-text('cnn4x32')", timeout=10_000)
        assert page.locator("#key-form").is_hidden()
        page.set_input_files("#file-input", str(image))
        card = page.locator(".card").first
        card.locator(".pred-class").wait_for(timeout=15_000)
        assert card.locator(".pred-class").inner_text() == want  # the same class as the checkpoint's
        assert card.locator(".bar").count() == len(CLASSES)
        assert card.locator("img.cam").count() == 0  # an .onnx file has no Grad-CAM, and says so
        assert "with Grad-CAM" not in card.locator(".meta").inner_text()
        page.close()
        assert not errors, errors
