"""What a new user meets in the first hour: progress on long work, captions and notes on overlays,
errors in the user's words, help with defaults, and the small API gaps of issue 18."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from explainrt import Explainer, from_torch, progress
from explainrt.cli import main
from explainrt.models import load
from explainrt.models.loading import IMAGENET_MEAN, IMAGENET_STD
from explainrt.overlay import caption
from explainrt.preprocessing import Preprocessing


@pytest.fixture
def info_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="explainrt")
    yield caplog
    progress.set_quiet(False)


def _photo(path: Path, size: tuple[int, int] = (80, 96), seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


# -- progress ------------------------------------------------------------------------------------------------
def test_progress_is_log_lines_off_a_terminal_and_nothing_when_quiet(info_logs: pytest.LogCaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with progress.progress(3, "work", unit="batches") as bar:
        for _ in range(3):
            bar.update()
    lines = [record.getMessage() for record in info_logs.records if record.name == "explainrt.progress"]
    assert lines[0] == "work: started (3 batches)" and lines[1:4] == ["work: 1/3 batches", "work: 2/3 batches", "work: 3/3 batches"]
    assert lines[4].startswith("work: done, 3/3 batches in ")
    info_logs.clear()
    progress.set_quiet(True)
    assert list(progress.track(range(4), "quiet work")) == [0, 1, 2, 3]
    progress.note("a note")
    assert info_logs.records == []


def test_progress_is_a_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    assert list(progress.track(range(3), "drawn", unit="images")) == [0, 1, 2]
    assert "drawn" in terminal.getvalue() and "3/3" in terminal.getvalue()
    progress.note("preparing")
    assert terminal.getvalue().endswith("explainrt: preparing\n")


def test_a_bar_is_drawn_on_a_terminal_that_reports_no_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pseudo-terminal never sized (0 columns: `script`, some CI runners) still shows the bar, 80 wide."""
    import os
    import pty

    master, slave = pty.openpty()
    assert os.get_terminal_size(slave).columns == 0
    with open(slave, "w", encoding="utf-8", closefd=True) as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        assert list(progress.track(range(3), "unsized", unit="images")) == [0, 1, 2]
    drawn = os.read(master, 65536).decode("utf-8", "replace")
    os.close(master)
    last = drawn.replace("\r\n", "\n").split("\r")[-1].strip()
    assert last.startswith("unsized: 100%") and "3/3" in last and len(last) <= 80


