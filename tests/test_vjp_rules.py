"""Every VJP rule against central finite differences of its forward operator (see gradcheck.py).

One table of cases, each naming the rule it covers; ``test_every_rule_has_a_case`` fails when a
rule is added to ``RULES`` without one. float64 where ONNX Runtime's CPU provider has float64
kernels for the operator and its gradient graph, float32 (larger step, looser tolerance) where it
does not — the ``F32`` cases below. At ties (Max, Min, the max reductions and pooling), where
finite differences do not apply, gradients are compared with torch.autograd's values.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
import torch
from gradcheck import (
    away_from,
    away_from_zero,
    check_gradients,
    distinct,
    forward_model,
    gradient_model,
    gradients,
    normal,
    positive,
    relative_error,
    rng,
    session,
    torch_gradients,
)
from onnx import TensorProto, helper, numpy_helper

from explainrt.errors import InvalidModelError, UnknownSizeError, UnsupportedOperatorError
from explainrt.autodiff.rules import REFUSED, RULES

F64, F32 = np.float64, np.float32
I64 = np.int64
BIG = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Case:
    op: str  # the rule under test
    id: str
    nodes: tuple[onnx.NodeProto, ...]
    feeds: dict[str, np.ndarray]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    wrt: tuple[str, ...] | None = None
    opset: int = 18
    output: str = "y"
    dynamic_batch: tuple[str, ...] = ()
    tolerance: float | None = None
    step: float | None = None


def node(op: str, inputs: list[str], outputs: tuple[str, ...] = ("y",), **attrs: object) -> onnx.NodeProto:
    return helper.make_node(op, inputs, list(outputs), name=f"{op}_under_test", **attrs)


def case(op: str, variant: str, inputs: list[str], feeds: dict[str, np.ndarray], *,
         attrs: dict[str, object] | None = None, outputs: tuple[str, ...] = ("y",), **options: object) -> Case:
    """A case of one ``op`` node; ``feeds`` are graph inputs, ``constants`` initializers."""
    return Case(op, f"{op}-{variant}", (node(op, inputs, outputs, **(attrs or {})),), feeds, **options)  # type: ignore[arg-type]


def graph_case(op: str, variant: str, nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray], **options: object) -> Case:
    return Case(op, f"{op}-{variant}", tuple(nodes), feeds, **options)  # type: ignore[arg-type]


def split_pool(shapes: list[list[int]], dtype: type = F64, seed: int = 0, spacing: float = 0.05) -> list[np.ndarray]:
    """Arrays of the given shapes whose values are all pairwise distinct (Max/Min without ties)."""
    sizes = [int(np.prod(s)) for s in shapes]
    pool = distinct([sum(sizes)], dtype, seed, spacing).reshape(-1)
    bounds = np.cumsum([0, *sizes])
    return [pool[lo:hi].reshape(s) for lo, hi, s in zip(bounds[:-1], bounds[1:], shapes)]


def n64(shape: list[int], seed: int = 0) -> np.ndarray:
    return normal(shape, F64, seed)


def n32(shape: list[int], seed: int = 0) -> np.ndarray:
    return normal(shape, F32, seed)


# --- the cases ----------------------------------------------------------------------------------
def _elementwise_binary() -> list[Case]:
    cases = []
    shapes = {
        "same": ([2, 3, 4], [2, 3, 4]),
        "b-missing-and-size1-axes": ([2, 3, 4], [3, 1]),
        "a-missing-and-size1-axes": ([4], [2, 3, 1]),
        "both-size1": ([2, 1, 4], [3, 1]),
        "scalar-b": ([2, 3], []),
    }
    for op in ("Add", "Sub", "Mul", "Div"):
        for variant, (sa, sb) in shapes.items():
            b = away_from(sb, (0.0,), F64, 2, margin=0.5) if op == "Div" else n64(sb, 2)
            cases.append(case(op, variant, ["a", "b"], {"a": n64(sa, 1), "b": b}))
        cases.append(case(op, "only-a-differentiable", ["a", "b"], {"a": n64([2, 3], 1), "b": positive([3], F64, 2)},
                          wrt=("a",)))
        cases.append(case(op, "constant-b", ["a", "b"], {"a": n64([2, 3], 1)}, constants={"b": positive([2, 1], F64, 2)}))
        cases.append(case(op, "same-input-twice", ["a", "a"], {"a": positive([2, 3], F64, 1)}))
    return cases


def _variadic() -> list[Case]:
    cases = []
    three = {"a": [2, 3, 4], "b": [3, 1], "c": [1]}
    for op in ("Sum", "Max", "Min"):
        a, b, c = split_pool(list(three.values()))
        cases.append(case(op, "three-broadcast", ["a", "b", "c"], {"a": a, "b": b, "c": c}))
        a, b = split_pool([[2, 1, 4], [3, 1]], seed=1)
        cases.append(case(op, "two-both-size1", ["a", "b"], {"a": a, "b": b}))
        cases.append(case(op, "one", ["a"], {"a": n64([2, 3])}))
    # Mean has no float64 CPU kernel
    cases.append(case("Mean", "three-broadcast", ["a", "b", "c"],
                      {"a": n32([2, 3, 4]), "b": n32([3, 1], 1), "c": n32([1], 2)}))
    cases.append(case("Mean", "two-same", ["a", "b"], {"a": n32([2, 3]), "b": n32([2, 3], 1)}))
    a, b = split_pool([[2, 3], [2, 3]], seed=3)
    cases.append(case("Max", "one-differentiable", ["a", "b"], {"a": a, "b": b}, wrt=("a",)))
    return cases


def _where_expand() -> list[Case]:
    condition = rng(5).random([3, 1]) > 0.5
    condition[0, 0], condition[1, 0] = True, False
    return [
        case("Where", "broadcast-both", ["c", "a", "b"], {"a": n64([2, 3, 4], 1), "b": n64([4], 2)},
             constants={"c": condition}),
        case("Where", "size1-operands", ["c", "a", "b"], {"a": n64([1, 4], 1), "b": n64([2, 1, 1], 2)},
             constants={"c": condition}),
        case("Where", "runtime-condition", ["c", "a", "b"],
             {"a": n64([3, 4], 1), "b": n64([3, 4], 2), "c": rng(6).random([3, 4]) > 0.5}),
        case("Expand", "missing-and-size1", ["x", "s"], {"x": n64([3, 1])}, constants={"s": np.array([2, 3, 4], I64)}),
        case("Expand", "vector", ["x", "s"], {"x": n64([4])}, constants={"s": np.array([2, 1, 4], I64)}),
        case("Expand", "shape-smaller-than-input", ["x", "s"], {"x": n64([2, 3, 4])}, constants={"s": np.array([3, 1], I64)}),
    ]


def _unary() -> list[Case]:
    shape = [2, 3, 4]
    return [
        case("Identity", "plain", ["x"], {"x": n64(shape)}),
        case("Dropout", "inference", ["x"], {"x": n64(shape)}),
        case("Dropout", "mask-output-ratio-input", ["x", "r"], {"x": n64(shape)}, outputs=("y", "mask"),
             constants={"r": np.array(0.3, F64)}),
        case("Cast", "float32-to-float64", ["x"], {"x": n32(shape)}, attrs={"to": TensorProto.DOUBLE}),
        case("Cast", "float64-to-float32", ["x"], {"x": n64(shape)}, attrs={"to": TensorProto.FLOAT},
             step=1e-2, tolerance=1e-5),  # the float32 output needs a float32-sized step
        case("Neg", "plain", ["x"], {"x": n64(shape)}),
        case("Relu", "plain", ["x"], {"x": away_from_zero(shape)}),
        case("LeakyRelu", "default-alpha", ["x"], {"x": away_from_zero(shape, F32)}),
        case("LeakyRelu", "alpha", ["x"], {"x": away_from_zero(shape, F32)}, attrs={"alpha": 0.3}),
        case("PRelu", "channel-slope", ["x", "s"], {"x": away_from_zero([2, 3, 2, 2], F32)},
             constants={"s": np.array([0.1, -0.2, 0.5], F32).reshape(3, 1, 1)}),
        case("PRelu", "scalar-slope", ["x", "s"], {"x": away_from_zero(shape, F32)}, constants={"s": np.array([0.25], F32)}),
        case("Clip", "min-only", ["x", "lo"], {"x": away_from(shape, (-0.3,))}, constants={"lo": np.array(-0.3)}),
        case("Clip", "max-only", ["x", "", "hi"], {"x": away_from(shape, (0.4,))}, constants={"hi": np.array(0.4)}),
        case("Clip", "min-and-max", ["x", "lo", "hi"], {"x": away_from(shape, (-0.5, 0.5))},
             constants={"lo": np.array(-0.5), "hi": np.array(0.5)}),
        case("Clip", "none", ["x"], {"x": n64(shape)}),
        case("Clip", "relu6", ["x", "lo", "hi"], {"x": away_from(shape, (0.0, 6.0), scale=4.0)},
             constants={"lo": np.array(0.0), "hi": np.array(6.0)}),
        case("HardSigmoid", "default", ["x"], {"x": away_from(shape, (-2.5, 2.5), F32, scale=3.0)}),
        case("HardSigmoid", "alpha-beta", ["x"], {"x": away_from(shape, (-0.6, 1.4), F32, scale=2.0)},
             attrs={"alpha": 0.5, "beta": 0.3}),
        case("HardSwish", "plain", ["x"], {"x": away_from(shape, (-3.0, 3.0), F32, scale=4.0)}),
        case("Gelu", "exact", ["x"], {"x": n32(shape) * 2}, opset=20),
        case("Gelu", "tanh", ["x"], {"x": n32(shape) * 2}, opset=20, attrs={"approximate": "tanh"}),
        case("Erf", "plain", ["x"], {"x": n32(shape)}),
        case("Sigmoid", "plain", ["x"], {"x": n64(shape) * 3}),
        # SiLU, x * Sigmoid(x): both rules compute the sigmoid again from x (ONNX Runtime then fuses the forward pair)
        graph_case("Sigmoid", "silu", [node("Sigmoid", ["x"], ("s",)), node("Mul", ["x", "s"])], {"x": n64(shape) * 3}),
        graph_case("Mul", "silu-sigmoid-first", [node("Sigmoid", ["x"], ("s",)), node("Mul", ["s", "x"])],
                   {"x": n64(shape) * 3}),
        graph_case("Mul", "silu-sigmoid-also-read", [node("Sigmoid", ["x"], ("s",)), helper.make_node("Mul", ["x", "s"], ["m"], name="silu"),
                                                     node("Mul", ["m", "s"])], {"x": n64(shape) * 3}),
        case("Tanh", "plain", ["x"], {"x": n64(shape) * 2}),
        case("Exp", "plain", ["x"], {"x": n64(shape)}),
        case("Log", "plain", ["x"], {"x": positive(shape, low=0.2)}),
        case("Sqrt", "plain", ["x"], {"x": positive(shape, low=0.2)}),
        case("Reciprocal", "plain", ["x"], {"x": away_from(shape, (0.0,), margin=0.3)}),
        case("Abs", "plain", ["x"], {"x": away_from_zero(shape)}),
        case("Softplus", "plain", ["x"], {"x": n32(shape) * 3}),
        case("Pow", "float-exponent", ["x", "p"], {"x": positive(shape)}, constants={"p": np.array(2.5)}),
        case("Pow", "int-exponent", ["x", "p"], {"x": n64(shape)}, constants={"p": np.array(3, I64)}),
        case("Pow", "broadcast-exponent", ["x", "p"], {"x": positive([3, 1])}, constants={"p": np.array([[0.5, 2.0, -1.0, 3.0]])}),
    ]


def _shapes() -> list[Case]:
    x = n64([2, 3, 4])
    return [
        case("Reshape", "flat", ["x", "s"], {"x": x}, constants={"s": np.array([4, -1], I64)}),
        case("Reshape", "copy-dim-dynamic-batch", ["x", "s"], {"x": x}, constants={"s": np.array([0, -1, 2], I64)},
             dynamic_batch=("x",)),
        case("Flatten", "axis1", ["x"], {"x": n64([2, 3, 2, 2])}),
        case("Flatten", "axis2-dynamic-batch", ["x"], {"x": n64([2, 3, 2, 2])}, attrs={"axis": 2}, dynamic_batch=("x",)),
        case("Flatten", "axis0", ["x"], {"x": x}, attrs={"axis": 0}),
        case("Squeeze", "axes", ["x", "a"], {"x": n64([2, 1, 3, 1])}, constants={"a": np.array([1, -1], I64)}),
        case("Squeeze", "all", ["x"], {"x": n64([1, 3, 1, 4])}),
        case("Unsqueeze", "axes", ["x", "a"], {"x": x}, constants={"a": np.array([0, -1], I64)}),
        case("Transpose", "perm", ["x"], {"x": x}, attrs={"perm": [2, 0, 1]}),
        case("Transpose", "default-reverses", ["x"], {"x": x}),
        case("Transpose", "rank4-dynamic-batch", ["x"], {"x": n64([2, 3, 4, 5])}, attrs={"perm": [0, 2, 3, 1]},
             dynamic_batch=("x",)),
    ]


def _concat_split_slice() -> list[Case]:
    cases = [
        case("Concat", "three-inputs-one-feed-off-path", ["a", "b", "c"],
             {"a": n64([2, 1, 4]), "b": n64([2, 3, 4], 1), "c": n64([2, 2, 4], 2)}, attrs={"axis": 1}, wrt=("a", "c")),
        case("Concat", "negative-axis-constant-input", ["a", "k", "c"], {"a": n64([2, 3, 1]), "c": n64([2, 3, 2], 2)},
             constants={"k": n64([2, 3, 4], 3)}, attrs={"axis": -1}),
        case("Concat", "axis0-dynamic-batch", ["a", "c"], {"a": n64([2, 3]), "c": n64([1, 3], 2)}, attrs={"axis": 0},
             dynamic_batch=("a",)),
    ]
    x = n64([2, 4, 3])
    parts = ("s0", "s1", "s2")
    cases += [
        graph_case("Split", "middle-output-unused", [
            node("Split", ["x", "sizes"], parts, axis=1),
            node("Mul", ["s0", "s2"]),
        ], {"x": x}, constants={"sizes": np.array([1, 2, 1], I64)}),
        graph_case("Split", "only-last-used-num-outputs", [node("Split", ["x"], parts, axis=-1, num_outputs=3)],
                   {"x": n64([2, 6])}, output="s2"),
        graph_case("Split", "all-used-opset13", [
            node("Split", ["x", "sizes"], parts, axis=0),
            node("Concat", ["s2", "s0", "s1"], axis=0),
        ], {"x": n64([5, 2])}, constants={"sizes": np.array([2, 1, 2], I64)}, opset=13),
        graph_case("Split", "one-output-twice", [
            node("Split", ["x"], ("s0", "s1"), axis=0, num_outputs=2),
            node("Mul", ["s1", "s1"], ("t",)),
            node("Add", ["t", "s1"]),
        ], {"x": n64([4, 3])}),
    ]
    y = n64([3, 4, 5])
    slices = {
        "two-axes-negative-start-end-past-end": ([-2, 1], [BIG, -1], [0, 2]),
        "no-axes": ([1, 0], [3, 3], None),
        "negative-axis": ([-3], [1000], [-1]),
        "start-before-begin": ([-100, 2], [2, 4], [1, 0]),
        "empty-range-axis": ([3], [1], [1]),
        "all-three-axes-with-steps-1": ([0, 1, 1], [2, 3, -1], [0, 1, 2], [1, 1, 1]),
        # steps other than 1: patch merging (x[:, 0::2, 0::2]), an odd start, spread zeros past the input,
        # a flip, a negative step of 2, and strided and unit-step axes mixed
        "patch-merging-steps-2": ([0, 0], [BIG, BIG], [1, 2], [2, 2]),
        "odd-start-step-2": ([1], [BIG], [2], [2]),
        "step-3-last-zeros-past-the-input": ([0], [4], [2], [3]),
        "flip": ([-1], [-BIG], [1], [-1]),
        "negative-step-2": ([4], [0], [2], [-2]),
        "mixed-steps": ([1, 0, 3], [3, BIG, 0], [0, 1, 2], [1, 3, -1]),
        "start-past-end-negative-step": ([100], [0], [2], [-1]),
        "empty-axis-beside-strided": ([0, 3], [BIG, 1], [1, 2], [2, 1]),
    }
    for variant, (starts, ends, axes, *steps) in slices.items():
        inputs = ["x", "st", "en"] + (["ax"] if axes is not None else [])
        constants = {"st": np.array(starts, I64), "en": np.array(ends, I64)}
        if axes is not None:
            constants["ax"] = np.array(axes, I64)
        if steps:
            inputs.append("sp")
            constants["sp"] = np.array(steps[0], I64)
        cases.append(case("Slice", variant, inputs, {"x": y}, constants=constants))
    cases.append(case("Slice", "dynamic-batch", ["x", "st", "en", "ax"], {"x": y},
                      constants={"st": np.array([1], I64), "en": np.array([-1], I64), "ax": np.array([2], I64)},
                      dynamic_batch=("x",)))
    cases.append(case("Slice", "dynamic-batch-steps-2", ["x", "st", "en", "ax", "sp"], {"x": y},
                      constants={"st": np.array([0, 1], I64), "en": np.array([BIG, BIG], I64),
                                 "ax": np.array([1, 2], I64), "sp": np.array([2, 2], I64)},
                      dynamic_batch=("x",)))
    return cases


def _gather_pad() -> list[Case]:
    data = n64([4, 3])
    cases = [
        case("Gather", "scalar-index", ["x", "i"], {"x": data}, constants={"i": np.array(2, I64)}),
        case("Gather", "repeats", ["x", "i"], {"x": data}, constants={"i": np.array([1, 1, 3, 0, 1], I64)}),
        case("Gather", "negative", ["x", "i"], {"x": data}, constants={"i": np.array([-1, 0, -1], I64)}),
        case("Gather", "axis1-2d-indices", ["x", "i"], {"x": n64([2, 3, 4])},
             constants={"i": np.array([[0, 2], [2, -3]], I64)}, attrs={"axis": 1}),
        case("Gather", "axis-negative-scalar", ["x", "i"], {"x": n64([2, 3, 4])}, constants={"i": np.array(-1, I64)},
             attrs={"axis": -1}),
        case("Gather", "distinct-opset13", ["x", "i"], {"x": data}, constants={"i": np.array([2, -1, 0], I64)}, opset=13),
        case("Gather", "runtime-indices", ["x", "i"], {"x": data, "i": np.array([3, 3, 0], I64)}),
        # constant runs: padded, not scattered (q, k, v = qkv[0], qkv[1], qkv[2]; a CLS token)
        case("Gather", "qkv-select", ["x", "i"], {"x": n64([3, 2, 4, 5])}, constants={"i": np.array(1, I64)}),
        case("Gather", "first-token", ["x", "i"], {"x": n64([2, 5, 3])}, constants={"i": np.array(0, I64)},
             attrs={"axis": 1}, dynamic_batch=("x",)),
        case("Gather", "consecutive-run", ["x", "i"], {"x": n64([2, 6, 3])}, constants={"i": np.array([2, 3, 4], I64)},
             attrs={"axis": 1}),
        case("Gather", "wrapping-run", ["x", "i"], {"x": n64([5, 3])}, constants={"i": np.array([-2, -1], I64)}),
    ]
    # GatherND: torch's adaptive pooling to a size its input does not divide gathers index pairs, some twice
    pooled = np.array([[[0, 0], [0, 1]], [[1, 1], [1, 1]], [[2, -1], [0, 0]]], I64)  # [3, 2, 2]: (0, 0) thrice
    cases += [
        case("GatherND", "pairs-repeating", ["x", "i"], {"x": n64([3, 4, 2])}, constants={"i": pooled}),
        case("GatherND", "one-axis-slices", ["x", "i"], {"x": n64([4, 3])}, constants={"i": np.array([[3], [-4], [3]], I64)}),
        case("GatherND", "full-index", ["x", "i"], {"x": n64([2, 3])}, constants={"i": np.array([[1, 2], [0, -1]], I64)}),
        case("GatherND", "runtime-indices", ["x", "i"], {"x": n64([3, 2, 2]), "i": np.array([[2, 1], [2, 1]], I64)}),
        case("GatherND", "distinct-opset13", ["x", "i"], {"x": n64([3, 4])}, constants={"i": np.array([[0, 1], [2, -1]], I64)},
             opset=13),
        case("GatherElements", "axis0-repeats", ["x", "i"], {"x": n64([3, 4])},
             constants={"i": np.array([[0, 2, 2, 1], [0, -1, 2, 0]], I64)}),
        case("GatherElements", "axis-last", ["x", "i"], {"x": n64([2, 3, 4])},
             constants={"i": np.array([[[3, 3], [0, -1], [1, 2]], [[0, 0], [2, 2], [1, 1]]], I64)}, attrs={"axis": -1}),
        case("GatherElements", "int32-runtime", ["x", "i"], {"x": n64([3, 2]), "i": np.array([[1, 1], [2, 0]], np.int32)}),
        case("GatherElements", "distinct-opset13", ["x", "i"], {"x": n64([3, 2])},
             constants={"i": np.array([[1, 1], [2, 0]], I64)}, opset=13),
        # before opset 16 only the indexed axis's size must be known to tell that indices never repeat
        case("Gather", "scattered-opset13-dynamic-batch", ["x", "i"], {"x": n64([2, 5, 3])},
             constants={"i": np.array([3, 0, -1], I64)}, attrs={"axis": 1}, opset=13, dynamic_batch=("x",)),
        case("GatherElements", "opset13-dynamic-batch", ["x", "i"], {"x": n64([2, 3])},
             constants={"i": np.array([[2, 0], [1, -1]], I64)}, attrs={"axis": 1}, opset=13, dynamic_batch=("x",)),
    ]
    x = n64([2, 3, 4])
    cases += [
        case("Pad", "constant-zero", ["x", "p"], {"x": x}, constants={"p": np.array([0, 1, 2, 1, 0, 3], I64)}),
        case("Pad", "constant-value", ["x", "p", "v"], {"x": x},
             constants={"p": np.array([1, 0, 0, 0, 2, 1], I64), "v": np.array(1.5)}),
        case("Pad", "axes", ["x", "p", "", "a"], {"x": x},
             constants={"p": np.array([2, 1, 0, 3], I64), "a": np.array([-1, 1], I64)}),
        case("Pad", "negative-crops", ["x", "p"], {"x": x}, constants={"p": np.array([0, -1, 1, 0, 1, -2], I64)}),
    ]
    return cases


def _reductions() -> list[Case]:
    cases = []
    x = n64([2, 3, 4])
    for op in ("ReduceMean", "ReduceSum", "ReduceL2", "ReduceL1", "ReduceMax", "ReduceMin"):
        value = distinct([2, 3, 4]) if op in ("ReduceMax", "ReduceMin") else away_from_zero([2, 3, 4]) if op == "ReduceL1" else x
        for keepdims in (0, 1):
            for axes in ([1], [0, 2], [-1, 0]):
                cases.append(case(op, f"axes{axes}-keepdims{keepdims}", ["x", "a"], {"x": value},
                                  constants={"a": np.array(axes, I64)}, attrs={"keepdims": keepdims}))
            cases.append(case(op, f"all-keepdims{keepdims}", ["x"], {"x": value}, attrs={"keepdims": keepdims}))
            if op == "ReduceSum":  # axes became an input in opset 13 already
                cases.append(case(op, f"opset13-keepdims{keepdims}", ["x", "a"], {"x": value}, opset=13,
                                  constants={"a": np.array([2, 0], I64)}, attrs={"keepdims": keepdims}))
            else:
                cases.append(case(op, f"attr-axes-opset13-keepdims{keepdims}", ["x"], {"x": value}, opset=13,
                                  attrs={"keepdims": keepdims, "axes": [2, 0]}))
        cases.append(case(op, "noop-with-empty-axes", ["x"], {"x": value}, attrs={"noop_with_empty_axes": 1}))
        cases.append(case(op, "dynamic-batch", ["x", "a"], {"x": value}, constants={"a": np.array([1, 2], I64)},
                          dynamic_batch=("x",), attrs={"keepdims": 0}))
    cases += [
        case("GlobalAveragePool", "rank4", ["x"], {"x": n32([2, 3, 4, 5])}),
        case("GlobalAveragePool", "dynamic-batch", ["x"], {"x": n32([2, 3, 4, 5])}, dynamic_batch=("x",)),
        case("GlobalAveragePool", "rank3", ["x"], {"x": n32([2, 3, 5])}),
        case("GlobalMaxPool", "rank4", ["x"], {"x": distinct([2, 3, 4, 5], F32)}),
        case("GlobalMaxPool", "dynamic-batch", ["x"], {"x": distinct([2, 3, 2, 3], F32)}, dynamic_batch=("x",)),
    ]
    for op in ("Softmax", "LogSoftmax"):
        for axis in (-1, 0, 1):
            cases.append(case(op, f"axis{axis}", ["x"], {"x": x * 2}, attrs={"axis": axis}))
        cases.append(case(op, "default-axis-rank2", ["x"], {"x": n64([3, 5])}))
    return cases


def _linear_algebra() -> list[Case]:
    cases = [
        case("MatMul", "2d", ["a", "b"], {"a": n64([3, 4]), "b": n64([4, 5], 1)}),
        case("MatMul", "batched-times-2d", ["a", "b"], {"a": n64([2, 3, 4]), "b": n64([4, 5], 1)}),
        case("MatMul", "2d-times-batched", ["a", "b"], {"a": n64([3, 4]), "b": n64([2, 4, 5], 1)}),
        case("MatMul", "batched-broadcast", ["a", "b"], {"a": n64([2, 1, 3, 4]), "b": n64([3, 4, 2], 1)}),
        case("MatMul", "constant-weight", ["a", "w"], {"a": n64([2, 3, 4])}, constants={"w": n64([4, 2], 1)}),
        case("MatMul", "dynamic-batch", ["a", "w"], {"a": n64([2, 3, 4])}, constants={"w": n64([4, 2], 1)},
             dynamic_batch=("a",)),
    ]
    einsum = {  # variant: (equation, operand shapes); the first two are what torchvision's MaxViT exports
        "attention-scores": ("B G H I D, B G H J D -> B G H I J", [[2, 1, 2, 3, 4], [2, 1, 2, 5, 4]]),
        "attention-values": ("bghij,bghjd->bghid", [[2, 1, 2, 3, 5], [2, 1, 2, 5, 4]]),
        "implicit-output": ("ij,jk", [[3, 4], [4, 5]]),
        "transposed-output": ("ij,jk->ki", [[3, 4], [4, 5]]),
        "outer-product": ("i,j->ij", [[3], [4]]),
        "three-operands": ("ij,jk,kl->il", [[2, 3], [3, 4], [4, 2]]),
        "one-operand-transpose": ("abc->cab", [[2, 3, 4]]),
        "ellipsis-broadcast": ("...ij,...jk->...ik", [[2, 1, 3, 4], [1, 3, 4, 5]]),
    }
    for variant, (equation, shapes) in einsum.items():
        names = [f"x{i}" for i in range(len(shapes))]
        cases.append(case("Einsum", variant, names, {name: n64(shape, i) for i, (name, shape) in
                                                     enumerate(zip(names, shapes))}, attrs={"equation": equation}))
    cases.append(case("Einsum", "constant-operand-dynamic-batch", ["a", "w"], {"a": n64([2, 3, 4])},
                      constants={"w": n64([4, 5], 1)}, attrs={"equation": "nij,jk->nik"}, dynamic_batch=("a",)))
    gemm_bias = {"none": None, "vector": [5], "row": [1, 5], "column": [3, 1], "full": [3, 5], "scalar": []}
    for trans_a in (0, 1):
        for trans_b in (0, 1):
            a = n64([4, 3] if trans_a else [3, 4])
            b = n64([5, 4] if trans_b else [4, 5], 1)
            for bias_name, bias in gemm_bias.items():
                if bias_name not in ("vector", "column") and (trans_a, trans_b) != (1, 1):
                    continue
                feeds = {"a": a, "b": b} | ({"c": n64(bias, 2)} if bias is not None else {})
                attrs = {"transA": trans_a, "transB": trans_b, "alpha": 0.7, "beta": -1.3}
                cases.append(case("Gemm", f"transA{trans_a}-transB{trans_b}-bias-{bias_name}", list(feeds), feeds,
                                  attrs=attrs))
    cases += [
        case("Gemm", "defaults", ["a", "b", "c"], {"a": n64([3, 4]), "b": n64([4, 5], 1), "c": n64([5], 2)}),
        case("Gemm", "classifier-dynamic-batch", ["a", "w", "c"], {"a": n64([3, 4])},
             constants={"w": n64([5, 4], 1), "c": n64([5], 2)}, attrs={"transB": 1}, dynamic_batch=("a",)),
    ]
    return cases


def _normalisation() -> list[Case]:
    x = n64([2, 3, 4])
    return [
        case("LayerNormalization", "axis-1", ["x", "s", "b"], {"x": x}, constants={"s": n64([4], 1), "b": n64([4], 2)}),
        case("LayerNormalization", "axis-2", ["x", "s", "b"], {"x": x}, constants={"s": n64([3, 4], 1), "b": n64([3, 4], 2)},
             attrs={"axis": -2, "epsilon": 1e-3}),
        case("LayerNormalization", "axis1-no-bias", ["x", "s"], {"x": x}, constants={"s": n64([3, 4], 1)},
             attrs={"axis": 1}),
        case("LayerNormalization", "dynamic-batch", ["x", "s", "b"], {"x": x},
             constants={"s": n64([4], 1), "b": n64([4], 2)}, dynamic_batch=("x",)),
        case("BatchNormalization", "rank4", ["x", "s", "b", "m", "v"], {"x": n64([2, 3, 2, 2])},
             constants={"s": n64([3], 1), "b": n64([3], 2), "m": n64([3], 3), "v": positive([3], seed=4)},
             attrs={"epsilon": 1e-3}),
        case("BatchNormalization", "rank2-dynamic-batch", ["x", "s", "b", "m", "v"], {"x": n64([2, 3])},
             constants={"s": n64([3], 1), "b": n64([3], 2), "m": n64([3], 3), "v": positive([3], seed=4)},
             dynamic_batch=("x",)),
        # no float64 CPU kernel: float32
        case("InstanceNormalization", "rank4", ["x", "s", "b"], {"x": n32([2, 3, 4, 5])},
             constants={"s": n32([3], 1), "b": n32([3], 2)}),
        case("InstanceNormalization", "rank3-epsilon-dynamic-batch", ["x", "s", "b"], {"x": n32([2, 3, 6])},
             constants={"s": n32([3], 1), "b": n32([3], 2)}, attrs={"epsilon": 1e-2}, dynamic_batch=("x",)),
        *(case("LpNormalization", f"p{p}-axis{axis}", ["x"], {"x": away_from_zero([2, 3, 4], seed=p)},
               attrs={"p": p, "axis": axis}) for p in (1, 2) for axis in (1, -1)),
        case("LpNormalization", "default-dynamic-batch", ["x"], {"x": n64([2, 3, 4])}, dynamic_batch=("x",)),
    ]


def _resampling() -> list[Case]:
    """Resize in the forms torch exports F.interpolate (test_vjp_rules_torch.py checks those against
    torch.autograd) and the other modes; element rearrangements."""
    x = n32([2, 3, 4, 5])
    scales = {"s": np.array([1, 1, 2, 1.5], F32)}
    down = {"z": np.array([2, 3, 3, 2], I64)}
    up = {"z": np.array([2, 3, 7, 9], I64)}
    variants = {  # variant: (attributes, constants, sizes rather than scales)
        "nearest-floor-asymmetric-scales": ({"mode": "nearest", "nearest_mode": "floor",
                                             "coordinate_transformation_mode": "asymmetric"}, scales, False),
        "nearest-round_prefer_floor-half_pixel-down": ({"mode": "nearest"}, down, True),
        "nearest-round_prefer_ceil-align_corners-up": ({"mode": "nearest", "nearest_mode": "round_prefer_ceil",
                                                        "coordinate_transformation_mode": "align_corners"}, up, True),
        "nearest-ceil-half_pixel-scales": ({"mode": "nearest", "nearest_mode": "ceil"}, scales, False),
        "linear-half_pixel-scales": ({"mode": "linear"}, scales, False),
        "linear-half_pixel-down": ({"mode": "linear"}, down, True),
        "linear-pytorch_half_pixel-to-1": ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
                                           {"z": np.array([2, 3, 1, 3], I64)}, True),
        "linear-align_corners-up": ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, up, True),
        "linear-asymmetric-scales": ({"mode": "linear", "coordinate_transformation_mode": "asymmetric"}, scales, False),
        "linear-half_pixel_symmetric-scales": ({"mode": "linear", "coordinate_transformation_mode":
                                                "half_pixel_symmetric"}, scales, False),
        "cubic-half_pixel-scales": ({"mode": "cubic", "cubic_coeff_a": -0.75}, scales, False),
        "cubic-align_corners-up": ({"mode": "cubic", "cubic_coeff_a": -0.75,
                                    "coordinate_transformation_mode": "align_corners"}, up, True),
        "cubic-exclude_outside-down": ({"mode": "cubic", "exclude_outside": 1}, down, True),
        "linear-antialias-down": ({"mode": "linear", "antialias": 1, "exclude_outside": 1}, down, True),
        "cubic-antialias-down": ({"mode": "cubic", "antialias": 1, "exclude_outside": 1, "cubic_coeff_a": -0.75},
                                 {"z": np.array([2, 3, 2, 3], I64)}, True),
    }
    cases = [case("Resize", variant, ["x", "", "", "z"] if sized else ["x", "", "s"], {"x": x}, attrs=attrs,
                  constants=constants) for variant, (attrs, constants, sized) in variants.items()]
    cases += [
        case("Resize", "axes-sizes", ["x", "", "", "z"], {"x": x}, attrs={"mode": "linear", "axes": [-1, 2]},
             constants={"z": np.array([8, 3], I64)}),
        # floor(4 * 1.2) = 4, floor(5 * 1.1) = 5: ONNX Runtime copies; one axis resized: the other's scale counts
        case("Resize", "scales-keeping-every-size", ["x", "", "s"], {"x": x}, attrs={"mode": "linear"},
             constants={"s": np.array([1, 1, 1.2, 1.1], F32)}, dynamic_batch=("x",)),
        case("Resize", "scale-keeping-one-size", ["x", "", "s"], {"x": x}, attrs={"mode": "cubic"},
             constants={"s": np.array([1, 1, 1.2, 2], F32)}),
        case("Resize", "dynamic-batch", ["x", "", "s"], {"x": x}, attrs={"mode": "linear"}, constants=scales,
             dynamic_batch=("x",)),
        case("Tile", "repeats", ["x", "r"], {"x": n64([2, 3, 2])}, constants={"r": np.array([1, 2, 3], I64)}),
        case("Tile", "dynamic-batch", ["x", "r"], {"x": n64([2, 3, 2])}, constants={"r": np.array([2, 1, 2], I64)},
             dynamic_batch=("x",)),
        case("DepthToSpace", "DCR", ["x"], {"x": n64([2, 8, 2, 3])}, attrs={"blocksize": 2}),
        case("DepthToSpace", "CRD-dynamic-batch", ["x"], {"x": n64([2, 18, 2, 3])}, attrs={"blocksize": 3, "mode": "CRD"},
             dynamic_batch=("x",)),
        case("SpaceToDepth", "block2", ["x"], {"x": n64([2, 3, 4, 6])}, attrs={"blocksize": 2}),
        case("SpaceToDepth", "dynamic-batch", ["x"], {"x": n64([2, 2, 6, 3])}, attrs={"blocksize": 3},
             dynamic_batch=("x",)),
    ]
    return cases


def _conv() -> list[Case]:
    x = n32([2, 4, 7, 6])
    w = n32([6, 4, 3, 3], 1)
    variants = {
        "plain": ({}, w),
        "stride2-pad1": ({"strides": [2, 2], "pads": [1, 1, 1, 1]}, w),
        "asymmetric-pads-strides": ({"strides": [2, 1], "pads": [0, 2, 1, 0]}, w),
        "dilation2": ({"dilations": [2, 2], "pads": [2, 1, 2, 1]}, w),
        "dilation-stride": ({"dilations": [2, 1], "strides": [1, 2]}, w),
        "depthwise": ({"group": 4, "pads": [1, 1, 1, 1]}, n32([4, 1, 3, 3], 1)),
        "depthwise-multiplier-stride2": ({"group": 4, "strides": [2, 2], "pads": [1, 1, 1, 1]}, n32([8, 1, 3, 3], 1)),
        "groups2": ({"group": 2}, n32([6, 2, 3, 3], 1)),
        "same-upper-stride2": ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, w),
        "same-lower-stride2": ({"auto_pad": "SAME_LOWER", "strides": [2, 2]}, w),
        "same-upper-even-kernel": ({"auto_pad": "SAME_UPPER"}, n32([6, 4, 2, 4], 1)),
        "valid-stride3": ({"auto_pad": "VALID", "strides": [3, 3]}, w),
        "kernel-larger-than-stride-leaves-rows": ({"strides": [3, 2]}, n32([6, 4, 2, 2], 1)),
        "1x1-stride2": ({"strides": [2, 2]}, n32([6, 4, 1, 1], 1)),
        "kernel-shape-attr": ({"kernel_shape": [3, 3], "pads": [1, 0, 1, 0]}, w),
        # stride 1: the gradient is a Conv with the flipped weight (pads d (k - 1) - pad, cropping where negative)
        "asymmetric-pads": ({"pads": [0, 2, 1, 0]}, w),
        "pads-wider-than-kernel": ({"pads": [3, 0, 1, 4]}, w),
        "1x1-padded": ({"pads": [1, 2, 0, 1]}, n32([6, 4, 1, 1], 1)),
        "dilation-asymmetric-pads": ({"dilations": [2, 3], "pads": [0, 3, 4, 1]}, w),
        "groups2-dilation-pads": ({"group": 2, "dilations": [1, 2], "pads": [1, 2, 0, 2]}, n32([6, 2, 3, 2], 1)),
        "depthwise-multiplier": ({"group": 4, "pads": [2, 1, 0, 1]}, n32([8, 1, 3, 3], 1)),
        "same-lower-even-kernel": ({"auto_pad": "SAME_LOWER"}, n32([6, 4, 2, 4], 1)),
        "valid-rectangular-kernel": ({"auto_pad": "VALID"}, n32([6, 4, 2, 5], 1)),
    }
    cases = [case("Conv", variant, ["x", "w"], {"x": x}, constants={"w": weight}, attrs=attrs)
             for variant, (attrs, weight) in variants.items()]
    cases += [
        case("Conv", "bias-dynamic-batch", ["x", "w", "b"], {"x": x}, constants={"w": w, "b": n32([6], 2)},
             attrs={"pads": [1, 1, 1, 1], "strides": [2, 2]}, dynamic_batch=("x",)),
        case("Conv", "1d", ["x", "w"], {"x": n32([2, 3, 9])}, constants={"w": n32([2, 3, 3], 1)},
             attrs={"strides": [2], "pads": [1, 2]}),
        case("Conv", "1d-stride1-dilation", ["x", "w"], {"x": n32([2, 3, 9])}, constants={"w": n32([2, 3, 3], 1)},
             attrs={"dilations": [2], "pads": [3, 0]}),
        case("Conv", "3d-stride1-groups", ["x", "w"], {"x": n32([2, 4, 4, 5, 3])}, constants={"w": n32([2, 2, 2, 3, 2], 1)},
             attrs={"group": 2, "pads": [1, 0, 1, 0, 2, 1], "dilations": [1, 2, 1]}),
        case("Conv", "3d-stride2", ["x", "w"], {"x": n32([2, 2, 5, 4, 4])}, constants={"w": n32([3, 2, 3, 2, 3], 1)},
             attrs={"strides": [2, 1, 2], "pads": [1, 0, 1, 1, 1, 0]}),
        # a computed weight (an int8 weight's DequantizeLinear, a graph input) is flipped by graph operators
        graph_case("Conv", "stride1-dequantized-weight",
                   [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0),
                    node("Conv", ["x", "w"], group=2, pads=[1, 0, 2, 1], dilations=[2, 1])],
                   {"x": x}, constants={"wq": rng(3).integers(-100, 100, [6, 2, 3, 3]).astype(np.int8),
                                        "ws": positive([6], F32, 4, 0.005, 0.02)}),
        case("Conv", "stride1-weight-input", ["x", "w"], {"x": x, "w": n32([6, 4, 2, 3], 1)}, wrt=("x",),
             attrs={"pads": [0, 1, 1, 1]}),
    ]
    w_t = n32([4, 3, 3, 3], 1)
    transposed = {  # torch.nn.ConvTranspose2d exports pads, strides, output_padding, dilations, group
        "plain": ({}, w_t),
        "stride2-pad1-output_padding1": ({"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, w_t),
        "asymmetric-stride-pads": ({"strides": [2, 3], "pads": [0, 1, 2, 0]}, w_t),
        "dilation2-stride2": ({"dilations": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1]}, w_t),
        "output_padding-stride3": ({"strides": [3, 2], "output_padding": [2, 1], "pads": [2, 0, 0, 1]}, w_t),
        "groups2": ({"group": 2, "strides": [2, 2], "output_padding": [1, 0]}, n32([4, 2, 2, 3], 1)),
        "depthwise": ({"group": 4, "strides": [2, 2], "pads": [1, 1, 1, 1]}, n32([4, 1, 3, 3], 1)),
        "valid-kernel-shape": ({"auto_pad": "VALID", "kernel_shape": [3, 3], "strides": [2, 2]}, w_t),
    }
    xt = n32([2, 4, 3, 4])
    cases += [case("ConvTranspose", variant, ["x", "w"], {"x": xt}, constants={"w": weight}, attrs=attrs)
              for variant, (attrs, weight) in transposed.items()]
    cases += [
        case("ConvTranspose", "bias-dynamic-batch", ["x", "w", "b"], {"x": xt}, constants={"w": w_t, "b": n32([3], 2)},
             attrs={"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, dynamic_batch=("x",)),
        case("ConvTranspose", "1d", ["x", "w"], {"x": n32([2, 3, 5])}, constants={"w": n32([3, 2, 4], 1)},
             attrs={"strides": [3], "pads": [1, 2]}),
    ]
    return cases


def _pools() -> list[Case]:
    cases = []
    x = n32([2, 2, 7, 6])
    average = {
        "k2s2": {"kernel_shape": [2, 2], "strides": [2, 2]},
        "k3s2-pads": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
        "k3s2-asymmetric-pads": {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [0, 1, 2, 0]},
        "k3s2-pads-ceil": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
        "k2s3-ceil-no-pads": {"kernel_shape": [2, 2], "strides": [3, 3], "ceil_mode": 1, "opset": 22},
        "same-upper": {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
        "same-lower": {"kernel_shape": [2, 2], "strides": [1, 1], "auto_pad": "SAME_LOWER"},
    }
    for variant, attrs in average.items():
        opset = attrs.pop("opset", 18)
        for include in (0, 1):
            cases.append(case("AveragePool", f"{variant}-count_include_pad{include}", ["x"], {"x": x},
                              attrs={**attrs, "count_include_pad": include}, opset=opset))
    cases.append(case("AveragePool", "dynamic-batch", ["x"], {"x": x}, dynamic_batch=("x",),
                      attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}))
    cases.append(case("AveragePool", "1d", ["x"], {"x": n32([2, 3, 9])},
                      attrs={"kernel_shape": [3], "strides": [2], "pads": [1, 1], "count_include_pad": 1}))
    distinct_x = distinct([2, 2, 7, 6], F32)
    maximum = {
        "k2s2": {"kernel_shape": [2, 2], "strides": [2, 2]},
        "k3s2-overlap-pads": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
        "k3s2-pads-ceil": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
        "k2s3-ceil": {"kernel_shape": [2, 2], "strides": [3, 3], "ceil_mode": 1, "opset": 22},
        "asymmetric-pads": {"kernel_shape": [3, 2], "strides": [1, 2], "pads": [2, 0, 0, 1]},
        "dilation2": {"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 1, 1, 1]},
        "same-upper": {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
        "stride1-overlap": {"kernel_shape": [3, 3], "strides": [1, 1]},
    }
    for variant, attrs in maximum.items():
        opset = attrs.pop("opset", 18)
        cases.append(case("MaxPool", variant, ["x"], {"x": distinct_x}, attrs=attrs, opset=opset))
    cases.append(case("MaxPool", "dynamic-batch-negative-values", ["x"], {"x": distinct([2, 2, 5, 5], F32, offset=-5.0)},
                      attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, dynamic_batch=("x",)))
    return cases


CASES = [
    *_elementwise_binary(), *_variadic(), *_where_expand(), *_unary(), *_shapes(), *_concat_split_slice(),
    *_gather_pad(), *_reductions(), *_linear_algebra(), *_normalisation(), *_conv(), *_pools(), *_resampling(),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule_matches_finite_differences(case: Case) -> None:
    check_gradients(case.nodes, case.feeds, case.output, wrt=case.wrt, constants=case.constants, opset=case.opset,
                    dynamic_batch=case.dynamic_batch, tolerance=case.tolerance, step=case.step)


# Rules tested in test_vjp_rules_torch.py instead: GroupNormalization (ONNX shape inference cannot type its
# output, which the cases need), the straight-through QuantizeLinear/DequantizeLinear (finite differences of
# rounding are 0 almost everywhere) and the refusals.
ELSEWHERE = {"GroupNormalization", "QuantizeLinear", "DequantizeLinear", *REFUSED}


def test_every_rule_has_a_case() -> None:
    covered = {c.op for c in CASES}
    assert set(RULES) - ELSEWHERE == covered, (f"rules without a case: {sorted(set(RULES) - covered)}; "
                                   f"cases without a rule: {sorted(covered - set(RULES))}")


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("op, wrong", [("Sigmoid", "Tanh"), ("Softmax", "LogSoftmax"), ("ReduceMean", "ReduceSum")])
def test_the_check_catches_a_wrong_rule(monkeypatch: pytest.MonkeyPatch, op: str, wrong: str) -> None:
    """The harness is not vacuous: a plausible but wrong rule fails it."""
    monkeypatch.setitem(RULES, op, RULES[wrong])
    attrs = {"axes": [1]} if op == "ReduceMean" else {}
    with pytest.raises(AssertionError, match="relative errors"):
        check_gradients([node(op, ["x"], **attrs)], {"x": n64([2, 3])}, opset=13)


@pytest.mark.parametrize("weight, strides, expected", [
    ("constant", [1, 1], "Conv"), ("dequantized", [1, 1], "Conv"), ("input", [1, 1], "Conv"),
    ("constant", [2, 1], "ConvTranspose")], ids=["stride1-constant", "stride1-dequantized", "stride1-input", "strided"])
def test_conv_gradient_form(weight: str, strides: list[int], expected: str) -> None:
    """A stride-1 Conv's input gradient is a Conv (ONNX Runtime's ConvTranspose is much slower), whose flipped
    weight is an initializer computed at export when the weight is constant or an int8 weight's dequantization
    (built by graph operators from a graph input); a strided Conv's is a ConvTranspose."""
    x, w = n32([1, 4, 6, 5]), n32([6, 2, 3, 2], 1)
    quantized, scale = rng(3).integers(-100, 100, w.shape).astype(np.int8), np.float32(0.01)
    nodes = [node("Conv", ["x", "w"], group=2, strides=strides, pads=[1, 0, 1, 1])]
    feeds, constants = {"x": x}, {"w": w}
    if weight == "input":
        feeds, constants = {"x": x, "w": w}, {}
    elif weight == "dequantized":
        nodes.insert(0, helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"]))
        constants = {"wq": quantized, "ws": np.array(scale)}
        w = quantized.astype(F32) * scale
    model = gradient_model(forward_model(nodes, feeds, "y", constants=constants), ["x"], "y")
    added = [n for n in model.graph.node if n.name not in {f.name for f in nodes}]
    assert [n.op_type for n in added if n.op_type.startswith("Conv")] == [expected]
    if expected == "Conv" and weight != "input":
        (back,) = [n for n in added if n.op_type == "Conv"]
        flipped = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == back.input[1])
        expected_weight = w.reshape(2, 3, 2, 3, 2).transpose(0, 2, 1, 3, 4).reshape(4, 3, 3, 2)[:, :, ::-1, ::-1]
        np.testing.assert_allclose(flipped, expected_weight, rtol=1e-6)
        assert not any("w" in n.input for n in added)  # nothing flips (or dequantizes) it per call


