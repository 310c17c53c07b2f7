"""The Session contract: one explainable model on one backend, behind the calls methods need.

- ``run(images, targets, objective)``: logits, resolved targets, activations and gradients of
  every target layer, in one runtime call;
- ``input_gradients(images, targets, objective)``: the same with the model input as the one
  "layer" (Saliency, Integrated Gradients, SmoothGrad, FGVis);
- ``defended_input_gradients(...)``: input gradients with FGVis's Relu defence;
- ``logits(images)``: a plain forward pass (perturbation methods);
- ``head(layer, activations, images)``: logits with the target layer's activations replaced
  (ablation), re-running only what comes after the layer where the backend allows.

The backends (``explainrt.runtime.onnxruntime``, ``.torch``, ``.tensorrt``) implement it; the
table in ``explainrt.runtime`` opens one by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx

from explainrt.errors import InvalidInputError, InvalidModelError
from explainrt.export.heads import add_map_heads, closed_form, keep_maps_only
from explainrt.export.spec import (
    BOX_MATCHES_OUTPUT,
    BOX_OBJECTIVES,
    BOXES_INPUT,
    RESOLVED_TARGETS_OUTPUT,
    TARGETS_INPUT,
    WEIGHTED_BOX_OBJECTIVES,
    WEIGHTS_INPUT,
    ExplainableSpec,
    activations_output,
    gradients_output,
    maps_output,
)
from explainrt.export.variants import head_input


@dataclass(frozen=True)
class RunResult:
    """Everything one explaining call of the model returns (host arrays)."""

    logits: np.ndarray  # [N, classes]
    targets: np.ndarray  # [N, K] resolved class indices
    activations: list[np.ndarray]  # per target layer [N, C, h, w]
    gradients: list[np.ndarray]  # per target layer [N, K, C, h, w]
    objectives: np.ndarray | None = None  # [N, K] each target's objective where the graph computed it (boxes)


@dataclass(frozen=True)
class MapsResult:
    """What a map head returns (host arrays, or CuPy arrays with device outputs)."""

    logits: Any  # [N, classes]
    targets: Any  # [N, K] resolved class indices
    maps: Any  # [N, K, H, W] float32, normalised as the Python path normalises CAM maps
    objectives: Any = None  # [N, K] each target's objective where the graph computed it (boxes)


@runtime_checkable
class MapHeadSession(Protocol):
    """A session that can run a closed-form CAM method's map head in the graph (ONNX Runtime, TensorRT)."""

    def maps(self, images: Any, targets: Any, method: str, objective: str | None = None) -> MapsResult:
        """``objective``: a target objective (weights, boxes...) in place of the class logit the method weighs,
        ``targets`` then fed as ``targets_feed`` takes them; None: the method's own, class indices [N, K]."""
        ...


def uses_main_model(spec: ExplainableSpec, method: str) -> bool:
    """Whether the model's own outputs hold ``method``'s float32 maps for the objective the method weighs."""
    return method in spec.maps and spec.maps_dtype == "float32" and spec.objective == closed_form(method).objective


def in_call_heads(spec: ExplainableSpec, methods: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The methods whose float32 maps a session's one model call can return, and which of them need a head added:
    the model's own heads (``uses_main_model``), then those of ``methods`` the model can take (not there yet,
    weighing the model's objective, and its activations and gradients still outputs (not maps-only) beside
    any float32 heads it has)."""
    own = tuple(m for m in spec.maps if uses_main_model(spec, m))
    takes_heads = not spec.maps_only and (not spec.maps or spec.maps_dtype == "float32")
    added = tuple(m for m in methods if takes_heads and m not in spec.maps and closed_form(m).objective == spec.objective)
    return (*own, *added), added


def maps_session_model(model: onnx.ModelProto, added: Sequence[str], methods: Sequence[str]) -> onnx.ModelProto:
    """What a session runs for in-call map heads: a copy of the explainable ``model`` (which stays as given:
    variants, heads alone and users read it) with the heads of ``added``, returning only the maps of ``methods``
    (``keep_maps_only``)."""
    headed = onnx.ModelProto()
    headed.CopyFrom(model)
    return keep_maps_only(add_map_heads(headed, added) if added else headed, methods)


def maps_outputs(spec: ExplainableSpec, method: str) -> list[str]:
    return [spec.logits, RESOLVED_TARGETS_OUTPUT, maps_output(method)]


def map_head_feeds(spec: ExplainableSpec, images: Any, result: RunResult) -> dict[str, Any]:
    """The inputs of ``head_only_model``: the images and each target layer's activations and gradients."""
    feeds = {spec.image_input: images}
    for index, (activations, gradients) in enumerate(zip(result.activations, result.gradients)):
        feeds[activations_output(index)] = activations
        feeds[gradients_output(index)] = gradients
    return feeds


