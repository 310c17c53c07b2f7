"""The Ray batch job on a real local Ray cluster (3 CPUs: an actor pool of 2 and reading): maps equal what
``Explainer.explain`` gives directly on the same files, summary complete, the CLI end to end."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import ray
from conftest import SMALL_SIZE
from PIL import Image

from explainrt import Explainer
from explainrt.batch.job import SUMMARY_COLUMNS, explain_dataset, find_source
from explainrt.errors import BatchJobError, InvalidInputError, InvalidModelError, UnknownMethodError
from explainrt.models.default import write_example_images
from explainrt.preprocessing import Preprocessing

SMALL_PREPROCESSING = Preprocessing(input_size=SMALL_SIZE, resize_shorter=72, mean=(0.5, 0.5, 0.5),
                                    std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def ray_cluster():  # noqa: ANN201
    """A local Ray instance for this module: 2 actor workers and a CPU for reading; shut down afterwards.

    Ray's memory monitor kills workers whenever the machine's memory is 95 % used, by any process: under
    xdist the other worker's tests (large exports) can hold most of it, and Ray would kill and restart
    this test's actors without end. It is turned off here; the kernel still guards real exhaustion."""
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def small_model_file(small_onnx, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    path = tmp_path_factory.mktemp("model") / "small.onnx"
    onnx.save(small_onnx, path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six random images of different sizes and formats in two class folders, plus one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(6):
        folder = root / ("cats" if index < 3 else "dogs")
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (70 + 9 * index, 90 - 4 * index, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.{'png' if index % 2 else 'jpg'}")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def check_outputs(out: Path, summary: pd.DataFrame, direct: Explainer, files: dict[str, Path], method: str) -> None:
    """Each image's map equals Explainer.explain on the same file; overlays decode; rows agree."""
    names = sorted(files)
    explanation = direct.explain([files[name] for name in names], method=method)
    probabilities = np.exp(explanation.logits) / np.exp(explanation.logits).sum(axis=1, keepdims=True)
    overlays = explanation.overlays(captions=True)  # batch overlays carry their caption
    rows = summary.set_index("image").loc[names]
    for index, name in enumerate(names):
        row = rows.loc[name]
        saliency = np.load(out / row["map"])
        assert saliency.shape == explanation.maps[index].shape
        np.testing.assert_allclose(saliency, explanation.maps[index], atol=1e-4)
        overlay = np.asarray(Image.open(out / row["overlay"]))
        assert overlay.shape == overlays[index].shape
        assert np.abs(overlay.astype(int) - overlays[index]).mean() < 1.0
        predicted = int(explanation.logits[index].argmax())
        assert (row["predicted_class"], row["explained_class"]) == (predicted, int(explanation.targets[index]))
        assert row["probability"] == pytest.approx(probabilities[index, predicted], abs=1e-5)
        assert row["method"] == method and pd.isna(row["error"])
        assert row["decode_seconds"] >= 0 and row["explain_seconds"] > 0 and row["batch_images"] >= 1


def test_small_model_on_image_folder(ray_cluster, small_onnx, small_model_file: Path, image_folder: Path,
                                     tmp_path: Path) -> None:  # noqa: ANN001
    result = explain_dataset(image_folder, tmp_path, small_model_file, "gradcam", preprocessing=SMALL_PREPROCESSING,
                             batch_size=2, workers=2)
    summary = result.summary
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    assert summary["image"].tolist() == ["broken.png", "cats/img0.jpg", "cats/img1.png", "cats/img2.jpg",
                                         "dogs/img3.png", "dogs/img4.jpg", "dogs/img5.png"]
    assert pd.isna(summary["label"][0]) and summary["label"][1:].tolist() == ["cats"] * 3 + ["dogs"] * 3
    broken = summary.iloc[0]
    assert result.failed == 1 and "cannot read image" in broken["error"] and pd.isna(broken["map"])
    files = {name: image_folder / name for name in summary["image"][1:]}
    check_outputs(tmp_path, summary, Explainer(small_onnx, preprocessing=SMALL_PREPROCESSING), files, "gradcam")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "cats").iterdir()) == sorted(
        f"cats/img{i}.gradcam.{ext}" for i in range(3) for ext in ("npy", "png"))
    pd.testing.assert_frame_equal(pd.read_parquet(result.parquet), summary, check_dtype=False)
    from_csv = pd.read_csv(result.csv)
    assert from_csv["image"].tolist() == summary["image"].tolist()
    np.testing.assert_allclose(from_csv["probability"][1:], summary["probability"][1:], rtol=1e-12)
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left


def test_default_model_on_example_images(ray_cluster, default_explainer, tmp_path: Path) -> None:  # noqa: ANN001
    paths = write_example_images(tmp_path / "examples")
    out = tmp_path / "out"
    result = explain_dataset(tmp_path / "examples", out, method="gradcam", batch_size=2, workers=2)
    summary = result.summary
    assert summary["image"].tolist() == ["astronaut.png", "chelsea.png", "coffee.png"]
    assert result.failed == 0 and summary["label"].isna().all()
    check_outputs(out, summary, default_explainer, {p.name: p for p in paths}, "gradcam")
    coffee = summary.set_index("image").loc["coffee.png"]
    assert (coffee["predicted_class"], coffee["predicted_label"]) == (967, "espresso")


def test_failing_job_writes_no_summary(ray_cluster, small_model_file: Path, image_folder: Path,
                                       tmp_path: Path) -> None:  # noqa: ANN001
    # preprocessing to 32x32 while the model takes 64x64: every actor call fails
    wrong = Preprocessing(input_size=(32, 32), resize_shorter=None, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(BatchJobError, match="no summary written.*expects"):
        explain_dataset(image_folder / "cats", tmp_path, small_model_file, preprocessing=wrong, workers=2)
    assert not (tmp_path / "summary.parquet").exists() and not (tmp_path / "summary.csv").exists()
    with pytest.raises(InvalidInputError, match="has 3 CPUs but 3 workers need 4"):
        explain_dataset(image_folder, tmp_path, small_model_file, preprocessing=SMALL_PREPROCESSING, workers=3)


def test_cli_on_parquet_joins_the_cluster(ray_cluster, small_onnx, small_model_file: Path, image_folder: Path,
                                          tmp_path: Path) -> None:  # noqa: ANN001
    good = sorted(p for p in image_folder.rglob("img*"))
    table = pd.DataFrame({"filename": [p.name for p in good], "label": [p.parent.name for p in good],
                          "image": [p.read_bytes() for p in good]})
    dataset = tmp_path / "data.parquet"
    table.to_parquet(dataset)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "explainrt.cli", "batch", str(dataset), "--out", str(out), "--model",
               str(small_model_file), "--method", "gradcam", "--input-size", "64", "64", "--mean", "0.5", "0.5",
               "0.5", "--std", "0.25", "0.25", "0.25", "--ray", ray_cluster, "--workers", "2", "--batch-size", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,  # a hang guard, not a speed check
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "explained 6 of 6 images with gradcam" in done.stdout
    # without -v, none of Ray's own lines: its token authentication warning, its C++ core's log lines
    # ("core_worker.cc:... Actor ... has constructor arguments in the object store"), Ray Data's warnings
    ray_lines = [line for line in done.stderr.splitlines() if re.search(
        r"Token authentication|\.cc:\d+|RAY_BACKEND_LOG_LEVEL|\w+\.py:\d+|/ray/", line)]
    assert not ray_lines, done.stderr[-3000:]
    summary = pd.read_parquet(out / "summary.parquet")
    assert summary["image"].tolist() == sorted(p.name for p in good)
    assert summary["label"].tolist() == [p.parent.name for p in sorted(good, key=lambda p: p.name)]
    # the CLI's preprocessing: --input-size 64 64 on an ONNX model of that size -> resize shorter side to 73, crop
    cli_preprocessing = Preprocessing(input_size=SMALL_SIZE, resize_shorter=73, mean=(0.5,) * 3, std=(0.25,) * 3)
    check_outputs(out, summary, Explainer(small_onnx, preprocessing=cli_preprocessing),
                  {p.name: p for p in good}, "gradcam")


def test_bad_input_is_refused_before_ray_starts(small_model_file: Path, image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        find_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="holds no images"):
        find_source(tmp_path / "empty")
    twins = tmp_path / "twins"
    twins.mkdir()
    for suffix in ("png", "jpg"):
        Image.new("RGB", (8, 8)).save(twins / f"a.{suffix}")
    with pytest.raises(InvalidInputError, match="would write the same outputs 'a'"):
        find_source(twins)
    pd.DataFrame({"x": [1, 2]}).to_parquet(tmp_path / "numbers.parquet")
    with pytest.raises(InvalidInputError, match="which column .* holds the image bytes"):
        find_source(tmp_path / "numbers.parquet")
    with pytest.raises(InvalidInputError, match="--image-column 'pixels' is not a column"):
        find_source(tmp_path / "numbers.parquet", image_column="pixels")
    with pytest.raises(UnknownMethodError):
        explain_dataset(image_folder, tmp_path / "o", small_model_file, "no-such-method")
    with pytest.raises(InvalidInputError, match="workers must be an integer >= 1, got 0"):
        explain_dataset(image_folder, tmp_path / "o", small_model_file, workers=0)
    with pytest.raises(InvalidModelError, match="stores no preprocessing"):
        explain_dataset(image_folder, tmp_path / "o", small_model_file)
    with pytest.raises(InvalidInputError, match="target class 10 is out of range"):
        explain_dataset(image_folder, tmp_path / "o", small_model_file, preprocessing=SMALL_PREPROCESSING, target=10)


def test_no_caption_writes_the_plain_overlay(ray_cluster, small_onnx, small_model_file: Path, image_folder: Path,
                                            tmp_path: Path) -> None:  # noqa: ANN001
    """`batch --no-caption` (the CLI, joining the cluster in-process) writes exactly Explainer.overlays(); the
    default job's overlays equal overlays(captions=True) and differ from the plain ones only in a bottom band."""
    from explainrt.cli import main

    cats = image_folder / "cats"
    # the CLI's preprocessing for --input-size 64 64 (resize the shorter side to 73, crop), for both jobs
    preprocessing = Preprocessing(input_size=SMALL_SIZE, resize_shorter=73, mean=(0.5,) * 3, std=(0.25,) * 3)
    captioned = explain_dataset(cats, tmp_path / "captioned", small_model_file, preprocessing=preprocessing,
                                batch_size=1, workers=2)
    assert main(["batch", str(cats), "--out", str(tmp_path / "plain"), "--model", str(small_model_file),
                 "--input-size", "64", "64", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25",
                 "--ray", ray_cluster, "--workers", "2", "--batch-size", "1", "--no-caption"]) == 0
    names = captioned.summary["image"].tolist()
    assert names == ["img0.jpg", "img1.png", "img2.jpg"]
    # without -v, Ray Data's own lines ("Starting execution...", "Progress bars disabled") stay off the terminal
    assert not logging.getLogger("explainrt").isEnabledFor(logging.INFO)
    assert logging.getLogger("ray.data").getEffectiveLevel() == logging.ERROR
    direct = Explainer(small_onnx, preprocessing=preprocessing)
    for name in names:
        stem = Path(name).stem
        plain = np.asarray(Image.open(tmp_path / "plain" / f"{stem}.gradcam.png"))
        with_caption = np.asarray(Image.open(tmp_path / "captioned" / f"{stem}.gradcam.png"))
        reference = direct.explain([cats / name], method="gradcam", batch_size=1, progress=False)
        np.testing.assert_array_equal(plain, reference.overlays()[0])
        np.testing.assert_array_equal(with_caption, reference.overlays(captions=True)[0])
        changed = np.nonzero((with_caption != plain).any(axis=(1, 2)))[0]
        assert changed.min() >= SMALL_SIZE[0] - 20 and changed.max() == SMALL_SIZE[0] - 1  # the caption band only


def test_ray_notices_are_held_without_v_and_shown_with_it(capfd: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Without -v Ray's C++ core starts at level fatal, its token warning is off and what reaches stderr (fd 2)
    while it starts is held, shown only if the start fails; with -v nothing changes. (The CLI test above
    checks a real job's stderr.)"""
    from explainrt.batch.job import (
        RAY_BACKEND_LOG_LEVEL,
        RAY_TOKEN_LOGGER,
        _ray_notices_at_verbose,
    )

    monkeypatch.delenv(RAY_BACKEND_LOG_LEVEL, raising=False)
    ours, token = logging.getLogger("explainrt"), logging.getLogger(RAY_TOKEN_LOGGER)
    levels = ours.level, token.level
    try:
        ours.setLevel(logging.WARNING)
        token.setLevel(logging.NOTSET)
        with _ray_notices_at_verbose():
            assert os.environ[RAY_BACKEND_LOG_LEVEL] == "fatal"
            os.write(2, b"logging.cc:303: Set ray log level from environment variable\n")
        assert RAY_BACKEND_LOG_LEVEL not in os.environ and token.level == logging.ERROR
        assert capfd.readouterr().err == ""
        with pytest.raises(RuntimeError, match="no cluster"), _ray_notices_at_verbose():
            os.write(2, b"gcs_client.cc:1: cannot connect\n")
            raise RuntimeError("no cluster")
        assert capfd.readouterr().err == "gcs_client.cc:1: cannot connect\n"
        monkeypatch.setenv(RAY_BACKEND_LOG_LEVEL, "debug")  # the user's own level is kept
        with _ray_notices_at_verbose():
            assert os.environ[RAY_BACKEND_LOG_LEVEL] == "debug"
        assert os.environ[RAY_BACKEND_LOG_LEVEL] == "debug"
        monkeypatch.delenv(RAY_BACKEND_LOG_LEVEL)
        ours.setLevel(logging.INFO)  # -v
        token.setLevel(logging.NOTSET)
        with _ray_notices_at_verbose():
            assert RAY_BACKEND_LOG_LEVEL not in os.environ
            os.write(2, b"core_worker.cc:2465: Actor ...\n")
        assert capfd.readouterr().err == "core_worker.cc:2465: Actor ...\n" and token.level == logging.NOTSET
    finally:
        ours.setLevel(levels[0])
        token.setLevel(levels[1])
