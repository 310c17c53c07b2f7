"""The web page at ``/`` in headless Chromium: upload chelsea, see the prediction and the maps."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from explainrt.serve.launcher import ServerProcess

CHROMIUM = "/usr/bin/chromium"
HAS_CHROMIUM = bool(shutil.which(CHROMIUM)) or Path(CHROMIUM).is_file()
REQUIRED = os.environ.get("EXPLAINRT_REQUIRE_BROWSER") == "1"  # .ci/run sets it: there a missing browser fails
pytestmark = pytest.mark.skipif(not HAS_CHROMIUM and not REQUIRED,
                                reason=f"no Chromium at {CHROMIUM}: the page test drives Debian's headless Chromium "
                                       "(apt-get install chromium, as .ci/run does); Playwright's own browser "
                                       "builds cannot be downloaded here")
CAT_LABELS = ("tabby", "tiger cat", "Egyptian cat")
PAGE_METHODS = ("gradcam", "contrast-cam", "occlusion", "rise")  # the page's defaults


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("serve-page") / "server.log"
    with ServerProcess(env=dict(os.environ), log_path=log) as process:
        yield process


def test_page_uploads_an_image_and_shows_predictions_and_maps(server: ServerProcess, example_images,  # noqa: ANN001
                                                              tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert HAS_CHROMIUM, f"{CHROMIUM} is needed for the page test (EXPLAINRT_REQUIRE_BROWSER=1)"
    image_path = tmp_path / "chelsea.png"
    Image.fromarray(example_images["chelsea"]).save(image_path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url + "/")
            page.wait_for_selector("#methods input[value=gradcam]")
            checked = page.eval_on_selector_all("#methods input[type=checkbox]:checked", "boxes => boxes.map(b => b.value)")
            assert set(checked) == set(PAGE_METHODS)
            page.set_input_files("#file", str(image_path))
            page.wait_for_function("document.body.dataset.state === 'done' || document.body.dataset.state === 'error'",
                                   timeout=240_000)
            assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")

            predictions = page.locator("#predictions li").all_inner_texts()
            assert len(predictions) == 5
            assert predictions[0].startswith(CAT_LABELS), predictions
            figures = page.locator("#maps figure")
            assert figures.count() == len(PAGE_METHODS)
            assert page.locator("#maps figure.failed").count() == 0, page.inner_text("#maps")
            shown = [figures.nth(i).get_attribute("data-method") for i in range(figures.count())]
            assert shown == list(PAGE_METHODS)
            sizes = page.eval_on_selector_all("#maps img.overlay", "images => images.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            assert sizes == [[True, 224, 224]] * len(PAGE_METHODS)
            assert "vs" in figures.nth(1).inner_text()  # Contrast-CAM names the class it contrasts with
            assert page.locator("#timings tbody tr").count() == 1 + len(PAGE_METHODS)
            assert not errors, errors
            screenshot = tmp_path / "page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert Image.open(screenshot).size[0] == 1280
            keep = os.environ.get("EXPLAINRT_SCREENSHOT")  # where to copy it for a person to look at
            if keep:
                shutil.copy(screenshot, keep)
        finally:
            browser.close()
