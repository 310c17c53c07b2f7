"""The ``explainrt`` command line, run in-process through ``main`` (and once as a real process)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import SMALL_CLASSES, ambiguous_nhwc_model
from PIL import Image

from explainrt import METHODS, Explainer
from explainrt.cli import main
from explainrt.export.spec import ExplainableSpec, original_model

REPO = Path(__file__).resolve().parents[1]
ESPRESSO = 967


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def weights(small_resnet, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    """The small random ResNet-18's state dict, saved as a user would."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(small_resnet.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def photo(example_images, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    """The coffee example as a JPEG file."""
    path = tmp_path_factory.mktemp("images") / "cup.jpg"
    Image.fromarray(example_images["coffee"]).save(path, quality=95)
    return path


# -- methods -------------------------------------------------------------------------------------------
def test_methods_lists_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "methods")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == list(METHODS)
    for line, method in zip(lines, METHODS.values(), strict=True):
        assert line.endswith(method.summary)


def test_methods_as_a_process() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "explainrt.cli", "methods"], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "gradcam" in done.stdout and "Grad-CAM" in done.stdout


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, )[0] == 2
    code, _, err = run(capsys, "explain")
    assert code == 2 and "explainrt explain: error:" in err
    assert run(capsys, "explain", "examples", "--batch-size", "0")[0] == 2
    code, _, err = run(capsys, "explain", "examples", "-O", "no-key")
    assert code == 2 and "expected KEY=VALUE with KEY a name, got 'no-key'" in err
    assert run(capsys, "--help")[0] == 0
    assert run(capsys, "-v", "methods")[0] == 0


def test_demo(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    """What the README's first command runs."""
    code, stdout, err = run(capsys, "demo", "--out", "demo-out")
    assert code == 0, err
    out = workdir / "demo-out"
    overlays = {f"{stem}.gradcam.png" for stem in ("chelsea", "coffee", "astronaut")}
    assert overlays | {"explanations.json"} <= set(files_in(out))
    assert "espresso" in stdout and "tabby" in stdout
    assert json.loads((out / "explanations.json").read_text())["images"][1]["target"]["index"] == ESPRESSO


# -- explain with the default model ----------------------------------------------------------------------
def test_explain_examples_writes_maps_overlays_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                         default_explanation) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "explain", "examples", "--out", out)
    assert code == 0, err
    stems = ["chelsea", "coffee", "astronaut"]
    expected = [f"{stem}.gradcam.{ext}" for stem in stems for ext in ("png", "npy")] + ["explanations.json"]
    assert files_in(out) == sorted(expected)

    summary = json.loads((out / "explanations.json").read_text())
    assert summary["method"] == "gradcam" and summary["backend"] == "onnxruntime"
    records = summary["images"]
    assert [r["image"] for r in records] == [f"skimage:{s}" for s in stems]
    coffee = records[1]
    top = coffee["top5"][0]
    assert top == {"index": ESPRESSO, "label": "espresso",
                   "probability": pytest.approx(coffee["target"]["probability"])}
    assert coffee["target"]["index"] == ESPRESSO and coffee["target"]["label"] == "espresso"
    assert {p["index"] for p in records[0]["top5"][:3]} == {281, 282, 285}
    for record in records:
        assert len(record["top5"]) == 5
        assert record["overlay"] == f"{Path(record['image'].split(':')[1]).stem}.gradcam.png"
        assert {"read", "preprocess", "runtime", "maps", "total"} <= set(record["timings"])

    for index, stem in enumerate(stems):
        saliency = np.load(out / f"{stem}.gradcam.npy")
        assert saliency.shape == (224, 224) and saliency.dtype == np.float32
        np.testing.assert_allclose(saliency, default_explanation.maps[index], atol=1e-6)
        with Image.open(out / f"{stem}.gradcam.png") as overlay:
            assert overlay.size == (224, 224) and overlay.mode == "RGB"

    assert "espresso" in stdout and "tiger cat" in stdout
    assert not [name for name in files_in(out) if name.endswith(".tmp")]


def test_explain_files_with_a_class_by_label(capsys: pytest.CaptureFixture[str], tmp_path: Path, photo: Path) -> None:
    code, stdout, err = run(capsys, "explain", photo, "--target", "cup", "--method", "layercam", "--out", tmp_path)
    assert code == 0, err
    record = json.loads((tmp_path / "explanations.json").read_text())["images"][0]
    assert record["image"] == str(photo) and record["target"]["index"] == 968  # "cup"
    assert record["overlay"] == "cup.layercam.png" and (tmp_path / "cup.layercam.npy").is_file()
    assert "cup" in stdout