# --- MaxPool at ties: torch.autograd routes to the first maximum -----------------------------------
@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [2, 2], "strides": [1, 1], "dilations": [2, 2]},
], ids=["k2s2", "k3s2-pads", "k3s2-pads-ceil", "k3s1-pads", "k2-dilation2"])
def test_max_pool_ties_route_like_torch(attrs: dict[str, object]) -> None:
    x = rng(7).integers(-2, 3, size=(2, 3, 7, 6)).astype(F32)  # five values: windows full of ties
    x[0, 0] = 1.0  # a constant channel: every window is one tie
    model = forward_model([node("MaxPool", ["x"], **attrs)], {"x": x}, "y")
    y = session(model).run(["y"], {"x": x})[0]
    seeds = rng(8).standard_normal((2, *y.shape)).astype(F32)
    actual = gradients(model, {"x": x}, ["x"], "y", seeds)["x"]

    pads = attrs.get("pads", [0, 0, 0, 0])
    reference = []
    for seed in seeds:
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = torch.nn.functional.max_pool2d(xt, attrs["kernel_shape"], attrs["strides"] if "strides" in attrs else 1,
                                            padding=pads[:2], dilation=attrs.get("dilations", 1),
                                            ceil_mode=bool(attrs.get("ceil_mode", 0)))
        np.testing.assert_array_equal(yt.detach().numpy(), y)
        (yt * torch.from_numpy(seed)).sum().backward()
        reference.append(xt.grad.numpy())
    assert relative_error(actual, np.stack(reference)) <= 1e-6


