"""Finite-difference checks of the exporter's gradient graphs (a helper for the tests; no tests here).

``check_gradients`` takes a small ONNX graph (usually one node), appends the vector-Jacobian
product of K = 2 random seeds with ``GradientBuilder`` + ``append_gradients``, runs it with ONNX
Runtime and compares every gradient with central finite differences of ``sum(seed[k] * f(x))``,
where ``f`` is the *forward* graph run by ONNX Runtime as well (so the reference never goes
through a VJP rule).

Precision follows the dtype of the differentiable inputs:

- float64 (step 1e-6, tolerance 1e-7) wherever ONNX Runtime's CPU provider has a float64 kernel
  for the operator *and* for what its gradient graph uses;
- float32 otherwise (Conv, pooling, LeakyRelu, PRelu, HardSigmoid, HardSwish, Erf, Gelu,
  Softplus, Mean have no float64 CPU kernel; MaxPool's gradient needs ConvTranspose): a larger
  step (1e-2) and a looser tolerance (2e-4), because a float32 forward pass rounds at ~6e-8
  relative and the difference quotient divides that by the step. The seed-weighted sums are
  formed in float64 from the float32 outputs, so only the affected outputs' rounding counts.

The error measure is the one the zoo tests use: ``max |grad - reference| / max |reference|``;
``floor`` bounds that scale from below, so that a gradient which vanishes (up to the noise of the
differences) is compared in absolute terms.
Inputs for piecewise operators must stay farther than the step from their kinks and ties:
``away_from``, ``away_from_zero`` and ``distinct`` make such inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from explainrt.autodiff.gradients import GradientBuilder, append_gradients
from explainrt.autodiff.rules import RULES

SEEDS = 2  # K: cotangents per check
SEED_INPUT = "gradcheck.seed"

STEP = {np.dtype(np.float64): 1e-6, np.dtype(np.float32): 1e-2}
TOLERANCE = {np.dtype(np.float64): 1e-7, np.dtype(np.float32): 2e-4}


def grad_output(x: str) -> str:
    return f"gradcheck.grad.{x}"


# -- inputs ----------------------------------------------------------------------------------------
def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def normal(shape: Sequence[int], dtype: type = np.float64, seed: int = 0) -> np.ndarray:
    return rng(seed).standard_normal(shape).astype(dtype)


def away_from(shape: Sequence[int], kinks: Sequence[float] = (0.0,), dtype: type = np.float64, seed: int = 0,
              margin: float = 0.05, scale: float = 1.0) -> np.ndarray:
    """Normal values (times ``scale``) at least ``margin`` from every kink (ReLU-like operators)."""
    x = rng(seed).standard_normal(shape) * scale
    for kink in kinks:
        near = np.abs(x - kink) < margin
        x = np.where(near, kink + np.where(x >= kink, 1.0, -1.0) * 2 * margin, x)
    for kink in kinks:
        if np.any(np.abs(x - kink) < margin):
            raise ValueError("kinks closer than twice the margin: choose other inputs")
    return x.astype(dtype)


def away_from_zero(shape: Sequence[int], dtype: type = np.float64, seed: int = 0, margin: float = 0.05) -> np.ndarray:
    return away_from(shape, (0.0,), dtype, seed, margin)


def positive(shape: Sequence[int], dtype: type = np.float64, seed: int = 0, low: float = 0.5,
             high: float = 2.0) -> np.ndarray:
    return rng(seed).uniform(low, high, size=shape).astype(dtype)


def distinct(shape: Sequence[int], dtype: type = np.float64, seed: int = 0, spacing: float = 0.05,
             offset: float = 0.0) -> np.ndarray:
    """Pairwise distinct values at least ``spacing`` apart, centred on ``offset`` (no ties)."""
    count = int(np.prod(shape))
    values = (np.arange(count) - (count - 1) / 2) * spacing + offset
    return rng(seed).permutation(values).reshape(shape).astype(dtype)


# -- models ----------------------------------------------------------------------------------------
def forward_model(nodes: Sequence[onnx.NodeProto], feeds: Mapping[str, np.ndarray], output: str, *,
                  constants: Mapping[str, np.ndarray] | None = None, opset: int = 18,
                  dynamic_batch: Sequence[str] = ()) -> onnx.ModelProto:
    """A model of ``nodes`` with graph inputs ``feeds`` (axis 0 symbolic for the names in
    ``dynamic_batch``), initializers ``constants`` and one output, typed by shape inference."""
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                            ["N", *value.shape[1:]] if name in dynamic_batch else list(value.shape))
              for name, value in feeds.items()]
    initializers = [numpy_helper.from_array(np.asarray(value), name) for name, value in (constants or {}).items()]
    graph = helper.make_graph(list(nodes), "gradcheck", inputs, [], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)  # what this onnxruntime reads
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    typed = {v.name: v for v in model.graph.value_info}
    if output not in typed:
        raise ValueError(f"shape inference could not type the output {output!r}")
    model.graph.output.append(typed[output])
    onnx.checker.check_model(model, full_check=True)
    return model


def output_info(model: onnx.ModelProto, name: str) -> tuple[int, list[int]]:
    for value in [*model.graph.output, *model.graph.value_info]:
        if value.name == name:
            tensor = value.type.tensor_type
            return tensor.elem_type, [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
    raise KeyError(name)


def gradient_model(model: onnx.ModelProto, wrt: Sequence[str], output: str,
                   output_shape: Sequence[int] | None = None) -> onnx.ModelProto:
    """``model`` plus input ``SEED_INPUT`` [K, *shape(output)] and outputs ``grad_output(x)``.

    ``output_shape`` is the shape ONNX Runtime actually produces, where it differs from what
    ONNX shape inference says (MaxPool/AveragePool with ceil_mode before opset 22).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    builder = GradientBuilder(model)
    elem_type, shape = output_info(model, output)
    seed = builder.add_input(SEED_INPUT, elem_type, ["K", *(shape if output_shape is None else output_shape)])
    grads = append_gradients(builder, list(wrt), output, seed, RULES)
    for x in wrt:
        info = builder.info(x)
        builder.add_output(grad_output(x), grads[x], info.elem_type, ["K", *info.shape])  # type: ignore[misc]
    onnx.checker.check_model(model, full_check=True)
    return model


