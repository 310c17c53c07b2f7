"""The public API: ``Explainer(model).explain(images, method=...) -> Explanation``.

Load the model once (``explainrt.models.load``) and open its session (``explainrt.runtime``);
per call: prepare the images, check targets and options, run the method chunk by chunk (it
runs the model through the session), normalise the maps, assemble the Explanation.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from explainrt import kernels, models, runtime
from explainrt.errors import InconsistentExplanationError, InvalidInputError, InvalidTargetError
from explainrt.export.heads import checked_maps
from explainrt.export.inputs import InputForm, input_form
from explainrt.methods import Attribution, AttributionRequest, Method, add_timings, get_method
from explainrt.models import LoadedModel
from explainrt.numerics import class_order, class_scores, softmax
from explainrt.overlay import caption, concept_overlay, overlay
from explainrt.preprocessing import Preprocessing
from explainrt.progress import track
from explainrt.runtime.base import Session, to_host
from explainrt.runtime.objective import TargetSession
from explainrt.targets import Class, Target, as_targets
from explainrt.validation import check_class_range

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str | None
    probability: float


@dataclass
class Explanation:
    """Maps [N, H, W] (in [0, 1] unless raw maps were asked for), the predictions, and what each stage cost.

    With K targets per image, ``maps`` is [N, K, H, W] and ``targets`` [N, K]; ``overlays()`` is then
    [N, K, H, W, 3] and ``captions()`` holds N * K lines, image by image."""

    maps: np.ndarray
    logits: np.ndarray
    targets: np.ndarray  # [N] (or [N, K]) the class each map explains
    method: str
    timings: dict[str, float] = field(default_factory=dict)
    labels: tuple[str, ...] | None = None
    images: np.ndarray | None = None  # uint8 [N, H, W, 3] when raw images were given
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # method-specific per-image arrays
    normalized: bool = True  # False: raw attributions (overlays scale them first)
    notes: tuple[str | None, ...] = ()  # per image: why its map deserves a word (all zero), else None
    objective: bool = False  # targets were explainrt.targets objects: logits [N, 1] (or [N, K]) hold the objectives
    outlined: tuple[tuple[Any, ...], ...] = ()  # those objects, per image: what ``outlines`` draws, when asked

    @functools.cached_property
    def outlines(self) -> np.ndarray | None:
        """bool [N, (K,) H, W]: the box or region each target object covers (None where none has one), drawn on
        overlays; drawn on first use, not for every explanation (a full-size mask per target)."""
        size = tuple(self.maps.shape[-2:])
        drawn = [target.outline(size) for row in self.outlined for target in row]
        if not any(edges is not None for edges in drawn):
            return None
        return np.stack([np.zeros(size, bool) if edges is None else edges for edges in drawn]).reshape(self.maps.shape)

    @property
    def class_scores(self) -> np.ndarray:
        """The logits as [N, classes]: an output [N, classes, ...] (a segmentation map) summed over its other
        axes, as class-index targets read it. Not for target objects: their logits are the objectives."""
        if self.objective:
            raise InvalidTargetError("this explanation's logits hold its target objects' objectives, one per image "
                                     "and target, not the model's class scores: Explainer.predict() returns those")
        return class_scores(self.logits)

    def top_k(self, k: int = 5) -> list[list[Prediction]]:
        """The k most likely classes per image (by ``class_scores``), with softmax probabilities."""
        scores = self.class_scores
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        order = np.argsort(-scores, axis=1)[:, :k]
        return [[Prediction(int(c), self.labels[c] if self.labels else None, float(p[c])) for c in row]
                for row, p in zip(order, probabilities)]

    def overlays(self, alpha: float = 0.5, captions: bool = False) -> np.ndarray:
        """Heatmaps blended onto the (resized, cropped) input images, uint8 [N, H, W, 3]; ``captions``
        writes each image's ``captions()`` line along its bottom edge."""
        if self.maps.ndim == 4:
            flat = self._one_map_each().overlays(alpha, captions)
            return flat.reshape(*self.maps.shape[:2], *flat.shape[1:])
        if self.images is None:
            raise InvalidInputError("overlays need the raw images: explain files, PIL images or uint8 arrays")
        if "concept_maps" in self.extras:  # DFF: one colour per concept
            images = [concept_overlay(image, concepts, alpha)
                      for image, concepts in zip(self.images, self.extras["concept_maps"])]
        else:
            maps = self.maps if self.normalized else kernels.normalize_minmax(self.maps)
            images = [overlay(image, saliency, alpha) for image, saliency in zip(self.images, maps)]
        if self.outlines is not None and self.outlines.shape == (len(images), *images[0].shape[:2]):
            for image, edges in zip(images, self.outlines):
                image[edges] = 255  # the target's box or region outline, in white
        if captions:
            images = [caption(image, text) for image, text in zip(images, self.captions())]
        return np.stack(images)

    def captions(self) -> list[str]:
        """Per image, "<class label> <probability> | <method>" (the class index where there are no labels)."""
        if self.maps.ndim == 4:
            return self._one_map_each().captions()
        probabilities = None if self.objective else softmax(self.class_scores)
        texts = []
        for index, target in enumerate(self.targets):
            known = self.labels is not None and 0 <= target < len(self.labels)
            name = self.labels[target] if known else f"class {int(target)}" if target >= 0 else "target"  # type: ignore[index]
            blank = " (all zero)" if index < len(self.notes) and self.notes[index] else ""
            value = f"score {self.logits[index, 0]:.3g}" if probabilities is None else f"{probabilities[index, target]:.0%}"
            texts.append(f"{name} {value} | {self.method}{blank}")
        return texts

    def _one_map_each(self) -> Explanation:
        """This explanation of K targets per image as one of N * K images with one map each (image by image)."""
        n, k = self.maps.shape[:2]
        flat = replace(self, maps=self.maps.reshape(n * k, *self.maps.shape[2:]), targets=self.targets.reshape(-1),
                       images=None if self.images is None else np.repeat(self.images, k, axis=0),
                       extras={key: value.reshape(n * k, *value.shape[2:]) for key, value in self.extras.items()},
                       notes=tuple(note for note in self.notes for _ in range(k)),
                       outlined=tuple((target,) for row in self.outlined for target in row))
        flat.logits = self.logits.reshape(n * k, 1) if self.objective else np.repeat(self.logits, k, axis=0)
        return flat