# --- other ties: torch.autograd shares the gradient equally among tied inputs -----------------------
# Finite differences are not valid at a tie, so these compare values with torch.autograd.
def ties(shape: list[int], dtype: type = F64, seed: int = 0) -> np.ndarray:
    """Values in {-1, 0, 1}: most windows, rows and element pairs hold ties."""
    return rng(seed).integers(-1, 2, size=shape).astype(dtype)


def check_ties_against_torch(nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray], f: Callable[..., torch.Tensor],
                             constants: dict[str, np.ndarray] | None = None, tolerance: float = 1e-12) -> None:
    """The appended gradient graph of ``nodes`` against torch.autograd of ``f`` (the same function)."""
    model = forward_model(nodes, feeds, "y", constants=constants)
    y = session(model).run(["y"], feeds)[0]
    np.testing.assert_array_equal(f(**{x: torch.from_numpy(v) for x, v in feeds.items()}).numpy(), y)
    seeds = rng(8).standard_normal((2, *y.shape)).astype(y.dtype)
    actual = gradients(model, feeds, list(feeds), "y", seeds)
    expected = torch_gradients(f, feeds, seeds)
    errors = {x: relative_error(actual[x], expected[x]) for x in feeds}
    assert all(e <= tolerance for e in errors.values()), errors


