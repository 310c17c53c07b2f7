"""Target objects (``explainrt.targets``) behind the Session contract, so every method honours them.

``TargetSession`` wraps a session and a list of targets; to the methods its "classes" are those
targets: "class" t is the objective of ``targets[t]``. ``run`` / ``input_gradients`` feed the
targets' cotangents to the explainable graph's ``weights`` objective (one runtime call per batch),
Box targets (all targets of a call Boxes) to its box objective, which decides which predictions
count on the same pass (one call too), Boxes mixed with other linear targets or summed (``Sum``) to its
weighted box objective (weights and boxes in the same call; a forward pass first only where another
target reads the output's values, as a rank ``Class(-k)`` not yet bound to an image's classes does), or, for Softmax targets,
the graph's ``probability`` seed; ``maps`` runs a CAM method's map head on the same objectives (where the
inner session has map heads), one call per objective kind; ``logits`` and ``head`` return every target's objective of each
(perturbed) input [b, T], so perturbation methods score each copy with the same objective.

A Box that no prediction overlaps is an error on the images being explained; on a perturbed, noisy or
interpolated copy of them it is an objective of 0 (its cotangent zero), as in pytorch-grad-cam's
FasterRCNNBoxScoreTarget, so RISE, occlusion, IG and SmoothGrad run with boxes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from explainrt.errors import InvalidTargetError
from explainrt.export.heads import closed_form
from explainrt.runtime.base import MapsResult, RunResult, Session, to_host
from explainrt.targets import Box, Sum, Target, detector_layout

Result = TypeVar("Result", RunResult, MapsResult)
"""What a call returns: gradients (``run``) or a map head's maps (``maps``); both have logits and targets."""


