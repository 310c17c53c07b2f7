"""Triton model repository export: config.pbtxt parsed back with Triton's own schema and checked
against what ONNX Runtime reports for the model file in the repository, which must load and run."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import SMALL_CLASSES, SMALL_SIZE
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from explainrt.cli import main
from explainrt.errors import InvalidInputError, InvalidModelError
from explainrt.models.default import default_explainable_model
from explainrt.export.spec import ExplainableSpec, original_model
from explainrt.deploy.triton import write_triton_repository
from explainrt.preprocessing import Preprocessing

ORT_TO_TRITON = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}


def parse_config(folder: Path) -> model_config_pb2.ModelConfig:
    """Parse config.pbtxt independently of explainrt's reader: Triton's message, protobuf's text parser."""
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def check_against_onnxruntime(config: model_config_pb2.ModelConfig, folder: Path) -> ort.InferenceSession:
    """Names, dtypes and dims (batch axis dropped, dynamic sizes -1) agree with the model file's own."""
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [t.name for t in declared] == [a.name for a in actual]
        for tensor, info in zip(declared, actual):
            assert model_config_pb2.DataType.Name(tensor.data_type) == ORT_TO_TRITON[info.type]
            assert not isinstance(info.shape[0], int)  # a dynamic batch axis
            assert list(tensor.dims) == [d if isinstance(d, int) else -1 for d in info.shape[1:]]
    return session


def test_small_model_repository_parses_back_and_runs(small_onnx, small_resnet, tmp_path: Path) -> None:  # noqa: ANN001
    folder = write_triton_repository(small_onnx, tmp_path / "repo", name="small", max_batch_size=8,
                                     preferred_batch_sizes=[4, 8], max_queue_delay_us=2000, instance_count=2)
    assert folder == tmp_path / "repo" / "small"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == ["1", "1/model.onnx", "config.pbtxt"]
    config = parse_config(folder)
    assert (config.name, config.platform, config.max_batch_size) == ("small", "onnxruntime_onnx", 8)
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    dims = {t.name: list(t.dims) for t in [*config.input, *config.output]}
    assert dims == {"input": [3, *SMALL_SIZE], "explainrt.targets": [-1], "logits": [SMALL_CLASSES],
                    "explainrt.resolved_targets": [-1], "explainrt.activations.0": [512, 2, 2],
                    "explainrt.gradients.0": [-1, 512, 2, 2]}
    assert '"num_classes": 10' in config.parameters["explainrt"].string_value
    session = check_against_onnxruntime(config, folder)

    images = np.random.default_rng(1).standard_normal((3, 3, *SMALL_SIZE)).astype(np.float32)
    targets = np.array([[-1, 2], [0, 1], [-2, 9]], dtype=np.int64)
    logits, resolved, activations, gradients = session.run(
        ["logits", "explainrt.resolved_targets", "explainrt.activations.0", "explainrt.gradients.0"],
        {"input": images, "explainrt.targets": targets})
    with torch.no_grad():
        expected = small_resnet(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    order = np.argsort(-expected, axis=1)
    assert resolved.tolist() == [[order[0, 0], 2], [0, 1], [order[2, 1], 9]]
    assert activations.shape == (3, 512, 2, 2) and gradients.shape == (3, 2, 512, 2, 2)


def test_default_model_repository(default_explainer, example_images, tmp_path: Path) -> None:  # noqa: ANN001
    folder = write_triton_repository(default_explainable_model(), tmp_path, name="efficientnet_lite0",
                                     max_batch_size=0, instance_kind="gpu")
    config = parse_config(folder)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    dims = {t.name: list(t.dims) for t in [*config.input, *config.output]}
    assert dims["explainrt.targets"] == [-1, -1] and dims["explainrt.gradients.0"][:2] == [-1, -1]
    image_input = config.input[0].name
    assert dims[image_input] == [-1, 3, 224, 224]
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in declared] == \
            [(a.name, ORT_TO_TRITON[a.type], [d if isinstance(d, int) else -1 for d in a.shape]) for a in actual]
    batch, _ = default_explainer.prepare(list(example_images.values()))
    logits = session.run([config.output[0].name], {image_input: batch,
                                                   "explainrt.targets": np.full((3, 1), -1, np.int64)})[0]
    np.testing.assert_allclose(logits, default_explainer.predict(batch), rtol=1e-4, atol=1e-4)
    assert logits.argmax(axis=1)[1] == 967  # coffee: espresso


