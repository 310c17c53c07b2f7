"""README.md's fenced examples, extracted and run as a reader would, so the README and the behaviour cannot drift.

Every ``bash`` and ``python`` fence runs unless the line right before it is
``<!-- readme-test: skip REASON -->`` (network, GPU, TensorRT, Triton, a server that runs until
stopped, or minutes of CPU): those are skipped with that reason. Each runs in a fresh folder
holding the files the README calls the user's: ``cat.jpg``, ``cup.png``, ``cup.jpg`` (example
photos), ``images/`` (a folder of two of them) and ``model.onnx`` (a small plain ONNX classifier); a block that names the user's ResNet-50
files also finds ``resnet50.pt`` (random weights, seeded), ``resnet50.onnx`` (its plain ONNX export,
input ``input``) and ``resnet50.maps.onnx`` (made from it by the README's ``explainrt export ... --maps
gradcam --maps-only``), made once per module; a block that names the user's detection or segmentation
files finds ``yolov8n.onnx`` (a YOLOv8n from Ultralytics' yaml, random weights, whose raw head predicts
the README's boxes: ``tests/readme_standins.py``), ``seg.onnx`` (a small segmenter, 21 classes at
256 x 256), ``mask.png`` (its size), ``street.jpg`` and ``scene.png``. A Python block also finds ``model`` (a torchvision
ResNet-18 with random weights, or for a block that names those files the ResNet-50 of
``resnet50.pt``: "model from the block above"), ``input_tensor`` (a preprocessed batch of one) and
``batch`` (a preprocessed float32 NumPy batch of two at 224 x 224).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest
from PIL import Image

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
SKIP = re.compile(r"<!-- readme-test: skip (.+?) -->\n$")


def readme_blocks() -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, skip reason or None) of every fenced block ("" for a block without a language)."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()]
        skip = SKIP.search(before[before.rfind("\n", 0, len(before) - 1) + 1 :])
        blocks.append((before.count("\n") + 1, match[1], match[2], skip[1] if skip else None))
    return blocks


BLOCKS = readme_blocks()
RESNET50_FILES = ("resnet50.pt", "resnet50.onnx", "resnet50.maps.onnx")
DETECTION_FILES = ("yolov8n.onnx", "seg.onnx")
DETECTION_FOLDER = (*DETECTION_FILES, "mask.png", "street.jpg", "scene.png")


def test_every_block_is_run_or_skipped_with_a_reason() -> None:
    fences = README.read_text(encoding="utf-8").count("\n```")
    assert fences % 2 == 0 and len(BLOCKS) >= 8
    assert {language for _, language, _, _ in BLOCKS} <= {"bash", "python", ""}
    run = [line for line, language, _, skip in BLOCKS if skip is None and language in ("bash", "python")]
    assert len(run) >= 3, "the Python API, the command line and the pytorch-grad-cam drop-in examples must run"
    assert all(skip.strip() for _, _, _, skip in BLOCKS if skip is not None)


@pytest.fixture
def user_folder(tmp_path: Path, model_cache: Path, small_onnx, example_images) -> Path:  # noqa: ANN001
    from explainrt.export.spec import original_model

    Image.fromarray(example_images["chelsea"]).save(tmp_path / "cat.jpg")
    Image.fromarray(example_images["coffee"]).save(tmp_path / "cup.png")
    Image.fromarray(example_images["coffee"]).save(tmp_path / "cup.jpg")
    (tmp_path / "images").mkdir()
    for name in ("chelsea", "astronaut"):
        Image.fromarray(example_images[name]).save(tmp_path / "images" / f"{name}.jpg")
    onnx.save(original_model(small_onnx), tmp_path / "model.onnx")
    return tmp_path


@pytest.fixture(scope="module")
def resnet50_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the user's ResNet-50 files (weights, plain ONNX, maps-only ONNX), made once: about 30 s."""
    import torch
    from torchvision.models import resnet50

    from explainrt.cli import main

    folder = tmp_path_factory.mktemp("resnet50")
    torch.manual_seed(0)
    model = resnet50().eval()
    torch.save(model.state_dict(), folder / "resnet50.pt")
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, 224, 224), str(folder / "resnet50.onnx"), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    assert main(["export", str(folder / "resnet50.onnx"), "--maps", "gradcam", "--maps-only",
                 "-o", str(folder / "resnet50.maps.onnx")]) == 0
    return folder


@pytest.fixture(scope="module")
def detection_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the user's detector and segmenter files and images (``DETECTION_FOLDER``), made once."""
    import numpy as np
    from skimage import data

    from tests.readme_standins import (
        SEG_SIZE,
        YOLO_SIZE,
        TinySegmenter,
        export,
        yolov8n,
    )

    folder = tmp_path_factory.mktemp("detection")
    export(yolov8n(), folder / "yolov8n.onnx", YOLO_SIZE, "images", "output0")
    export(TinySegmenter().eval(), folder / "seg.onnx", SEG_SIZE, "input", "out")
    mask = np.zeros((SEG_SIZE, SEG_SIZE), np.uint8)
    mask[64:192, 64:192] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(data.astronaut()).save(folder / "street.jpg")
    Image.fromarray(data.coffee()).save(folder / "scene.png")
    return folder


@pytest.mark.parametrize(("line", "language", "code", "skip"),
                         [block for block in BLOCKS if block[1] in ("bash", "python")],
                         ids=[f"line{line}-{language}" for line, language, _, _ in BLOCKS if language in ("bash", "python")])
def test_readme_example(line: int, language: str, code: str, skip: str | None, user_folder: Path,
                        monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    if skip is not None:
        pytest.skip(f"README.md line {line}: {skip}")
    monkeypatch.chdir(user_folder)
    uses_resnet50 = any(name in code for name in RESNET50_FILES)
    if uses_resnet50:
        folder = request.getfixturevalue("resnet50_files")
        for name in RESNET50_FILES:
            (user_folder / name).symlink_to(folder / name)
    if any(name in code for name in DETECTION_FILES):
        folder = request.getfixturevalue("detection_files")
        for name in DETECTION_FOLDER:
            (user_folder / name).symlink_to(folder / name)
    if language == "python":
        import numpy as np
        import torch
        from torchvision.models import resnet18, resnet50

        torch.manual_seed(0)
        if uses_resnet50:
            model = resnet50()
            model.load_state_dict(torch.load(user_folder / "resnet50.pt"))
        else:
            model = resnet18()
        batch = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
        namespace = {"model": model.eval(), "input_tensor": torch.randn(1, 3, 224, 224), "batch": batch}
        exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 (the README's own example)
        return
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=user_folder, env=env, capture_output=True,
                            text=True, timeout=900, check=False)
    assert result.returncode == 0, f"README.md line {line} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
