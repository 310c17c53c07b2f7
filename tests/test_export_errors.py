"""The exporter's errors: every bad model, layer or name gets the exception that names it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from explainrt.errors import InvalidModelError, NoSpatialLayerError, UnknownLayerError
from explainrt.export import ExplainableSpec, load_model, make_explainable
from explainrt.export.spec import METADATA_KEY
from explainrt.export.torch_export import from_torch


def _init(name: str, shape: list[int], seed: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _model(*, spatial: bool = True) -> onnx.ModelProto:
    """image [N, 3, 8, 8] -> Conv -> Relu (``features``) -> GlobalAveragePool -> Flatten -> Gemm -> ``logits``.

    Without ``spatial`` the Conv and Relu are left out: nothing rank 4 with h * w > 1 is computed.
    """
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["features"], name="relu"),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"], name="gap"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    channels = 4 if spatial else 3
    if not spatial:
        nodes = nodes[2:]
        nodes[0].input[0] = "image"
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        [_init("w", [4, 3, 3, 3], 0), _init("fc_w", [5, channels], 1), _init("fc_b", [5], 2)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


# --- target layers and logits -------------------------------------------------------------------
def test_unknown_target_layer_suggests_close_names() -> None:
    with pytest.raises(UnknownLayerError, match=r"'featurez'.*did you mean 'features'"):
        make_explainable(_model(), ["featurez"])


def test_unknown_target_layer_without_close_names() -> None:
    with pytest.raises(UnknownLayerError, match="'no_such_tensor' is not a tensor of the model"):
        make_explainable(_model(), "no_such_tensor")


@pytest.mark.parametrize("name", ["flat", "logits", "fc_b"])
def test_target_layer_must_be_rank4(name: str) -> None:
    with pytest.raises(UnknownLayerError, match=rf"'{name}' must be a float tensor \[N, C, h, w\]"):
        make_explainable(_model(), [name])


def test_empty_target_layers() -> None:
    with pytest.raises(UnknownLayerError, match="empty"):
        make_explainable(_model(), [])


def test_no_spatial_layer_for_auto() -> None:
    with pytest.raises(NoSpatialLayerError, match="'logits'"):
        make_explainable(_model(spatial=False), "auto")


def test_no_spatial_layer_error_names_the_logits_given() -> None:
    with pytest.raises(NoSpatialLayerError, match="'flat'"):
        make_explainable(_model(spatial=False), "auto", logits="flat")


def test_unknown_logits_suggests_close_names() -> None:
    with pytest.raises(UnknownLayerError, match=r"logits tensor 'logit' not found.*did you mean 'logits'"):
        make_explainable(_model(), "auto", logits="logit")


def test_explained_output_of_rank_below_2() -> None:
    """[N, classes, ...] outputs are explained (a class sums its channel); a rank-1 output is refused."""
    assert ExplainableSpec.from_model(make_explainable(_model(), ["features"], logits="pooled")).output_shape == (4, 1, 1)
    model = _model()
    model.graph.node.append(helper.make_node("ReduceSum", ["logits"], ["total"], name="total", keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N"]))
    with pytest.raises(InvalidModelError, match=r"must have shape \[N, classes\] or \[N, classes, ...\]"):
        make_explainable(model, "auto", logits="total")


def test_an_inner_tensor_explained_becomes_an_output() -> None:
    """A final Softmax's input, or an inner tensor named as the logits, is an output of the explainable model (a
    runtime returns only outputs): its values come back, in ONNX Runtime and through the Explainer."""
    from explainrt import Explainer

    model = _model()
    model.graph.node.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1))
    model.graph.output[0].name = "probabilities"
    image = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    plain = onnxruntime_outputs(model, image, ["logits", "pooled"])
    explained = Explainer(model.SerializeToString(), ["features"]).explain(image, normalize=False)
    np.testing.assert_allclose(explained.logits, plain[0], rtol=1e-5, atol=1e-6)
    inner = make_explainable(model, ["features"], logits="pooled")
    assert "pooled" in [o.name for o in inner.graph.output]
    np.testing.assert_allclose(onnxruntime_outputs(inner, image, ["pooled"])[0], plain[1], rtol=1e-6)


def test_an_index_into_a_single_tensor_output_is_refused() -> None:
    """output=1 on a model returning one tensor would pick along the batch axis: refused, naming it."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 5)).eval()
    with pytest.raises(InvalidModelError, match=r"returns one tensor.*output=1 has nothing to choose"):
        from_torch(model, torch.zeros(1, 3, 8, 8), [model[0]], output=1)
    assert ExplainableSpec.from_model(from_torch(model, torch.zeros(1, 3, 8, 8), [model[0]], output=0)).num_classes == 5


