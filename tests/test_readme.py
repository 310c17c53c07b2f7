"""README.md's fenced examples, extracted and run as a reader would, so the README and the behaviour cannot drift.

Every ``bash`` and ``python`` fence runs unless the line right before it is
``<!-- readme-test: skip REASON -->`` (network, GPU, TensorRT, Triton): those are skipped with that
reason. A block marked ``<!-- readme-test: server -->`` starts a server that runs until stopped: it is
started in the background (``explainrt serve`` on the port the kernel picks, since another test
worker may hold the README's; the KServe block with ``--http_port`` set to a free port), asked the
requests the README shows, and stopped. Each runs in a fresh folder
holding the files the README calls the user's: ``cat.jpg``, ``cup.png``, ``cup.jpg`` (example
photos), ``images/`` (a folder of two of them) and ``model.onnx`` (a small plain ONNX classifier); a block that names the user's ResNet-50
files also finds ``resnet50.pt`` (random weights, seeded), ``resnet50.onnx`` (its plain ONNX export,
input ``input``), ``resnet50.maps.onnx`` (made from it by the README's ``explainrt export ... --maps
gradcam --maps-only``) and, unless the block writes it, ``resnet50.explainable.onnx`` (``explainrt
export resnet50.onnx``), made once per module; a block that names the user's detection or segmentation
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
MARK = re.compile(r"<!-- readme-test: (skip (.+?)|server) -->\n$")
SERVER = "server"


def readme_blocks() -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, mark) of every fenced block ("" for a block without a language); the mark is
    None, the skip reason, or ``SERVER``."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()]
        mark = MARK.search(before[before.rfind("\n", 0, len(before) - 1) + 1 :])
        blocks.append((before.count("\n") + 1, match[1], match[2], None if mark is None else mark[2] or SERVER))
    return blocks


BLOCKS = readme_blocks()
RESNET50_FILES = ("resnet50.pt", "resnet50.onnx", "resnet50.maps.onnx")
EXPLAINABLE_RESNET50 = "resnet50.explainable.onnx"
DETECTION_FILES = ("yolov8n.onnx", "seg.onnx")
DETECTION_FOLDER = (*DETECTION_FILES, "mask.png", "street.jpg", "scene.png")


def test_every_block_is_run_or_skipped_with_a_reason() -> None:
    fences = README.read_text(encoding="utf-8").count("\n```")
    assert fences % 2 == 0 and len(BLOCKS) >= 8
    assert {language for _, language, _, _ in BLOCKS} <= {"bash", "python", ""}
    run = [line for line, language, _, skip in BLOCKS if skip is None and language in ("bash", "python")]
    assert len(run) >= 3, "the Python API, the command line and the pytorch-grad-cam drop-in examples must run"
    assert all(skip.strip() for _, _, _, skip in BLOCKS if skip is not None)
    servers = [code for _, _, code, mark in BLOCKS if mark == SERVER]
    assert len(servers) == 2 and "explainrt serve" in servers[0] and "kserve.ModelServer" in servers[1]


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


@pytest.mark.parametrize(("line", "language", "code", "mark"),
                         [block for block in BLOCKS if block[1] in ("bash", "python")],
                         ids=[f"line{line}-{language}" for line, language, _, _ in BLOCKS if language in ("bash", "python")])
def test_readme_example(line: int, language: str, code: str, mark: str | None, user_folder: Path,
                        monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    if mark not in (None, SERVER):
        pytest.skip(f"README.md line {line}: {mark}")
    monkeypatch.chdir(user_folder)
    uses_resnet50 = any(name in code for name in (*RESNET50_FILES, EXPLAINABLE_RESNET50))
    if uses_resnet50:
        folder = request.getfixturevalue("resnet50_files")
        for name in RESNET50_FILES:
            (user_folder / name).symlink_to(folder / name)
        if EXPLAINABLE_RESNET50 in code and f"-o {EXPLAINABLE_RESNET50}" not in code:
            from explainrt.cli import main

            assert main(["export", "resnet50.onnx", "-o", EXPLAINABLE_RESNET50]) == 0
    if any(name in code for name in DETECTION_FILES):
        folder = request.getfixturevalue("detection_files")
        for name in DETECTION_FOLDER:
            (user_folder / name).symlink_to(folder / name)
    if mark == SERVER:
        (serve_cli if language == "bash" else serve_kserve)(line, code, user_folder)
        return
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


def _explain_request(image: Path) -> dict:
    """The V1 ``:explain`` body the README shows: one image, Grad-CAM of two targets, the maps back."""
    import base64

    return {"instances": [{"image": {"b64": base64.b64encode(image.read_bytes()).decode()}}],
            "parameters": {"method": "gradcam", "targets": [[281, -2]], "return": ["map"]}}


def _check_explained(answer: dict, targets: list[int | None]) -> None:
    """One image's explanation with a map per target, each varying over the image."""
    import numpy as np

    (explanation,) = answer["explanations"]
    assert explanation["method"] == "gradcam" and len(explanation["targets"]) == len(targets)
    for explained, index in zip(explanation["targets"], targets):
        if index is not None:
            assert explained["target"]["index"] == index
        values = np.asarray(explained["map"], np.float32)
        assert values.ndim == 2 and 0.0 <= values.min() < values.max() <= 1.0


