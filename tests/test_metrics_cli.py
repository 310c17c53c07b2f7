"""``explainrt evaluate`` end to end (pasted data with the default model, a folder with an ONNX file) and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from explainrt.cli import main


def test_evaluate_pasted_data_with_the_default_model(workdir: Path, model_cache: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["evaluate", "--data", "pasted", "--count", "3", "--methods", "gradcam,gradcam++", "--steps", "8",
                   "--out", "eval"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "| gradcam |" in printed and "| gradcam++ |" in printed and "pointing (↑)" in printed
    summary = json.loads((workdir / "eval" / "evaluation.json").read_text())
    assert set(summary["table"]) == {"gradcam", "gradcam++"}
    assert set(summary["table"]["gradcam"]) == {"deletion", "insertion", "pointing", "energy"}
    for method, row in summary["table"].items():
        assert 0 <= row["deletion"] <= 1 and 0 <= row["insertion"] <= 1 and 0 <= row["energy"] <= 1
        assert len(summary["per_image"][method]["deletion"]) == 3
        assert len(summary["curves"][method]["insertion"]["mean"]) == 9
    assert len(summary["data"]["images"]) == 3 and 0 <= summary["data"]["predicted_object_rate"] <= 1
    assert (workdir / "eval" / "evaluation.md").read_text().startswith("| method |")
    with Image.open(workdir / "eval" / "curves.png") as plot:
        assert plot.format == "PNG" and plot.width > 400


def test_evaluate_a_folder_with_an_onnx_model(workdir: Path, small_onnx, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    (workdir / "small.onnx").write_bytes(small_onnx.SerializeToString())
    assert main(["evaluate", "--data", "pasted", "--model", "small.onnx", "--out", "eval"]) == 2
    assert "needs a 1000-class model, not one with 10 classes" in capsys.readouterr().err
    folder = workdir / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(folder / f"noise{index}.png")
    status = main(["evaluate", str(folder), "--model", "small.onnx", "--methods", "gradcam,eigencam",
                   "--metrics", "deletion,road", "--steps", "4", "--out", "eval"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    summary = json.loads((workdir / "eval" / "evaluation.json").read_text())
    assert set(summary["table"]["eigencam"]) == {"deletion", "road-morf", "road-lerf"}
    assert summary["data"]["images"] == [str(folder / "noise0.png"), str(folder / "noise1.png")]
    assert (workdir / "eval" / "curves.png").is_file()


@pytest.mark.parametrize(("arguments", "message"), [
    (["--data", "pasted", "--metrics", "deletion,accuracy"], "unknown metric(s) 'accuracy'"),
    (["--data", "pasted", "--methods", "gradcam,nosuchcam"], "unknown method 'nosuchcam'"),
    (["empty"], "folder 'empty' holds no images"),
    (["--data", "pasted", "--steps", "0"], "--steps: must be at least 1, got 0"),
    (["--data", "pasted", "--count", "0"], "--count: must be at least 1, got 0"),
    ([], "give either IMAGE files/folders or --data pasted"),
    (["empty", "--data", "pasted"], "give either IMAGE files/folders or --data pasted"),
    (["missing.png", "--metrics", "pointing"], "need object boxes: use --data pasted"),
])
def test_evaluate_bad_input(arguments: list[str], message: str, workdir: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "empty").mkdir()
    assert main(["evaluate", *arguments, "--out", "eval"]) == 2
    assert message in capsys.readouterr().err
    assert not (workdir / "eval").exists()


@pytest.fixture
def noise_folder(workdir: Path, small_onnx) -> Path:  # noqa: ANN001
    """small.onnx and a folder of two 64x64 noise PNGs in the working directory."""
    (workdir / "small.onnx").write_bytes(small_onnx.SerializeToString())
    folder = workdir / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"noise{index}.png")
    return folder


def _reference_batch(small_onnx, folder: Path):  # noqa: ANN001, ANN202
    """The small model with the CLI's default preprocessing for a 64x64 ONNX input, and the folder's images."""
    from explainrt.explainer import Explainer
    from explainrt.preprocessing import Preprocessing

    explainer = Explainer(small_onnx, preprocessing=Preprocessing((64, 64), 64 * 8 // 7, (0.485, 0.456, 0.406),
                                                                  (0.229, 0.224, 0.225)))
    images = [np.asarray(Image.open(folder / f"noise{index}.png").convert("RGB")) for index in range(2)]
    return explainer, explainer.prepare(images)[0]


def test_evaluate_road_percentages_agree_with_road_curves(noise_folder: Path, small_onnx,  # noqa: ANN001
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from explainrt.metrics.road import road_curves

    status = main(["evaluate", str(noise_folder), "--model", "small.onnx", "--methods", "gradcam", "--metrics", "road",
                   "--road-percentages", "25, 50,75", "--seed", "3", "--batch-size", "4", "--out", "eval"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    summary = json.loads((noise_folder.parent / "eval" / "evaluation.json").read_text())
    assert summary["road_percentages"] == [25.0, 50.0, 75.0]
    explainer, batch = _reference_batch(small_onnx, noise_folder)
    explanation = explainer.explain(batch, "gradcam")
    assert summary["targets"] == explanation.targets.tolist()
    for order in ("morf", "lerf"):
        curves = road_curves(explainer.session, batch, explanation.maps, explanation.targets, order, (25, 50, 75),
                             seed=3, batch_size=4)
        np.testing.assert_allclose(summary["per_image"]["gradcam"][f"road-{order}"], curves.mean, atol=1e-6)
        assert f"{curves.mean.mean():.3f}" in printed


def test_evaluate_sanity_table_agrees_with_cascading_randomization(noise_folder: Path, small_onnx,  # noqa: ANN001
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from explainrt.export.spec import original_model
    from explainrt.metrics.sanity import cascading_randomization, weighted_nodes

    status = main(["evaluate", str(noise_folder), "--model", "small.onnx", "--methods", "gradcam,eigencam",
                   "--steps", "4", "--sanity", "--sanity-steps", "3", "--seed", "2", "--out", "eval"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    out = noise_folder.parent / "eval"
    summary = json.loads((out / "evaluation.json").read_text())
    table = (out / "sanity.md").read_text()
    assert table in printed and "| layers randomised | down to | gradcam | eigencam |" in table
    _, batch = _reference_batch(small_onnx, noise_folder)
    layers = weighted_nodes(original_model(small_onnx))
    cuts = summary["sanity"]["cuts"]
    assert [c["layers_randomized"] for c in cuts] == np.rint(np.linspace(1, len(layers), 3)).astype(int).tolist()
    assert [c["down_to"] for c in cuts] == [layers[c["layers_randomized"] - 1] for c in cuts]
    for method in ("gradcam", "eigencam"):
        reference = cascading_randomization(small_onnx, batch, method, np.array(summary["targets"]), steps=3, seed=2)
        assert [c["down_to"] for c in cuts] == list(reference.layers)
        np.testing.assert_allclose(summary["sanity"]["spearman"][method], reference.spearman[1:], atol=1e-6)
        np.testing.assert_allclose(summary["sanity"]["ssim"][method], reference.ssim[1:], atol=1e-6)
        column = ["gradcam", "eigencam"].index(method) + 2
        rows = [line.strip("|").split("|") for line in table.splitlines()[4:]]
        assert [float(row[column]) for row in rows] == pytest.approx(reference.spearman[1:].mean(axis=1), abs=5e-4)


@pytest.mark.parametrize(("arguments", "message"), [
    (["--metrics", "road", "--road-percentages", "10,100"], "argument --road-percentages: percentages must lie "
                                                            "strictly between 0 and 100, got 100"),
    (["--metrics", "road", "--road-percentages", "0,50"], "argument --road-percentages: percentages must lie"),
    (["--metrics", "road", "--road-percentages", "-5"], "argument --road-percentages: percentages must lie"),
    (["--metrics", "road", "--road-percentages", ""], "argument --road-percentages: expected comma-separated"),
    (["--metrics", "road", "--road-percentages", "10,,20"], "argument --road-percentages: expected comma-separated"),
    (["--metrics", "road", "--road-percentages", "10,ten"], "argument --road-percentages: expected comma-separated "
                                                            "numbers, got '10,ten'"),
    (["--metrics", "road", "--road-percentages", "nan"], "argument --road-percentages: percentages must lie"),
    (["--road-percentages", "10,20"], "--road-percentages sets the road metric's removals: add road to --metrics"),
    (["--sanity", "--sanity-steps", "0"], "argument --sanity-steps: must be at least 1, got 0"),
    (["--sanity", "--backend", "torch"], "--sanity re-draws the ONNX model's weights"),
])
def test_evaluate_bad_road_and_sanity_flags(arguments: list[str], message: str, workdir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "missing.png", *arguments, "--out", "eval"]) == 2
    assert message in capsys.readouterr().err
    assert not (workdir / "eval").exists()