@pytest.mark.parametrize("op, a_grad, b_grad", [("Max", [0.5, 1, 0.5], [0.5, 0, 0.5]), ("Min", [0.5, 0, 0.5], [0.5, 1, 0.5])])
def test_extremum_halves_a_tie_like_torch(op: str, a_grad: list[float], b_grad: list[float]) -> None:
    """Max([1, 2, 3], [1, 0, 3]): torch.maximum gives a = [.5, 1, .5], b = [.5, 0, .5]."""
    feeds = {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([1.0, 0.0, 3.0])}
    grads = gradients(forward_model([node(op, ["a", "b"])], feeds, "y"), feeds, ["a", "b"], "y", np.ones((1, 3)))
    np.testing.assert_array_equal(grads["a"][0], a_grad)
    np.testing.assert_array_equal(grads["b"][0], b_grad)


@pytest.mark.parametrize("op", ["Max", "Min"])
@pytest.mark.parametrize("shapes", [([2, 3, 4], [2, 3, 4]), ([2, 3, 4], [3, 1]), ([2, 1, 4], [3, 1])],
                         ids=["same", "broadcast", "both-size1"])
def test_extremum_of_two_at_ties_matches_torch(op: str, shapes: tuple[list[int], list[int]]) -> None:
    feeds = {"a": ties(shapes[0], seed=1), "b": ties(shapes[1], seed=2)}
    pick = torch.maximum if op == "Max" else torch.minimum
    check_ties_against_torch([node(op, ["a", "b"])], feeds, lambda a, b: pick(a, b))


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_extremum_of_three_shares_ties_equally(op: str) -> None:
    """n inputs: an equal share to each input equal to the result, as torch.amax over the stacked inputs."""
    feeds = {"a": ties([2, 3, 4], seed=1), "b": ties([3, 1], seed=2), "c": ties([4], seed=3)}
    feeds["a"][0, 0] = 0.0  # a three-way tie
    feeds["b"][0, 0], feeds["c"][0] = 0.0, 0.0
    reduce = torch.amax if op == "Max" else torch.amin
    check_ties_against_torch([node(op, ["a", "b", "c"])], feeds,
                             lambda a, b, c: reduce(torch.stack(torch.broadcast_tensors(a, b, c)), 0))


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
@pytest.mark.parametrize("axes, keepdims", [([1], 1), ([0, 2], 0), ([-1], 0), (None, 1)])
def test_extreme_reduction_at_ties_matches_torch(op: str, axes: list[int] | None, keepdims: int) -> None:
    x = ties([2, 3, 4])
    x[1] = 1.0  # a constant slice: every reduction over it is one tie
    inputs, constants = (["x", "a"], {"a": np.array(axes, I64)}) if axes is not None else (["x"], {})
    reduce = torch.amax if op == "ReduceMax" else torch.amin
    dims = tuple(axes) if axes is not None else (0, 1, 2)
    check_ties_against_torch([node(op, inputs, keepdims=keepdims)], {"x": x},
                             lambda x: reduce(x, dims, keepdim=bool(keepdims)), constants=constants)


