"""``explainrt evaluate`` end to end (pasted data with the default model, a folder with an ONNX file) and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from explainrt.engine.cli import main


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
