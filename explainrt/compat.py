"""pytorch-grad-cam's call form on explainrt's engine: change the import, keep the code.

    from explainrt.compat import ClassifierOutputTarget, GradCAM

    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(281)])  # float32 [N, H, W]

The classes are named, built and called like pytorch-grad-cam's and return the same maps (to
float32 rounding). Differences: the model is exported to ONNX once per input size (H, W) and
explained on ONNX Runtime; targets are pytorch-grad-cam's (or ours of the same name)
``ClassifierOutputTarget``, ``ClassifierOutputSoftmaxTarget``, ``BinaryClassifierOutputTarget``,
``RawScoresOutputTarget``, ``SemanticSegmentationTarget`` and ``FasterRCNNBoxScoreTarget`` (on a raw
detector head, see its docstring), run as ``explainrt.targets``; ``eigen_smooth`` is not supported and says so. ``reshape_transform`` may be
any function that turns a layer's tokens ``[N, T, D]`` into ``[N, D, h, w]`` after dropping
leading (CLS, distillation, register) tokens, or channels-last ``[N, h, w, C]`` into
``[N, C, h, w]`` (pytorch-grad-cam's ViT and Swin recipes): its effect on a probe tensor is
recognised and the same reshape is built into the graph; any other function is refused. It may
also be given declaratively as ``"tokens"`` or ``"nhwc"``.
``aug_smooth=True`` averages the same six flips and scalings as pytorch-grad-cam's default
test-time augmentation. ``ScoreCAM.from_cam(cam)`` reuses another instance's exports.

Two pytorch-grad-cam behaviours are reproduced on purpose, so that maps match: Ablation-CAM's
ablation value falls with each copy's position in its batch (``pytorch_grad_cam_ablation_values``),
and on a CPU model a target layer whose output the model then modifies in place (torchvision's
DenseNet ``features[-1]``, or a conv followed by ``ReLU(inplace=True)``) is weighted with the
modified values but the gradients of the layer's own output (``_ReadAfterForward``).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from explainrt import targets
from explainrt.errors import InvalidInputError
from explainrt.explainer import Explainer
from explainrt.export.layouts import Layout
from explainrt.export.spec import ExplainableSpec
from explainrt.runtime.base import RunResult, Session

__all__ = [
    "AblationCAM",
    "BaseCAM",
    "BinaryClassifierOutputTarget",
    "ClassifierOutputSoftmaxTarget",
    "ClassifierOutputTarget",
    "EigenCAM",
    "EigenGradCAM",
    "FasterRCNNBoxScoreTarget",
    "GradCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "RawScoresOutputTarget",
    "ScoreCAM",
    "SemanticSegmentationTarget",
    "XGradCAM",
    "pytorch_grad_cam_ablation_values",
]

# pytorch-grad-cam's default test-time augmentation (ttach): horizontal flip x multiply, in order.
_AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))
_ABLATION_STEP = np.float32(1e7)  # pytorch_grad_cam.ablation_layer.AblationLayer's ABLATION_VALUE


class ClassifierOutputTarget:
    """The score of one class: ``model_output[..., category]`` (negative counts from the end)."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: Any) -> Any:
        if len(model_output.shape) == 1:
            return model_output[self.category]
        return model_output[:, self.category]

    def __repr__(self) -> str:
        return f"ClassifierOutputTarget({self.category!r})"


class SemanticSegmentationTarget:
    """pytorch-grad-cam's: the sum of ``category``'s scores over ``mask`` [H, W] of an output [N, K, H, W]."""

    def __init__(self, category: int, mask: Any) -> None:
        self.category, self.mask = category, mask


class ClassifierOutputSoftmaxTarget:
    """pytorch-grad-cam's: the softmax probability of ``category``."""

    def __init__(self, category: int) -> None:
        self.category = category


class BinaryClassifierOutputTarget:
    """pytorch-grad-cam's: a one-logit output [N, 1], with the sign flipped unless ``category`` is 1."""

    def __init__(self, category: int) -> None:
        self.category = category


class RawScoresOutputTarget:
    """pytorch-grad-cam's: the sum of every output value."""