def test_global_max_pool_at_ties_matches_torch() -> None:
    """GlobalMaxPool is torch.amax over the spatial axes (no float64 kernel: float32)."""
    x = ties([2, 3, 3, 4], F32)
    x[0, 0] = -1.0
    check_ties_against_torch([node("GlobalMaxPool", ["x"])], {"x": x},
                             lambda x: torch.amax(x, (2, 3), keepdim=True), tolerance=1e-6)


def test_relu_then_maximum_with_zero_from_torch() -> None:
    """torch.maximum(relu(x), 0) exported to ONNX ties wherever the Relu is off: there the Relu
    output gets half the gradient, as in torch, and the input none."""

    class ReluMax(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            r = torch.relu(x)
            return torch.maximum(r, torch.zeros((), dtype=r.dtype)) * 2, r

    x = rng(9).standard_normal((3, 4))
    x[0, 0] = 0.0
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated, and 100x faster here
        torch.onnx.export(ReluMax(), (torch.from_numpy(x),), buffer, dynamo=False, opset_version=18,
                          input_names=["x"], output_names=["y", "r"])
    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(buffer.getvalue()))
    assert [n.op_type for n in model.graph.node if n.op_type != "Constant"] == ["Relu", "Max", "Mul"]
    seeds = rng(10).standard_normal((2, 3, 4))
    actual = gradients(model, {"x": x}, ["x", "r"], "y", seeds)
    for k, seed in enumerate(seeds):
        xt = torch.from_numpy(x).requires_grad_(True)
        y, r = ReluMax()(xt)
        r.retain_grad()
        (y * torch.from_numpy(seed)).sum().backward()
        np.testing.assert_allclose(actual["r"][k], r.grad.numpy(), rtol=1e-12, atol=0)  # type: ignore[union-attr]
        np.testing.assert_allclose(actual["x"][k], xt.grad.numpy(), rtol=1e-12, atol=0)  # type: ignore[union-attr]
    assert np.all(actual["r"][:, x <= 0] == seeds[:, x <= 0])  # half of 2 * seed at the ties


