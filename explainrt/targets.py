"""Explanation targets: what of a model's output an explanation explains, beyond one class's logit.

A target is a differentiable function f of one image's explained output y (the model output
``output=`` names, without the batch axis). Every method uses it through two calls:

- ``gradient(y)``: df/dy at y, the cotangent fed to the explainable graph's ``weights`` objective
  (``explainrt.export.spec``), so any such target costs one runtime call per batch. For a linear
  target it is the constant weighting w of f(y) = sum(w * y); Box decides which predictions count
  on the forward pass (``needs_values``) and is linear in the scores from there;
- ``score(ys)``: f of each of a batch of outputs (perturbation methods score every copy with it).

``Class(k)`` (ints, ``-k`` the k-th most likely) stays the fast path of the class-index input;
``Softmax`` is differentiated by the graph's ``probability`` seed. Bad targets raise
``InvalidTargetError`` before anything runs (``check``) or when the forward pass shows it (Box).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from explainrt.errors import InvalidTargetError
from explainrt.numerics import class_order, softmax

Shape = tuple[int | None, ...]

LAYOUTS = ("yolov8", "yolov5")
"""Raw detector heads: ``yolov8`` [4 + classes, anchors] (cx, cy, w, h; sigmoid class scores; also
YOLOv11), ``yolov5`` [anchors, 5 + classes] (cx, cy, w, h, objectness, class scores; also YOLOv7)."""


class Target(ABC):
    """One objective of one image's explained output (see the module docstring)."""

    needs_values: bool = False  # gradient() reads the output's values, not only its shape
    linear: bool = True  # False: differentiated in the graph (Softmax), gradient() unused

    @property
    def class_index(self) -> int:
        """The class the target is about, as ``Explanation.targets`` reports it (-1: none)."""
        return -1

    def check(self, shape: Shape, image_size: tuple[int, int]) -> None:
        """Raise InvalidTargetError if an output of ``shape`` (no batch axis; None where unknown before
        a run) of images of ``image_size`` (H, W) cannot take this target."""

    def bound(self, shape: Shape, image_size: tuple[int, int]) -> Target:
        """This target checked (``check``) for an output of ``shape`` and images of ``image_size``, with what
        it leaves to them decided (a Box's layout): what the runtime then evaluates."""
        self.check(shape, image_size)
        return self

    @abstractmethod
    def gradient(self, output: np.ndarray) -> np.ndarray:
        """df/dy at one image's output ``output`` (same shape; read-only: a new array is returned)."""

    @property
    def ranked(self) -> bool:
        """Whether a class is given by rank (-k: the image's k-th most likely class), to be fixed per image
        (``with_classes``) before perturbed copies are scored."""
        return False

    def with_classes(self, order: np.ndarray) -> Target:
        """This target with each class -k replaced by ``order[k - 1]``, one image's classes from the most likely
        (the image's, so that its perturbed copies are scored for those classes, not for their own top ones)."""
        return self

    def outline(self, size: tuple[int, int]) -> np.ndarray | None:
        """Pixels [H, W] (bool) that outline what the target covers on an image of ``size``, for
        overlays; None when it covers no image area (a class, a concept vector)."""
        return None

    def unmatched(self, output: np.ndarray) -> Box | None:
        """The Box of this target that no prediction of one image's ``output`` overlaps, else None."""
        return None

    def score(self, outputs: np.ndarray) -> np.ndarray:
        """f of each output [b, ...] -> [b] (linear targets: sum(gradient * y))."""
        return np.array([float((self.gradient(y).astype(np.float64) * y).sum()) for y in outputs], dtype=np.float32)


def _class_in(index: int, classes: int | None, what: str) -> None:
    if classes is not None and not -classes <= index < classes:
        raise InvalidTargetError(f"{what} {index} is out of range for an output of {classes} classes "
                                 f"(use 0..{classes - 1}, or -k for the k-th most likely)")