class FasterRCNNBoxScoreTarget:
    """pytorch-grad-cam's detection target, on a raw detector head before NMS (``explainrt.targets.Box``):
    per box and label, the scores of the predictions overlapping it with IoU >= ``iou_threshold``, summed.
    (pytorch-grad-cam reads torchvision's post-NMS dicts and adds the best match's IoU to its score;
    a raw head has no matching step, so every overlapping prediction counts and no IoU is added.)"""

    def __init__(self, labels: Sequence[int], bounding_boxes: Any, iou_threshold: float = 0.5) -> None:
        self.labels, self.bounding_boxes, self.iou_threshold = labels, bounding_boxes, iou_threshold


_TARGET_CLASSES = ("ClassifierOutputTarget", "SemanticSegmentationTarget", "ClassifierOutputSoftmaxTarget",
                   "BinaryClassifierOutputTarget", "RawScoresOutputTarget", "FasterRCNNBoxScoreTarget")


def _target_kind(target: Any) -> str | None:
    """The name of a target class of ours or exactly pytorch-grad-cam's (not their subclasses); None otherwise."""
    kind = type(target)
    if kind.__name__ in _TARGET_CLASSES and (kind is globals()[kind.__name__] or
                                             kind.__module__ == "pytorch_grad_cam.utils.model_targets"):
        return kind.__name__
    return None


def _as_target(target: Any, kind: str, index: int, spec: ExplainableSpec) -> int | targets.Target:
    """One compat target as explainrt's: a class index (the fast path) or an ``explainrt.targets`` object."""
    if kind == "RawScoresOutputTarget":
        return targets.Weights(np.ones(spec.output_shape, dtype=np.float32))
    if kind == "FasterRCNNBoxScoreTarget":
        boxes = np.asarray(_numpy(target.bounding_boxes), dtype=np.float64).reshape(-1, 4)
        labels = [int(label) for label in np.asarray(_numpy(target.labels)).reshape(-1)]
        if len(labels) != len(boxes):
            raise InvalidInputError(f"target {index}: {len(labels)} labels for {len(boxes)} bounding boxes")
        if not len(boxes):
            raise InvalidInputError(f"target {index}: FasterRCNNBoxScoreTarget has no bounding boxes")
        return targets.Sum([targets.Box(box, label, float(target.iou_threshold)) for box, label in zip(boxes, labels)])
    try:
        category = operator.index(target.category)
    except TypeError:
        raise InvalidInputError(f"target {index}: category must be an integer, got {target.category!r}") from None
    if kind == "SemanticSegmentationTarget":
        return targets.Region(category, _numpy(target.mask))
    if kind == "ClassifierOutputSoftmaxTarget":
        return targets.Softmax(category)
    if kind == "BinaryClassifierOutputTarget":
        return targets.Weights(np.full(spec.output_shape, 1.0 if category == 1 else -1.0, dtype=np.float32))
    if not -spec.num_classes <= category < spec.num_classes:
        raise InvalidInputError(f"target {index}: category {category} is out of range for {spec.num_classes} classes")
    return category % spec.num_classes


def _numpy(value: Any) -> Any:
    """A torch tensor (pytorch-grad-cam's targets hold them) as a NumPy array; anything else as it is."""
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value


def pytorch_grad_cam_ablation_values(activations: np.ndarray, batch_size: int) -> np.ndarray:
    """The value pytorch-grad-cam's AblationLayer writes into each ablated channel, [N, C].

    When an image's minimum activation is 0 the channel is zeroed. Otherwise ``AblationLayer``
    writes ``torch.min(output) - 1e7`` into copy j of each batch of ``batch_size`` copies, re-reading
    the minimum after every write, so copy j gets min - (j + 1) * 1e7, accumulated in float32.
    """
    n, channels = activations.shape[:2]
    lowest = activations.reshape(n, -1).min(axis=1).astype(np.float32)
    steps = np.empty((n, min(batch_size, channels)), dtype=np.float32)
    value = lowest
    for position in range(steps.shape[1]):
        value = (value - _ABLATION_STEP).astype(np.float32)
        steps[:, position] = value
    values = steps[:, np.arange(channels) % batch_size]
    values[lowest == 0] = 0
    return values


