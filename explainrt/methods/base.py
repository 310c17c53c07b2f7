"""What every explanation method is: a name, its options, and ``attribute(request) -> Attribution``.

The pipeline (``explainrt.explainer``) validates images, targets and option names, cuts
the images into chunks, calls ``attribute`` once per chunk, and normalises the raw maps for
display. A method says only how it weights (CAM family) or perturbs (occlusion, RISE, ...) and
runs the model through the request's session, never on its own.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from explainrt.errors import ExplanationCancelled, InvalidInputError
from explainrt.runtime.base import Session
from explainrt.validation import checked_int


@dataclass(frozen=True)
class AttributionRequest:
    """One chunk of images to explain, and everything a method may use to do it."""

    images: np.ndarray  # [n, C, H, W] float32 model input
    targets: np.ndarray  # [n] int64 requested classes (-k: the k-th most likely)
    session: Session
    batch_size: int  # the most images (or perturbed copies) per runtime call
    normalize: bool  # whether the maps will be shown scaled to [0, 1] (CAM layers are scaled one by one)
    options: dict[str, Any] = field(default_factory=dict)
    cancel: threading.Event | None = None
    progress: bool = False

    def check_cancelled(self) -> None:
        """Raise ExplanationCancelled if the caller asked to stop (methods call it between runtime calls)."""
        if self.cancel is not None and self.cancel.is_set():
            raise ExplanationCancelled("the explanation was cancelled")


@dataclass
class Attribution:
    """A method's answer for one chunk: raw maps at input resolution and the predictions."""

    maps: np.ndarray  # [n, H, W] float32
    logits: np.ndarray  # [n, classes]
    targets: np.ndarray  # [n] the class each map explains
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # per-image arrays, first axis n


class Method(ABC):
    """An explanation method. Subclasses set the class attributes and implement ``attribute``."""

    name: str
    summary: str
    options: tuple[str, ...] = ()
    signed: bool = False  # raw maps may be negative; normalised display shows the positive evidence
    per_image_options: tuple[str, ...] = ()  # may be one value per image: the pipeline slices them per chunk
    image_options: tuple[str, ...] = ()  # images (one, or one per image): the pipeline preprocesses them

    @abstractmethod
    def attribute(self, request: AttributionRequest) -> Attribution:
        """Raw attribution maps [n, H, W] for the request's images and targets."""

    def check_options(self, options: dict[str, Any]) -> None:
        """Reject option names the method does not take (values are checked by the method)."""
        unknown = set(options) - set(self.options)
        if unknown:
            takes = f"it takes {', '.join(self.options)}" if self.options else "it takes none"
            raise InvalidInputError(f"method {self.name!r} takes no option(s) {', '.join(sorted(unknown))}; {takes}")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [..., classes] logits, in float64 for stable probabilities."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True), dtype=np.float64)
    return shifted / shifted.sum(axis=-1, keepdims=True)


def resolve_targets(requested: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Class indices for requested targets (any shape [n, ...]); -k is the k-th most likely class of its image."""
    requested = np.asarray(requested, dtype=np.int64)
    ranked = np.argsort(-logits, axis=1, kind="stable")
    flat = requested.reshape(requested.shape[0], -1)
    by_rank = np.take_along_axis(ranked, np.maximum(-flat - 1, 0), axis=1)
    return np.where(flat < 0, by_rank, flat).reshape(requested.shape)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """The last two axes blurred with a Gaussian of std ``sigma`` pixels (edges repeated): "blur" baselines."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(images, sigma=(0,) * (images.ndim - 2) + (sigma, sigma), mode="nearest").astype(np.float32)


def int_option(options: dict[str, Any], name: str, default: int | None, lowest: int = 1,
               highest: int | None = None) -> int | None:
    """An integer method option (``default`` when absent; None stays None)."""
    value = options.get(name, default)
    return None if value is None else checked_int(name, value, lowest, highest)


def number_option(options: dict[str, Any], name: str, default: float, *, allow_zero: bool) -> float:
    """A finite number option > 0 (>= 0 with ``allow_zero``)."""
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
            value >= 0 if allow_zero else value > 0) or not np.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def flag_option(options: dict[str, Any], name: str, default: bool) -> bool:
    """A True/False method option."""
    value = options.get(name, default)
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidInputError(f"{name} must be True or False, got {value!r}")
    return bool(value)


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[stage]`` (the per-stage timings of an Attribution)."""
    tick = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - tick