def test_method_options_raw_maps_and_extras(capsys: pytest.CaptureFixture[str], tmp_path: Path, photo: Path) -> None:
    code, out, err = run(capsys, "explain", photo, "--method", "contrast-cam", "-O", "top_k=2", "--raw", "--out", tmp_path)
    assert code == 0, err
    assert files_in(tmp_path) == ["cup.contrast-cam.extras.npz", "cup.contrast-cam.npy", "cup.contrast-cam.png",
                                  "explanations.json"]
    summary = json.loads((tmp_path / "explanations.json").read_text())
    assert summary["options"] == {"top_k": 2} and summary["raw_maps"] is True
    extras = np.load(tmp_path / "cup.contrast-cam.extras.npz")
    assert extras["contrast_maps"].shape == (2, 224, 224)
    top5 = [p["index"] for p in summary["images"][0]["top5"]]
    assert list(extras["contrast_classes"]) == top5[1:3]
    np.testing.assert_array_equal(np.load(tmp_path / "cup.contrast-cam.npy"), extras["contrast_maps"][0])
    assert "wrote 4 files" in out


def test_negative_target(capsys: pytest.CaptureFixture[str], tmp_path: Path, photo: Path) -> None:
    code, _, err = run(capsys, "explain", photo, "--target", "-2", "--out", tmp_path)
    assert code == 0, err
    record = json.loads((tmp_path / "explanations.json").read_text())["images"][0]
    assert record["target"]["index"] == record["top5"][1]["index"]


def test_many_images_in_small_batches(capsys: pytest.CaptureFixture[str], tmp_path: Path, photo: Path,
                                      example_images) -> None:  # noqa: ANN001
    images = []
    for index in range(5):
        path = tmp_path / f"image{index}.png"
        Image.fromarray(example_images["chelsea"]).save(path)
        images.append(path)
    out = tmp_path / "out"
    code, _, err = run(capsys, "explain", *images, "--batch-size", "2", "--out", out)
    assert code == 0, err
    records = json.loads((out / "explanations.json").read_text())["images"]
    assert len(records) == 5 and len({r["target"]["index"] for r in records}) == 1
    assert [r["timings"]["batch_images"] for r in records] == [2, 2, 2, 2, 1]
    first, last = (np.load(out / f"image{i}.gradcam.npy") for i in (0, 4))
    np.testing.assert_allclose(first, last, atol=1e-6)