def test_perturbation_methods_report_each_perturbed_batch(small_explainer, small_batch,  # noqa: ANN001
                                                          info_logs: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    small_explainer.explain(small_batch[:1], method="rise", n_masks=12, batch_size=4)
    lines = [record.getMessage() for record in info_logs.records if record.name == "explainrt.progress"]
    assert lines[0] == "rise (image 0): started (12 copies)"
    assert lines[1:4] == ["rise (image 0): 4/12 copies", "rise (image 0): 8/12 copies", "rise (image 0): 12/12 copies"]
    info_logs.clear()
    small_explainer.explain(small_batch[:1], method="rise", n_masks=12, batch_size=4, progress=False)
    assert not [record for record in info_logs.records if record.name == "explainrt.progress"]


def test_cli_shows_progress_at_v_and_none_with_quiet(tmp_path: Path, small_onnx,  # noqa: ANN001
                                                     info_logs: pytest.LogCaptureFixture) -> None:
    model = tmp_path / "small.onnx"
    onnx.save(small_onnx, model)
    photos = [_photo(tmp_path / f"noise{index}.png", seed=index) for index in range(2)]
    argv = ["explain", *map(str, photos), "--model", str(model), "--method", "occlusion", "-O", "window=32",
            "--batch-size", "1", "--out", str(tmp_path / "out")]
    assert main(["-v", *argv]) == 0
    lines = [record.getMessage() for record in info_logs.records if record.name == "explainrt.progress"]
    assert "occlusion: started (2 images)" in lines and any(line.startswith("occlusion: done, 2/2 images") for line in lines)
    assert any(line.startswith("occlusion (image 0): started") for line in lines)  # the method's own, per batch
    info_logs.clear()
    assert main(["-v", "--quiet", *argv]) == 0
    assert not [record for record in info_logs.records if record.name == "explainrt.progress"]


# -- captions and all-zero maps ------------------------------------------------------------------------------
def test_caption_writes_a_strip_along_the_bottom_only() -> None:
    image = np.full((224, 224, 3), 100, dtype=np.uint8)
    captioned = caption(image, "tabby cat 71% | gradcam")
    changed = np.nonzero((captioned != image).any(axis=(1, 2)))[0]
    assert captioned.shape == image.shape and changed.min() > 180 and changed.max() == 223
    assert (captioned[changed.min():] == 255).all(axis=2).any()  # white text on the black strip
    long = caption(image, "x" * 500)  # shortened, never wider than the image
    assert long.shape == image.shape


def test_counterfactual_cam_of_the_top_class_says_why_it_is_all_zero(default_explainer, example_images) -> None:  # noqa: ANN001
    explanation = default_explainer.explain(example_images["chelsea"], method="counterfactual-cam")
    assert explanation.maps.max() == 0  # the demo image of issue 18: no region argues against the top class
    assert explanation.notes[0].startswith("the counterfactual-cam map is all zero: Counterfactual-CAM shows")
    assert explanation.captions()[0].endswith("| counterfactual-cam (all zero)")
    gradcam = default_explainer.explain(example_images["chelsea"], method="gradcam")
    assert gradcam.notes == (None,)
    label = gradcam.labels[gradcam.targets[0]]
    probability = np.exp(gradcam.logits[0] - gradcam.logits[0].max())
    probability = probability[gradcam.targets[0]] / probability.sum()
    assert gradcam.captions() == [f"{label} {probability:.0%} | gradcam"]
    plain, captioned = gradcam.overlays(), gradcam.overlays(captions=True)
    np.testing.assert_array_equal(plain[0, :180], captioned[0, :180])
    assert (plain[0, 200:] != captioned[0, 200:]).any()


def test_cli_warns_of_an_all_zero_map_in_json_and_captions_by_default(workdir: Path, model_cache: Path,  # noqa: ANN001
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    _photo(workdir / "noise.png")
    with caplog.at_level(logging.WARNING, logger="explainrt"):
        assert main(["explain", "examples", "--method", "counterfactual-cam", "--out", "cf"]) == 0
    records = json.loads((workdir / "cf" / "explanations.json").read_text())["images"]
    assert all("all zero" in record["note"] for record in records)
    assert any("chelsea: the counterfactual-cam map is all zero" in record.getMessage() for record in caplog.records)
    assert main(["explain", "examples", "--out", "captioned"]) == 0
    assert main(["explain", "examples", "--no-caption", "--out", "plain"]) == 0
    captioned = np.asarray(Image.open(workdir / "captioned" / "chelsea.gradcam.png"))
    plain = np.asarray(Image.open(workdir / "plain" / "chelsea.gradcam.png"))
    np.testing.assert_array_equal(captioned[:180], plain[:180])
    assert (captioned[200:] != plain[200:]).any()
    assert main(["demo", "--no-caption", "--out", "demo"]) == 0  # demo is `explain examples`, --no-caption too
    np.testing.assert_array_equal(np.asarray(Image.open(workdir / "demo" / "chelsea.gradcam.png")), plain)


# -- wording and help ----------------------------------------------------------------------------------------
def test_help_states_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "images per runtime call (default: 32)" in text
    assert "explanation method (see `explainrt methods`) (default: gradcam)" in text
    assert "--no-caption" in text and "(default: True)" not in text


def test_an_unknown_layer_lists_the_last_feature_maps(tmp_path: Path, small_onnx,  # noqa: ANN001
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "small.onnx"
    onnx.save(small_onnx, model)
    photo = _photo(tmp_path / "noise.png")
    assert main(["explain", str(photo), "--model", str(model), "--layer", "nonexistent", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("explainrt: error: target layer 'nonexistent' is not a tensor of the model (the last "
                          "feature maps before the logits: ")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- API gaps ------------------------------------------------------------------------------------------------
def _thousand_classes() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 1000)).eval()


def test_from_torch_with_preprocessing_yields_imagenet_class_names(tmp_path: Path) -> None:
    from explainrt.models.labels import imagenet_labels

    model = _thousand_classes()
    pre = Preprocessing(input_size=(32, 32), resize_shorter=36, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    proto = from_torch(model, torch.zeros(1, 3, 32, 32), [model[1]], preprocessing=pre.to_json())
    explanation = Explainer(proto).explain([_photo(tmp_path / "cat.png")])
    top = explanation.top_k(1)[0][0]
    assert top.label == imagenet_labels()[top.index]


def test_a_torch_model_without_preprocessing_falls_back_to_imagenet_like_the_cli(tmp_path: Path,
                                                                                 caplog: pytest.LogCaptureFixture) -> None:
    model = _thousand_classes()
    photo = _photo(tmp_path / "cat.png")
    with caplog.at_level(logging.INFO, logger="explainrt"):
        fallback = Explainer(model, [model[1]], input_size=(32, 32))
    assert any("ImageNet recipe at 32x32" in record.getMessage() for record in caplog.records)
    explicit = Explainer(model, [model[1]], preprocessing=Preprocessing(
        input_size=(32, 32), resize_shorter=36, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    ours = fallback.explain([str(photo)])
    np.testing.assert_allclose(ours.maps, explicit.explain([str(photo)]).maps, atol=1e-6)
    assert ours.top_k(1)[0][0].label is not None


def test_torchvision_weights_are_exported_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import resnet18

    from explainrt.models import loading

    monkeypatch.setenv("EXPLAINRT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    weights = tmp_path / "r18.pt"
    torch.save(resnet18(num_classes=10).state_dict(), weights)
    first = load("resnet18", ["layer4"], weights=weights, input_size=(64, 64))
    assert len(list((tmp_path / "cache").glob("resnet18-*.onnx"))) == 1

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again instead of read from the cache")

    monkeypatch.setattr(loading, "_from_module", no_export)
    monkeypatch.setattr(loading, "torchvision_model", no_export)  # a cached call builds no module (15-20 s for ResNet-50)
    monkeypatch.setattr(loading, "_architecture", no_export)  # nor imports torchvision to check the name (10 s)
    again = load("resnet18", ["layer4"], weights=weights, input_size=(64, 64))
    assert again.explainable.SerializeToString() == first.explainable.SerializeToString()
    assert again.preprocessing == first.preprocessing


def test_evaluate_road_alone_writes_curves(workdir: Path, small_onnx, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    (workdir / "small.onnx").write_bytes(small_onnx.SerializeToString())
    folder = workdir / "images"
    folder.mkdir()
    for index in range(2):
        _photo(folder / f"noise{index}.png", (64, 64), index)
    status = main(["evaluate", str(folder), "--model", "small.onnx", "--methods", "gradcam", "--metrics", "road",
                   "--road-percentages", "20,50", "--out", "eval"])
    assert status == 0, capsys.readouterr().err
    summary = json.loads((workdir / "eval" / "evaluation.json").read_text())
    morf = summary["curves"]["gradcam"]["road-morf"]
    assert morf["fractions"] == [0.0, 0.2, 0.5] and len(morf["mean"]) == 3
    assert np.isclose(np.mean(morf["mean"][1:]), summary["table"]["gradcam"]["road-morf"])
    with Image.open(workdir / "eval" / "curves.png") as plot:
        assert plot.format == "PNG" and plot.width > 400


def test_serve_with_a_bad_model_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    for model, message in ((tmp_path / "missing.onnx", "missing.onnx"), (broken, "broken.onnx")):
        assert main(["serve", "--port", "0", "--model", str(model)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("explainrt: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