def test_plain_model_is_made_explainable(small_onnx, tmp_path: Path) -> None:  # noqa: ANN001
    plain = original_model(small_onnx)
    assert not any(o.name.startswith("explainrt.") for o in plain.graph.output)
    config = parse_config(write_triton_repository(plain, tmp_path, name="plain"))
    assert [o.name for o in config.output] == ["logits", "explainrt.resolved_targets", "explainrt.activations.0",
                                               "explainrt.gradients.0"]


def test_bad_settings_and_existing_folder(small_onnx, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match="max_batch_size must be an integer >= 0.*-1"):
        write_triton_repository(small_onnx, tmp_path, max_batch_size=-1)
    with pytest.raises(InvalidInputError, match=r"preferred_batch_sizes must be 1..max_batch_size \(4\)"):
        write_triton_repository(small_onnx, tmp_path, max_batch_size=4, preferred_batch_sizes=[8])
    with pytest.raises(InvalidInputError, match="model name '../up'"):
        write_triton_repository(small_onnx, tmp_path, name="../up")
    with pytest.raises(InvalidInputError, match="instance_kind must be one of"):
        write_triton_repository(small_onnx, tmp_path, instance_kind="tpu")

    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidInputError, match="exists and is not empty.*--force"):
        write_triton_repository(small_onnx, tmp_path, name="taken")
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]
    write_triton_repository(small_onnx, tmp_path, name="taken", force=True)
    assert sorted(p.name for p in existing.iterdir()) == ["1", "config.pbtxt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_fixed_batch_axis_needs_max_batch_size_zero(small_onnx, tmp_path: Path) -> None:  # noqa: ANN001
    fixed = copy.deepcopy(small_onnx)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(InvalidModelError, match="tensor 'input' has a fixed batch size 1.*max_batch_size 0"):
        write_triton_repository(fixed, tmp_path, name="fixed")
    assert not (tmp_path / "fixed").exists()
    config = parse_config(write_triton_repository(fixed, tmp_path, name="fixed", max_batch_size=0))
    assert list(config.input[0].dims) == [1, 3, *SMALL_SIZE]


def test_cli_export_triton(small_onnx, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    model = tmp_path / "small.onnx"
    onnx.save(small_onnx, model)
    repo = tmp_path / "repo"
    argv = ["export", str(model), "--triton", str(repo), "--input-size", "64", "64", "--max-batch-size", "4"]
    assert main(argv) == 0
    assert "wrote Triton model 'small'" in capsys.readouterr().out
    config = parse_config(repo / "small")
    assert config.max_batch_size == 4 and list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    check_against_onnxruntime(config, repo / "small")
    stored = onnx.load(str(repo / "small" / "1" / "model.onnx"))
    assert Preprocessing.from_json(ExplainableSpec.from_model(stored).preprocessing).input_size == (64, 64)

    assert main(argv) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main([*argv, "--force", "--triton-name", "renamed", "-o", str(tmp_path / "out.onnx")]) == 0
    assert (repo / "renamed" / "config.pbtxt").is_file() and (tmp_path / "out.onnx").is_file()
    capsys.readouterr()
    assert main(["export", str(model)]) == 2
    assert "export needs -o OUT.onnx, --triton DIR or both" in capsys.readouterr().err
    assert main(["export", str(model), "--triton", str(repo), "--max-batch-size", "-2"]) == 2
    assert "max_batch_size must be an integer >= 0" in capsys.readouterr().err


def test_repository_with_map_heads_returns_heatmaps(small_onnx, small_batch, tmp_path: Path) -> None:  # noqa: ANN001
    """config.pbtxt declares the maps; feeding exactly its inputs to the model file gives explainrt's maps."""
    from explainrt import Explainer

    folder = write_triton_repository(small_onnx, tmp_path / "repo", name="heat", max_batch_size=8,
                                     maps="gradcam,layercam", maps_only=True, maps_dtype="uint8")
    config = parse_config(folder)
    declared = {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.output}
    assert declared == {"logits": ("TYPE_FP32", [SMALL_CLASSES]), "explainrt.resolved_targets": ("TYPE_INT64", [-1]),
                        "explainrt.maps.gradcam": ("TYPE_UINT8", [-1, *SMALL_SIZE]),
                        "explainrt.maps.layercam": ("TYPE_UINT8", [-1, *SMALL_SIZE])}
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input": small_batch, "explainrt.targets": np.array([[-1, 4]] * 3, dtype=np.int64)}
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type)) for t in config.input] == [
        ("input", "TYPE_FP32"), ("explainrt.targets", "TYPE_INT64")]
    outputs = dict(zip([t.name for t in config.output], session.run([t.name for t in config.output], feeds)))
    python = Explainer(small_onnx, map_heads=False)
    for method in ("gradcam", "layercam"):
        for k, targets in enumerate((None, 4)):
            expected = python.explain(small_batch, method=method, targets=targets).maps
            np.testing.assert_allclose(outputs[f"explainrt.maps.{method}"][:, k], np.round(expected * 255), atol=1)