# -- bad input: exit 2, one line on stderr, nothing written ---------------------------------------------
def assert_failed(code: int, out_dir: Path, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("explainrt: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err
    assert files_in(out_dir) == []


def test_missing_image(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = run(capsys, "explain", "examples", tmp_path / "nope.png", "--out", out)
    assert_failed(code, out, err, "cannot read image", "nope.png", "no such file")


def test_corrupt_image_after_good_ones_writes_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    code, _, err = run(capsys, "explain", "examples", broken, "--batch-size", "1", "--out", out)
    assert_failed(code, out, err, "cannot read image", "broken.jpg")


def test_corrupt_model(capsys: pytest.CaptureFixture[str], tmp_path: Path, photo: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"definitely not protobuf")
    out = tmp_path / "out"
    code, _, err = run(capsys, "explain", photo, "--model", model, "--out", out)
    assert_failed(code, out, err, "model.onnx")


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--method", "gradcam+++"], "unknown method 'gradcam+++'"),
    (["--target", "1000"], "target class 1000 is out of range"),
    (["--target", "not-a-class"], "'not-a-class' is neither a class index nor a label"),
    (["--model", "resnet_nine"], "neither an ONNX file nor a torchvision architecture"),
    (["--model", "resnet18"], "needs --weights FILE"),
    (["--model", "absent.onnx"], "model file not found"),
    (["--provider", "CUDAExecutionProvider"], "CUDAExecutionProvider"),
    (["--backend", "nope"], "unknown backend 'nope'"),
    (["--method", "contrast-cam", "-O", "top_k=5000"], "top_k must be an integer in 1..999"),
    (["--method", "gradcam", "-O", "window=8"], "method 'gradcam' takes no option(s) window"),
])
def test_bad_options(capsys: pytest.CaptureFixture[str], tmp_path: Path, photo: Path, argv: list[str],
                     fragment: str) -> None:
    if "CUDAExecutionProvider" in argv:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("CUDA is available here")
    out = tmp_path / "out"
    code, _, err = run(capsys, "explain", photo, *argv, "--out", out)
    assert_failed(code, out, err, fragment)


def test_duplicate_image_names(capsys: pytest.CaptureFixture[str], tmp_path: Path, photo: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / photo.name).write_bytes(photo.read_bytes())
    out = tmp_path / "out"
    code, _, err = run(capsys, "explain", photo, other / photo.name, "--out", out)
    assert_failed(code, out, err, "'cup'")


# -- torchvision architectures and export ------------------------------------------------------------------
def test_export_torchvision_architecture_then_explain(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                       weights: Path, photo: Path, small_resnet) -> None:  # noqa: ANN001
    exported = tmp_path / "resnet18-explainable.onnx"
    code, stdout, err = run(capsys, "export", "resnet18", "--weights", weights, "--target", "layer4",
                            "--input-size", "64", "64", "-o", exported)
    assert code == 0, err
    assert str(exported) in stdout
    assert "w.r.t. 'layer4'" in stdout and "explainrt.tap" not in stdout  # the user's module name, not the tap
    spec = ExplainableSpec.from_model(onnx.load(exported))
    assert spec.num_classes == SMALL_CLASSES and len(spec.target_layers) == 1
    preprocessing = Explainer(exported).preprocessing
    assert preprocessing.input_size == (64, 64) and preprocessing.labels is None

    out = tmp_path / "out"
    code, _, err = run(capsys, "explain", photo, "--model", exported, "--out", out)
    assert code == 0, err
    record = json.loads((out / "explanations.json").read_text())["images"][0]
    assert 0 <= record["target"]["index"] < SMALL_CLASSES and record["target"]["label"] is None
    saliency = np.load(out / "cup.gradcam.npy")
    assert saliency.shape == (64, 64) and 0 <= saliency.min() and saliency.max() <= 1

    # The same weights through --model ARCH give the same map.
    direct = tmp_path / "direct"
    code, _, err = run(capsys, "explain", photo, "--model", "resnet18", "--weights", weights, "--layer", "layer4",
                       "--input-size", "64", "64", "--out", direct)
    assert code == 0, err
    np.testing.assert_allclose(np.load(direct / "cup.gradcam.npy"), saliency, atol=1e-5)

    # Re-exporting the plain ONNX model picks the same layer automatically.
    plain = tmp_path / "plain.onnx"
    onnx.save(original_model(onnx.load(exported)), plain)
    again = tmp_path / "again.onnx"
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(SMALL_CLASSES)))
    code, _, err = run(capsys, "export", plain, "--labels", labels, "--mean", "0.5", "0.5", "0.5", "-o", again)
    assert code == 0, err
    assert ExplainableSpec.from_model(onnx.load(again)).target_layers == spec.target_layers
    stored = Explainer(again).preprocessing
    assert stored.input_size == (64, 64) and stored.mean == (0.5,) * 3 and stored.labels[3] == "class 3"

    # Re-exporting an explainable model for another layer keeps its stored preprocessing.
    other_layer = ExplainableSpec.from_model(onnx.load(again)).target_layers[0]
    third = tmp_path / "third.onnx"
    code, _, err = run(capsys, "export", again, "--target", other_layer, "-o", third)
    assert code == 0, err
    assert Explainer(third).preprocessing == stored
    code, stdout, err = run(capsys, "explain", photo, "--model", third, "--target", "class 3", "--out", tmp_path / "o3")
    assert code == 0, err
    assert json.loads((tmp_path / "o3" / "explanations.json").read_text())["images"][0]["target"]["label"] == "class 3"


def test_export_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path) -> None:
    out = tmp_path / "out"
    output = out / "model.onnx"
    code, _, err = run(capsys, "export", "resnet18", "--weights", weights, "--target", "layer9", "-o", output)
    assert_failed(code, out, err, "no module 'layer9'")
    code, _, err = run(capsys, "export", "resnet18", "--weights", tmp_path / "absent.pt", "-o", output)
    assert_failed(code, out, err, "weights file not found")
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    code, _, err = run(capsys, "export", "resnet18", "--weights", wrong, "-o", output)
    assert_failed(code, out, err, "does not fit torchvision's resnet18")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00\x01garbage")
    code, _, err = run(capsys, "export", corrupt, "-o", output)
    assert_failed(code, out, err, "corrupt.onnx")