def onnxruntime_outputs(model: onnx.ModelProto, image: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """``names`` of ``model`` run on ``image`` in ONNX Runtime, inner tensors made outputs first."""
    import onnxruntime

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in known)
    session = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: image if i.name == "image" else np.full((image.shape[0], 1), -1, np.int64) for i in session.get_inputs()}
    return session.run(names, feeds)


def test_target_off_the_path_to_the_logits() -> None:
    model = _model()
    model.graph.node.append(helper.make_node("Sigmoid", ["image"], ["side"], name="side_branch"))
    with pytest.raises(InvalidModelError, match="does not depend on"):
        make_explainable(model, ["side"])


def test_auto_target_is_the_last_spatial_tensor() -> None:
    spec = ExplainableSpec.from_model(make_explainable(_model()))
    assert spec.target_layers == ("features",)


# --- unreadable models ------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [b"\x00\xffnot an onnx model\x13\x37", b"hello world, this is text\n"],
                         ids=["binary-garbage", "text"])
def test_corrupt_bytes(data: bytes) -> None:
    with pytest.raises(InvalidModelError, match="cannot read ONNX model"):
        load_model(data)
    with pytest.raises(InvalidModelError):
        make_explainable(data)


def test_truncated_model_bytes() -> None:
    data = _model().SerializeToString()
    with pytest.raises(InvalidModelError):
        make_explainable(data[: len(data) // 2])


def test_empty_bytes_cannot_be_made_explainable() -> None:
    with pytest.raises(InvalidModelError):
        make_explainable(b"")


def test_load_model_rejects_empty_bytes_like_an_empty_file() -> None:
    with pytest.raises(InvalidModelError, match="hold no ONNX graph"):
        load_model(b"")


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_text("this is not a model\nbut a text file\n")
    with pytest.raises(InvalidModelError, match="model.onnx"):
        make_explainable(path)
    with pytest.raises(InvalidModelError):
        make_explainable(str(path))


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(InvalidModelError, match="hold no ONNX graph"):
        make_explainable(path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="not found"):
        make_explainable(tmp_path / "missing.onnx")


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError):
        make_explainable(tmp_path)


def test_invalid_graph() -> None:
    model = _model()
    model.graph.node[1].input[0] = "undefined_tensor"
    with pytest.raises(InvalidModelError, match="invalid ONNX model"):
        make_explainable(model)


def test_model_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    onnx.save(_model(), str(path))
    assert ExplainableSpec.from_model(make_explainable(path)).target_layers == ("features",)


# --- the PyTorch front door ----------------------------------------------------------------------
class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.unused = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_torch_module_not_in_the_model() -> None:
    model = _Tiny().eval()
    stranger = torch.nn.Conv2d(3, 4, 3)
    with pytest.raises(UnknownLayerError, match="not a sub-module of the model"):
        from_torch(model, torch.zeros(1, 3, 8, 8), [stranger])


def test_torch_module_of_another_model() -> None:
    model, other = _Tiny().eval(), _Tiny().eval()
    with pytest.raises(UnknownLayerError):
        from_torch(model, torch.zeros(1, 3, 8, 8), [other.conv])


def test_torch_module_never_called() -> None:
    model = _Tiny().eval()
    with pytest.raises(UnknownLayerError, match="not called"):
        from_torch(model, torch.zeros(1, 3, 8, 8), [model.unused])


# --- metadata -------------------------------------------------------------------------------------
def test_metadata_round_trip() -> None:
    model = make_explainable(_model(), ["conv", "features"], logits="logits", preprocessing='{"size": 8}')
    spec = ExplainableSpec.from_model(model)
    layout = {"kind": "nchw", "grid": [8, 8], "channels": 4, "prefix_tokens": 0}
    assert spec == ExplainableSpec("image", "logits", 5, ("conv", "features"), '{"size": 8}', "logit", (layout, layout),
                                   output_shape=(5,))
    again = ExplainableSpec.from_model(onnx.load_from_string(model.SerializeToString()))
    assert again == spec
    assert ExplainableSpec(**{**spec.__dict__}).to_json() == spec.to_json()


def test_metadata_missing() -> None:
    with pytest.raises(InvalidModelError, match="no explainrt metadata"):
        ExplainableSpec.from_model(_model())


@pytest.mark.parametrize("value", ["{not json", '{"image_input": "image"}', '["a list"]', '{"unknown": 1}'])
def test_metadata_corrupt(value: str) -> None:
    model = _model()
    model.metadata_props.add(key=METADATA_KEY, value=value)
    with pytest.raises(InvalidModelError, match="corrupt explainrt metadata"):
        ExplainableSpec.from_model(model)


def test_an_explainable_model_is_not_rewritten_twice() -> None:
    once = make_explainable(_model(), ["features"])
    with pytest.raises(InvalidModelError, match="already has a tensor named 'explainrt.targets'"):
        make_explainable(once, ["conv"])