class Explainer:
    """Explains a model's predictions: one runtime call per batch, any method of ``METHODS``.

    ``model``: anything ``explainrt.models.load`` takes (a ``torch.nn.Module``, an ONNX path, bytes
    or ModelProto, explainable already or not, None for the shipped EfficientNet-Lite0), or a
    ``LoadedModel`` it returned. ``target_layers``: modules (torch) or tensor names (ONNX); None
    picks the model's own, else the last spatial layer. ``backend``: a name of
    ``explainrt.runtime.BACKENDS`` ("onnxruntime" with ``providers`` in priority order, validated;
    "torch"; "tensorrt"). ``device``: "cpu", "cuda" or "cuda:N". ``backend_options``: the
    backend's own settings, e.g. ``{"precision": "fp16"}`` for TensorRT. ``output`` picks the
    logits among several outputs (ONNX output name; dict key, attribute or index of a PyTorch
    model's output). Target layers may be ``[N, C, h, w]``, channels-last ``[N, h, w, C]`` or
    tokens ``[N, T, D]`` (vision transformers): the layout is told from the graph, else set by
    ``layer_layout``; ``token_grid=(h, w)`` and ``prefix_tokens=k`` override the inferred grid.
    ``input_layout`` ("nchw", "nhwc"): the image input's layout where the graph does not tell it;
    fp16, uint8 and channels-last models take images in their own form (see ``prepare``), and a
    static batch runs in chunks of that batch.
    ``map_heads``: closed-form CAM methods (Grad-CAM, Grad-CAM++, ...) compute their normalised maps
    in the graph (``explainrt.export.heads``) on ONNX Runtime and TensorRT; False keeps the Python path.
    The heads of ``map_heads`` (True: ``("gradcam",)``; or method names, heads on) join the model's own
    runtime call when the model lacks them (one call per batch; each costs every call a little, as the
    runtime runs all of a model's nodes); other closed-form methods run their head alone after the model
    (a second, small call).
    """

    def __init__(
        self,
        model: Any = None,
        target_layers: Sequence[Any] | None = None,
        backend: str = "onnxruntime",
        providers: Sequence[str] | None = None,
        preprocessing: Preprocessing | None = None,
        input_size: tuple[int, int] | None = None,
        device: str | None = None,
        backend_options: dict[str, Any] | None = None,
        *,
        output: str | int | None = None,
        layer_layout: str | Sequence[str] | None = None,
        token_grid: tuple[int, int] | Sequence[tuple[int, int]] | None = None,
        prefix_tokens: int | Sequence[int] | None = None,
        input_layout: str | None = None,
        map_heads: bool | Sequence[str] = True,
    ) -> None:
        chosen = runtime.backend(backend, backend_options)  # fails before an export when the backend cannot run
        in_call = _in_call_heads(map_heads)
        if isinstance(model, LoadedModel):
            loaded = model
        else:
            outputs = models.Outputs(output, layer_layout, token_grid, prefix_tokens, input_layout)
            loaded = models.load(model, target_layers, backend=chosen.name, outputs=outputs,
                                 preprocessing=preprocessing, input_size=input_size)
        heads = {"maps": in_call} if chosen.adds_heads and in_call else {}
        self.session: Session = chosen.open(loaded.runnable, providers, device, **(backend_options or {}), **heads)
        self.spec = self.session.spec
        self.input_form = (input_form(loaded.explainable) if loaded.explainable is not None
                           else InputForm("nchw", "float32", tuple(self.session.input_shape)))
        self.preprocessing = loaded.preprocessing
        self.backend = chosen.name
        self.map_heads = bool(map_heads) if isinstance(map_heads, (bool, np.bool_)) else True

    # -- inputs ------------------------------------------------------------------------------
    def prepare(self, images: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Model input [N, C, H, W] float32 and, for raw images, the uint8 crops they came from.

        Float arrays are preprocessed batches in the model's own layout (``[N, H, W, C]`` for a
        channels-last model) of any float precision; for a uint8-input model, uint8 batches in its
        layout and size pass unchanged."""
        if _is_torch_tensor(images):
            images = images.detach().cpu().numpy()
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            return self._checked_batch(images), None
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype != np.uint8:
            return self._checked_batch(images), None  # refused, naming the model's form
        if isinstance(images, np.ndarray) and self._passes_unchanged(images):
            batch = self._checked_batch(images)
            crops = batch.transpose(0, 2, 3, 1).astype(np.uint8) if batch.shape[1] == 3 else None
            return batch, crops
        raw = [images] if _is_single_image(images) else list(images)
        if isinstance(images, np.ndarray) and images.ndim == 4:
            raw = list(images)
        if not raw:
            raise InvalidInputError("no images given")
        preprocessed = [np.asarray(item.detach().cpu() if _is_torch_tensor(item) else item) for item in raw
                        if _is_torch_tensor(item) or (isinstance(item, np.ndarray) and item.dtype.kind == "f")]
        if len(preprocessed) == len(raw):  # a list of preprocessed [C, H, W] images: one batch of one size
            sizes = sorted({item.shape for item in preprocessed})
            if len(sizes) > 1:
                raise InvalidInputError(f"images have mixed sizes {sizes}: give one [N, C, H, W] batch of one size")
            return self._checked_batch(np.stack(preprocessed)), None
        if self.preprocessing is None:
            raise InvalidInputError(f"the model stores no preprocessing: pass a preprocessed batch "
                                    f"{self.input_form.describe()}")
        batch, crops = self.preprocessing.prepare(raw)
        return self._checked_batch(batch, "nchw"), crops

    def _passes_unchanged(self, images: np.ndarray) -> bool:
        """Whether ``images`` is a batch of a uint8-input model's own form (dtype, layout, size)."""
        form = self.input_form
        if not form.is_integer or images.dtype != np.dtype(form.dtype) or images.ndim != 4:
            return False
        return all(not (isinstance(want, int) and want > 0) or got == want for got, want in zip(images.shape[1:], form.dims[1:]))

    def _checked_batch(self, batch: np.ndarray, layout: str | None = None) -> np.ndarray:
        """``batch`` (in ``layout``, default the model's own) as float32 [N, C, H, W], checked against the model's form."""
        form = self.input_form
        layout = layout or form.layout
        if batch.dtype != np.float32 and batch.dtype != np.dtype(form.dtype):
            accepted = sorted({"float32", form.dtype})
            raise InvalidInputError(f"images must be {' or '.join(accepted)}, got {batch.dtype}: the model takes "
                                    f"{form.describe()}")
        if batch.ndim != 4 or batch.shape[0] == 0:
            axes = "[N, H, W, C]" if layout == "nhwc" else "[N, C, H, W]"
            raise InvalidInputError(f"images must have shape {axes} with N >= 1, got {batch.shape}: the model takes "
                                    f"{form.describe()}")
        given = batch.shape
        if layout == "nhwc":
            batch = batch.transpose(0, 3, 1, 2)
        for axis, (got, want) in enumerate(zip(batch.shape[1:], form.nchw[1:])):
            if isinstance(want, int) and want > 0 and got != want:
                raise InvalidInputError(f"images have shape {given}; the model expects {form.describe()} "
                                        f"({'CHW'[axis]} must be {want}, got {got})")
        if batch.dtype != np.float32 or not batch.flags.c_contiguous:
            batch = np.ascontiguousarray(batch, dtype=np.float32)
        # one BLAS pass, no mask: NaN/inf propagate into the sum of squares (a quarter of NumPy's sum's
        # time); a float32 overflow of huge but finite pixels is told apart by the exact check that follows only then
        flat = batch.reshape(-1)
        if not math.isfinite(np.vdot(flat, flat)) and not np.isfinite(batch).all():
            bad = int(np.argwhere(~np.isfinite(batch))[0][0])
            raise InvalidInputError(f"images contain NaN or inf values (image {bad})")
        return batch

    def _targets(self, targets: Any, count: int) -> np.ndarray:
        classes = self.spec.num_classes
        if targets is None:  # the most likely class: in range for any output
            return np.full(count, -1, dtype=np.int64)
        if isinstance(targets, (int, np.integer)):
            wanted = np.full(count, int(targets), dtype=np.int64)
        else:
            try:
                wanted = np.asarray(targets)
            except ValueError:  # ragged rows
                wanted = np.asarray(None)
            if wanted.ndim not in (1, 2) or wanted.shape[0] != count or wanted.size == 0 or wanted.dtype.kind not in "iu":
                raise InvalidInputError(f"targets must be None, one int, {count} ints (one per image) or {count} "
                                        f"equal-length rows of K ints (K per image), got {targets!r}")
            wanted = wanted.astype(np.int64)
        check_class_range(wanted, classes)
        return wanted

    # -- explaining --------------------------------------------------------------------------
    def predict(self, images: Any) -> np.ndarray:
        """Plain logits [N, classes]."""
        batch, _ = self.prepare(images)
        return self.session.logits(batch)

    def explain(self, images: Any, method: str = "gradcam", targets: Any = None, *, batch_size: int = 32,
                normalize: bool = True, progress: bool | None = None, cancel: threading.Event | None = None,
                **options: Any) -> Explanation:
        """Maps for ``targets`` (None: the top class; -k: the k-th most likely class; or
        ``explainrt.targets`` objects, one for all images or one per image: then ``logits`` holds each
        image's objective [N, 1] and ``targets`` the class each target is about, -1 for none).
        K targets per image ([N, K] class indices, or one sequence of K targets per image) give maps
        [N, K, H, W], ``targets`` [N, K] (and for objects ``logits`` [N, K]); methods that take them at
        once (``Method.many_targets``: the CAM family, Saliency) run one runtime call per batch for all K.

        ``batch_size`` bounds the images (or perturbed copies) in one runtime call. ``normalize``
        scales each map to [0, 1] for display; False returns the method's raw attributions.
        ``progress``: False shows nothing; otherwise a bar over the batches when there are several,
        and the method's own over its perturbed batches or steps (``explainrt.progress``: a bar on a
        terminal, log lines otherwise). ``cancel``: set the event from another thread to stop between runtime calls
        (ExplanationCancelled; nothing partial is returned). ``options`` are the method's own.
        """
        chosen = get_method(method)
        options = chosen.check_options(options)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        batch, crops = self.prepare(images)
        session, wanted, objects = self._session_and_targets(targets, batch, int(batch_size))
        if objects is None and not chosen.target_free:
            self._check_class_output()
        if objects is not None and chosen.class_targets_only:
            raise InvalidTargetError(f"method {chosen.name!r} explains classes (its objective is a loss or a ranking "
                                     f"of classes): give class indices as targets, not {objects[0][0]!r}")
        per_image = self._per_image_options(chosen, options, batch)
        timings["preprocess"] = time.perf_counter() - start
        parts: list[Attribution] = []
        chunks = range(0, batch.shape[0], batch_size)
        shown = progress is not False
        for first in track(chunks, chosen.name, unit="batches") if shown and len(chunks) > 1 else chunks:
            stop = first + batch_size
            chunk_options = {**options, **{name: values[first:stop] for name, values in per_image.items()}}
            request = AttributionRequest(batch[first:stop], wanted[first:stop], session, int(batch_size),
                                         normalize, chunk_options, cancel, shown, self.map_heads)
            request.check_cancelled()
            part = _attribute(chosen, request)
            add_timings(timings, part)
            parts.append(part)
        tick = time.perf_counter()
        maps = _joined([p.maps for p in parts])
        expected = (*wanted.shape, *batch.shape[2:])
        if maps.shape != expected:
            raise InconsistentExplanationError(
                f"{chosen.name} returned maps of shape {maps.shape} for {batch.shape[0]} images of size "
                f"{batch.shape[2:]}: expected one map per image and target ({expected})")
        normalized = all(p.normalized for p in parts)
        notes = _blank_notes(chosen, maps, normalized)
        if normalize and not normalized:
            flat = maps.reshape(-1, *maps.shape[-2:])
            maps = kernels.normalize_minmax(np.maximum(flat, 0) if chosen.signed else flat).reshape(maps.shape)
        timings["maps"] = timings.get("maps", 0.0) + time.perf_counter() - tick
        timings["total"] = time.perf_counter() - start
        extras = {key: _joined([p.extras[key] for p in parts]) for key in parts[0].extras}
        labels = self.preprocessing.labels if self.preprocessing else None
        logits, explained = _joined([p.logits for p in parts]), _joined([p.targets for p in parts])
        if objects is not None:  # per image (and target): its objective, and the class the target is about
            logits = np.take_along_axis(logits, wanted.reshape(wanted.shape[0], -1), axis=1)
            explained = np.array([[target.class_index for target in row] for row in objects],
                                 dtype=np.int64).reshape(wanted.shape)
        return Explanation(maps, logits, explained, chosen.name, timings, labels, crops, extras, normalize, notes,
                           objects is not None, tuple(tuple(row) for row in objects or ()))

    def _check_class_output(self) -> None:
        """Class indices mean a class's scores; on an [N, A, B] output (a detector head such as YOLO's
        [N, 4 + K, anchors]) a row summed over anchors is no class score (row 0 is the boxes' x centres)."""
        shape = self.spec.output_shape
        if len(shape) == 2:
            dims = ", ".join("?" if d is None else str(d) for d in shape)
            raise InvalidTargetError(f"the explained output is [N, {dims}] (a detector head?): a class index would be "
                                     "a row of it summed over its last axis, not a class score; give explainrt.targets "
                                     "objects (Box(xyxy, class) for a detector head, Weights for any linear objective)")

    def _session_and_targets(self, targets: Any, batch: np.ndarray,
                             batch_size: int) -> tuple[Session, np.ndarray, list[list[Target]] | None]:
        """The session the methods run, the int targets they see ([N], or [N, K] for K targets per image),
        and the target objects as rows [N][K] (None: class indices).

        Target objects other than ``Class`` are checked against the explained output (``Target.bound``: a Box's
        layout decided) and become the "classes" of a ``TargetSession`` (each target's int is its object's column).
        Classes given by rank (``Difference(-1, -2)``) are fixed per image first (``Target.with_classes``, runtime
        calls of at most ``batch_size`` images), so every perturbed copy is scored for the image's classes."""
        given = as_targets(targets, batch.shape[0])
        if given is not None and all(type(target) is Class for row in given[0] for target in row):
            indices = [[target.class_index for target in row] for row in given[0]]  # the class-index fast path
            targets, given = (indices if given[1] else [row[0] for row in indices]), None
        if given is None:
            return self.session, self._targets(targets, batch.shape[0]), None
        rows, many = given
        shape = self.spec.output_shape
        if not shape or None in shape:  # not stored (older models) or known only at run time
            shape = tuple(np.shape(self.session.logits(batch[:1]))[1:])
        if any(target.ranked for row in rows for target in row):
            for target in {id(target): target for row in rows for target in row}.values():
                target.check(shape, tuple(batch.shape[2:]))  # a rank -k within the classes before it is looked up
            rows = self._with_classes(rows, batch, batch_size)
        unique = list({id(target): target for row in rows for target in row}.values())
        bound = {id(target): target.bound(shape, tuple(batch.shape[2:])) for target in unique}
        column = {key: index for index, key in enumerate(bound)}
        wanted = np.array([[column[id(target)] for target in row] for row in rows], np.int64)
        rows = [[bound[id(target)] for target in row] for row in rows]
        return TargetSession(self.session, list(bound.values()), batch, wanted), wanted if many else wanted[:, 0], rows

    def _with_classes(self, rows: list[list[Target]], batch: np.ndarray, batch_size: int) -> list[list[Target]]:
        """``rows`` with each image's classes given by rank fixed (``Target.with_classes``), from the explained
        output's class scores (``numerics.class_order``); a target that ranks the same classes on several images
        stays one object (one column of the ``TargetSession``)."""
        orders = class_order(np.concatenate([to_host(self.session.logits(batch[start:start + batch_size]))
                                             for start in range(0, batch.shape[0], batch_size)]))
        fixed: dict[tuple[int, str], Target] = {}  # (the given target, the classes it got): repr is exact for
        # the ranked kinds (Class, Softmax, Difference) and a Sum keeps its other parts' objects
        result = []
        for row, order in zip(rows, orders):
            bound = [target.with_classes(order) for target in row]
            result.append([fixed.setdefault((id(given), repr(new)), new) for given, new in zip(row, bound)])
        return result

    def explain_contrasts(self, images: Any, k: int = 3, **kwargs: Any) -> Explanation:
        """Contrast-CAM of each image's prediction against each of the next ``k`` most likely classes,
        in one runtime call per batch: ``extras["contrast_maps"]`` [N, k, H, W] and
        ``extras["contrast_classes"]`` [N, k]; ``maps`` is the contrast with the runner-up."""
        return self.explain(images, method="contrast-cam", top_k=k, **kwargs)

    def _per_image_options(self, method: Method, options: dict[str, Any], batch: np.ndarray) -> dict[str, np.ndarray]:
        """Options given per image ([N, ...] arrays the pipeline slices per chunk), images preprocessed.

        A per-image option's one value for all images (kept whole) is a scalar, a string, dict or
        callable, or a map of the images' size [H, W] (e.g. LIME's ``segments``); anything else
        must hold one value per image along its first axis.
        """
        count = batch.shape[0]
        sliced: dict[str, np.ndarray] = {}
        for name in method.image_options:
            if options.get(name) is None:
                continue
            try:
                prepared, _ = self.prepare(options[name])
            except InvalidInputError as error:
                raise InvalidInputError(f"{name}: {error}") from error
            if prepared.shape[1:] != batch.shape[1:] or prepared.shape[0] not in (1, count):
                raise InvalidInputError(f"{name} must be one image or one per image ({count}) of the same size as the "
                                        f"images: got {prepared.shape[0]} of shape {prepared.shape[1:]} for images "
                                        f"{batch.shape[1:]}")
            sliced[name] = np.broadcast_to(prepared, batch.shape)
        for name in method.per_image_options:
            value = options.get(name)
            if value is None or np.ndim(value) == 0 or np.shape(value) == batch.shape[2:]:
                continue
            values = np.asarray(value)
            if values.shape[0] != count:
                raise InvalidInputError(f"{name} must be one value or one per image ({count} images), got "
                                        f"{values.shape[0]} (shape {values.shape}; one map for all images has the "
                                        f"images' size {batch.shape[2:]})")
            sliced[name] = values
        return sliced


