"""TensorRT compatibility check (``explainrt check-trt``): the shipped operator table, each kind of
restriction on hand-built graphs, the command line, and the zoo's explainable models (the nodes
explainrt adds must all be accepted by TensorRT's ONNX parser)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torchvision_zoo
from onnx import TensorProto, helper, numpy_helper

from explainrt.cli import main
from explainrt.deploy.trt_support import (
    OperatorTable,
    check_tensorrt_support,
    operator_table,
)
from explainrt.export import ExplainableSpec, make_explainable
from explainrt.export.spec import original_model

FLOAT = TensorProto.FLOAT


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           initializers: list[onnx.TensorProto] = (), opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _image(name: str = "x", dims: tuple = ("N", 3, 8, 8), elem: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(dims))


def _problems(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(f.node, f.problem) for f in check_tensorrt_support(model)]


# --- the table ------------------------------------------------------------------------------------


def test_table_names_its_tensorrt_version_and_source() -> None:
    table = operator_table()
    assert table.tensorrt_version == "10.15"
    assert (table.opset_min, table.opset_max) == (9, 24)
    assert "onnx-tensorrt" in table.source
    assert table.operators["Conv"] == ("FP32", "FP16", "BF16")
    assert table.operators["Unique"] is None
    assert "INT64" in table.operators["Gather"]
    assert all(table.operators[op] for op in table.restrictions)  # restrictions only on supported ops


# --- one hand-built graph per kind of finding ---------------------------------------------------


def test_clean_graph_has_no_findings() -> None:
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]
    assert _problems(_model(nodes, [_image()], [_image("y", ("N", 4, 4, 4))], [w])) == []


def test_unsupported_operator_and_custom_domain_are_findings() -> None:
    nodes = [helper.make_node("Unique", ["x"], ["u"], name="unique"),
             helper.make_node("Gelu", ["x"], ["g"], name="ms_gelu", domain="com.microsoft")]
    model = _model(nodes, [_image("x", (5,))], [_image("u", (None,)), _image("g", (5,))])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    problems = dict(_problems(model))
    assert "not supported by TensorRT 10.15" in problems["unique"]
    assert "domain 'com.microsoft'" in problems["ms_gelu"]


def test_opset_outside_the_parsed_range_is_a_model_finding() -> None:
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    problems = _problems(_model([node], [_image()], [_image("y")], opset=8))
    assert problems == [("<model>", "ONNX opset 8 is outside the range TensorRT 10.15 parses (9..24)")]


def test_maxpool_indices_output_and_dilations_are_findings() -> None:
    node = helper.make_node("MaxPool", ["x"], ["y", "indices"], name="pool", kernel_shape=[2, 2], dilations=[2, 2])
    outputs = [_image("y", ("N", 3, 6, 6)), _image("indices", ("N", 3, 6, 6), TensorProto.INT64)]
    problems = [p for _, p in _problems(_model([node], [_image()], outputs))]
    assert any("uses output(s) ['indices']" in p and "`Indices` output tensor unsupported" in p for p in problems)
    assert any("attribute dilations=[2, 2]" in p for p in problems)


def test_one_dimensional_pooling_is_a_finding() -> None:
    node = helper.make_node("AveragePool", ["x"], ["y"], name="pool", kernel_shape=[2])
    problems = _problems(_model([node], [_image("x", ("N", 3, 8))], [_image("y", ("N", 3, 7))]))
    assert problems and "input has 1 spatial dimensions" in problems[0][1]


@pytest.mark.parametrize("attribute, value, allowed", [
    ("mode", "cubic", True),
    ("coordinate_transformation_mode", "tf_crop_and_resize", True),
    ("antialias", 1, True),
    ("mode", "linear", False),
])
def test_resize_modes(attribute: str, value: object, allowed: bool) -> None:
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize", **{attribute: value})
    problems = _problems(_model([node], [_image()], [_image("y", ("N", 3, 16, 16))], [scales], opset=18))
    assert bool(problems) == allowed
    if problems:
        assert f"attribute {attribute}={value!r}" in problems[0][1]


def test_topk_must_be_sorted_with_k_below_3840() -> None:
    k_small = numpy_helper.from_array(np.array([5], np.int64), "k_small")
    k_large = numpy_helper.from_array(np.array([4000], np.int64), "k_large")
    nodes = [helper.make_node("TopK", ["x", "k_small"], ["v1", "i1"], name="unsorted", axis=-1, sorted=0),
             helper.make_node("TopK", ["x", "k_large"], ["v2", "i2"], name="too_many", axis=-1)]
    outputs = [_image(n, ("N", None)) for n in ("v1", "v2")] + [_image(n, ("N", None), TensorProto.INT64) for n in ("i1", "i2")]
    problems = dict(_problems(_model(nodes, [_image("x", ("N", 5000))], outputs, [k_small, k_large])))
    assert "attribute sorted=0" in problems["unsorted"]
    assert "is [4000]" in problems["too_many"] and "less than 3840" in problems["too_many"]


def test_topk_with_k_from_a_static_dimension_of_a_dynamic_shape_is_resolved() -> None:
    """explainrt's target resolution takes K = Shape(logits)[1:2]: known at build time."""
    start = numpy_helper.from_array(np.array([1], np.int64), "start")
    stop = numpy_helper.from_array(np.array([2], np.int64), "stop")
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Slice", ["shape", "start", "stop"], ["k"]),
             helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=-1)]
    outputs = [_image("v", ("N", 5000)), _image("i", ("N", 5000), TensorProto.INT64)]
    problems = dict(_problems(_model(nodes, [_image("x", ("N", 5000))], outputs, [start, stop])))
    assert "is [5000]" in problems["topk"]  # the folded value is checked like a constant