def serve_cli(line: int, code: str, folder: Path) -> None:
    """The README's ``explainrt serve`` line: started (its own arguments, the port the kernel picks), its web page
    and a V1 explanation asked for, then stopped."""
    import shlex

    import httpx

    from explainrt.serve.launcher import ServerProcess

    (words,) = [shlex.split(text, comments=True) for text in code.splitlines() if text.startswith("explainrt serve")]
    arguments = words[2:]
    if "--port" in arguments:  # the README's port: another worker's server may hold it
        at = arguments.index("--port")
        del arguments[at:at + 2]
    with ServerProcess(arguments, log_path=folder / "serve.log") as server, httpx.Client(timeout=120) as client:
        page = client.get(server.url + "/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"], f"README.md line {line}"
        answer = client.post(server.url + "/v1/models/default:explain", json=_explain_request(folder / "cat.jpg"))
        assert answer.status_code == 200, answer.text
        _check_explained(answer.json(), [281, None])
        assert server.alive()
    assert "Traceback" not in (folder / "serve.log").read_text()


def serve_kserve(line: int, code: str, folder: Path) -> None:
    """The README's KServe block, run as a script with kserve's own ``--http_port`` (a free port) and without its
    gRPC server; asked the V1 explanation and the V2 inference its comments show, then stopped."""
    import socket

    import httpx
    import numpy as np

    from explainrt.serve.launcher import UVICORN_READY, ServerProcess

    with socket.socket() as probe:  # kserve takes no port 0
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", code, "--http_port", str(port), "--enable_grpc", "false"]
    with ServerProcess(command=command, cwd=folder, log_path=folder / "kserve.log", ready=UVICORN_READY) as server, \
            httpx.Client(base_url=server.url, timeout=120) as client:
        assert client.get("/v2/health/ready").status_code == 200, f"README.md line {line}"
        answer = client.post("/v1/models/resnet50:explain", json=_explain_request(folder / "cat.jpg"))
        assert answer.status_code == 200, answer.text
        _check_explained(answer.json(), [281, None])
        batch = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        inferred = client.post("/v2/models/resnet50/infer", json={
            "inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                        "data": batch.ravel().tolist()}],
            "parameters": {"method": "gradcam", "targets": "[[281, -2]]"},
            "outputs": [{"name": "explainrt.maps", "parameters": {"format": "UINT8"}}]})
        assert inferred.status_code == 200, inferred.text
        (maps,) = inferred.json()["outputs"]
        assert maps["name"] == "explainrt.maps" and maps["shape"] == [1, 2, 224, 224]
        assert maps["datatype"] == "UINT8" and 0 <= min(maps["data"]) < max(maps["data"]) <= 255
        assert server.alive()