def test_input_layout_for_a_model_that_does_not_tell(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                      photo: Path) -> None:
    model = tmp_path / "nhwc.onnx"
    w1, w2 = ambiguous_nhwc_model(model)
    code, _, err = run(capsys, "explain", photo, "--model", model, "--out", tmp_path / "none")
    assert_failed(code, tmp_path / "none", err, "cannot be told", "--input-layout")
    code, _, err = run(capsys, "explain", photo, "--model", model, "--input-layout", "chw", "--out", tmp_path / "bad")
    assert code == 2 and "argument --input-layout: invalid choice: 'chw'" in err and "nchw" in err and "nhwc" in err
    assert files_in(tmp_path / "bad") == []
    code, _, err = run(capsys, "explain", photo, "--input-layout", "nhwc", "--out", tmp_path / "default")
    assert_failed(code, tmp_path / "default", err, "input_layout='nhwc': the default model takes [N, C, H, W] images")

    code, _, err = run(capsys, "explain", photo, "--model", model, "--input-layout", "nhwc", "--raw", "--target", "2",
                       "--out", tmp_path / "given")
    assert code == 0, err
    maps = np.load(tmp_path / "given" / "cup.gradcam.npy")

    exported = tmp_path / "explainable.onnx"  # export stores the layout: the explainable model needs no flag
    code, _, err = run(capsys, "export", model, "--input-layout", "nhwc", "-o", exported)
    assert code == 0, err
    # Grad-CAM by hand: d logit_2 / d act = w2[:, 2] / 16 at every position, so the weights are w2[:, 2] / 16
    batch, _ = Explainer(str(exported)).prepare([str(photo)])  # [1, 3, 4, 4] by the stored preprocessing
    act = np.maximum(batch[0].transpose(1, 2, 0) @ w1, 0)
    np.testing.assert_allclose(maps, np.maximum(act @ (w2[:, 2] / 16), 0), rtol=1e-5, atol=1e-6)
    code, _, err = run(capsys, "explain", photo, "--model", exported, "--raw", "--target", "2", "--out", tmp_path / "o")
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "o" / "cup.gradcam.npy"), maps, rtol=1e-6, atol=1e-7)
    code, _, err = run(capsys, "explain", photo, "--model", exported, "--input-layout", "nchw", "--out", tmp_path / "x")
    assert_failed(code, tmp_path / "x", err, "input_layout='nchw', but the model's input was read as [N, 4, 4, 3] "
                  "float32 (channels-last)")


def test_method_options_are_parsed_by_their_declared_types(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          photo: Path) -> None:
    code, _, err = run(capsys, "explain", photo, "--method", "occlusion", "-O", "window=56,56", "-O", "stride=[56,56]",
                       "-O", "incremental=false", "--raw", "--out", tmp_path)
    assert code == 0, err
    summary = json.loads((tmp_path / "explanations.json").read_text())
    assert summary["options"] == {"window": [56, 56], "stride": [56, 56], "incremental": False}
    raw = np.load(tmp_path / "cup.occlusion.npy")
    assert len(np.unique(raw)) > 1 and np.allclose(raw[:56, :56], raw[0, 0])  # one value per 56 x 56 window
    code, _, err = run(capsys, "explain", photo, "--method", "rise", "-O", "p=1.5", "--out", tmp_path / "bad")
    assert code == 2 and "method 'rise': p must be a finite number in (0, 1), got 1.5" in err
    assert not (tmp_path / "bad").exists()


def test_methods_name_lists_the_options_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "methods", "rise")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"rise: {METHODS['rise'].summary}"
    assert [line.split()[0] for line in lines[1:]] == [option.name for option in METHODS["rise"].options]
    assert "Default 500" in lines[1] and "Default 0.5" in out
    code, _, err = run(capsys, "methods", "gradcam+++")
    assert code == 2 and "unknown method 'gradcam+++'" in err