def session(model: onnx.ModelProto,
            level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    """One-thread CPU session; ``level`` lowers ONNX Runtime's graph optimisation (see ``FLOAT_QDQ``)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own unexported exception types
        if "NOT_IMPLEMENTED" in str(error):
            raise AssertionError(f"no ONNX Runtime CPU kernel for this dtype, use float32: {error}") from error
        raise


# -- the check -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    """Per differentiable input: the graph's gradient, its reference and their relative error."""

    gradients: dict[str, np.ndarray]
    references: dict[str, np.ndarray]
    errors: dict[str, float]
    dtype: np.dtype


def relative_error(actual: np.ndarray, reference: np.ndarray, floor: float = 0.0) -> float:
    scale = max(float(np.max(np.abs(reference))) if reference.size else 0.0, floor)
    diff = float(np.max(np.abs(actual.astype(np.float64) - reference))) if reference.size else 0.0
    return diff / scale if scale > 0 else diff


def finite_differences(forward: ort.InferenceSession, feeds: Mapping[str, np.ndarray], x: str, output: str,
                       seeds: np.ndarray, step: float) -> np.ndarray:
    """Central differences of ``sum(seeds[k] * f)`` w.r.t. every element of ``feeds[x]``: [K, *shape(x)]."""
    base = feeds[x]
    result = np.zeros((len(seeds), base.size))
    weights = seeds.astype(np.float64)
    for index in range(base.size):
        values = []
        for sign in (1.0, -1.0):
            moved = base.copy().reshape(-1)
            moved[index] += sign * step
            y = forward.run([output], {**feeds, x: moved.reshape(base.shape)})[0].astype(np.float64)
            values.append(np.sum(weights * y, axis=tuple(range(1, weights.ndim))))
        # divide by the step actually taken after rounding to the input's dtype
        centre, delta = base.reshape(-1)[index], base.dtype.type(step)
        taken = float(centre + delta) - float(centre - delta)
        result[:, index] = (values[0] - values[1]) / taken
    return result.reshape(len(seeds), *base.shape)


def gradients(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], wrt: Sequence[str], output: str,
              seeds: np.ndarray,
              level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> dict[str, np.ndarray]:
    """Run the gradient graph appended to ``model`` for ``seeds``."""
    graph = gradient_model(model, wrt, output, seeds.shape[1:])
    values = session(graph, level).run([grad_output(x) for x in wrt], {**feeds, SEED_INPUT: seeds})
    return dict(zip(wrt, values))


def check_gradients(nodes: Sequence[onnx.NodeProto], feeds: Mapping[str, np.ndarray], output: str = "y", *,
                    wrt: Sequence[str] | None = None, constants: Mapping[str, np.ndarray] | None = None,
                    opset: int = 18, dynamic_batch: Sequence[str] = (), step: float | None = None,
                    tolerance: float | None = None, seed: int = 0, floor: float = 0.0) -> Result:
    """Assert the appended gradient graph matches central finite differences; return the details.

    ``feeds`` become graph inputs; ``wrt`` (default: every floating feed) are differentiated,
    the other feeds are inputs off the gradient's path. ``constants`` become initializers
    (indices, shapes, weights that are not differentiated).
    """
    wrt = [name for name, value in feeds.items() if value.dtype.kind == "f"] if wrt is None else list(wrt)
    model = forward_model(nodes, feeds, output, constants=constants, opset=opset, dynamic_batch=dynamic_batch)
    dtype = np.dtype(feeds[wrt[0]].dtype)
    if any(np.dtype(feeds[x].dtype) != dtype for x in wrt):
        raise ValueError("differentiate inputs of one dtype per check")
    step = STEP[dtype] if step is None else step
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    forward = session(model)
    y = forward.run([output], dict(feeds))[0]
    seeds = rng(seed + 1).standard_normal((SEEDS, *y.shape)).astype(y.dtype)
    actual = gradients(model, feeds, wrt, output, seeds)
    references = {x: finite_differences(forward, feeds, x, output, seeds, step) for x in wrt}
    errors = {}
    for x in wrt:
        assert actual[x].shape == references[x].shape, f"gradient of {x!r}: shape {actual[x].shape}"
        assert actual[x].dtype == feeds[x].dtype, f"gradient of {x!r}: dtype {actual[x].dtype}"
        errors[x] = relative_error(actual[x], references[x], floor)
    bad = {x: e for x, e in errors.items() if not e <= tolerance}
    assert not bad, f"relative errors {bad} above {tolerance} ({dtype}, step {step})"
    return Result(actual, references, errors, dtype)


def check_op(op_type: str, inputs: Sequence[str], feeds: Mapping[str, np.ndarray], *,
             outputs: Sequence[str] = ("y",), output: str = "y", attrs: Mapping[str, object] | None = None,
             **options: object) -> Result:
    """``check_gradients`` for a graph of one ``op_type`` node (``""`` in ``inputs`` skips an input)."""
    node = helper.make_node(op_type, list(inputs), list(outputs), name=f"{op_type}_under_test", **(attrs or {}))
    return check_gradients([node], feeds, output, **options)  # type: ignore[arg-type]


def torch_gradients(f: Callable[..., torch.Tensor], feeds: dict[str, np.ndarray], seeds: np.ndarray) -> dict[str, np.ndarray]:
    """[K, *shape(x)] gradients of ``sum(seeds[k] * f(**feeds))`` w.r.t. every feed, by torch.autograd."""
    result: dict[str, list[np.ndarray]] = {x: [] for x in feeds}
    for seed in seeds:
        tensors = {x: torch.from_numpy(value).requires_grad_(True) for x, value in feeds.items()}
        (f(**tensors) * torch.from_numpy(seed)).sum().backward()
        for x, tensor in tensors.items():
            result[x].append(tensor.grad.numpy())  # type: ignore[union-attr]
    return {x: np.stack(grads) for x, grads in result.items()}