def test_cli_export_maps(small_onnx, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    """--maps / --maps-only / --maps-dtype, and bad map options refused before the export."""
    model = tmp_path / "small.onnx"
    onnx.save(small_onnx, model)
    out = tmp_path / "maps.onnx"
    assert main(["export", str(model), "-o", str(out), "--maps", "gradcam,gradcam++", "--maps-only",
                 "--maps-dtype", "float16"]) == 0
    assert "maps gradcam, gradcam++ (float16, maps only)" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [(o.name, o.type) for o in session.get_outputs()] == [
        ("logits", "tensor(float)"), ("explainrt.resolved_targets", "tensor(int64)"),
        ("explainrt.maps.gradcam", "tensor(float16)"), ("explainrt.maps.gradcam++", "tensor(float16)")]
    assert main(["export", str(model), "-o", str(out), "--maps", "eigencam"]) == 2
    assert "'eigencam' has no map head" in capsys.readouterr().err
    assert main(["export", str(model), "-o", str(out), "--maps", "gradcam,nosuch"]) == 2
    assert "no map head for 'nosuch'" in capsys.readouterr().err
    assert main(["export", str(model), "-o", str(out), "--maps-only"]) == 2
    assert "--maps-only needs --maps METHODS" in capsys.readouterr().err


def test_cli_export_objective_takes_target_objects_in_the_graph(small_onnx, small_batch, tmp_path: Path,  # noqa: ANN001
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--objective weights: the exported model takes explainrt.weights (any linear objective: a Region, a
    Similarity) in place of class indices, also in Triton's config; one-hot weights give the class-index
    maps. --objective cross_entropy gives Contrast-CAM its head; a method of another objective is refused."""
    model = tmp_path / "small.onnx"
    onnx.save(small_onnx, model)
    out, classes = tmp_path / "weights.onnx", tmp_path / "classes.onnx"
    assert main(["export", str(model), "-o", str(out), "--objective", "weights", "--maps", "gradcam", "--maps-only",
                 "--triton", str(tmp_path / "repo")]) == 0
    assert "objective weights" in capsys.readouterr().out
    assert main(["export", str(model), "-o", str(classes), "--maps", "gradcam", "--maps-only"]) == 0
    weighted = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in weighted.get_inputs()] == ["input", "explainrt.weights"]
    one_hot = np.zeros((3, 1, SMALL_CLASSES), np.float32)
    one_hot[np.arange(3), 0, [0, 3, 7]] = 1
    ours = weighted.run(["explainrt.maps.gradcam"], {"input": small_batch, "explainrt.weights": one_hot})[0]
    by_class = ort.InferenceSession(str(classes), providers=["CPUExecutionProvider"]).run(
        ["explainrt.maps.gradcam"], {"input": small_batch, "explainrt.targets": np.array([[0], [3], [7]], np.int64)})[0]
    assert by_class.std() > 0.05
    np.testing.assert_allclose(ours, by_class, atol=1e-5)
    config = parse_config(tmp_path / "repo" / "small")
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [3, *SMALL_SIZE]),
                                                              ("explainrt.weights", [-1, SMALL_CLASSES])]
    contrast = tmp_path / "contrast.onnx"
    assert main(["export", str(model), "-o", str(contrast), "--objective", "cross_entropy", "--maps", "contrast-cam"]) == 0
    assert "explainrt.maps.contrast-cam" in [o.name for o in onnx.load(contrast).graph.output]
    assert main(["export", str(model), "-o", str(contrast), "--objective", "cross_entropy", "--maps", "gradcam"]) == 2
    assert "weighs the gradients of objective 'logit'" in capsys.readouterr().err
    # a model of another objective keeps it unless told otherwise (and takes its methods' heads)
    assert main(["export", str(contrast), "-o", str(tmp_path / "again.onnx"), "--maps", "counterfactual-cam"]) == 2
    assert "differentiates 'cross_entropy'" in capsys.readouterr().err
    assert main(["export", str(contrast), "-o", str(tmp_path / "again.onnx")]) == 0
    assert "objective cross_entropy" in capsys.readouterr().out
    assert ExplainableSpec.from_model(onnx.load(tmp_path / "again.onnx")).maps == ("contrast-cam",)