def test_a_failure_while_writing_leaves_the_folder_as_it_was(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    code, _, err = run(capsys, "explain", "examples", "--out", out)
    assert code == 0, err
    before = {name: (out / name).read_bytes() for name in files_in(out)}
    import explainrt.overlay

    written = []

    def save_then_fail(path: Path, image: np.ndarray) -> Path:
        if written:  # the second image's overlay: a full disk
            raise OSError(28, "No space left on device")
        written.append(path)
        return real(path, image)

    real = explainrt.overlay.save_png
    monkeypatch.setattr(explainrt.overlay, "save_png", save_then_fail)
    code, _, err = run(capsys, "explain", "examples", "--method", "layercam", "--out", out)
    assert code == 2 and "No space left on device" in err
    assert {name: (out / name).read_bytes() for name in files_in(out)} == before
    assert files_in(tmp_path) == ["out"]  # no staging folder left behind


def test_reusing_out_replaces_the_earlier_set_and_keeps_other_files(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path, photo: Path) -> None:
    out = tmp_path / "out"
    assert run(capsys, "explain", "examples", "--out", out)[0] == 0
    (out / "notes.txt").write_text("mine")
    assert run(capsys, "explain", photo, "--method", "layercam", "--out", out)[0] == 0
    assert files_in(out) == ["cup.layercam.npy", "cup.layercam.png", "explanations.json", "notes.txt"]
    assert json.loads((out / "explanations.json").read_text())["method"] == "layercam"


# -- faults while explaining or writing: a clear error or exit 130, and never half a set of files ------
def test_a_read_only_out_is_a_clear_error_and_writes_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated (the tests may run as root, whom a chmod does not stop): the folder beside --out
    refuses the staging folder, then --out itself refuses the first file moved into it."""
    from explainrt.cli import explain

    def read_only(*_: object, **__: object) -> str:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    out = tmp_path / "out"
    monkeypatch.setattr(explain.tempfile, "mkdtemp", read_only)
    code, _, err = run(capsys, "explain", "examples", "--out", out)
    assert_failed(code, out, err, f"cannot write to --out {out}: Read-only file system")
    monkeypatch.undo()

    def refused(source: object, target: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))

    monkeypatch.setattr(explain.os, "replace", refused)
    code, _, err = run(capsys, "explain", "examples", "--out", out)
    assert_failed(code, out, err, f"cannot write to --out {out}: Permission denied; nothing was written")
    assert [name for name in files_in(tmp_path) if name != "out"] == []  # no staging folder left


def test_a_full_disk_is_a_clear_error_and_leaves_the_earlier_set(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    assert run(capsys, "explain", "examples", "--out", out)[0] == 0
    before = {name: (out / name).read_bytes() for name in files_in(out)}
    real = np.save

    def full_after_one(path: object, array: np.ndarray, *args: object, **kwargs: object) -> None:
        if full_after_one.calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        full_after_one.calls += 1
        real(path, array, *args, **kwargs)

    full_after_one.calls = 0
    monkeypatch.setattr(np, "save", full_after_one)
    code, _, err = run(capsys, "explain", "examples", "--method", "layercam", "--out", out)
    assert code == 2 and err.startswith(f"explainrt: error: cannot write to --out {out}: No space left on device")
    assert {name: (out / name).read_bytes() for name in files_in(out)} == before
    assert files_in(tmp_path) == ["out"]


@pytest.mark.parametrize("when", ["explaining image 2", "writing image 2"])
def test_ctrl_c_exits_130_and_writes_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    import explainrt.overlay
    from explainrt.explainer import Explainer

    out = tmp_path / "out"
    calls = []
    patched, name = (Explainer, "explain") if when.startswith("explaining") else (explainrt.overlay, "save_png")
    real = getattr(patched, name)

    def interrupted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(patched, name, interrupted)
    code, _, err = run(capsys, "explain", "examples", "--batch-size", "1", "--out", out)
    assert code == 130 and err.strip() == "explainrt: interrupted"
    assert files_in(tmp_path) == []  # neither --out nor a staging folder


def test_ctrl_c_while_the_set_moves_into_place_lands_after_the_whole_set(capsys: pytest.CaptureFixture[str],
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGINT during the first rename: the set is completed, then the interrupt exits 130."""
    from explainrt.cli import explain

    out = tmp_path / "out"
    real = os.replace
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever runs pytest

    def interrupted_replace(source: object, target: object) -> None:
        if Path(target).parent == out and not list(out.iterdir()):  # the first file moved into --out
            os.kill(os.getpid(), signal.SIGINT)
        real(source, target)

    monkeypatch.setattr(explain.os, "replace", interrupted_replace)
    try:
        code, _, err = run(capsys, "explain", "examples", "--out", out)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130 and "explainrt: interrupted" in err
    summary = json.loads((out / "explanations.json").read_text())
    listed = sorted(record[key] for record in summary["images"] for key in ("overlay", "map"))
    assert files_in(out) == sorted([*listed, "explanations.json"]) and len(listed) == 6
    assert files_in(tmp_path) == ["out"]
