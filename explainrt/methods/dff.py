"""Deep Feature Factorization (Collins et al., ECCV 2018): which concepts the model sees, and where.

The target layer's activations of a chunk of images [n, C, h, w] are factorised with NMF into k
concepts: A (as [C, n*h*w], shifted to be non-negative) ~ W [C, k] @ H [k, n*h*w]. Each
concept's heatmap is its row of H; each concept vector (W plus the shift, as pytorch-grad-cam
computes it) is scored by running the model's head on a feature map filled with that vector,
which for a global-pooling head equals the classifier applied to the concept (a segmentation head's
per-pixel class probabilities are averaged over the map). Concepts are
shared by the images of one chunk (``batch_size`` images), like pytorch-grad-cam's batch.
"""

from __future__ import annotations

import numpy as np

from explainrt import kernels
from explainrt.optional import require
from explainrt.errors import InvalidInputError
from explainrt.methods.base import Attribution, AttributionRequest, Method, resolve_targets, timed
from explainrt.methods.options import Integer, Option
from explainrt.numerics import class_probabilities

TOP_CLASSES = 3
"""Classes listed per concept in ``extras["concept_classes"]``."""


def factorize(activations: np.ndarray, n_concepts: int) -> tuple[np.ndarray, np.ndarray]:
    """NMF of [n, C, h, w] activations: concept vectors [k, C] and heatmaps [n, k, h, w]."""
    NMF = require("sklearn.decomposition", "Deep Feature Factorization (dff)").NMF

    n, channels, h, w = activations.shape
    stacked = np.nan_to_num(activations.transpose(1, 0, 2, 3).reshape(channels, -1))
    offset = stacked.min(axis=1)
    model = NMF(n_components=n_concepts, init="random", random_state=0)
    concepts = model.fit_transform(stacked - offset[:, None]) + offset[:, None]
    heatmaps = model.components_.reshape(n_concepts, n, h, w).transpose(1, 0, 2, 3)
    return concepts.T.astype(np.float32), heatmaps.astype(np.float32)


class DeepFeatureFactorization(Method):
    """DFF: NMF concepts of the target layer, each with its heatmap and the classes it scores."""

    name = "dff"
    class_targets_only = True
    summary = ("Deep Feature Factorization: NMF concepts of the target layer, each scored by the head "
               "(concept maps, classes and scores in extras)")
    options = (Option("n_concepts", Integer(1), 5, "number of NMF concepts (at most the target layer's channels)"),)

    def compute(self, request: AttributionRequest) -> Attribution:
        n_concepts = request.options["n_concepts"]
        n = request.images.shape[0]
        timings: dict[str, float] = {}
        with timed(timings, "runtime"):
            result = request.session.run(request.images, np.full((n, 1), -1, dtype=np.int64))
        targets = resolve_targets(request.targets, result.logits)  # refuses an output that has no classes first
        layer = len(result.activations) - 1  # the deepest target layer: the one next to the head
        activations = result.activations[layer]
        if n_concepts > activations.shape[1]:
            raise InvalidInputError(f"n_concepts ({n_concepts}) exceeds the target layer's {activations.shape[1]} channels")
        with timed(timings, "method"):
            concepts, heatmaps = factorize(activations, n_concepts)
        with timed(timings, "runtime"):
            filled = np.ascontiguousarray(np.broadcast_to(concepts[:, :, None, None], (n_concepts, *activations.shape[1:])))
            concept_logits = request.session.head(layer, filled, request.images[:1])
        with timed(timings, "maps"):
            height, width = request.images.shape[2:]
            scaled = kernels.normalize_minmax(heatmaps.reshape(-1, *heatmaps.shape[2:]))
            concept_maps = kernels.resize_bilinear(scaled, (height, width)).reshape(n, n_concepts, height, width)
            probabilities = class_probabilities(concept_logits)
            top = np.argsort(-probabilities, axis=1, kind="stable")[:, :TOP_CLASSES]
        extras = {
            "concept_maps": concept_maps,
            "concept_classes": np.broadcast_to(top, (n, *top.shape)).copy(),
            "concept_scores": np.broadcast_to(np.take_along_axis(probabilities, top, axis=1), (n, *top.shape)).copy(),
        }
        return Attribution(concept_maps.max(axis=1), result.logits, targets, timings, extras)


DFF_METHODS: tuple[Method, ...] = (DeepFeatureFactorization(),)