def _numbers(value: Any, what: str, dtype: type = np.float32) -> np.ndarray:
    """``value`` as an array of numbers; InvalidTargetError for text, ragged sequences and non-numbers."""
    if isinstance(value, (str, bytes)):
        raise InvalidTargetError(f"{what} must be numbers (an array), got the text {value!r}")
    try:
        return np.asarray(value, dtype=dtype)
    except (ValueError, TypeError) as error:
        raise InvalidTargetError(f"{what} must be an array of numbers of one shape, got {value!r:.80}: {error}") from None


def _checked_index(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidTargetError(f"{name} must be an int, got {value!r}")
    return int(value)


def _ranked(output: np.ndarray, index: int) -> int:
    """``index`` itself, or for -k the k-th largest class of one image's output by ``numerics.class_order``."""
    return index if index >= 0 else _by_rank(index, class_order(output[None])[0])


def _by_rank(index: int, order: np.ndarray) -> int:
    """``index`` itself, or for -k the k-th class of ``order`` (an image's classes from the most likely)."""
    return index if index >= 0 else int(order[-index - 1])


def _needs_classes(shape: Shape, what: str, rank: int | None = None) -> None:
    if len(shape) < 1 or (rank is not None and len(shape) != rank):
        wanted = "[N, classes]" if rank == 1 else "[N, classes, ...]" if rank is None else f"rank {rank + 1}"
        raise InvalidTargetError(f"{what} needs an output {wanted}; the explained output is [N, "
                                 f"{', '.join(map(str, shape))}]")


class Class(Target):
    """The class's score: its logit on [N, classes], its scores summed over the other axes on [N, classes, ...]."""

    def __init__(self, index: int) -> None:
        self.index = _checked_index(index, "Class index")
        self.needs_values = self.index < 0

    def __repr__(self) -> str:
        return f"Class({self.index})"

    @property
    def class_index(self) -> int:
        return self.index

    @property
    def ranked(self) -> bool:
        return self.index < 0

    def with_classes(self, order: np.ndarray) -> Target:
        return Class(_by_rank(self.index, order)) if self.ranked else self

    def check(self, shape: Shape, image_size: tuple[int, int]) -> None:
        _needs_classes(shape, "Class")
        _class_in(self.index, shape[0], "class")

    def gradient(self, output: np.ndarray) -> np.ndarray:
        weights = np.zeros_like(output)
        weights[_ranked(output, self.index)] = 1
        return weights


class Softmax(Target):
    """The class's probability softmax(y)_index on an output [N, classes] (nonlinear: seeded in the graph)."""

    linear = False

    def __init__(self, index: int) -> None:
        self.index = _checked_index(index, "Softmax index")

    def __repr__(self) -> str:
        return f"Softmax({self.index})"

    @property
    def class_index(self) -> int:
        return self.index

    @property
    def ranked(self) -> bool:
        return self.index < 0

    def with_classes(self, order: np.ndarray) -> Target:
        return Softmax(_by_rank(self.index, order)) if self.ranked else self

    def check(self, shape: Shape, image_size: tuple[int, int]) -> None:
        _needs_classes(shape, "Softmax", rank=1)
        _class_in(self.index, shape[0], "class")

    def gradient(self, output: np.ndarray) -> np.ndarray:
        p = softmax(output)
        t = _ranked(output, self.index)
        hot = np.zeros_like(p)
        hot[t] = 1
        return (p[t] * (hot - p)).astype(output.dtype)

    def score(self, outputs: np.ndarray) -> np.ndarray:
        return np.array([softmax(y)[_ranked(y, self.index)] for y in outputs], dtype=np.float32)


class Difference(Target):
    """Score of class p minus score of class q ("why p rather than q")."""

    def __init__(self, p: int, q: int) -> None:
        self.p, self.q = _checked_index(p, "Difference p"), _checked_index(q, "Difference q")
        self.needs_values = self.p < 0 or self.q < 0

    def __repr__(self) -> str:
        return f"Difference({self.p}, {self.q})"

    @property
    def class_index(self) -> int:
        return self.p

    @property
    def ranked(self) -> bool:
        return self.needs_values

    def with_classes(self, order: np.ndarray) -> Target:
        if not self.ranked:
            return self
        p, q = _by_rank(self.p, order), _by_rank(self.q, order)
        if p == q:
            raise InvalidTargetError(f"Difference({self.p}, {self.q}): p and q are the same class {p}")
        return Difference(p, q)

    def check(self, shape: Shape, image_size: tuple[int, int]) -> None:
        _needs_classes(shape, "Difference")
        _class_in(self.p, shape[0], "class p")
        _class_in(self.q, shape[0], "class q")

    def gradient(self, output: np.ndarray) -> np.ndarray:
        p, q = _ranked(output, self.p), _ranked(output, self.q)
        if p == q:
            raise InvalidTargetError(f"Difference({self.p}, {self.q}): p and q are the same class {p}")
        weights = np.zeros_like(output)
        weights[p], weights[q] = 1, -1
        return weights


class Region(Target):
    """Sum of one class's scores over a pixel mask [H, W] (weights allowed) of an output [N, K, H, W]
    (pytorch-grad-cam's SemanticSegmentationTarget)."""

    def __init__(self, class_index: int, mask: Any) -> None:
        self.index = _checked_index(class_index, "Region class_index")
        if self.index < 0:
            raise InvalidTargetError(f"Region class_index must be a class index >= 0, got {self.index}")
        self.mask = _numbers(mask, "Region mask")
        if self.mask.ndim != 2 or self.mask.size == 0:
            raise InvalidTargetError(f"Region mask must be a 2-D array [H, W], got shape {self.mask.shape}")
        if not np.isfinite(self.mask).all():
            raise InvalidTargetError("Region mask contains NaN or inf")

    def __repr__(self) -> str:
        return f"Region({self.index}, mask {self.mask.shape[0]}x{self.mask.shape[1]})"

    @property
    def class_index(self) -> int:
        return self.index

    def check(self, shape: Shape, image_size: tuple[int, int]) -> None:
        _needs_classes(shape, "Region", rank=3)
        _class_in(self.index, shape[0], "class")
        if any(s is not None and s != m for s, m in zip(shape[1:], self.mask.shape)):
            raise InvalidTargetError(f"Region mask has shape {self.mask.shape}; the output's maps are "
                                     f"{tuple(shape[1:])}")

    def gradient(self, output: np.ndarray) -> np.ndarray:
        self.check(output.shape, (0, 0))
        weights = np.zeros(output.shape, dtype=output.dtype)
        weights[self.index] = self.mask
        return weights

    def score(self, outputs: np.ndarray) -> np.ndarray:
        """The masked sum of the class's map alone: the other classes' zero weights read nothing (a segmenter's
        whole output would be read, in float64, a few times over)."""
        for output in outputs:
            self.check(output.shape, (0, 0))
        mask = self.mask.astype(np.float64)
        return np.array([float((mask * y[self.index]).sum()) for y in outputs], dtype=np.float32)

    def outline(self, size: tuple[int, int]) -> np.ndarray | None:
        """The mask's border (masked pixels with an unmasked 4-neighbour or on the image's edge)."""
        if self.mask.shape != tuple(size):
            return None
        inside = np.pad(self.mask != 0, 1)
        interior = inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
        return (self.mask != 0) & ~interior


def detector_layout(shape: Shape, layout: str | None = None, image_size: tuple[int, int] | None = None) -> str:
    """The layout of a raw detector head of ``shape`` (no batch axis): ``layout`` if given (checked),
    else told from the shape. Given the images' ``image_size``, an axis whose length is the anchor count of
    YOLO's grids at that size (``anchor_counts``) is the anchors axis; when both axes could be (a 64 x 64
    YOLOv8 head is [84, 84]) the layout must be named. Otherwise the anchors axis is the longer one."""
    if layout is not None and layout not in LAYOUTS:
        raise InvalidTargetError(f"Box layout must be one of {LAYOUTS}, got {layout!r}")
    if len(shape) != 2 or not all(isinstance(s, int) for s in shape):
        raise InvalidTargetError(f"Box needs a raw detector output [N, 4 + classes, anchors] (YOLOv8) or "
                                 f"[N, anchors, 5 + classes] (YOLOv5) before NMS; the explained output is "
                                 f"[N, {', '.join(map(str, shape))}]")
    rows, cols = shape
    chosen = layout or _layout_from_shape(rows, cols, image_size)  # type: ignore[arg-type]
    fields = rows if chosen == "yolov8" else cols
    if fields <= (4 if chosen == "yolov8" else 5):
        raise InvalidTargetError(f"an output [N, {rows}, {cols}] is not a {chosen} detector head (too few "
                                 "fields per prediction)")
    return chosen


def anchor_counts(image_size: tuple[int, int]) -> set[int]:
    """How many predictions a YOLO head makes for images of ``image_size`` (H, W): one (YOLOv8/v11) or three
    (YOLOv5/v7) per cell of its grids at strides 8, 16, 32 (and 64: the P6 models)."""
    height, width = image_size
    counts = set()
    for strides in ((8, 16, 32), (8, 16, 32, 64)):
        cells = sum(-(-height // s) * -(-width // s) for s in strides)
        counts.update({cells, 3 * cells})
    return counts


def _layout_from_shape(rows: int, cols: int, image_size: tuple[int, int] | None) -> str:
    """YOLOv8's [4 + classes, anchors] or YOLOv5's [anchors, 5 + classes], from the shape (``detector_layout``)."""
    known = image_size is not None and min(image_size) > 0
    counts = anchor_counts(image_size) if known else set()  # type: ignore[arg-type]
    readings = [name for name, anchors in (("yolov8", cols), ("yolov5", rows)) if anchors in counts]
    if len(readings) == 1:
        return readings[0]
    if rows == cols or readings:
        raise InvalidTargetError(f"an output [N, {rows}, {cols}] reads as YOLOv8's [N, 4 + classes, anchors] and as "
                                 f"YOLOv5's [N, anchors, 5 + classes] alike: name it, Box(..., layout='yolov8') or "
                                 "layout='yolov5'")
    return "yolov8" if rows < cols else "yolov5"


class Box(Target):
    """For a raw detector head before NMS: the sum of class ``class_index``'s score over every prediction
    whose box overlaps ``xyxy`` (input pixels) with IoU >= ``iou``. Which predictions count is decided on
    the forward pass of each image (and of each perturbed copy); YOLOv5's score is objectness x class."""

    needs_values = True

    def __init__(self, xyxy: Sequence[float], class_index: int, iou: float = 0.5, layout: str | None = None) -> None:
        box = _numbers(xyxy, "Box xyxy", np.float64)
        if box.shape != (4,) or not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
            raise InvalidTargetError(f"Box xyxy must be 4 finite numbers x1, y1, x2, y2 with x2 > x1 and y2 > y1, "
                                     f"got {xyxy!r}")
        if isinstance(iou, (bool, np.bool_)) or not isinstance(iou, (int, float, np.integer, np.floating)) or not 0 < iou <= 1:
            raise InvalidTargetError(f"Box iou must be a number in (0, 1], got {iou!r}")
        if layout is not None and layout not in LAYOUTS:
            raise InvalidTargetError(f"Box layout must be one of {LAYOUTS}, got {layout!r}")
        self.box, self.index, self.iou, self.layout = box, _checked_index(class_index, "Box class_index"), float(iou), layout
        if self.index < 0:
            raise InvalidTargetError(f"Box class_index must be a class index >= 0, got {self.index}")

    def __repr__(self) -> str:
        return f"Box({self.box.tolist()}, {self.index}, iou={self.iou})"

    @property
    def class_index(self) -> int:
        return self.index

    def bound(self, shape: Shape, image_size: tuple[int, int]) -> Target:
        layout = self._checked_layout(shape, image_size)
        if layout == self.layout:
            return self
        bound = copy.copy(self)  # its checked fields as they are, no second validation on every call
        bound.layout = layout
        return bound

    def check(self, shape: Shape, image_size: tuple[int, int]) -> None:
        self._checked_layout(shape, image_size)

    def _checked_layout(self, shape: Shape, image_size: tuple[int, int]) -> str:
        """The layout of a head of ``shape`` after checking the box and class against it and the image."""
        layout = detector_layout(shape, self.layout, image_size)
        classes = shape[0] - 4 if layout == "yolov8" else shape[1] - 5  # type: ignore[operator]
        _class_in(self.index, classes, "class")
        height, width = image_size
        x1, y1, x2, y2 = self.box
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise InvalidTargetError(f"Box {self.box.tolist()} is outside the {width}x{height} image "
                                     "(xyxy in input pixels)")
        return layout

    def outline(self, size: tuple[int, int]) -> np.ndarray | None:
        """The box's edges, 2 pixels wide, clipped to the image."""
        height, width = size
        x1, y1, x2, y2 = (round(v) for v in self.box)
        x1, x2 = max(0, min(x1, width - 1)), max(0, min(x2, width - 1))
        y1, y2 = max(0, min(y1, height - 1)), max(0, min(y2, height - 1))
        edges = np.zeros((height, width), dtype=bool)
        edges[y1:y2 + 1, x1:x1 + 2] = edges[y1:y2 + 1, max(x2 - 1, 0):x2 + 1] = True
        edges[y1:y1 + 2, x1:x2 + 1] = edges[max(y2 - 1, 0):y2 + 1, x1:x2 + 1] = True
        return edges

    def _fields(self, output: np.ndarray) -> tuple[str, np.ndarray]:
        """The layout, and the predictions field-major as [fields, anchors] (rows cx, cy, w, h, ...): each field
        one contiguous row for YOLOv8's layout."""
        layout = detector_layout(output.shape, self.layout)
        return layout, (output if layout == "yolov8" else output.T)

    def _overlapping(self, fields: np.ndarray) -> np.ndarray:
        """Which predictions' boxes (``fields`` [fields, anchors]) overlap the box with IoU >= iou: bool [anchors]."""
        cx, cy, w, h = fields[:4].astype(np.float64)
        bx1, by1, bx2, by2 = self.box
        across = np.minimum(cx + w / 2, bx2) - np.maximum(cx - w / 2, bx1)
        down = np.minimum(cy + h / 2, by2) - np.maximum(cy - h / 2, by1)
        inter = np.maximum(across, 0) * np.maximum(down, 0)
        union = np.abs(w * h) + (bx2 - bx1) * (by2 - by1) - inter
        return inter / np.maximum(union, 1e-12) >= self.iou

    def no_overlap(self) -> InvalidTargetError:
        """The error for an image where no prediction overlaps the box enough."""
        return InvalidTargetError(f"no prediction overlaps box {self.box.tolist()} with IoU >= {self.iou}: "
                                  "lower iou or check the box (xyxy in input pixels)")

    def unmatched(self, output: np.ndarray) -> Box | None:
        return None if self._overlapping(self._fields(output)[1]).any() else self

    def gradient(self, output: np.ndarray) -> np.ndarray:
        """The cotangent at ``output``: zero where no prediction overlaps the box (a perturbed copy's objective
        is then 0; ``runtime.objective.TargetSession`` refuses it on the images being explained)."""
        layout, fields = self._fields(output)
        chosen = self._overlapping(fields)
        weights = np.zeros_like(fields)
        if layout == "yolov8":
            weights[4 + self.index, chosen] = 1
            return weights
        # d(objectness * class score) = class score d objectness + objectness d class score
        weights[4, chosen] = fields[5 + self.index, chosen]
        weights[5 + self.index, chosen] = fields[4, chosen]
        return weights.T

    def score(self, outputs: np.ndarray) -> np.ndarray:
        scores = np.empty(outputs.shape[0], dtype=np.float32)
        for i, output in enumerate(outputs):
            layout, fields = self._fields(output)
            chosen = self._overlapping(fields)
            values = fields[4 + self.index, chosen] if layout == "yolov8" else (
                fields[4, chosen] * fields[5 + self.index, chosen])
            scores[i] = float(values.astype(np.float64).sum())
        return scores


class Similarity(Target):
    """Dot product of an embedding output [N, D] with a concept vector [D]."""

    def __init__(self, vector: Any) -> None:
        self.vector = _numbers(vector, "Similarity vector")
        if self.vector.ndim != 1 or self.vector.size == 0 or not np.isfinite(self.vector).all():
            raise InvalidTargetError(f"Similarity vector must be a finite 1-D array [D], got shape {self.vector.shape}")

    def __repr__(self) -> str:
        return f"Similarity(vector of {self.vector.size})"

    def check(self, shape: Shape, image_size: tuple[int, int]) -> None:
        if len(shape) != 1 or shape[0] not in (None, self.vector.size):
            raise InvalidTargetError(f"Similarity with a vector of {self.vector.size} needs an embedding output "
                                     f"[N, {self.vector.size}]; the explained output is [N, {', '.join(map(str, shape))}]")

    def gradient(self, output: np.ndarray) -> np.ndarray:
        self.check(output.shape, (0, 0))
        return self.vector.astype(output.dtype)


class Weights(Target):
    """Any linear objective: sum(weights * y) for one image's output y (``weights`` has y's shape)."""

    def __init__(self, weights: Any) -> None:
        self.weights = _numbers(weights, "Weights")
        if self.weights.ndim == 0 or not np.isfinite(self.weights).all():
            raise InvalidTargetError(f"Weights must be a finite array of the output's shape, got shape "
                                     f"{self.weights.shape}")

    def __repr__(self) -> str:
        return f"Weights(shape {self.weights.shape})"

    def check(self, shape: Shape, image_size: tuple[int, int]) -> None:
        if len(shape) != self.weights.ndim or any(s is not None and s != w for s, w in zip(shape, self.weights.shape)):
            raise InvalidTargetError(f"Weights have shape {self.weights.shape}; the explained output per image is "
                                     f"{tuple(shape)}")

    def gradient(self, output: np.ndarray) -> np.ndarray:
        self.check(output.shape, (0, 0))
        return self.weights.astype(output.dtype)


class Sum(Target):
    """The sum of several targets' objectives (e.g. one Box per detected object)."""

    def __init__(self, parts: Sequence[Target]) -> None:
        self.parts = list(parts)
        if not self.parts or not all(isinstance(part, Target) and part.linear for part in self.parts):
            raise InvalidTargetError(f"Sum takes one or more linear targets (not Softmax), got {parts!r}")
        self.needs_values = any(part.needs_values for part in self.parts)

    def __repr__(self) -> str:
        return f"Sum({self.parts!r})"

    @property
    def class_index(self) -> int:
        return self.parts[0].class_index

    def check(self, shape: Shape, image_size: tuple[int, int]) -> None:
        for part in self.parts:
            part.check(shape, image_size)

    def bound(self, shape: Shape, image_size: tuple[int, int]) -> Target:
        return self._with_parts([part.bound(shape, image_size) for part in self.parts])

    @property
    def ranked(self) -> bool:
        return any(part.ranked for part in self.parts)

    def with_classes(self, order: np.ndarray) -> Target:
        return self._with_parts([part.with_classes(order) for part in self.parts])

    def _with_parts(self, parts: list[Target]) -> Target:
        """This Sum if ``parts`` are its own, else a Sum of ``parts``."""
        return self if all(new is old for new, old in zip(parts, self.parts)) else Sum(parts)

    def outline(self, size: tuple[int, int]) -> np.ndarray | None:
        outlines = [edges for part in self.parts if (edges := part.outline(size)) is not None]
        return np.logical_or.reduce(outlines) if outlines else None

    def unmatched(self, output: np.ndarray) -> Box | None:
        return next((box for part in self.parts if (box := part.unmatched(output)) is not None), None)

    def gradient(self, output: np.ndarray) -> np.ndarray:
        return np.sum([part.gradient(output) for part in self.parts], axis=0).astype(output.dtype)

    def score(self, outputs: np.ndarray) -> np.ndarray:
        return np.sum([part.score(outputs) for part in self.parts], axis=0).astype(np.float32)


def as_targets(value: Any, count: int) -> tuple[list[list[Target]], bool] | None:
    """Target objects for ``count`` images from what ``explain(targets=...)`` takes, as rows [count][K]
    and whether a K axis was given: one Target for all images, a sequence of one per image, or a
    sequence of one equal-length sequence per image (K targets each, class indices allowed among
    them); None when ``value`` holds no Target (class indices, [N] or [N, K])."""
    if isinstance(value, Target):
        return [[value]] * count, False
    if not isinstance(value, (list, tuple)):
        return None
    nested = [isinstance(item, (list, tuple, np.ndarray)) for item in value]
    if any(nested):
        if not all(nested):
            raise InvalidTargetError("give targets either one per image or as one sequence of K targets per image, "
                                     f"not both: got {value!r}")
        if not any(isinstance(item, Target) for row in value for item in row):
            return None
        if len(value) != count:
            raise InvalidTargetError(f"give one sequence of K targets per image ({count}), got {len(value)}")
        lengths = sorted({len(row) for row in value})
        if len(lengths) != 1 or lengths[0] == 0:
            raise InvalidTargetError(f"every image needs the same number K >= 1 of targets (maps are [N, K, H, W]); "
                                     f"got rows of {', '.join(map(str, lengths))}")
        return [[_as_target(item) for item in row] for row in value], True
    if not any(isinstance(item, Target) for item in value):
        return None
    if len(value) != count:
        raise InvalidTargetError(f"give one target for all images or one per image ({count}), got {len(value)}")
    return [[_as_target(item)] for item in value], False


def _as_target(item: Any) -> Target:
    """A Target itself, or a class index as Class."""
    if isinstance(item, Target):
        return item
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        return Class(int(item))
    raise InvalidTargetError(f"a target is a class index or an explainrt.targets object, got {item!r}")


def text_form(target: Target | int) -> str:
    """A target in short text, as reports and file names show it: ``class:281`` (an int: ``class:-2`` for the
    2nd most likely), ``softmax:3``, ``difference:1:2``, ``region:12``, ``box:100,120,300,400:0`` (``:iou`` when
    not 0.5), ``similarity``, ``weights``, ``sum`` (the form ``parse`` reads, less the files)."""
    if not isinstance(target, Target):
        return f"class:{int(target)}"
    if isinstance(target, Box):
        corners = ",".join(f"{value:g}" for value in target.box)
        return f"box:{corners}:{target.index}" + ("" if target.iou == 0.5 else f":{target.iou:g}")
    if isinstance(target, Difference):
        return f"difference:{target.p}:{target.q}"
    kind = type(target).__name__.lower()
    return f"{kind}:{target.index}" if isinstance(target, (Class, Softmax, Region)) else kind


FILE_KINDS = ("region", "similarity", "weights")
"""Target kinds whose text form reads a file (a server takes them as JSON objects instead)."""


def from_json(value: Any) -> Target | int:
    """A target from JSON (the server's ``parameters.targets``): a class index, a text form without files
    (``class:K``, ``softmax:K``, ``difference:P:Q``, ``box:x1,y1,x2,y2:K[:iou]``), or an object
    ``{"kind": "region", "class": K, "mask": [[...]]}``, ``{"kind": "box", "xyxy": [...], "class": K,
    "iou": 0.5, "layout": null}``, ``{"kind": "similarity", "vector": [...]}``, ``{"kind": "weights",
    "weights": [...]}``, ``{"kind": "softmax" | "class", "class": K}``, ``{"kind": "difference", "p": P, "q": Q}``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value.partition(":")[0].strip().lower() in FILE_KINDS:
            raise InvalidTargetError(f"target {value!r} reads a file; give it as a JSON object instead "
                                     '(e.g. {"kind": "region", "class": 12, "mask": [[...]]})')
        return parse(value)
    if not isinstance(value, dict) or not isinstance(value.get("kind"), str):
        raise InvalidTargetError(f"a target is a class index, a text form such as 'box:x1,y1,x2,y2:K', or an "
                                 f'object with a "kind", got {value!r}')
    kind, fields = value["kind"].lower(), {k: v for k, v in value.items() if k != "kind"}
    builders = {
        "class": (("class",), lambda f: Class(f["class"])),
        "softmax": (("class",), lambda f: Softmax(f["class"])),
        "difference": (("p", "q"), lambda f: Difference(f["p"], f["q"])),
        "region": (("class", "mask"), lambda f: Region(f["class"], f["mask"])),
        "box": (("xyxy", "class", "iou", "layout"),
                lambda f: Box(f["xyxy"], f["class"], f.get("iou", 0.5), f.get("layout"))),
        "similarity": (("vector",), lambda f: Similarity(f["vector"])),
        "weights": (("weights",), lambda f: Weights(f["weights"])),
    }
    if kind not in builders:
        raise InvalidTargetError(f"unknown target kind {kind!r}; one of {sorted(builders)}")
    allowed, build = builders[kind]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise InvalidTargetError(f"target kind {kind!r} takes {', '.join(allowed)}; got {', '.join(unknown)}")
    try:
        return build(fields)
    except KeyError as missing:
        raise InvalidTargetError(f"target kind {kind!r} needs {missing}") from None
    except (TypeError, ValueError) as error:
        raise InvalidTargetError(f"bad {kind} target {value!r}: {error}") from error


def parse(text: str) -> Target:
    """A target from its command-line / JSON form: ``class:281``, ``softmax:281``, ``difference:281:282``,
    ``region:MASK.png:12`` (the mask image's grey levels / 255 are the weights), ``box:x1,y1,x2,y2:0``
    (optionally ``:iou``), ``similarity:VECTOR.npy``, ``weights:WEIGHTS.npy``."""
    kind, _, rest = text.partition(":")
    fields = rest.split(":") if rest else []
    kind = kind.strip().lower()
    try:
        if kind == "class" and len(fields) == 1:
            return Class(int(fields[0]))
        if kind == "softmax" and len(fields) == 1:
            return Softmax(int(fields[0]))
        if kind == "difference" and len(fields) == 2:
            return Difference(int(fields[0]), int(fields[1]))
        if kind == "region" and len(fields) == 2:
            return Region(int(fields[1]), _mask_image(fields[0]))
        if kind == "box" and len(fields) in (2, 3):
            box = [float(v) for v in fields[0].split(",")]
            return Box(box, int(fields[1]), float(fields[2]) if len(fields) == 3 else 0.5)
        if kind in ("similarity", "weights") and len(fields) == 1:
            values = np.load(fields[0])
            return Similarity(values) if kind == "similarity" else Weights(values)
    except (ValueError, OSError) as error:
        raise InvalidTargetError(f"cannot read target {text!r}: {error}") from error
    raise InvalidTargetError(f"target {text!r} is not one of class:K, softmax:K, difference:P:Q, region:MASK.png:K, "
                             "box:x1,y1,x2,y2:K[:iou], similarity:VECTOR.npy, weights:WEIGHTS.npy")


def _mask_image(path: str) -> np.ndarray:
    """A mask image's grey levels as weights in [0, 1] [H, W]."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
