"""The web page at ``/`` in headless Chromium: upload chelsea, see the prediction and the maps."""

from __future__ import annotations

import base64
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
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


def test_page_notes_an_all_zero_map_and_leaves_captions_out_when_unticked(server: ServerProcess, example_images,  # noqa: ANN001
                                                                          default_explainer, tmp_path: Path) -> None:
    """Counterfactual-CAM of chelsea's top class is all zero: the page shows the server's note (with its reason)
    under that map, and none under Grad-CAM's; with "captions" unticked the overlays are the plain ones."""
    from playwright.sync_api import sync_playwright

    assert HAS_CHROMIUM, f"{CHROMIUM} is needed for the page test (EXPLAINRT_REQUIRE_BROWSER=1)"
    image_path = tmp_path / "chelsea.png"
    Image.fromarray(example_images["chelsea"]).save(image_path)
    reference = {method: default_explainer.explain([example_images["chelsea"]], method=method, progress=False)
                 for method in ("gradcam", "counterfactual-cam")}
    assert reference["counterfactual-cam"].maps.max() == 0 and reference["gradcam"].notes == (None,)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url + "/")
            page.wait_for_selector("#methods input[value='counterfactual-cam']")
            for box in page.locator("#methods input[type=checkbox]").all():
                box.set_checked(box.get_attribute("value") in reference)
            assert page.is_checked("#caption")  # captions are on by default
            page.uncheck("#caption")
            page.set_input_files("#file", str(image_path))
            page.wait_for_function("document.body.dataset.state === 'done' || document.body.dataset.state === 'error'",
                                   timeout=120_000)
            assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
            assert page.locator("#maps figure.failed").count() == 0, page.inner_text("#maps")
            note = page.locator("#maps figure[data-method='counterfactual-cam'] p.note")
            assert note.count() == 1 and note.inner_text() == reference["counterfactual-cam"].notes[0]
            assert "all zero: Counterfactual-CAM shows" in note.inner_text()
            assert page.locator("#maps figure[data-method='gradcam'] p.note").count() == 0
            for method, explanation in reference.items():
                source = page.get_attribute(f"#maps figure[data-method='{method}'] img.overlay", "src")
                shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB"))
                plain, captioned = explanation.overlays()[0].astype(int), explanation.overlays(captions=True)[0]
                assert np.abs(shown.astype(int) - plain).mean() < 1.0  # the served map equals ours to 2e-4
                assert np.abs(shown[200:].astype(int) - captioned[200:]).mean() > 10  # no caption band
            assert not errors, errors
        finally:
            browser.close()
