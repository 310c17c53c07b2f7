"""Adebayo et al. (NeurIPS 2018) cascading model-parameter randomisation, on any ONNX model.

The weighted nodes (Conv, ConvTranspose, Gemm, MatMul with a constant weight of rank >= 2) are
taken in reverse topological order, from the logits down. Step k re-draws the constant inputs
(weights and biases) of the first k of them on a copy of the original model, makes the copy
explainable again with the same target layers, and explains the same images for the same
classes. A method whose maps stay similar while the model forgets what it learnt does not
explain the model. Similarity per image: Spearman rank correlation and SSIM (maps min-max scaled).

Re-drawn values are normal with the mean and standard deviation of the tensor they replace (so
activations keep their scale), from ``numpy.random.default_rng([seed, k])`` for the k-th node:
step k+1 keeps step k's random values and adds one layer.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from explainrt import kernels
from explainrt.errors import InvalidInputError
from explainrt.export.explainable import make_explainable
from explainrt.export.spec import ExplainableSpec, load_model, original_model
from explainrt.optional import require

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class SanityResult:
    """Per step (0 = the original model, k = top k layers randomised): the layer randomised last and
    the similarity of each image's map to the original one, [steps + 1, N]."""

    layers: tuple[str, ...]  # layers[k - 1] is the node randomised at step k
    spearman: np.ndarray
    ssim: np.ndarray
    maps: np.ndarray  # [steps + 1, N, H, W] maps scaled to [0, 1]


def weighted_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes with learnt weights, in reverse topological order (logits first)."""
    constants = {tensor.name: len(tensor.dims) for tensor in model.graph.initializer}
    found = [node.name for node in model.graph.node
             if node.op_type in WEIGHTED_OPS and any(constants.get(name, 0) >= 2 for name in node.input)]
    return found[::-1]


def randomized_model(model: onnx.ModelProto, count: int, seed: int = 0) -> onnx.ModelProto:
    """A copy of plain ONNX ``model`` with the constant inputs of its top ``count`` weighted nodes re-drawn."""
    names = weighted_nodes(model)
    if not 0 <= count <= len(names):
        raise InvalidInputError(f"count must be in 0..{len(names)} (the model's weighted layers), got {count}")
    randomized = copy.deepcopy(model)
    initializers = {tensor.name: tensor for tensor in randomized.graph.initializer}
    nodes = {node.name: node for node in randomized.graph.node}
    done: set[str] = set()
    for index, name in enumerate(names[:count]):
        rng = np.random.default_rng([seed, index])
        for tensor_name in nodes[name].input:
            tensor = initializers.get(tensor_name)
            if tensor is None or tensor_name in done or tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
                continue
            values = numpy_helper.to_array(tensor)
            drawn = rng.normal(values.mean(), values.std() or 1.0, values.shape).astype(values.dtype)
            tensor.CopyFrom(numpy_helper.from_array(drawn, tensor_name))
            done.add(tensor_name)
    return randomized


def map_similarity(reference: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman rank correlation and SSIM per image of maps [N, H, W] (scaled to [0, 1]) to ``reference``."""
    rank = np.array([_spearman(a, b) for a, b in zip(reference, maps, strict=True)])
    structural_similarity = require("skimage.metrics", "the sanity check's SSIM", "metrics").structural_similarity
    ssim = np.array([structural_similarity(a, b, data_range=1.0) for a, b in zip(reference, maps, strict=True)])
    return rank, ssim


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:  # a constant map has no ranking: no correlation
        return 0.0
    spearmanr = require("scipy.stats", "the sanity check's rank correlation", "metrics").spearmanr
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def cascading_randomization(model: Any, images: np.ndarray, method: str = "gradcam", targets: Any = None,
                            steps: int | Sequence[int] | None = None, seed: int = 0, batch_size: int = 32,
                            providers: Sequence[str] | None = None, **options: Any) -> SanityResult:
    """Adebayo's cascading randomisation of explainable ONNX ``model`` for float ``images`` [N, C, H, W].

    ``steps``: how many layers are randomised at each step (default every count 1..L; an int n
    picks n counts spread evenly over 1..L). ``targets`` as in ``Explainer.explain``; they are
    resolved on the original model and kept fixed. ``options`` go to the method.
    """
    from explainrt.explainer import Explainer

    explainable = load_model(model)
    spec = ExplainableSpec.from_model(explainable)
    plain = original_model(explainable)
    names = weighted_nodes(plain)
    if not names:
        raise InvalidInputError("the model has no weighted layers (Conv, Gemm, MatMul with constant weights) to randomise")
    counts = _step_counts(steps, len(names))
    original = Explainer(explainable, providers=providers).explain(images, method, targets, batch_size=batch_size,
                                                                   **options)
    fixed = original.targets
    all_maps = [original.maps]
    for count in counts:
        variant = make_explainable(randomized_model(plain, count, seed), list(spec.target_layers), logits=spec.logits,
                                   preprocessing=spec.preprocessing, objective=spec.objective)
        explained = Explainer(variant, providers=providers).explain(images, method, fixed, batch_size=batch_size,
                                                                    **options)
        all_maps.append(explained.maps)
    maps = np.stack([kernels.normalize_minmax(np.ascontiguousarray(m, dtype=np.float32)) for m in all_maps])
    similarity = [map_similarity(maps[0], step) for step in maps]
    return SanityResult(tuple(names[c - 1] for c in counts), np.stack([s[0] for s in similarity]),
                        np.stack([s[1] for s in similarity]), maps)


def _step_counts(steps: int | Sequence[int] | None, layers: int) -> list[int]:
    if steps is None:
        return list(range(1, layers + 1))
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        if steps < 1:
            raise InvalidInputError(f"steps must be >= 1, got {steps}")
        return sorted({int(v) for v in np.rint(np.linspace(1, layers, min(int(steps), layers)))})
    counts = [int(v) for v in steps]
    if not counts or any(b <= a for a, b in zip(counts, counts[1:])) or counts[0] < 1 or counts[-1] > layers:
        raise InvalidInputError(f"steps must be increasing layer counts in 1..{layers}, got {list(steps)!r}")
    return counts