def test_reduction_axes_computed_at_run_time_are_a_finding() -> None:
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Size", ["shape"], ["rank"]),
             helper.make_node("Reshape", ["rank", "one"], ["axes"]),
             helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum", keepdims=1),
             helper.make_node("ReduceMean", ["x", "const_axes"], ["z"], name="mean", keepdims=1)]
    initializers = [numpy_helper.from_array(np.array([1], np.int64), "one"),
                    numpy_helper.from_array(np.array([1], np.int64), "const_axes")]
    outputs = [_image("y", (None, None, None, None)), _image("z", ("N", 1, 8, 8))]
    problems = dict(_problems(_model(nodes, [_image()], outputs, initializers)))
    assert "input 1 ('axes') is computed at run time" in problems["sum"]
    assert "mean" not in problems


def test_element_types_outside_the_table_are_findings() -> None:
    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.int64), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="int_conv"),
             helper.make_node("Cast", ["x"], ["d"], name="to_double", to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["x"], ["s"], name="to_int16", to=TensorProto.INT16)]
    x = _image("x", ("N", 1, 4, 4), TensorProto.INT64)
    outputs = [_image("y", ("N", 1, 4, 4), TensorProto.INT64), _image("d", ("N", 1, 4, 4), TensorProto.DOUBLE),
               _image("s", ("N", 1, 4, 4), TensorProto.INT16)]
    problems = dict(_problems(_model(nodes, [x], outputs, [w])))
    assert "element type INT64; TensorRT supports FP32, FP16, BF16 here" in problems["int_conv"]
    assert "to_double" not in problems  # DOUBLE is cast down to FLOAT by TensorRT
    assert "element type INT16" in problems["to_int16"]


def test_dropout_in_training_mode_is_a_finding() -> None:
    training = numpy_helper.from_array(np.array(True), "training")
    ratio = numpy_helper.from_array(np.array(0.5, np.float32), "ratio")
    node = helper.make_node("Dropout", ["x", "ratio", "training"], ["y"], name="dropout")
    problems = dict(_problems(_model([node], [_image()], [_image("y")], [ratio, training])))
    assert "input 2 ('training') is true" in problems["dropout"]


def test_unknown_restriction_kind_in_a_table_is_an_error() -> None:
    table = OperatorTable("0", 9, 24, {"Relu": ("FP32",)}, {"Relu": ({"rule": "bogus", "text": "?"},)},
                          frozenset(), "test")
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    with pytest.raises(ValueError, match="unknown restriction kind 'bogus'"):
        check_tensorrt_support(_model([node], [_image()], [_image("y")]), table)


# --- the command line ---------------------------------------------------------------------------


def _saved(model: onnx.ModelProto, path: Path) -> str:
    onnx.save(model, path)
    return str(path)


def test_cli_exit_status_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = _saved(_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_image()], [_image("y")]),
                   tmp_path / "clean.onnx")
    bad = _saved(_model([helper.make_node("MaxPool", ["x"], ["y", "i"], name="pool", kernel_shape=[2, 2])],
                        [_image()], [_image("y", ("N", 3, 7, 7)), _image("i", ("N", 3, 7, 7), TensorProto.INT64)]),
                 tmp_path / "bad.onnx")
    assert main(["check-trt", clean]) == 0
    assert "no findings against TensorRT 10.15" in capsys.readouterr().out
    assert main(["check-trt", bad]) == 1
    out = capsys.readouterr().out
    assert "pool (MaxPool): uses output(s) ['i']" in out and "1 finding(s)" in out
    assert main(["check-trt", bad, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)[0]["node"] == "pool"
    assert main(["check-trt", bad, "--explainrt-only"]) == 0  # the finding is in the user's own nodes
    assert main(["check-trt", str(tmp_path / "missing.onnx")]) == 2
    assert "model file not found" in capsys.readouterr().err


# --- the zoo: explainrt's gradient graphs ---------------------------------------------------------

@pytest.fixture(scope="module", params=torchvision_zoo.params(sorted(torchvision_zoo.SHARED)))
def zoo_models(request: pytest.FixtureRequest) -> tuple[str, list[onnx.ModelProto]]:
    """A zoo model (random init, 64x64) made explainable at two layers (the export test_zoo_gradients.py
    checks against autograd), and its input-gradient, cross-entropy variant (whose gradient graph
    crosses the whole network)."""
    layers = torchvision_zoo.export(request.param).explainable
    spec = ExplainableSpec.from_model(layers)
    to_input = make_explainable(original_model(layers), [spec.image_input], logits=spec.logits,
                                objective="cross_entropy")
    return request.param, [layers, to_input]


def test_zoo_gradient_graphs_are_tensorrt_compatible(zoo_models: tuple[str, list[onnx.ModelProto]]) -> None:
    name, models = zoo_models
    for model in models:
        added = Counter(n.op_type for n in model.graph.node if n.name.startswith("explainrt/"))
        assert added["TopK"] == 1 and len(added) > 5, added  # the gradient graph is there to check
        findings = check_tensorrt_support(model)
        assert [str(f) for f in findings if f.node.startswith("explainrt/")] == [], name
        assert [str(f) for f in findings] == [], name  # torchvision's own nodes pass as well
