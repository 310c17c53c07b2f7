"""Exact incremental inference: logits of copies of one image that differ from it only inside a box.

Occlusion runs the model once per window position, yet a window changes only the pixels under it
and, layer by layer, the box those pixels reach. Krypton (Nakandala et al., SIGMOD 2019) keeps the
activations of the unchanged image and recomputes only that box. Here the model's spatially local
front (``explainrt.export.locality``) is split at *cuts* (tensors every path passes through, e.g.
ResNet block outputs) into stages; each stage runs, batched over the copies, on a crop of its input
just large enough to compute the changed box of its output exactly; the changed box is pasted into
the cached activations, and after the last chosen cut the rest of the model runs on full maps.

Crops start on multiples of the stage's strides, so a crop computes exactly what the full map
does; a crop side that meets the image border sees the model's own padding. Results equal full
inference up to floating-point reassociation. Which cuts to use is chosen per image size and box
size by minimising estimated multiply-accumulates (plus copying) over all cut sequences.

Any runtime session that can run sub-models (``Session.submodel_runner``; ONNX Runtime) can do
this; ``IncrementalModel.of(session)`` caches the analysis, the plans and the compiled stages.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from explainrt.errors import InvalidInputError, InvalidModelError
from explainrt.export.locality import LocalFront
from explainrt.export.spec import original_model

log = logging.getLogger(__name__)

COPY_MACS = 25.0
"""Estimated cost of copying one activation value, in multiply-accumulates (a CPU runs a
convolution at ~25 GMAC/s and copies ~1 G floats/s)."""

WORTHWHILE = 0.85
"""``incremental="auto"`` uses a plan only if it needs at most this fraction of full inference."""

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Stage:
    """One stage of a plan: the cut ``start`` -> the cut ``end``, run on crops of ``crop`` (h, w).

    Tables are per axis (H, W) and indexed by the box's first row (column) ``p``: the crop's
    origin in ``start`` coordinates and the changed interval [first, last) of ``end``.
    """

    start: str
    end: str
    crop: tuple[int, int]
    stride: tuple[int, int]
    origins: tuple[np.ndarray, np.ndarray]
    changed: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Plan:
    """Stages for boxes of at most ``box`` (h, w) in images of ``image`` (h, w), and the estimated cost."""

    image: tuple[int, int]
    box: tuple[int, int]
    stages: tuple[Stage, ...]
    fraction: float  # estimated cost of one copy relative to full inference

    @property
    def last(self) -> str:
        return self.stages[-1].end


class IncrementalModel:
    """A session's model split for incremental inference; plans and stage runners are cached."""

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, session: object) -> None:
        if not hasattr(session, "submodel_runner"):
            raise InvalidInputError(f"incremental inference needs a backend that runs sub-models (onnxruntime), "
                                    f"not {type(session).__name__}")
        self._session = session
        spec = session.spec  # type: ignore[attr-defined]
        self._outputs = [spec.logits]
        self.front = LocalFront.of(original_model(session.model), spec.image_input)  # type: ignore[attr-defined]
        self._plans: dict[tuple[int, int, int, int], Plan | None] = {}
        self._runners: dict[tuple[str, str | None], Runner] = {}

    @classmethod
    def of(cls, session: object) -> IncrementalModel:
        """The (cached) incremental model of ``session``."""
        if session not in cls._cache:
            cls._cache[session] = cls(session)
        return cls._cache[session]

    def plan(self, image: tuple[int, int], box: tuple[int, int]) -> Plan | None:
        """The cheapest plan for boxes of ``box`` in images of ``image`` (None: nothing to save)."""
        key = (*image, *box)
        if key not in self._plans:
            self._plans[key] = self._best_plan(image, box)
        return self._plans[key]

    def _best_plan(self, image: tuple[int, int], box: tuple[int, int]) -> Plan | None:
        front, cuts = self.front, self.front.cuts
        if len(cuts) < 2 or not front.nodes:
            return None
        if any(b < 1 or b > s for b, s in zip(box, image)):
            raise InvalidInputError(f"box {box} does not fit the image {image}")
        sizes = front.sizes(*image)
        last_local = front.nodes[-1].output
        positions = [np.arange(size - span + 1, dtype=np.int64) for size, span in zip(image, box)]
        reach = [front.changed(axis, positions[axis], positions[axis] + box[axis], sizes, last_local)
                 for axis in (0, 1)]
        full = front.stage_macs(front.image_input, last_local, sizes[front.image_input])
        best: list[tuple[float, tuple[Stage, ...]]] = [(0.0, ())]
        for j in range(1, len(cuts)):
            options = []
            for i in range(j):
                stage = self._stage(cuts[i], cuts[j], sizes, reach)
                if stage is not None:
                    options.append((best[i][0] + self._stage_cost(stage), best[i][1] + (stage,)))
            best.append(min(options, key=lambda option: option[0]) if options else (np.inf, ()))
        totals = [cost + self._suffix_cost(cuts[j], sizes, last_local) for j, (cost, _) in enumerate(best)]
        chosen = int(np.argmin(totals))
        if chosen == 0:
            return None
        plan = Plan(image, box, best[chosen][1], totals[chosen] / full)
        log.info("incremental plan for %s boxes in %s images: %d stages to %s, %.0f%% of full inference",
                 box, image, len(plan.stages), plan.last, 100 * plan.fraction)
        return plan

    def _stage(self, start: str, end: str, sizes: dict[str, tuple[int, int]],
               reach: list[dict[str, tuple[np.ndarray, np.ndarray]]]) -> Stage | None:
        """The stage ``start`` -> ``end`` with one crop size for every box position (None: no crop saves)."""
        steps, stride = self.front.strides(start, end)
        crop, origins = [], []
        for axis in (0, 1):
            first, last = self.front.needed(axis, start, end, reach[axis][end], sizes)
            step, size = steps[axis], sizes[start][axis]
            origin = first // step * step
            span = int((last - origin).max())
            length = size - step * ((size - span) // step)
            if length >= size:
                return None
            crop.append(length)
            origins.append(np.minimum(origin, size - length))
        return Stage(start, end, (crop[0], crop[1]), stride, (origins[0], origins[1]),
                     (reach[0][end], reach[1][end]))

    def _stage_cost(self, stage: Stage) -> float:
        """Estimated cost of one copy: the stage's MACs on its crop, plus assembling the crop and pasting the box."""
        channels = self.front.channels(stage.start) + self.front.channels(stage.end)
        out = [int((stage.changed[axis][1] - stage.changed[axis][0]).max()) for axis in (0, 1)]
        copied = self.front.channels(stage.start) * stage.crop[0] * stage.crop[1] + channels * out[0] * out[1]
        return self.front.stage_macs(stage.start, stage.end, stage.crop) + COPY_MACS * copied

    def _suffix_cost(self, start: str, sizes: dict[str, tuple[int, int]], last_local: str) -> float:
        """Estimated cost of one copy from the cut ``start`` on at full size (plus copying the full map
        of a cut other than the image)."""
        h, w = sizes[start]
        copied = 0 if start == self.front.image_input else self.front.channels(start) * h * w
        return self.front.stage_macs(start, last_local, (h, w)) + COPY_MACS * copied

    def runner(self, start: str, end: str | None) -> Runner:
        """The compiled stage ``start`` -> ``end`` (``None``: to the logits) on the session's runtime."""
        if (start, end) not in self._runners:
            model = self.front.stage_model(start, end, self._outputs)
            self._runners[(start, end)] = self._session.submodel_runner(model)  # type: ignore[attr-defined]
        return self._runners[(start, end)]


def incremental_forward(session: object, image: np.ndarray, box: tuple[int, int], *,
                        required: bool = False) -> ImageForward | None:
    """Incremental logits for copies of ``image`` [C, H, W] changed in boxes of at most ``box``, or None
    when the session cannot run it or it would save less than ``1 - WORTHWHILE`` of the work;
    ``required=True`` raises instead of returning None, saying why."""
    try:
        model = IncrementalModel.of(session)
        plan = model.plan(image.shape[1:], tuple(box))  # type: ignore[arg-type]
    except (InvalidInputError, InvalidModelError) as error:
        if required:
            raise InvalidInputError(f"incremental inference is not possible here: {error}") from error
        log.info("no incremental inference: %s", error)
        return None
    if plan is None or (plan.fraction > WORTHWHILE and not required):
        if required:
            raise InvalidInputError(f"incremental inference is not possible here: the model has no spatially local "
                                    f"front that a {tuple(box)} box leaves partly unchanged (cuts: {len(model.front.cuts) - 1})")
        return None
    return ImageForward(model, plan, image)


class ImageForward:
    """The cached activations of one image at a plan's cuts, and the incremental logits of its copies."""

    def __init__(self, model: IncrementalModel, plan: Plan, image: np.ndarray) -> None:
        self._model = model
        self.plan = plan
        self._cached: dict[str, np.ndarray] = {}
        current = image[None]
        for stage in plan.stages:
            current = model.runner(stage.start, stage.end)(current)
            self._cached[stage.end] = current

    def __call__(self, copies: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """Logits of ``copies`` [b, C, H, W], which equal the image where ``masks`` ([b, (C,) H, W]) is 1."""
        return self.logits(copies, changed_boxes(masks))

    def logits(self, copies: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Logits of ``copies`` [b, C, H, W] equal to the image outside ``boxes`` [b, 4] (y0, y1, x0, x1)."""
        limit = self.plan.box
        if np.any(boxes[:, 1] - boxes[:, 0] > limit[0]) or np.any(boxes[:, 3] - boxes[:, 2] > limit[1]):
            raise InvalidInputError(f"a changed box is larger than the planned {limit}")
        rows = np.minimum(boxes[:, 0], self.plan.image[0] - limit[0])
        cols = np.minimum(boxes[:, 2], self.plan.image[1] - limit[1])
        previous, previous_origin = copies, np.zeros((copies.shape[0], 2), dtype=np.int64)
        for index, stage in enumerate(self.plan.stages):
            source = copies if index == 0 else self._cached[stage.start]
            origin = np.stack([stage.origins[0][rows], stage.origins[1][cols]], axis=1)
            crops = _crops(source, origin, stage.crop)
            if index > 0:
                _paste(crops, origin, previous, previous_origin, self.plan.stages[index - 1], rows, cols)
            previous = self._model.runner(stage.start, stage.end)(crops)
            previous_origin = origin // np.asarray(stage.stride)
        last = self.plan.stages[-1]
        full = np.repeat(self._cached[last.end], copies.shape[0], axis=0)
        _paste(full, np.zeros_like(previous_origin), previous, previous_origin, last, rows, cols)
        return self._model.runner(last.end, None)(full)


def changed_boxes(masks: np.ndarray) -> np.ndarray:
    """Per mask ([b, H, W] or [b, C, H, W]; 1 keeps the image), the box (y0, y1, x0, x1) of pixels it
    changes in any channel; a mask that changes nothing gets the 1-pixel box at the origin."""
    changed = np.asarray(masks) != 1
    if changed.ndim == 4:
        changed = changed.any(axis=1)
    rows, cols = changed.any(axis=2), changed.any(axis=1)
    boxes = np.stack([rows.argmax(axis=1), rows.shape[1] - rows[:, ::-1].argmax(axis=1),
                      cols.argmax(axis=1), cols.shape[1] - cols[:, ::-1].argmax(axis=1)], axis=1)
    boxes[~rows.any(axis=1)] = (0, 1, 0, 1)
    return boxes.astype(np.int64)


def _crops(source: np.ndarray, origins: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[b, C, h, w] windows of ``source`` ([b or 1, C, H, W]) at ``origins`` [b, 2]."""
    count = origins.shape[0]
    crops = np.empty((count, source.shape[1], *size), dtype=source.dtype)
    for k, (y, x) in enumerate(origins):
        crops[k] = source[k if source.shape[0] > 1 else 0, :, y : y + size[0], x : x + size[1]]
    return crops


def _paste(target: np.ndarray, target_origin: np.ndarray, values: np.ndarray, values_origin: np.ndarray,
           stage: Stage, rows: np.ndarray, cols: np.ndarray) -> None:
    """Write the changed box of ``stage.end`` from ``values`` (a stage's output crops) into ``target``."""
    for k in range(target.shape[0]):
        (y0, y1), (x0, x1) = ((int(stage.changed[0][0][rows[k]]), int(stage.changed[0][1][rows[k]])),
                              (int(stage.changed[1][0][cols[k]]), int(stage.changed[1][1][cols[k]])))
        ty, tx = target_origin[k]
        vy, vx = values_origin[k]
        y0, x0 = max(y0, ty), max(x0, tx)
        y1, x1 = min(y1, ty + target.shape[2]), min(x1, tx + target.shape[3])
        if y0 >= y1 or x0 >= x1:
            continue
        if y0 < vy or x0 < vx or y1 - vy > values.shape[2] or x1 - vx > values.shape[3]:
            raise InvalidModelError(f"incremental plan error: the changed box of {stage.end!r} lies outside its crop")
        target[k, :, y0 - ty : y1 - ty, x0 - tx : x1 - tx] = values[k, :, y0 - vy : y1 - vy, x0 - vx : x1 - vx]
