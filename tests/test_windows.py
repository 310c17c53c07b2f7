"""Reverse-pass branches run on a window of their grid (``explainrt.autodiff.windows``): the same values as on
the whole grid where the branch allows a window, and the whole grid where it does not.

Hand-built ``If`` branches over a 6x8 grid (the cotangent ``g`` [K, 1, C, cells], non-zero at one random cell per
trial, reshaped to the grid as the reverse pass does) check each rule of the allow-list; a small two-scale
detector with a non-square grid and 3x3, 5x5 and 3x5 kernels checks the rewrite on a real reverse pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from explainrt.autodiff.windows import run_on_windows
from explainrt.autodiff.zero_branches import ZeroBranches

H, W, C, K = 6, 8, 2, 2
Body = Callable[[list[onnx.NodeProto]], str]


def _on_grid(nodes: list[onnx.NodeProto], sized_by: str = "x") -> str:
    """The cotangent as the reverse pass reshapes it: [K, 1, C, H*W] -> [K, 1, C, H, W] -> [K*1, C, H, W], the
    grid's size read from forward tensor ``sized_by``."""
    nodes += [helper.make_node("Shape", [sized_by], ["x_shape"]),
              helper.make_node("Concat", ["seeds", "x_shape"], ["seeded_shape"], axis=0),
              helper.make_node("Reshape", ["g", "seeded_shape"], ["g5"]),
              helper.make_node("Shape", ["g5"], ["g5_shape"]),
              helper.make_node("Slice", ["g5_shape", "two", "max"], ["g5_tail"]),
              helper.make_node("Concat", ["minus_one", "g5_tail"], ["merged_shape"], axis=0),
              helper.make_node("Reshape", ["g5", "merged_shape"], ["g4"])]
    return "g4"


def _conv(nodes: list[onnx.NodeProto], source: str, *extra: str) -> str:
    nodes.append(helper.make_node("Conv", [source, "w", *extra], [f"{source}/conv"], pads=[1, 1, 1, 1]))
    return f"{source}/conv"


def _back(nodes: list[onnx.NodeProto], source: str) -> str:
    """[K*1, C, H, W] -> [K, 1, C, H, W], times the forward value ``x`` (a SiLU's derivative would be here)."""
    nodes += [helper.make_node("Reshape", [source, "seeded_shape"], ["back"]),
              helper.make_node("Mul", ["back", "x"], ["result"])]
    return "result"


def linear(nodes: list[onnx.NodeProto]) -> str:
    return _back(nodes, _conv(nodes, _on_grid(nodes)))


def where_zero(nodes: list[onnx.NodeProto]) -> str:  # a Relu's rule: the cotangent where the input is positive
    _back(nodes, _conv(nodes, _on_grid(nodes)))
    nodes += [helper.make_node("Greater", ["x", "zero"], ["positive"]),
              helper.make_node("Where", ["positive", "back", "zero"], ["chosen"])]
    return "chosen"


def conv_bias(nodes: list[onnx.NodeProto]) -> str:  # a bias adds a constant everywhere, also outside the window
    return _back(nodes, _conv(nodes, _on_grid(nodes), "bias"))


def add_constant(nodes: list[onnx.NodeProto]) -> str:
    nodes.append(helper.make_node("Add", [_on_grid(nodes), "one"], ["shifted"]))
    return _back(nodes, _conv(nodes, "shifted"))


def exp_of_cotangent(nodes: list[onnx.NodeProto]) -> str:  # exp(0) = 1: not zero where the cotangent is
    nodes.append(helper.make_node("Exp", [_on_grid(nodes)], ["exp"]))
    return _back(nodes, _conv(nodes, "exp"))


def constant_along_columns(nodes: list[onnx.NodeProto]) -> str:  # [W] broadcasts against the window's columns
    nodes.append(helper.make_node("Mul", [_on_grid(nodes), "ramp"], ["ramped"]))
    return _back(nodes, _conv(nodes, "ramped"))