class BaseCAM:
    """Shared by every method: a subclass only names its engine method (and a default batch size).

    ``batch_size``: how many masked inputs (Score-CAM) or ablated copies (Ablation-CAM) run at
    once; it also decides Ablation-CAM's ablation values, as in pytorch-grad-cam.
    ``providers``: ONNX Runtime execution providers in priority order (default CPU).
    """

    method: ClassVar[str]
    batch_size: int = 32

    def __init_subclass__(cls, method: str | None = None, batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if method is not None:
            cls.method = method
        if batch_size is not None:
            cls.batch_size = batch_size

    def __init__(
        self,
        model: Any,
        target_layers: Sequence[Any],
        reshape_transform: Callable[..., Any] | str | None = None,
        *,
        batch_size: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        if not (reshape_transform is None or callable(reshape_transform) or reshape_transform in ("tokens", "nhwc")):
            raise InvalidInputError(f"reshape_transform must be a function, 'tokens' or 'nhwc', got {reshape_transform!r}")
        if isinstance(target_layers, (str, bytes)) or not isinstance(target_layers, Sequence) or not target_layers:
            raise InvalidInputError(f"target_layers must be a non-empty list of layers, got {target_layers!r}")
        self.model = model
        self.target_layers = list(target_layers)
        self.reshape_transform = reshape_transform
        self.providers = list(providers) if providers else None
        if batch_size is not None:
            self.batch_size = batch_size
        self._explainers: dict[tuple[int, int], Explainer] = {}

    @classmethod
    def from_cam(cls, other: BaseCAM, *, batch_size: int | None = None) -> BaseCAM:
        """This method on ``other``'s model and target layers, sharing its exported models."""
        cam = cls(other.model, other.target_layers, other.reshape_transform, batch_size=batch_size,
                  providers=other.providers)
        cam._explainers = other._explainers
        return cam

    def __enter__(self) -> BaseCAM:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._explainers = {}  # drops this instance's sessions; instances made by from_cam keep theirs

    def explainer(self, height: int, width: int) -> Explainer:
        """The engine for inputs of size (height, width): exported on first use, then reused."""
        key = (int(height), int(width))
        if key not in self._explainers:
            layouts = _transform_layouts(self.model, self.target_layers, self.reshape_transform, key)
            explainer = Explainer(self.model, self.target_layers, providers=self.providers, input_size=key, **layouts)
            if _is_cpu_torch_module(self.model):
                _, modified = _outputs_after_forward(self.model, self.target_layers, np.zeros((1, 3, *key), np.float32))
                if any(modified):
                    explainer.session = _ReadAfterForward(explainer.session, self.model, self.target_layers, modified)
            self._explainers[key] = explainer
        return self._explainers[key]

    def __call__(
        self,
        input_tensor: Any,
        targets: Sequence[Any] | None = None,
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> np.ndarray:
        """Saliency maps float32 [N, H, W] in [0, 1] for ``targets`` (one per image; None: top class)."""
        if eigen_smooth:
            raise InvalidInputError("eigen_smooth=True is not supported by explainrt.compat; call with eigen_smooth=False")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        images = _images(input_tensor)
        explainer = self.explainer(*images.shape[2:])
        classes = _targets(targets, images.shape[0], explainer.spec)
        if not aug_smooth:
            return self._maps(explainer, images, classes)
        cams = []
        for flip, factor in _AUGMENTATIONS:
            augmented = images[..., ::-1] if flip else images
            augmented = augmented * np.float32(factor) if factor != 1 else augmented
            cam = self._maps(explainer, np.ascontiguousarray(augmented), classes)
            cams.append(cam[..., ::-1] if flip else cam)
        return np.mean(np.float32(cams), axis=0)

    def _maps(self, explainer: Explainer, images: np.ndarray, classes: Any) -> np.ndarray:
        options: dict[str, Any] = {}
        if self.method == "ablationcam":
            batch = int(self.batch_size)
            options["ablation_values"] = lambda activations: pytorch_grad_cam_ablation_values(activations, batch)
        explanation = explainer.explain(images, method=self.method, targets=classes, batch_size=int(self.batch_size),
                                        progress=False, **options)
        return np.asarray(explanation.maps, dtype=np.float32)


class GradCAM(BaseCAM, method="gradcam"): ...
class GradCAMPlusPlus(BaseCAM, method="gradcam++"): ...
class XGradCAM(BaseCAM, method="xgradcam"): ...
class HiResCAM(BaseCAM, method="hirescam"): ...
class LayerCAM(BaseCAM, method="layercam"): ...
class EigenCAM(BaseCAM, method="eigencam"): ...
class EigenGradCAM(BaseCAM, method="eigengradcam"): ...
class ScoreCAM(BaseCAM, method="scorecam", batch_size=16): ...
class AblationCAM(BaseCAM, method="ablationcam", batch_size=32): ...


class _ReadAfterForward:
    """A session whose activations are the target layers' outputs as pytorch-grad-cam reads them.

    On a CPU model pytorch-grad-cam keeps a reference to each target layer's output (``.cpu()`` of
    a CPU tensor is the tensor itself) and reads it after the forward pass. Where the model later
    modifies that tensor in place (torchvision's DenseNet runs ``F.relu(features, inplace=True)``
    on ``features[-1]``'s output), it weights the modified values, while its gradients are those of
    the layer's own output. ``run`` returns those values for such layers; all else is the session's.
    """

    def __init__(self, session: Session, model: Any, layers: Sequence[Any], modified: Sequence[bool]) -> None:
        self.session = session
        self.spec = session.spec
        self.input_shape = session.input_shape
        self._model = model
        self._layers = [(index, layer) for index, (layer, changed) in enumerate(zip(layers, modified)) if changed]

    def run(self, images: np.ndarray, wanted: np.ndarray, objective: str = "logit") -> RunResult:
        import torch

        from explainrt.runtime.torch import to_maps

        result = self.session.run(images, wanted, objective)
        values, _ = _outputs_after_forward(self._model, [layer for _, layer in self._layers], images)
        activations = list(result.activations)
        for (index, _), value in zip(self._layers, values):
            layout = Layout.from_json(self.spec.layouts[index]) if self.spec.layouts else None
            activations[index] = to_maps(torch.from_numpy(value), layout, 1).numpy()
        return dataclasses.replace(result, activations=activations)

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.session.logits(images)

    def head(self, layer: int, activations: np.ndarray, images: np.ndarray) -> np.ndarray:
        return self.session.head(layer, activations, images)


def _is_cpu_torch_module(model: Any) -> bool:
    try:
        import torch
    except ImportError:
        return False
    if not isinstance(model, torch.nn.Module):
        return False
    return all(p.device.type == "cpu" for p in model.parameters())


def _outputs_after_forward(model: Any, layers: Sequence[Any], images: np.ndarray) -> tuple[list[np.ndarray], list[bool]]:
    """Each layer's output as it reads once the forward pass is over, and whether it was modified in place."""
    import torch

    seen: dict[int, tuple[Any, int]] = {}

    def hook(index: int) -> Callable[..., None]:
        def record(_module: Any, _inputs: Any, output: Any) -> None:
            seen.setdefault(index, (output, output._version))
        return record

    handles = [layer.register_forward_hook(hook(index)) for index, layer in enumerate(layers)]
    modes = {module: module.training for module in model.modules()}
    model.eval()  # as pytorch-grad-cam (and the export) run it
    try:
        with torch.no_grad():
            model(torch.from_numpy(np.ascontiguousarray(images)))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
    values = [np.array(seen[i][0].numpy(), dtype=np.float32) for i in range(len(layers))]
    return values, [seen[i][0]._version != seen[i][1] for i in range(len(layers))]


def _transform_layouts(model: Any, layers: Sequence[Any], transform: Callable[..., Any] | str | None,
                       size: tuple[int, int]) -> dict[str, Any]:
    """The layouts (``Explainer``'s ``layer_layout``, ``token_grid``, ``prefix_tokens``) that do what
    ``transform`` does to each target layer's output, recognised on a probe tensor of its shape."""
    if transform is None:
        return {}
    if isinstance(transform, str):
        return {"layer_layout": transform}
    outputs, _ = _outputs_after_forward(model, layers, np.zeros((1, 3, *size), np.float32))
    found = [_recognised(transform, shape=value.shape, index=index) for index, value in enumerate(outputs)]
    return {"layer_layout": [f.kind for f in found],
            "token_grid": [f.grid if f.kind == "tokens" else None for f in found],
            "prefix_tokens": [f.prefix_tokens if f.kind == "tokens" else None for f in found]}


def _recognised(transform: Callable[..., Any], shape: tuple[int, ...], index: int) -> Layout:
    """The layout whose reshape equals ``transform`` on a probe of ``shape`` (two images, distinct values)."""
    import torch

    from explainrt.runtime.torch import to_maps

    probe = torch.arange(2 * int(np.prod(shape[1:])), dtype=torch.float32).reshape(2, *shape[1:])
    try:
        result = transform(probe.clone())
    except Exception as error:  # the user's function may fail in any way on the probe
        raise InvalidInputError(f"reshape_transform failed on target layer {index}'s output of shape "
                                f"{[2, *shape[1:]]}: {error}") from error
    candidates = []
    if len(shape) == 3 and getattr(result, "ndim", 0) == 4:
        grid = tuple(int(v) for v in result.shape[2:])
        prefix = shape[1] - grid[0] * grid[1]
        if prefix >= 0:
            candidates.append(Layout("tokens", grid, shape[2], prefix))  # type: ignore[arg-type]
    elif len(shape) == 4:
        candidates += [Layout("nhwc", (shape[1], shape[2]), shape[3]), Layout("nchw", (shape[2], shape[3]), shape[1])]
    for layout in candidates:
        expected = to_maps(probe, layout, 1)
        if isinstance(result, torch.Tensor) and result.shape == expected.shape and torch.equal(result, expected):
            return layout
    raise InvalidInputError(f"reshape_transform turns target layer {index}'s output {list(shape)} into "
                            f"{list(getattr(result, 'shape', []))} in a way explainrt cannot build into the graph: "
                            "only dropping leading tokens and reshaping tokens [N, T, D] to [N, D, h, w], or "
                            "channels-last [N, h, w, C] to [N, C, h, w], are recognised")


def _images(input_tensor: Any) -> np.ndarray:
    if type(input_tensor).__module__.startswith("torch") and hasattr(input_tensor, "detach"):
        input_tensor = input_tensor.detach().cpu().numpy()
    if not isinstance(input_tensor, np.ndarray) or input_tensor.ndim != 4:
        shape = getattr(input_tensor, "shape", None)
        raise InvalidInputError(f"input_tensor must be a 4-D tensor [N, C, H, W], got {type(input_tensor).__name__} "
                                f"with shape {shape}")
    return input_tensor


def _targets(given: Sequence[Any] | None, count: int, spec: ExplainableSpec) -> np.ndarray | list[Any] | None:
    """One class index per image (negative categories count from the end, as torch indexing does), or,
    where some target is not a ClassifierOutputTarget, one explainrt target per image."""
    if given is None:
        return None
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
        raise InvalidInputError(f"targets must be None or a list of targets, got {type(given).__name__}")
    if len(given) == 1 and count > 1:  # one target explained in every image (pytorch-grad-cam zips, leaving zeros)
        given = list(given) * count
    if len(given) != count:
        raise InvalidInputError(f"got {len(given)} targets for {count} images: give one target per image, or one "
                                "for all")
    chosen = []
    for index, target in enumerate(given):
        kind = _target_kind(target)
        if kind is None:
            name = f"{type(target).__module__}.{type(target).__qualname__}"
            raise InvalidInputError(f"target {index} is a {name}; explainrt.compat supports {', '.join(_TARGET_CLASSES)} "
                                    "(explainrt.compat's or pytorch-grad-cam's)")
        chosen.append(_as_target(target, kind, index, spec))
    if all(isinstance(item, int) for item in chosen):
        return np.array(chosen, dtype=np.int64)
    return [targets.Class(item) if isinstance(item, int) else item for item in chosen]