DEFAULT_MAP_HEADS = ("gradcam",)
"""The heads ``Explainer(map_heads=True)`` puts into the model's own runtime call: the default method's."""


def _in_call_heads(map_heads: bool | Sequence[str]) -> tuple[str, ...]:
    """The methods whose heads go into the model's call (checked names; none for ``map_heads=False``)."""
    if isinstance(map_heads, (bool, np.bool_)):
        return DEFAULT_MAP_HEADS if map_heads else ()
    if not isinstance(map_heads, (str, Sequence)):
        raise InvalidInputError(f"map_heads must be True, False or method names (a sequence or a comma-separated "
                                f"string), got {map_heads!r}")
    return checked_maps(map_heads)


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _is_single_image(value: Any) -> bool:
    from PIL import Image

    if isinstance(value, (str, bytes, os.PathLike, Image.Image)):
        return True
    return isinstance(value, np.ndarray) and value.ndim in (2, 3)


def _attribute(method: Method, request: AttributionRequest) -> Attribution:
    """``method``'s attribution of a chunk; for K targets per image (``request.targets`` [n, K]), maps
    [n, K, H, W] and targets [n, K]: one call with all K where the method takes them at once
    (``Method.many_targets``), else one call per target column, stacked."""
    if request.targets.ndim == 1 or method.many_targets:  # options checked by explain: compute, not attribute
        return method.compute(request)
    columns = [method.compute(replace(request, targets=request.targets[:, k])) for k in range(request.targets.shape[1])]
    timings: dict[str, float] = {}
    add_timings(timings, *columns)
    extras = {key: np.stack([column.extras[key] for column in columns], axis=1) for key in columns[0].extras}
    return Attribution(np.stack([column.maps for column in columns], axis=1), columns[0].logits,
                       np.stack([column.targets for column in columns], axis=1), timings, extras,
                       all(column.normalized for column in columns))


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    """The chunks' arrays joined along axis 0; one chunk's array as it is (no copy of a batch's maps)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _blank_notes(method: Method, maps: np.ndarray, normalized: bool = False) -> tuple[str | None, ...]:
    """Per image, a note when its raw map (with K targets: any of its maps) is all zero (nothing to show:
    a blank overlay), with the method's reason. ``normalized``: the maps are in [0, 1] (a map head's), so a
    max of 0 is a map of zeros."""
    # one contiguous max per map (faster than reading a sample of it first, which a blank map must follow by the
    # whole read); its min only where that max is 0 and a value may be negative (no copy of the maps: a detector's
    # map is 1.6 MB). Python lists past the max: a few values, and each NumPy call costs tens of microseconds with
    # the caches cold
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1])
    tops = flat.max(axis=-1).tolist()
    blank = [top <= 0 if method.signed or normalized else top == 0 and flat[index].min() == 0
             for index, top in enumerate(tops)]
    reason = f": {method.blank_reason}" if method.blank_reason else ""
    if maps.ndim == 3:
        return tuple(f"the {method.name} map is all zero{reason}" if flag else None for flag in blank)
    per_image = maps.shape[1]
    rows = [blank[first:first + per_image] for first in range(0, len(blank), per_image)]
    return tuple(f"the {method.name} map of target(s) {', '.join(str(k) for k, flag in enumerate(row) if flag)} is all "
                 f"zero{reason}" if any(row) else None for row in rows)
