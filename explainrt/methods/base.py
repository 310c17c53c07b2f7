"""What every explanation method is: a name, its declared options, and ``attribute(request) -> Attribution``.

The pipeline (``explainrt.explainer``) validates images, targets and options
(``Method.check_options``), cuts the images into chunks, calls ``attribute`` once per chunk, and
normalises the raw maps for display. A method says only how it weights (CAM family) or perturbs
(occlusion, RISE, ...) and runs the model through the request's session, never on its own; it
reads its options, validated and complete, from ``request.options[name]``.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from explainrt.errors import ExplanationCancelled, InvalidInputError
from explainrt.methods.options import Option
from explainrt.numerics import class_order
from explainrt.optional import require
from explainrt.runtime.base import Session


@dataclass(frozen=True)
class AttributionRequest:
    """One chunk of images to explain, and everything a method may use to do it."""

    images: np.ndarray  # [n, C, H, W] float32 model input
    targets: np.ndarray  # [n] int64 requested classes (-k: the k-th most likely); [n, K] for a many_targets method
    session: Session
    batch_size: int  # the most images (or perturbed copies) per runtime call
    normalize: bool  # whether the maps will be shown scaled to [0, 1] (CAM layers are scaled one by one)
    options: dict[str, Any] = field(default_factory=dict)
    cancel: threading.Event | None = None
    progress: bool = False
    map_heads: bool = True  # closed-form CAM methods may use the session's in-graph map heads

    def check_cancelled(self) -> None:
        """Raise ExplanationCancelled if the caller asked to stop (methods call it between runtime calls)."""
        if self.cancel is not None and self.cancel.is_set():
            raise ExplanationCancelled("the explanation was cancelled")


@dataclass
class Attribution:
    """A method's answer for one chunk: raw maps at input resolution and the predictions."""

    maps: np.ndarray  # [n, H, W] float32 ([n, K, H, W] for targets [n, K])
    logits: np.ndarray  # [n, classes]
    targets: np.ndarray  # [n] (or [n, K]) the class each map explains
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # per-image arrays, first axis n
    normalized: bool = False  # the maps are already scaled as the pipeline scales them (a map head's)


class Method(ABC):
    """An explanation method. Subclasses set the class attributes and implement ``compute``."""

    name: str
    summary: str
    options: tuple[Option, ...] = ()
    signed: bool = False  # raw maps may be negative; normalised display shows the positive evidence
    class_targets_only: bool = False  # its objective is a loss or a ranking of classes: no explainrt.targets objects
    target_free: bool = False  # its maps do not depend on the target (Eigen-CAM), so it explains any output
    many_targets: bool = False  # compute takes targets [n, K] and returns maps [n, K, H, W] (one runtime call for all K)
    blank_reason: str = ""  # why this method's map can be all zero for a sound model (said with the map)

    @property
    def per_image_options(self) -> tuple[str, ...]:
        """Options that may be one value per image: the pipeline slices them per chunk."""
        return tuple(option.name for option in self.options if option.per_image)

    @property
    def image_options(self) -> tuple[str, ...]:
        """Options that are images (one, or one per image): the pipeline preprocesses them."""
        return tuple(option.name for option in self.options if option.image)

    def attribute(self, request: AttributionRequest) -> Attribution:
        """Raw attribution maps [n, H, W] for the request's images and targets.

        The request's options are checked and completed first (``check_options`` returns checked
        values unchanged), so a request built with only some options, or none, works too.
        """
        return self.compute(replace(request, options=self.check_options(request.options)))

    @abstractmethod
    def compute(self, request: AttributionRequest) -> Attribution:
        """Raw attribution maps [n, H, W]; ``request.options`` holds every declared option, validated."""

    def option(self, name: str) -> Option:
        """The declared option ``name``; InvalidInputError naming the ones the method takes if there is none."""
        for option in self.options:
            if option.name == name:
                return option
        raise self._unknown([name])

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Every declared option, the given ones validated (``Option.parse``), the others at their defaults.

        Raises InvalidInputError for option names the method does not take and for values its
        declarations do not allow; checks that need the model or the images come in ``compute``.
        """
        unknown = sorted(set(options) - {option.name for option in self.options})
        if unknown:
            raise self._unknown(unknown)
        return {option.name: option.parse(options[option.name], self.name) if option.name in options
                else option.default for option in self.options}

    def _unknown(self, names: list[str]) -> InvalidInputError:
        names_taken = ", ".join(option.name for option in self.options)
        takes = f"it takes {names_taken}" if self.options else "it takes none"
        return InvalidInputError(f"method {self.name!r} takes no option(s) {', '.join(names)}; {takes}")


def resolve_targets(requested: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Class indices for requested targets (any shape [n, ...]); -k is the k-th most likely class of its image
    (by ``numerics.class_order``: a segmentation output's class maps summed)."""
    requested = np.asarray(requested, dtype=np.int64)
    ranked = class_order(logits)
    flat = requested.reshape(requested.shape[0], -1)
    by_rank = np.take_along_axis(ranked, np.maximum(-flat - 1, 0), axis=1)
    return np.where(flat < 0, by_rank, flat).reshape(requested.shape)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """The last two axes blurred with a Gaussian of std ``sigma`` pixels (edges repeated): "blur" baselines."""
    gaussian_filter = require("scipy.ndimage", "blurred baselines").gaussian_filter

    return gaussian_filter(images, sigma=(0,) * (images.ndim - 2) + (sigma, sigma), mode="nearest").astype(np.float32)


def add_timings(timings: dict[str, float], *parts: Attribution) -> None:
    """Add the per-stage seconds of ``parts`` (attributions of chunks, targets or contrasts) to ``timings``."""
    for part in parts:
        for stage, seconds in part.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds


class timed:  # noqa: N801 (used as a function: ``with timed(timings, "maps"):``)
    """Add the seconds the block takes to ``timings[stage]`` (the per-stage timings of an Attribution). A class,
    not a generator context manager: a third of the cost on every explanation's path."""

    __slots__ = ("timings", "stage", "tick")

    def __init__(self, timings: dict[str, float], stage: str) -> None:
        self.timings, self.stage = timings, stage

    def __enter__(self) -> None:
        self.tick = time.perf_counter()

    def __exit__(self, *exception: object) -> None:
        self.timings[self.stage] = self.timings.get(self.stage, 0.0) + time.perf_counter() - self.tick