class TargetSession:
    """``inner`` with the objectives of ``targets`` as its classes (see the module docstring)."""

    def __init__(self, inner: Session, targets: Sequence[Target], images: Any = None, wanted: Any = None) -> None:
        """``images``: the images being explained, and ``wanted`` the targets (ids, [N] or [N, K]) of each: the
        only ones whose Boxes must match a prediction (None: every image and target, as if each were explained)."""
        self.inner = inner
        self.targets = list(targets)
        self._columns = {id(target): column for column, target in enumerate(self.targets)}
        self._explained: list[tuple[np.ndarray, set[int]]] = [] if images is None else [
            (image, set(np.atleast_1d(ids).tolist())) for image, ids in zip(to_host(images), np.asarray(wanted))]
        self.spec = dataclasses.replace(inner.spec, num_classes=len(self.targets))
        self.input_shape = inner.input_shape

    @functools.cached_property
    def _by_sample(self) -> dict[tuple[Any, ...], list[int]]:
        """The explained images by ``_sample_key``: made when a call first checks which image a batch's image is
        (a Box that matched nothing), not on every explanation."""
        found: dict[tuple[Any, ...], list[int]] = {}
        for index, (image, _) in enumerate(self._explained):
            found.setdefault(_sample_key(image), []).append(index)
        return found

    def restricted(self, columns: Sequence[int]) -> TargetSession:
        """This session with only the targets ``columns`` as its classes (in that order); Boxes are still checked on
        the explained images as their own targets."""
        view = copy.copy(self)
        view.targets = [self.targets[column] for column in columns]
        view.spec = dataclasses.replace(self.spec, num_classes=len(view.targets))
        return view

    def run(self, images: np.ndarray, targets: np.ndarray, objective: str = "logit") -> RunResult:
        return self._differentiate(images, targets, objective, self.inner.run)

    def input_gradients(self, images: np.ndarray, targets: np.ndarray, objective: str = "logit") -> RunResult:
        return self._differentiate(images, targets, objective, self.inner.input_gradients)

    def defended_input_gradients(self, images: np.ndarray, targets: np.ndarray, references: list[np.ndarray] | None = None,
                                 objective: str = "logit") -> tuple[RunResult, list[np.ndarray]]:
        relus: list[list[np.ndarray]] = []

        def call(batch: np.ndarray, fed: np.ndarray, kind: str) -> RunResult:
            result, activations = self.inner.defended_input_gradients(batch, fed, references, kind)
            relus.append(activations)
            return result

        return self._differentiate(images, targets, objective, call), relus[0]

    def maps(self, images: np.ndarray, targets: np.ndarray, method: str) -> MapsResult | None:
        """``method``'s maps of the targets from the inner session's map head for their objective (one call per
        objective kind, as ``run``); None where the inner session has no map heads (the Python path then runs)."""
        if not hasattr(self.inner, "maps"):
            return None
        return self._differentiate(images, targets, closed_form(method).objective,
                                   lambda batch, fed, kind: self.inner.maps(batch, fed, method, kind))  # type: ignore[attr-defined]

    def logits(self, images: np.ndarray) -> np.ndarray:
        outputs = to_host(self.inner.logits(images))
        for index, output in enumerate(outputs):
            self._check_own_boxes(images, index, output, self.targets)
        return self.scores(outputs)

    def head(self, layer: int, activations: np.ndarray, images: np.ndarray) -> np.ndarray:
        return self.scores(to_host(self.inner.head(layer, activations, images)))

    def scores(self, outputs: np.ndarray) -> np.ndarray:
        """Every target's objective of each output [b, ...] -> [b, T] float32."""
        return np.stack([target.score(outputs) for target in self.targets], axis=1).astype(np.float32)

    def _differentiate(self, images: np.ndarray, targets: np.ndarray, objective: str,
                       call: Callable[[np.ndarray, Any, str], Result]) -> Result:
        """``call`` (a RunResult's or a MapsResult's) on the objectives of the targets ``targets`` picks, its
        logits replaced by every target's objective and its targets by the ids."""
        if objective != "logit":
            raise InvalidTargetError(f"this method differentiates the {objective!r} of a class; it takes class "
                                     "indices as targets, not explainrt.targets objects")
        ids = np.asarray(targets, dtype=np.int64)
        if ids.ndim != 2 or (ids < 0).any() or (ids >= len(self.targets)).any():
            raise InvalidTargetError("this method picks classes by rank (-k); it takes class indices as targets, "
                                     "not explainrt.targets objects")
        chosen = [[self.targets[t] for t in row] for row in ids]
        softmax = np.array([all(not target.linear for target in row) for row in chosen])
        if any(any(not target.linear for target in row) != seeded for row, seeded in zip(chosen, softmax)):
            raise InvalidTargetError("Softmax targets cannot be mixed with linear targets for one image")
        if softmax.all() or not softmax.any():
            result = self._call(images, chosen, bool(softmax.all()), call)
        else:  # images of both kinds: one call for each kind, rows put back in order
            parts = [(rows, self._call(images[rows], [chosen[i] for i in rows], kind, call))
                     for kind, rows in ((True, np.flatnonzero(softmax)), (False, np.flatnonzero(~softmax)))]
            result = _merged(parts, images.shape[0])
        return dataclasses.replace(result, logits=self._objectives(result, ids), targets=ids, objectives=None)

    def _objectives(self, result: Result, ids: np.ndarray) -> np.ndarray:
        """Every target's objective [N, T] on the outputs of ``result``: each image's own targets (``ids``) as the graph
        computed them where it did (box objectives: the same predictions the gradient is of), the others, and every
        one where the graph did not, by ``scores``."""
        computed = result.objectives
        if computed is None:
            return self.scores(to_host(result.logits))
        values = np.zeros((ids.shape[0], len(self.targets)), dtype=np.float32)
        known = np.zeros(values.shape, dtype=bool)
        rows = np.arange(ids.shape[0])[:, None]
        values[rows, ids] = to_host(computed)
        known[rows, ids] = True
        if not known.all():
            outputs = to_host(result.logits)
            for column in np.flatnonzero(~known.all(axis=0)):
                missing = ~known[:, column]
                values[missing, column] = self.targets[column].score(outputs[missing])
        return values

    def _call(self, images: np.ndarray, chosen: list[list[Target]], softmax: bool,
              call: Callable[[np.ndarray, Any, str], Result]) -> Result:
        """One runtime call: Softmax targets by the graph's probability seed, the others as cotangents."""
        if softmax:
            return call(images, np.array([[target.index for target in row] for row in chosen], np.int64),  # type: ignore[attr-defined]
                        "probability")
        flat = [target for row in chosen for target in row]
        layout = self._boxes_layout(flat) if all(type(target) is Box for target in flat) else None  # type: ignore[arg-type]
        if layout is not None:  # the overlaps decided in the graph on the same pass: no forward pass first
            boxes = np.array([[[*target.box, target.index, target.iou] for target in row] for row in chosen],  # type: ignore[attr-defined]
                             dtype=np.float32)
            result = call(images, boxes, f"boxes_{layout}")
            for index, (row, matched) in enumerate(zip(chosen, to_host(result.targets))):
                self._check_matched(images, index, [(target, target if count == 0 else None)
                                                    for target, count in zip(row, matched)])
            return result
        split = [[_box_parts(target) for target in row] for row in chosen]
        layout = self._weighted_box_layout(split)
        if layout is not None:
            return self._weighted_box_call(images, chosen, split, layout, call)
        values = any(target.needs_values for row in chosen for target in row)
        outputs = self._outputs(images, values)
        if values:
            for index, (row, output) in enumerate(zip(chosen, outputs)):
                self._check_own_boxes(images, index, output, row)
        weights = np.stack([np.stack([target.gradient(output) for target in row]) for row, output in
                            zip(chosen, outputs)]).astype(outputs.dtype, copy=False)
        return call(images, weights, "weights")

    def _weighted_box_layout(self, split: list[list[tuple[list[Box], list[Target]]]]) -> str | None:
        """The detector layout when the call's targets hold Boxes besides other linear parts that need no
        output values (``_boxes_layout`` of the Boxes); else None."""
        if any(part.needs_values for row in split for _, rest in row for part in rest):
            return None
        return self._boxes_layout([box for row in split for parts, _ in row for box in parts])

    def _boxes_layout(self, boxes: list[Box]) -> str | None:
        """The detector layout of ``boxes`` when there are some, the head's shape is known and they are all of one
        layout (the graph's box objectives then decide the overlaps); else None (weights after a forward pass)."""
        shape = self.inner.spec.output_shape
        if not boxes or not shape or None in shape:
            return None
        layouts = {detector_layout(shape, box.layout) for box in boxes}
        return layouts.pop() if len(layouts) == 1 else None

    def _weighted_box_call(self, images: np.ndarray, chosen: list[list[Target]],
                           split: list[list[tuple[list[Box], list[Target]]]], layout: str,
                           call: Callable[[np.ndarray, Any, str], Result]) -> Result:
        """One call of the weighted box objective: per target its other parts' constant weights, and its boxes
        padded to the most of any target with boxes that match nothing (IoU threshold 2)."""
        zeros = np.zeros(self.inner.spec.output_shape, dtype=np.float32)  # type: ignore[arg-type]
        count = max(len(parts) for row in split for parts, _ in row)
        weights = np.zeros((len(split), len(split[0]), *zeros.shape), dtype=np.float32)
        boxes = np.tile(np.array(PADDING_BOX, np.float32), (len(split), len(split[0]), count, 1))
        for i, row in enumerate(split):
            for k, (parts, rest) in enumerate(row):
                for part in rest:
                    weights[i, k] += part.gradient(zeros)
                for b, box in enumerate(parts):
                    boxes[i, k, b] = [*box.box, box.index, box.iou]
        result = call(images, (weights, boxes), f"weights_boxes_{layout}")
        matches = to_host(result.targets)
        for index, (row, matched) in enumerate(zip(split, matches)):
            self._check_matched(images, index, [(target, box if found == 0 else None)
                                                for target, (parts, _), counts in zip(chosen[index], row, matched)
                                                for box, found in zip(parts, counts)])
        return dataclasses.replace(result, targets=matches.sum(axis=2))

    def _check_matched(self, images: Any, index: int, unmatched: list[tuple[Target, Box | None]]) -> None:
        """Raise the error of a Box that matched nothing (``unmatched``: targets with such a Box, or None) when
        image ``index`` of ``images`` is an image being explained and the target one of its own; on a copy of
        an image, or for another image's target, the Box scores 0."""
        missed = [(self._columns.get(id(target)), box) for target, box in unmatched if box is not None]
        if missed:
            own = self._own_columns(images, index)
            for column, box in missed:
                if column in own:
                    raise box.no_overlap()  # type: ignore[union-attr]

    def _check_own_boxes(self, images: Any, index: int, output: np.ndarray, targets: Sequence[Target]) -> None:
        """Raise the error of a Box of ``targets`` that no prediction of ``output`` overlaps, when image ``index``
        of ``images`` is an image being explained and the target one of its own (a copy's targets are not read)."""
        own = self._own_columns(images, index)
        for target in targets:
            if self._columns.get(id(target)) in own and (box := target.unmatched(output)) is not None:
                raise box.no_overlap()

    def _own_columns(self, images: Any, index: int) -> set[int]:
        """The targets (columns) of the explained image that image ``index`` of ``images`` is (equal values), or
        none for a perturbed, noisy or interpolated copy; every target when no images were given."""
        if not self._explained:
            return set(range(len(self.targets)))
        image = to_host(images[index])
        # a copy differs at some sampled pixels (its key is not found): whole images are compared only after them
        for candidate in self._by_sample.get(_sample_key(image), ()):
            own, columns = self._explained[candidate]
            if np.array_equal(image, own):
                return columns
        return set()

    def _outputs(self, images: np.ndarray, values: bool) -> np.ndarray:
        """What the targets' gradients are taken at: the forward pass's outputs where a target reads
        them (or the output's size is known only at run time), else a read-only zero of the stored shape
        (a broadcast: nothing written for a target that reads the shape alone)."""
        shape = self.inner.spec.output_shape
        if values or not shape or not all(isinstance(d, int) for d in shape):
            return to_host(self.inner.logits(images))
        return np.broadcast_to(np.float32(0), (images.shape[0], *shape))  # read for its shape: no zeros written