def rows_for_columns(nodes: list[onnx.NodeProto]) -> str:  # [H, W] read as [W, H], convolved, read back
    grid = _on_grid(nodes)
    nodes += [helper.make_node("Shape", [grid], ["s4"]),
              helper.make_node("Slice", ["s4", "zero_i", "two"], ["lead"]),
              helper.make_node("Slice", ["s4", "two", "three"], ["rows"]),
              helper.make_node("Slice", ["s4", "three", "four"], ["columns"]),
              helper.make_node("Concat", ["lead", "columns", "rows"], ["swapped"], axis=0),
              helper.make_node("Reshape", [grid, "swapped"], ["transposed"])]
    nodes.append(helper.make_node("Reshape", [_conv(nodes, "transposed"), "s4"], ["restored"]))
    return _back(nodes, "restored")


def forward_convolution(nodes: list[onnx.NodeProto]) -> str:  # the forward value's neighbours lie outside the window
    nodes.append(helper.make_node("Conv", ["x", "w"], ["x_conv"], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Mul", [_conv(nodes, _on_grid(nodes)), "x_conv"], ["weighted"]))
    return _back(nodes, "weighted")


def sized_by_another(nodes: list[onnx.NodeProto]) -> str:  # z is read for its shape alone: not cut, its window's shape
    return _back(nodes, _conv(nodes, _on_grid(nodes, "z")))  # made from its leading axes and the window's size


def another_gradient(nodes: list[onnx.NodeProto]) -> str:  # a gradient from elsewhere: non-zero anywhere
    nodes.append(helper.make_node("Add", [_back(nodes, _conv(nodes, _on_grid(nodes))), "other"], ["total"]))
    return "total"


def _model(body: Body, opset: int = 18) -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    result = body(nodes)
    nodes.append(helper.make_node("Identity", [result], ["gx/then"]))
    then = helper.make_graph(nodes, "then", [], [helper.make_tensor_value_info("gx/then", TensorProto.FLOAT, None)])
    otherwise = helper.make_graph([
        helper.make_node("Shape", ["x"], ["else_shape"]),
        helper.make_node("Concat", ["seeds", "else_shape"], ["zeros_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["zeros_shape"], ["zeros"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))],
        "else", [], [helper.make_tensor_value_info("zeros", TensorProto.FLOAT, None)])
    rng = np.random.default_rng(0)
    constants = {"two": [2], "three": [3], "four": [4], "zero_i": [0], "max": [np.iinfo(np.int64).max], "minus_one": [-1]}
    initializers = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in constants.items()] + [
        numpy_helper.from_array(rng.normal(size=(C, C, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([0.5, -0.25], np.float32), "bias"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.arange(W, dtype=np.float32), "ramp")]
    graph = helper.make_graph([helper.make_node("If", ["ran"], ["gx"], name="scale/If", then_branch=then,
                                                else_branch=otherwise)], "branch", [
        helper.make_tensor_value_info("ran", TensorProto.BOOL, []),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, W]),
        helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, C, H, W]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, H * W]),
        helper.make_tensor_value_info("g", TensorProto.FLOAT, [K, 1, C, H * W]),
        helper.make_tensor_value_info("other", TensorProto.FLOAT, [K, 1, C, H, W]),
        helper.make_tensor_value_info("seeds", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("matched", TensorProto.FLOAT, [1, K, H * W])],
        [helper.make_tensor_value_info("gx", TensorProto.FLOAT, [K, 1, C, H, W])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize(("body", "allowed", "opset"), [
    (linear, True, 18), (where_zero, True, 18), (conv_bias, False, 18), (add_constant, False, 18),
    (exp_of_cotangent, False, 18), (constant_along_columns, False, 18), (rows_for_columns, False, 18),
    (forward_convolution, False, 18), (another_gradient, False, 18), (sized_by_another, True, 18),
    (sized_by_another, True, 13),
])
def test_branch_runs_on_a_window_only_where_that_changes_nothing(body: Body, allowed: bool, opset: int) -> None:
    import onnxruntime as ort

    model = _model(body, opset)
    record = ZeroBranches({"g": "ran"}, {"g": ("y", False), "gx": ("x", False), "other": ("x", False)},
                          {"x": TensorProto.FLOAT, "y": TensorProto.FLOAT}, frozenset(), "seeds")
    windowed = copy.deepcopy(model)
    assert run_on_windows(windowed, {"scale/If": frozenset({"g"})}, {"g": (0, H * W)}, "matched", record) == int(allowed)
    if not allowed:
        assert windowed == model
        return
    onnx.checker.check_model(windowed)
    onnx.shape_inference.infer_shapes(windowed, strict_mode=True)
    then = next(a.g for n in windowed.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    assert not any(n.op_type == "Slice" and "z" in n.input for n in then.node)  # z: its shape alone, not cut
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (windowed, model)]
    rng = np.random.default_rng(1)
    for cell in (0, H * W - 1, W - 1, (H - 1) * W, int(rng.integers(H * W))):  # the grid's corners, and within
        matched = np.zeros((1, K, H * W), np.float32)
        matched[0, 1, cell] = 1
        cotangent = rng.normal(size=(K, 1, C, H * W)).astype(np.float32) * matched.transpose(1, 0, 2)[:, :, None, :]
        feeds = {"ran": np.array(True), "x": rng.normal(size=(1, C, H, W)).astype(np.float32),
                 "z": np.zeros((1, C, H, W), np.float32), "y": np.zeros((1, C, H * W), np.float32), "g": cotangent,
                 "seeds": np.array([K], np.int64), "other": np.zeros((K, 1, C, H, W), np.float32), "matched": matched}
        ours, whole = (session.run(None, feeds)[0] for session in sessions)
        assert np.abs(whole).max() > 0
        np.testing.assert_allclose(ours, whole, rtol=1e-5, atol=1e-6, err_msg=f"cell {cell}")


@pytest.mark.parametrize("also_output", [False, True])
def test_output_read_only_by_constant_tables_is_not_padded(also_output: bool) -> None:
    """A windowed branch's output that only ``rows @ (output @ columns)`` with constant tables reads (a map head's
    sums over a Conv's taps) leaves the If unpadded and the tables are cut to the window; read elsewhere too (here a
    graph output), it is padded back to the grid. The sums equal the whole grid's, also when the If takes its else
    branch (no cell matched: the window is the whole grid, as the else branch's zeros)."""
    import onnxruntime as ort

    model = _model(linear)
    rng = np.random.default_rng(2)
    model.graph.initializer.extend([numpy_helper.from_array(rng.random((W, 3)).astype(np.float32), "columns"),
                                    numpy_helper.from_array(rng.random((2, H)).astype(np.float32), "rows")])
    model.graph.node.extend([helper.make_node("MatMul", ["gx", "columns"], ["across"]),
                             helper.make_node("MatMul", ["rows", "across"], ["taps"])])
    kept = list(model.graph.output) if also_output else []
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info("taps", TensorProto.FLOAT, [K, 1, C, 2, 3]), *kept])
    record = ZeroBranches({"g": "ran"}, {"g": ("y", False), "gx": ("x", False)},
                          {"x": TensorProto.FLOAT, "y": TensorProto.FLOAT}, frozenset(), "seeds")
    windowed = copy.deepcopy(model)
    assert run_on_windows(windowed, {"scale/If": frozenset({"g"})}, {"g": (0, H * W)}, "matched", record) == 1
    onnx.checker.check_model(windowed)
    then = next(a.g for n in windowed.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    assert any(n.op_type == "Pad" for n in then.node) == also_output
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (windowed, model)]
    for cell in (None, 0, H * W - 1, W - 1, int(rng.integers(H * W))):  # None: no match, the else branch
        matched = np.zeros((1, K, H * W), np.float32)
        if cell is not None:
            matched[0, 0, cell] = 1
        cotangent = rng.normal(size=(K, 1, C, H * W)).astype(np.float32) * matched.transpose(1, 0, 2)[:, :, None, :]
        feeds = {"ran": np.array(cell is not None), "x": rng.normal(size=(1, C, H, W)).astype(np.float32),
                 "z": np.zeros((1, C, H, W), np.float32), "y": np.zeros((1, C, H * W), np.float32), "g": cotangent, "seeds": np.array([K], np.int64),
                 "other": np.zeros((K, 1, C, H, W), np.float32), "matched": matched}
        ours, whole = (session.run(None, feeds) for session in sessions)
        assert (np.abs(whole[0]).max() > 0) == (cell is not None)
        for got, want in zip(ours, whole):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"cell {cell}")


class _Head(torch.nn.Module):
    """One scale of a YOLOv8-layout head: boxes (cx, cy, w, h) from the cell and a 1x1 conv, three classes
    from 3x3, 5x5, 3x5 and 1x1 convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.classes = torch.nn.Sequential(
            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 5, padding=2), torch.nn.SiLU(),
            torch.nn.Conv2d(8, 8, (3, 5), padding=(1, 2)), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 1))
        self.boxes = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor, stride: float) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        rows, columns = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                       indexing="ij")
        b = torch.sigmoid(self.boxes(x))
        boxes = torch.stack([(columns + b[:, 0]) * stride, (rows + b[:, 1]) * stride, b[:, 2] * 4 * stride,
                             b[:, 3] * 4 * stride], 1)
        return boxes.reshape(n, 4, -1), self.classes(x).reshape(n, 3, -1)


class _TwoScaleDetector(torch.nn.Module):
    """[N, 3, 48, 80] -> [N, 4 + 3, 12 * 20 + 6 * 10]: a stride-4 grid of 12x20 and a stride-8 one of 6x10."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.SiLU())
        self.down = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.SiLU())
        self.fine, self.coarse = _Head(), _Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x)
        (b1, c1), (b2, c2) = self.fine(features, 4.0), self.coarse(self.down(features), 8.0)
        return torch.cat([torch.cat([b1, b2], 2), torch.sigmoid(torch.cat([c1, c2], 2))], 1)


