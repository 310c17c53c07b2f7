"""Small numerical helpers every layer may use."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [..., classes] logits, computed in float64 for stable probabilities."""
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def class_scores(logits: np.ndarray) -> np.ndarray:
    """Logits [N, classes, ...] as [N, classes]: summed over the axes after the classes' (a segmentation map's
    pixels), as class-index targets read them."""
    return logits if logits.ndim <= 2 else logits.reshape(*logits.shape[:2], -1).sum(axis=2)


def class_probabilities(logits: np.ndarray) -> np.ndarray:
    """Logits [N, classes, ...] as [N, classes] probabilities: the softmax over the classes, averaged over a
    segmentation map's pixels (for a map of equal pixels, its pixels' softmax)."""
    if logits.ndim <= 2:
        return softmax(logits)
    return softmax(np.moveaxis(logits.reshape(*logits.shape[:2], -1), 1, 2)).mean(axis=1)


def class_order(logits: np.ndarray) -> np.ndarray:
    """Each image's class indices from the most to the least likely by ``class_scores``, [N, classes]
    (ties in index order): what a target -k (the k-th most likely class) reads."""
    return np.argsort(-class_scores(logits), axis=1, kind="stable")