def _sample_key(image: np.ndarray) -> tuple[Any, ...]:
    """The shape, dtype and every 61st value of ``image``: equal for equal images, a cheap first test."""
    return image.shape, image.dtype.str, np.ascontiguousarray(image.reshape(-1)[::61]).tobytes()


PADDING_BOX = (0.0, 0.0, 1.0, 1.0, 0.0, 2.0)
"""A box of the weighted box objective that matches no prediction (IoU threshold 2 > any IoU)."""


def _box_parts(target: Target) -> tuple[list[Box], list[Target]]:
    """A linear target as its Box terms and its other terms (a Sum's parts, recursively)."""
    if type(target) is Box:
        return [target], []
    if isinstance(target, Sum):
        boxes: list[Box] = []
        rest: list[Target] = []
        for part in target.parts:
            more, others = _box_parts(part)
            boxes += more
            rest += others
        return boxes, rest
    return [], [target]


def _merged(parts: list[tuple[np.ndarray, Result]], count: int) -> Result:
    """One result (RunResult or MapsResult) of ``count`` images from results for some of them (their rows given):
    each array field, and each array of a list field (per target layer), gathered by row."""
    def gather(pick: Callable[[Result], Any]) -> np.ndarray:
        first = to_host(pick(parts[0][1]))
        merged = np.empty((count, *first.shape[1:]), dtype=first.dtype)
        for rows, result in parts:
            merged[rows] = to_host(pick(result))
        return merged

    values: dict[str, Any] = {}
    for field in dataclasses.fields(parts[0][1]):  # type: ignore[arg-type]
        value = getattr(parts[0][1], field.name)
        if any(getattr(result, field.name) is None for _, result in parts):  # a field only some results have
            values[field.name] = None
            continue
        values[field.name] = ([gather(lambda r, n=field.name, i=i: getattr(r, n)[i]) for i in range(len(value))]
                              if isinstance(value, list) else gather(lambda r, n=field.name: getattr(r, n)))
    return type(parts[0][1])(**values)


def scoring_only(session: Session, columns: np.ndarray) -> tuple[Session, np.ndarray]:
    """``session`` scoring only the classes ``columns``, and where they are in what it returns: a TargetSession
    scores every target on every copy, while the perturbed copies of one image need that image's targets only."""
    if not isinstance(session, TargetSession):
        return session, columns
    return session.restricted(columns.tolist()), np.arange(columns.size)
