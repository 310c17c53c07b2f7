"""The public API: ``Explainer(model).explain(images, method=...) -> Explanation``.

The pipeline is the same for every CAM method: validate inputs -> one runtime call per batch
(logits, activations, gradients) -> the method's weights -> fused kernel (weight, ReLU,
normalise, resize) per target layer -> average layers -> normalise.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm.auto import tqdm

from explainrt import kernels
from explainrt.engine.files import write_atomic
from explainrt.engine.methods import Attribution, AttributionRequest, Method, get_method
from explainrt.engine.methods.base import check_class_range
from explainrt.engine.overlay import concept_overlay, overlay
from explainrt.engine.preprocessing import Preprocessing
from explainrt.engine.session import OnnxRuntimeSession, Session, TorchSession, onnxruntime_placement
from explainrt.errors import BackendUnavailableError, InvalidInputError, InvalidModelError
from explainrt.export.explainable import METADATA_KEY, ExplainableSpec, load_model, make_explainable, original_model

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "torch", "tensorrt")
BACKEND_OPTIONS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("device_outputs",),
    "torch": (),
    "tensorrt": ("precision", "profile", "cache_dir", "device_outputs"),
}
"""Keyword settings each backend's session takes through ``Explainer(backend_options=...)``."""


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str | None
    probability: float