class Session(Protocol):
    spec: ExplainableSpec
    input_shape: tuple[int | str | None, ...]

    def run(self, images: np.ndarray, targets: np.ndarray, objective: str = "logit") -> RunResult: ...

    def input_gradients(self, images: np.ndarray, targets: np.ndarray, objective: str = "logit") -> RunResult: ...

    def defended_input_gradients(self, images: np.ndarray, targets: np.ndarray, references: list[np.ndarray] | None = None,
                                 objective: str = "logit") -> tuple[RunResult, list[np.ndarray]]: ...

    def logits(self, images: np.ndarray) -> np.ndarray: ...

    def head(self, layer: int, activations: np.ndarray, images: np.ndarray) -> np.ndarray: ...


def head_feeds(spec: ExplainableSpec, layer: int, activations: Any, images: Any, reads_image: bool) -> dict[str, Any]:
    """Inputs of a head sub-graph: the replaced activations, and the images repeated to match when it reads them."""
    feeds = {head_input(spec, layer): activations}
    if reads_image:
        feeds[spec.image_input] = np.repeat(np.asarray(images), activations.shape[0] // images.shape[0], axis=0)
    return feeds


def output_names(logits: str, layers: int, objective: str = "logit") -> list[str]:
    """The outputs of an explainable model in the order ``run_result`` reads them."""
    names = [logits] if objective == "weights" else [logits, BOX_MATCHES_OUTPUT if objective in BOX_OBJECTIVES
                                                                else RESOLVED_TARGETS_OUTPUT]
    for index in range(layers):
        names += [activations_output(index), gradients_output(index)]
    return names


def targets_feed(objective: str, targets: Any) -> dict[str, Any]:
    """The input that says what to differentiate: class indices int64 [N, K], for the
    ``weights`` objective the weights [N, K, *output] of the linear objective, for a box objective
    the boxes [N, K, 6] (x1, y1, x2, y2, class, iou), for a weighted box objective the pair
    (weights [N, K, *output], boxes [N, K, B, 6])."""
    if objective == "weights":
        return {WEIGHTS_INPUT: targets}
    if objective in WEIGHTED_BOX_OBJECTIVES:
        weights, boxes = targets
        return {WEIGHTS_INPUT: weights, BOXES_INPUT: boxes}
    if objective in BOX_OBJECTIVES:
        return {BOXES_INPUT: targets}
    return {TARGETS_INPUT: np.asarray(targets, np.int64) if isinstance(targets, (np.ndarray, list)) else targets}


def run_result(values: Sequence[Any], objective: str, targets: Any) -> RunResult:
    """A RunResult from the outputs listed by ``output_names`` (the ``weights`` objective resolves no
    class: its targets read -1; for a box objective, targets holds how many predictions each box matched)."""
    if objective == "weights":
        return RunResult(values[0], np.full(tuple(targets.shape[:2]), -1, dtype=np.int64), list(values[1::2]),
                         list(values[2::2]))
    return RunResult(values[0], values[1], list(values[2::2]), list(values[3::2]))  # box objectives: match counts


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as (kind, index); anything else is an InvalidInputError."""
    kind, _, index = str(device).partition(":")
    if kind == "cpu" and not index:
        return "cpu", 0
    if kind == "cuda" and (not index or index.isdigit()):
        return "cuda", int(index or 0)
    raise InvalidInputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def input_dims(model: onnx.ModelProto, name: str) -> list[int | str | None]:
    value = next(v for v in model.graph.input if v.name == name)
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value.type.tensor_type.shape.dim]


def static_dims(dims: Sequence[int | str | None]) -> list[int]:
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise InvalidModelError(f"defended gradients need Relu activations of a static size, got {list(dims)}")
    return list(dims)  # type: ignore[arg-type]


def static_batch(dims: Sequence[int | str | None]) -> int | None:
    """The batch of a static-batch input (``dims[0]`` fixed, e.g. a batch-1 export), None where it is dynamic."""
    batch = dims[0] if dims else None
    return batch if isinstance(batch, int) and batch > 0 else None


def to_host(value: Any) -> np.ndarray:
    """A NumPy array of ``value``, copied from the GPU where it is a CuPy array (a session's device outputs)."""
    return value.get() if hasattr(value, "__cuda_array_interface__") and hasattr(value, "get") else np.asarray(value)


def run_in_chunks(run_once: Callable[[dict[str, Any]], Sequence[Any]], feeds: dict[str, Any], size: int | None,
                  pad: bool, concatenate: Callable[[list[Any]], Any]) -> list[Any]:
    """``run_once``'s outputs for ``feeds`` run in chunks of ``size`` along axis 0 (None: one call), each
    output's chunks joined by ``concatenate``. ``pad`` (a static-batch model, ``size`` its batch): every
    call gets exactly ``size`` rows, the last chunk padded with copies of its last row, the padding dropped
    from the outputs. Feeds are NumPy or device arrays (CuPy, torch): rows are taken by slices and lists."""
    count = next(iter(feeds.values())).shape[0]
    if size is None or count == size or (count < size and not pad):
        return list(run_once(feeds))
    parts = []
    for start in range(0, count, size):
        stop = min(start + size, count)
        rows: Any = slice(start, stop) if stop - start == size or not pad else [
            *range(start, stop), *[stop - 1] * (size - (stop - start))]
        parts.append(run_once({name: value[rows] for name, value in feeds.items()}))
    return [concatenate([part[index] for part in parts])[:count] for index in range(len(parts[0]))]