def test_detector_branches_on_windows_of_non_square_grids() -> None:
    """Both scales' class branches run on windows (their inputs sliced); the maps, objectives and matches equal those
    of the model whose branches run on the whole grid, for boxes at the grids' corners and edges, at two far
    cells at once and at random cells of either scale, two images with two boxes each."""
    import onnxruntime as ort

    from explainrt import Explainer
    from explainrt.export.spec import BOXES_INPUT
    from explainrt.export.variants import variant_model

    torch.manual_seed(0)
    model = _TwoScaleDetector().eval()
    explainer = Explainer(model, [model.stem], input_size=(48, 80))
    made = {windows: variant_model(explainer.session.model, explainer.spec, "boxes_yolov8", False, maps=["gradcam"],
                                   maps_only=True, target_objective=True, zero_branches=windows) for windows in (True, False)}
    branches = [a.g for node in made[True].graph.node if node.op_type == "If" for a in node.attribute
                if a.name == "then_branch"]
    assert len(branches) == 2 and all(any("/window/" in n.name for n in branch.node) for branch in branches)
    # each leaves the output gradient of a Conv reading the target layer (the fine head's, the downsampling one's),
    # which the map head only sums over the Conv's taps: cut to the window, not padded back
    assert not any(n.op_type == "Pad" for branch in branches for n in branch.node)
    # a forward tensor a branch reads for its shape alone (a Conv's input, sizing the Conv's input gradient) is not
    # cut to the window: that window's shape is its leading axes and the window's size, no copy of its data
    for branch in branches:
        cuts = [n.output[0] for n in branch.node if n.op_type == "Slice" and "/window/" in n.name]
        assert cuts and all(any(cut in n.input and n.op_type != "Shape" for n in branch.node) for cut in cuts)
    # every node the rewrite added is read: none left to run for nothing
    from explainrt.autodiff.builder import node_reads

    for graph in (made[True].graph, *branches):
        read = {name for n in graph.node for name in node_reads(n)} | {o.name for o in graph.output}
        assert not [n.name for n in graph.node if n.name.startswith("explainrt/") and not read & set(n.output)]
    sessions = {windows: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for windows, m in made.items()}
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 3, 48, 80)).astype(np.float32)
    with torch.no_grad():
        values = model(torch.from_numpy(images)).numpy()
    corners = np.stack([values[:, 0] - values[:, 2] / 2, values[:, 1] - values[:, 3] / 2,
                        values[:, 0] + values[:, 2] / 2, values[:, 1] + values[:, 3] / 2], 1)
    fine = 12 * 20
    cases = [[[0, 19], [fine - 1, fine - 20]], [[0, fine - 1], [5, 100]], [[37, fine + 3], [fine + 5, fine + 59]]]
    cases += [[list(rng.integers(0, values.shape[-1], 2)) for _ in range(2)] for _ in range(6)]
    for cells in cases:  # per image, two boxes: the predicted boxes of these cells (an IoU of 1 with them)
        boxes = np.array([[[*corners[i, :, cell], 1, 0.99] for cell in cells[i]] for i in range(2)], np.float32)
        feeds = {explainer.spec.image_input: images, BOXES_INPUT: boxes}
        ours, whole = (sessions[windows].run(None, feeds) for windows in (True, False))
        assert (whole[1] > 0).all(), cells
        for got, want, name in zip(ours, whole, ("objectives", "matches", "maps")):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{name}, cells {cells}")
        assert whole[-1].std() > 0.01, cells