@dataclass
class Explanation:
    """Maps [N, H, W] (in [0, 1] unless raw maps were asked for), the predictions, and what each stage cost."""

    maps: np.ndarray
    logits: np.ndarray
    targets: np.ndarray  # [N] the class each map explains
    method: str
    timings: dict[str, float] = field(default_factory=dict)
    labels: tuple[str, ...] | None = None
    images: np.ndarray | None = None  # uint8 [N, H, W, 3] when raw images were given
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # method-specific per-image arrays
    normalized: bool = True  # False: raw attributions (overlays scale them first)

    def top_k(self, k: int = 5) -> list[list[Prediction]]:
        """The k most likely classes per image, with softmax probabilities."""
        shifted = np.exp(self.logits - self.logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        order = np.argsort(-self.logits, axis=1)[:, :k]
        return [[Prediction(int(c), self.labels[c] if self.labels else None, float(p[c])) for c in row]
                for row, p in zip(order, probabilities)]

    def overlays(self, alpha: float = 0.5) -> np.ndarray:
        """Heatmaps blended onto the (resized, cropped) input images, uint8 [N, H, W, 3]."""
        if self.images is None:
            raise InvalidInputError("overlays need the raw images: explain files, PIL images or uint8 arrays")
        if "concept_maps" in self.extras:  # DFF: one colour per concept
            return np.stack([concept_overlay(image, concepts, alpha)
                             for image, concepts in zip(self.images, self.extras["concept_maps"])])
        maps = self.maps if self.normalized else kernels.normalize_minmax(self.maps)
        return np.stack([overlay(image, saliency, alpha) for image, saliency in zip(self.images, maps)])


class Explainer:
    """Explains a classifier's predictions with the CAM family, in one runtime call per batch.

    ``model``: a ``torch.nn.Module`` (exported on the fly), an ONNX path, bytes or ModelProto
    (explainable already, or made so), or None for the shipped default (EfficientNet-Lite0).
    ``target_layers``: modules (torch) or tensor names (ONNX); None picks the last spatial layer.
    ``backend``: "onnxruntime" (``providers`` in priority order, validated), "torch" or "tensorrt".
    ``device``: "cpu", "cuda" or "cuda:N" (onnxruntime: picks CUDAExecutionProvider and its device;
    torch: where the module runs; tensorrt: the GPU, default "cuda"). ``backend_options``: the
    backend's own settings (see ``BACKEND_OPTIONS``), e.g. ``{"precision": "fp16"}`` for TensorRT.
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
    ) -> None:
        if backend not in BACKENDS:
            raise InvalidInputError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        backend_options = dict(backend_options or {})
        unknown = sorted(set(backend_options) - set(BACKEND_OPTIONS[backend]))
        if unknown:
            raise InvalidInputError(f"backend_options {unknown} are not options of backend {backend!r} "
                                    f"(it takes {list(BACKEND_OPTIONS[backend])})")
        if backend == "tensorrt":  # fail before an export when TensorRT or the GPU is missing
            from explainrt.engine.tensorrt_session import load_tensorrt

            load_tensorrt()
        module, target_modules = None, None
        if model is None:
            from explainrt.engine.default_model import DEFAULT_PREPROCESSING, default_target_module, load_default_torch_model

            preprocessing = preprocessing or DEFAULT_PREPROCESSING
            if backend == "torch":
                module = load_default_torch_model()
                target_modules = list(target_layers or [default_target_module(module)])
            else:
                model = default_explainable_model()
        if _is_torch_module(model):
            module = model
            target_modules = list(target_layers) if target_layers else None
        if backend == "torch":
            if module is None:
                raise BackendUnavailableError("backend='torch' needs a torch.nn.Module, not an ONNX model")
            self.session: Session = self._torch_session(module, target_modules, preprocessing, input_size,
                                                        device or "cpu")
        elif backend == "tensorrt":
            from explainrt.engine.tensorrt_session import TensorRTSession

            proto = self._explainable(model, target_layers, preprocessing, input_size)
            self.session = TensorRTSession(proto, device or "cuda", **backend_options)
        else:
            providers, device_id = onnxruntime_placement(providers, device)
            proto = self._explainable(model, target_layers, preprocessing, input_size)
            self.session = OnnxRuntimeSession(proto, providers, device_id, **backend_options)
        self.spec = self.session.spec
        self.preprocessing = preprocessing or _stored_preprocessing(self.spec)
        self.backend = backend

    @staticmethod
    def _explainable(model: Any, target_layers: Sequence[Any] | None, preprocessing: Preprocessing | None,
                     input_size: tuple[int, int] | None) -> onnx.ModelProto:
        stored = preprocessing.to_json() if preprocessing else None
        if _is_torch_module(model):
            from explainrt.export.torch_export import from_torch

            return from_torch(model, _example_input(preprocessing, input_size), target_layers, preprocessing=stored)
        proto = load_model(model)
        explainable = any(p.key == METADATA_KEY for p in proto.metadata_props)
        if explainable and not target_layers:
            return proto
        if explainable:
            proto = original_model(proto)
        return make_explainable(proto, list(target_layers) if target_layers else "auto", preprocessing=stored)

    @staticmethod
    def _torch_session(module: Any, target_modules: list[Any] | None, preprocessing: Preprocessing | None,
                       input_size: tuple[int, int] | None, device: str = "cpu") -> TorchSession:
        """The module with hooks on its target layers (no ONNX export: see ``TorchSession.probed``)."""
        if not target_modules:
            raise InvalidInputError("backend='torch' needs target_layers (modules) to hook")
        return TorchSession.probed(module, target_modules, _example_input(preprocessing, input_size),
                                   preprocessing.to_json() if preprocessing else None, device)

    # -- inputs ------------------------------------------------------------------------------
    def prepare(self, images: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Model input [N, C, H, W] float32 and, for raw images, the uint8 crops they came from."""
        if _is_torch_tensor(images):
            images = images.detach().cpu().numpy()
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            return self._checked_batch(images), None
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
            raise InvalidInputError("the model stores no preprocessing: pass a preprocessed float32 [N, C, H, W] batch")
        batch, crops = self.preprocessing.prepare(raw)
        return self._checked_batch(batch), crops

    def _checked_batch(self, batch: np.ndarray) -> np.ndarray:
        if batch.dtype != np.float32:
            raise InvalidInputError(f"images must be float32, got {batch.dtype}")
        if batch.ndim != 4 or batch.shape[0] == 0:
            raise InvalidInputError(f"images must have shape [N, C, H, W] with N >= 1, got {batch.shape}")
        expected = self.session.input_shape[1:]
        for axis, (got, want) in enumerate(zip(batch.shape[1:], expected), start=1):
            if isinstance(want, int) and want > 0 and got != want:
                raise InvalidInputError(f"images have shape {batch.shape}; the model expects [N, {', '.join(map(str, expected))}] (axis {axis})")
        # one vectorised pass, no mask: NaN/inf propagate into the sum; a float32 overflow of huge
        # but finite pixels is told apart by the exact check that follows only then
        if not np.isfinite(batch.sum()) and not np.isfinite(batch).all():
            bad = int(np.argwhere(~np.isfinite(batch))[0][0])
            raise InvalidInputError(f"images contain NaN or inf values (image {bad})")
        return np.ascontiguousarray(batch)

    def _targets(self, targets: Any, count: int) -> np.ndarray:
        classes = self.spec.num_classes
        if targets is None:
            wanted = np.full(count, -1, dtype=np.int64)
        elif isinstance(targets, (int, np.integer)):
            wanted = np.full(count, int(targets), dtype=np.int64)
        else:
            wanted = np.asarray(targets)
            if wanted.shape != (count,) or wanted.dtype.kind not in "iu":
                raise InvalidInputError(f"targets must be None, one int or {count} ints (one per image), got {targets!r}")
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
        """Maps for ``targets`` (None: the top class; -k: the k-th most likely class).

        ``batch_size`` bounds the images (or perturbed copies) in one runtime call. ``normalize``
        scales each map to [0, 1] for display; False returns the method's raw attributions.
        ``cancel``: set the event from another thread to stop between runtime calls
        (ExplanationCancelled; nothing partial is returned). ``options`` are the method's own.
        """
        chosen = get_method(method)
        chosen.check_options(options)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        batch, crops = self.prepare(images)
        wanted = self._targets(targets, batch.shape[0])
        per_image = self._per_image_options(chosen, options, batch)
        timings["preprocess"] = time.perf_counter() - start
        parts: list[Attribution] = []
        chunks = range(0, batch.shape[0], batch_size)
        show = progress if progress is not None else len(chunks) >= 4
        for first in tqdm(chunks, desc=chosen.name) if show else chunks:  # a hidden bar still costs 0.1 ms
            stop = first + batch_size
            chunk_options = {**options, **{name: values[first:stop] for name, values in per_image.items()}}
            request = AttributionRequest(batch[first:stop], wanted[first:stop], self.session, int(batch_size),
                                         normalize, chunk_options, cancel, bool(progress))
            request.check_cancelled()
            part = chosen.attribute(request)
            for stage, seconds in part.timings.items():
                timings[stage] = timings.get(stage, 0.0) + seconds
            parts.append(part)
        tick = time.perf_counter()
        maps = np.concatenate([p.maps for p in parts])
        if normalize:
            maps = kernels.normalize_minmax(np.maximum(maps, 0) if chosen.signed else maps)
        timings["maps"] = timings.get("maps", 0.0) + time.perf_counter() - tick
        timings["total"] = time.perf_counter() - start
        extras = {key: np.concatenate([p.extras[key] for p in parts]) for key in parts[0].extras}
        labels = self.preprocessing.labels if self.preprocessing else None
        return Explanation(maps, np.concatenate([p.logits for p in parts]), np.concatenate([p.targets for p in parts]),
                           chosen.name, timings, labels, crops, extras, normalize)


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


def _is_torch_module(value: Any) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(value, torch.nn.Module)


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _is_single_image(value: Any) -> bool:
    from PIL import Image

    if isinstance(value, (str, bytes, os.PathLike, Image.Image)):
        return True
    return isinstance(value, np.ndarray) and value.ndim in (2, 3)


def _example_input(preprocessing: Preprocessing | None, input_size: tuple[int, int] | None) -> Any:
    import torch

    height, width = input_size or (preprocessing.input_size if preprocessing else (224, 224))
    return torch.zeros(1, 3, height, width)


def _stored_preprocessing(spec: ExplainableSpec) -> Preprocessing | None:
    return Preprocessing.from_json(spec.preprocessing) if spec.preprocessing else None


def cache_dir() -> Path:
    """Where exported models are cached: $EXPLAINRT_CACHE, else ~/.cache/explainrt."""
    return Path(os.environ.get("EXPLAINRT_CACHE", Path.home() / ".cache" / "explainrt"))


def default_explainable_model() -> onnx.ModelProto:
    """The default model as explainable ONNX: exported on first use, then read from the cache."""
    from explainrt import __version__
    from explainrt.engine.default_model import DEFAULT_PREPROCESSING, default_target_module, load_default_torch_model

    key = hashlib.sha256(f"{__version__}:{DEFAULT_PREPROCESSING.to_json()}".encode()).hexdigest()[:16]
    path = cache_dir() / f"efficientnet_lite0-{key}.onnx"
    if path.is_file():
        try:
            return load_model(path)
        except InvalidModelError:
            log.warning("cached default model %s is corrupt: exporting it again", path)
    from explainrt.export.torch_export import from_torch

    module = load_default_torch_model()
    log.info("exporting the default model to %s (first use)", path)
    proto = from_torch(module, _example_input(DEFAULT_PREPROCESSING, None), [default_target_module(module)],
                       preprocessing=DEFAULT_PREPROCESSING.to_json())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, proto.SerializeToString())
    return proto