# --- operators and inputs without a gradient: a clear error, never a wrong gradient -----------------
def _error_for(nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray], wrt: list[str], *, opset: int = 18,
               constants: dict[str, np.ndarray] | None = None) -> UnsupportedOperatorError:
    model = forward_model(nodes, feeds, "y", constants=constants, opset=opset)
    with pytest.raises(UnsupportedOperatorError) as caught:
        gradient_model(model, wrt, "y")
    return caught.value


def test_operator_without_rule_names_node_and_op() -> None:
    nodes = [node("Relu", ["x"], ("r",)), helper.make_node("Hardmax", ["r"], ["e"], name="the_hardmax"),
             node("Tanh", ["e"])]
    error = _error_for(nodes, {"x": n64([2, 3])}, ["x"])
    assert error.op_type == "Hardmax" and error.node_name == "the_hardmax"
    assert "'Hardmax'" in str(error) and "'the_hardmax'" in str(error)


def test_resize_to_a_size_known_only_at_run_time_is_unsupported() -> None:
    """The gradient's interpolation matrices need the resized axes' sizes."""
    nodes = [node("Shape", ["like"], ("s",)), helper.make_node("Resize", ["x", "", "", "s"], ["y"], name="to_size",
                                                              mode="linear")]
    feeds = {"x": n32([1, 2, 3, 3]), "like": n32([1, 2, 5, 5])}
    model = forward_model(nodes, feeds, "y")
    model.graph.input[1].type.tensor_type.shape.dim[2].dim_param = "H"  # the size is known at run time only
    del model.graph.value_info[:], model.graph.output[:]
    model = onnx.shape_inference.infer_shapes(model)
    model.graph.output.extend(v for v in model.graph.value_info if v.name == "y")
    with pytest.raises(UnsupportedOperatorError, match="to_size.*static sizes"):
        gradient_model(model, ["x"], "y")