def _branch(name: str, condition: str, then_nodes: list[onnx.NodeProto], then_out: str, else_value: float,
            output: str) -> onnx.NodeProto:
    """``If(condition)``: ``then_nodes`` (their ``then_out``), else the constant ``else_value``, as ``output``."""
    then = helper.make_graph(then_nodes, f"{name}/then", [],
                             [helper.make_tensor_value_info(then_out, TensorProto.FLOAT, None)])
    orelse = helper.make_graph([helper.make_node("Constant", [], [f"{name}/zero"],
                                                 value=numpy_helper.from_array(np.full([2], else_value, np.float32)))],
                               f"{name}/else", [], [helper.make_tensor_value_info(f"{name}/zero", TensorProto.FLOAT, None)])
    return helper.make_node("If", [condition], [output], name=name, then_branch=then, else_branch=orelse)


def test_if_read_only_by_another_ifs_then_branch_moves_into_it() -> None:
    """``nest_in_sole_readers``: an If whose output only the then branch of another If reads runs inside it (not
    run when that one takes its else branch); one also read outside, or by an else branch, stays; the values are
    the same for every combination of conditions."""
    import onnxruntime as ort

    from explainrt.autodiff.zero_branches import nest_in_sole_readers

    nodes = [
        _branch("inner", "a", [helper.make_node("Mul", ["x", "x"], ["inner/sq"])], "inner/sq", 0.0, "inner_out"),
        _branch("shared", "a", [helper.make_node("Neg", ["x"], ["shared/neg"])], "shared/neg", 0.0, "shared_out"),
        _branch("elsewise", "a", [helper.make_node("Abs", ["x"], ["elsewise/abs"])], "elsewise/abs", 0.0, "else_out"),
        _branch("outer", "b", [helper.make_node("Add", ["inner_out", "shared_out"], ["outer/sum"])], "outer/sum", 0.0,
                "outer_out"),
        _branch("reads_else", "b", [helper.make_node("Identity", ["x"], ["reads_else/x"])], "reads_else/x", 0.0,
                "reads_else_out"),
        helper.make_node("Add", ["shared_out", "outer_out"], ["y"]),
    ]
    else_branch = next(a.g for a in nodes[4].attribute if a.name == "else_branch")
    else_branch.node[0].CopyFrom(helper.make_node("Identity", ["else_out"], ["reads_else/zero"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                           helper.make_tensor_value_info("a", TensorProto.BOOL, []),
                                           helper.make_tensor_value_info("b", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2]) for o in ("y", "reads_else_out")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    nested = copy.deepcopy(model)
    assert nest_in_sole_readers(nested, {"inner", "shared", "elsewise", "outer", "reads_else"}) == 1
    onnx.checker.check_model(nested)
    assert [n.name for n in nested.graph.node if n.op_type == "If"] == ["shared", "elsewise", "outer", "reads_else"]
    outer = next(n for n in nested.graph.node if n.name == "outer")
    then_branch = next(a.g for a in outer.attribute if a.name == "then_branch")
    assert [n.name for n in then_branch.node if n.op_type == "If"] == ["inner"]
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (model, nested)]
    x = np.array([1.5, -2.0], np.float32)
    for a in (False, True):
        for b in (False, True):
            feeds = {"x": x, "a": np.array(a), "b": np.array(b)}
            want, got = (s.run(None, feeds) for s in sessions)
            for w, g in zip(want, got):
                np.testing.assert_array_equal(g, w)
            inner, shared = (x * x, -x) if a else (0 * x, 0 * x)
            np.testing.assert_array_equal(got[0], shared + (inner + shared if b else 0 * x))