@pytest.mark.parametrize("attrs, expected", [
    ({"coordinate_transformation_mode": "tf_crop_and_resize"}, "tf_crop_and_resize"),
    ({"keep_aspect_ratio_policy": "not_larger"}, "keep_aspect_ratio_policy"),
], ids=["tf_crop_and_resize", "keep-aspect-ratio"])
def test_resize_variants_without_a_rule_are_unsupported(attrs: dict[str, str], expected: str) -> None:
    resize = helper.make_node("Resize", ["x", "", "", "z"], ["y"], name="odd_resize", mode="linear", **attrs)
    error = _error_for([resize], {"x": n32([1, 2, 3, 3])}, ["x"], constants={"z": np.array([1, 2, 6, 5], I64)})
    assert error.node_name == "odd_resize" and expected in str(error)


def test_conv_transpose_with_auto_pad_same_is_unsupported() -> None:
    conv = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="same_deconv", auto_pad="SAME_UPPER", strides=[2, 2])
    error = _error_for([conv], {"x": n32([1, 2, 3, 3])}, ["x"], constants={"w": n32([2, 3, 3, 3], 1)})
    assert error.node_name == "same_deconv" and "auto_pad" in str(error)


def test_resize_of_opset10_is_unsupported() -> None:
    resize = helper.make_node("Resize", ["x", "s"], ["y"], name="old_resize", mode="nearest")
    error = _error_for([resize], {"x": n32([1, 2, 3, 3])}, ["x"], opset=10, constants={"s": np.array([1, 1, 2, 2], F32)})
    assert error.node_name == "old_resize" and "opset 11" in str(error)


def test_unnamed_node_is_named_by_its_output() -> None:
    hardmax = helper.make_node("Hardmax", ["x"], ["y"])
    error = _error_for([hardmax], {"x": n64([2, 3])}, ["x"])
    assert error.node_name == "y" and "'Hardmax'" in str(error)


def test_conv_weight_on_path_is_unsupported() -> None:
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="the_conv")
    error = _error_for([conv], {"x": n32([1, 2, 4, 4]), "w": n32([3, 2, 3, 3], 1)}, ["x", "w"])
    assert error.op_type == "Conv" and error.node_name == "the_conv"
    assert "input 1" in str(error) and "'w'" in str(error)


def test_weight_reached_through_another_node_is_unsupported() -> None:
    """The weight depends on the differentiated input: the gradient would miss a term."""
    nodes = [node("Relu", ["x"], ("r",)), helper.make_node("Mul", ["w", "s"], ["ws"], name="scaled_weight"),
             helper.make_node("Conv", ["r", "ws"], ["y"], name="conv_with_computed_weight")]
    error = _error_for(nodes, {"x": n32([1, 2, 4, 4]), "s": n32([1], 2)}, ["x", "s"],
                       constants={"w": n32([3, 2, 3, 3], 1)})
    assert error.node_name == "conv_with_computed_weight"


def test_batch_norm_scale_on_path_is_unsupported() -> None:
    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn")
    error = _error_for([bn], {"x": n64([2, 3, 2, 2]), "s": n64([3], 1)}, ["x", "s"],
                       constants={"b": n64([3], 2), "m": n64([3], 3), "v": positive([3])})
    assert error.op_type == "BatchNormalization" and "input 1" in str(error)


def test_slice_with_step_along_a_dynamic_axis_needs_its_size() -> None:
    """A step other than 1 along an axis of unknown size (here the batch) places the gradient by that size: an
    UnknownSizeError, on which the loader exports a PyTorch model again at a fixed size."""
    sl = helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"], name="strided")
    model = forward_model([sl], {"x": n64([4, 6])}, "y", constants={
        "st": np.array([0], I64), "en": np.array([BIG], I64), "ax": np.array([0], I64), "sp": np.array([2], I64)})
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with pytest.raises(UnknownSizeError, match="'strided' along axis 0 .* needs the axis' static size"):
        gradient_model(model, ["x"], "y")


@pytest.mark.parametrize("end", [BIG, 2**31 - 1])
def test_slice_to_int_max_with_a_negative_step_is_refused(end: int) -> None:
    """ONNX Runtime reads such an end as "to the first element", the standard and its shape inference as an empty
    slice: the graph the gradient is built on would disagree with what runs."""
    sl = helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"], name="backwards")
    model = forward_model([sl], {"x": n64([4, 6])}, "y", constants={
        "st": np.array([2], I64), "en": np.array([end], I64), "ax": np.array([1], I64), "sp": np.array([-1], I64)})
    with pytest.raises(InvalidModelError, match="'backwards' ends at INT_MAX with step -1 along axis 1"):
        gradient_model(model, ["x"], "y")


def test_slice_whose_declared_output_disagrees_is_refused() -> None:
    """A declared output length that is not what the Slice picks would misplace the gradient."""
    sl = helper.make_node("Slice", ["x", "st", "en", "ax"], ["y"], name="mislabelled")
    model = forward_model([sl], {"x": n64([4, 6])}, "y", constants={
        "st": np.array([1], I64), "en": np.array([4], I64), "ax": np.array([1], I64)})
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5
    with pytest.raises(InvalidModelError, match="'mislabelled' picks 3 elements along axis 1 of 'x', but its output "
                                                "declares 5"):
        gradient_model(model, ["x"], "y")


def test_reduce_l2_of_zeros_has_torchs_zero_gradient() -> None:
    """sqrt(sum x^2) at x = 0: torch.linalg.vector_norm's gradient is 0 there, not NaN."""
    value = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 2.0]])
    reduce = helper.make_node("ReduceL2", ["x", "a"], ["y"], name="norm", keepdims=0)
    model = forward_model([reduce], {"x": value}, "y", constants={"a": np.array([1], I64)})
    ours = gradients(model, {"x": value}, ["x"], "y", np.ones((1, 2)))["x"][0]
    x = torch.tensor(value, requires_grad=True)
    torch.linalg.vector_norm(x, dim=1).sum().backward()
    np.testing.assert_allclose(ours, x.grad.numpy(), atol=1e-12)


@pytest.mark.parametrize("equation, shapes", [("ii->i", [[3, 3]]), ("ij,jk->i", [[2, 3], [3, 4]])])
def test_einsum_with_a_diagonal_or_a_subscript_summed_alone_is_unsupported(equation: str, shapes: list[list[int]]) -> None:
    einsum = helper.make_node("Einsum", [f"x{i}" for i in range(len(shapes))], ["y"], name="odd_einsum",
                              equation=equation)
    error = _error_for([einsum], {f"x{i}": n64(shape, i) for i, shape in enumerate(shapes)}, ["x0"])
    assert error.node_name == "odd_einsum" and "repeats a subscript or sums one alone" in str(error)


def test_custom_domain_is_unsupported() -> None:
    custom = helper.make_node("Relu", ["x"], ["y"], name="custom_relu", domain="com.example")
    model = helper.make_model(helper.make_graph([custom], "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2])],
                                                [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])]),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOperatorError, match="custom_relu"):
        gradient_model(model, ["x"], "y")


def test_gather_with_repeated_indices_before_opset16_is_unsupported() -> None:
    """ScatterElements only adds repeated indices' gradients from opset 16 (reduction='add')."""
    gather = helper.make_node("Gather", ["x", "i"], ["y"], name="repeating_gather")
    error = _error_for([gather], {"x": n64([4, 3])}, ["x"], opset=13, constants={"i": np.array([2, 2, -2], I64)})
    assert error.node_name == "repeating_gather" and "opset 16" in str(error)
    error = _error_for([gather], {"x": n64([4, 3]), "i": np.array([1, 3], I64)}, ["x"], opset=13)
    assert error.op_type == "Gather"


def test_gather_nd_and_elements_refusals() -> None:
    """Repeating or computed indices before opset 16 (no reduction='add'), and GatherND with batch_dims."""
    nd = helper.make_node("GatherND", ["x", "i"], ["y"], name="repeating_gather_nd")
    error = _error_for([nd], {"x": n64([3, 2])}, ["x"], opset=13, constants={"i": np.array([[1, 0], [-2, 0]], I64)})
    assert error.node_name == "repeating_gather_nd" and "opset 16" in str(error)
    elements = helper.make_node("GatherElements", ["x", "i"], ["y"], name="repeating_gather_elements")
    error = _error_for([elements], {"x": n64([3, 2]), "i": np.array([[1, 0]], I64)}, ["x"], opset=13)
    assert error.node_name == "repeating_gather_elements" and "opset 16" in str(error)
    batched = helper.make_node("GatherND", ["x", "i"], ["y"], name="batched_gather_nd", batch_dims=1)
    error = _error_for([batched], {"x": n64([2, 3])}, ["x"], constants={"i": np.array([[1], [2]], I64)})
    assert error.node_name == "batched_gather_nd" and "batch_dims" in str(error)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_ceil_mode_window_past_the_input_before_opset22_is_unsupported(op: str) -> None:
    """Before opset 22 ONNX shape inference keeps a last ceil_mode window that starts past the
    input, ONNX Runtime drops it: the model's static shapes are wrong, so no gradient is built."""
    pool = helper.make_node(op, ["x"], ["y"], name="ceil_pool", kernel_shape=[2, 2], strides=[3, 3], ceil_mode=1)
    error = _error_for([pool], {"x": n32([1, 2, 7, 6])}, ["x"], opset=18)
    assert error.node_name == "ceil_pool" and "opset 22" in str(error)
