"""The TensorRT backend: engines built from the explainable ONNX model, cached on disk, run on device buffers.

One engine per model variant (the explainable model, its input-gradient and loss variants, the
plain model, the head after a target layer, a method's map head alone), each built on first use with one optimisation
profile: a dynamic batch over every input (and a dynamic count of targets per image on
``explainrt.targets``), the other dimensions fixed by the model. A built engine is stored under
the cache folder, named by a key over everything that makes an engine valid: the model bytes'
SHA-256, the TensorRT version, the GPU's name and compute capability, the precision and the
profile. Engines run through TensorRT 10's name-based API (``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``) on PyTorch CUDA tensors as buffers.

``tensorrt`` and ``torch.cuda`` are imported when a session is created, never at module import,
so this module (its cache keys and argument checks) loads and is tested on machines without them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from explainrt.errors import BackendUnavailableError, InvalidInputError, InvalidModelError
from explainrt.export.heads import checked_maps, closed_form, head_only_model
from explainrt.export.spec import (
    BOXES_INPUT,
    TARGETS_INPUT,
    WEIGHTED_BOX_OBJECTIVES,
    WEIGHTS_INPUT,
    ExplainableSpec,
    gradients_output,
    maps_output,
    original_model,
)
from explainrt.export.variants import head_model, variant_model
from explainrt.files import write_atomic
from explainrt.optional import require
from explainrt.runtime.base import (
    MapsResult,
    RunResult,
    head_feeds,
    in_call_heads,
    input_dims,
    map_head_feeds,
    maps_outputs,
    maps_session_model,
    output_names,
    parse_device,
    run_in_chunks,
    run_result,
    static_batch,
    targets_feed,
)
from explainrt.validation import checked_int

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
INSTALL_HINT = "pip install explainrt[trt] (TensorRT >= 10) on a machine with an NVIDIA GPU, its driver and CUDA"


@dataclass(frozen=True)
class BatchProfile:
    """The dynamic dimensions of one optimisation profile: images per call and targets per image."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    max_targets: int = 4

    def __post_init__(self) -> None:
        for name in ("min_batch", "opt_batch", "max_batch", "max_targets"):
            checked_int(name, getattr(self, name))
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise InvalidInputError(f"the batch profile needs min_batch <= opt_batch <= max_batch, got "
                                    f"{self.min_batch}, {self.opt_batch}, {self.max_batch}")

    def shapes(self, model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape per model input: the batch (and the targets' K: of the targets, the weights, the
        boxes and a map head's gradients; the boxes per target B of [N, K, B, 6] boxes) dynamic, the rest static; a static-batch model's batch fixed at its size on every
        input (it runs in chunks of that batch).

        A dynamic dimension other than those is an error naming it: TensorRT needs its range too.
        """
        shapes = {}
        initializers = {init.name for init in model.graph.initializer}
        inputs = [value.name for value in model.graph.input if value.name not in initializers]
        fixed = next((b for b in (static_batch(input_dims(model, name)) for name in inputs) if b is not None), None)
        batch = (fixed, fixed, fixed) if fixed else (self.min_batch, self.opt_batch, self.max_batch)
        for name in inputs:
            dims = input_dims(model, name)
            ranges = [batch]
            for axis, dim in enumerate(dims[1:], start=1):
                if axis == 1 and (name in (TARGETS_INPUT, WEIGHTS_INPUT, BOXES_INPUT) or _is_gradients_input(name)):
                    ranges.append((1, 1, self.max_targets))
                elif axis == 2 and name == BOXES_INPUT and len(dims) == 4:  # boxes per target [N, K, B, 6]
                    ranges.append((1, 1, self.max_targets))
                elif isinstance(dim, int) and dim > 0:
                    ranges.append((dim, dim, dim))
                else:
                    raise InvalidModelError(f"input {name!r} has a dynamic dimension {axis} ({dim!r}); the "
                                            "TensorRT backend needs every dimension but the batch fixed "
                                            "(export the model with a fixed input size)")
            shapes[name] = tuple(tuple(r[i] for r in ranges) for i in range(3))  # type: ignore[assignment]
        return shapes


def _is_gradients_input(name: str) -> bool:
    """A map head's gradients input ``[N, K, C, h, w]`` (named as the explainable model's output)."""
    prefix = gradients_output(0)[:-1]
    return name.startswith(prefix) and name[len(prefix):].isdigit()


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine is valid for; its digest names the cache file."""

    model_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    precision: str
    profile: BatchProfile

    def digest(self) -> str:
        fields = asdict(self)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def filename(self) -> str:
        major, minor = self.compute_capability
        return f"{self.model_sha256[:16]}-sm{major}{minor}-{self.precision}-{self.digest()[:16]}.engine"


def engine_key(model_bytes: bytes, tensorrt_version: str, gpu_name: str, compute_capability: tuple[int, int],
               precision: str, profile: BatchProfile) -> EngineKey:
    """The cache key of an engine built from ``model_bytes`` (a serialized ONNX model)."""
    return EngineKey(hashlib.sha256(model_bytes).hexdigest(), tensorrt_version, gpu_name,
                     (int(compute_capability[0]), int(compute_capability[1])), checked_precision(precision), profile)


def checked_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def default_engine_dir() -> Path:
    """Engines live under the model cache: $EXPLAINRT_CACHE/tensorrt (default ~/.cache/explainrt/tensorrt)."""
    from explainrt.files import cache_dir

    return cache_dir() / "tensorrt"


def load_tensorrt() -> tuple[Any, Any]:
    """``(tensorrt, torch)`` with a usable CUDA device, or BackendUnavailableError saying what is missing."""
    try:
        import tensorrt
    except ImportError as error:
        raise BackendUnavailableError(f"backend 'tensorrt' needs the tensorrt package: {INSTALL_HINT} ({error})") from error
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < 10:
        raise BackendUnavailableError(f"backend 'tensorrt' needs TensorRT >= 10, found {tensorrt.__version__}: {INSTALL_HINT}")
    torch = require("torch", "backend 'tensorrt' (its device buffers are PyTorch tensors)")
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"backend 'tensorrt' found no CUDA device (torch.cuda.is_available() is False): {INSTALL_HINT}")
    return tensorrt, torch


class _Engine:
    """One built (or cached) engine and an execution context, run on CUDA tensors."""

    def __init__(self, trt: Any, torch: Any, model: onnx.ModelProto, key_fields: dict[str, Any], device: Any,
                 cache: Path) -> None:
        self._trt, self._torch, self.device = trt, torch, device
        self.profile: BatchProfile = key_fields["profile"]
        self.shapes = self.profile.shapes(model)
        data = model.SerializeToString()
        key = engine_key(data, trt.__version__, **key_fields)
        path = cache / key.filename()
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(path.read_bytes()) if path.is_file() else None
        if engine is None:
            serialized = self._build(logger, data, key.precision)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, serialized)
            engine = runtime.deserialize_cuda_engine(serialized)
        if engine is None:
            raise BackendUnavailableError(f"TensorRT could not deserialize the engine it built ({path})")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _build(self, logger: Any, data: bytes, precision: str) -> bytes:
        trt = self._trt
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(data):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise InvalidModelError(f"TensorRT's ONNX parser rejected the model: {errors} "
                                    "(run `explainrt check-trt MODEL.onnx` to see every unsupported node)")
        config = builder.create_builder_config()
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in self.shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        log.info("building a TensorRT engine (%s, batch %d..%d); this takes a while once, then it is cached",
                 precision, self.profile.min_batch, self.profile.max_batch)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendUnavailableError("TensorRT failed to build an engine from the model (see its log above)")
        return bytes(serialized)

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run on inputs (numpy or CUDA arrays, batch <= max_batch); CUDA tensor outputs."""
        torch, trt = self._torch, self._trt
        tensors = {name: _cuda_tensor(torch, feeds[name], self.device) for name in self.inputs}
        for name, tensor in tensors.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        results = {}
        for name in self.outputs:
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            results[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, results[name].data_ptr())
        # torch's current stream: ordered after the input copies and before whatever reads the outputs
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise BackendUnavailableError("TensorRT failed to run the engine (see its log above)")
        return results


def _cuda_tensor(torch: Any, value: Any, device: Any) -> Any:
    """A contiguous CUDA tensor of ``value``: device arrays are shared (DLPack), host arrays copied once."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value)).to(device)
    tensor = value if isinstance(value, torch.Tensor) else torch.from_dlpack(value)
    return tensor.to(device).contiguous()


class TensorRTSession:
    """An explainable ONNX model on TensorRT (the Session protocol), with engines per variant built lazily.

    ``device_outputs=True`` returns the arrays of ``run``/``input_gradients``/``logits``/``head``
    as CuPy arrays on the GPU (shared with TensorRT's output buffers by DLPack, no copy) instead
    of host NumPy arrays.
    """

    def __init__(self, model: onnx.ModelProto, device: str | None = "cuda", precision: str = "fp32",
                 profile: BatchProfile | None = None, cache_dir: str | os.PathLike | None = None,
                 device_outputs: bool = False, maps: Sequence[str] = ()) -> None:
        """``maps``: closed-form CAM methods whose map heads the model's main engine gets when ``model`` lacks
        them (``main_maps``): their maps then come from one engine call that returns only the logits, the
        resolved targets and the maps (``maps_session_model``), not from the model's engine, a copy of the
        activations and gradients to the host and back, and an engine of the head alone."""
        self.spec = ExplainableSpec.from_model(model)
        self.main_maps, self._added_maps = in_call_heads(self.spec, checked_maps(maps))
        """Methods whose float32 maps the main engine returns (the model's own heads and those added)."""
        self.precision = checked_precision(precision)
        self.profile = profile or BatchProfile()
        if not isinstance(self.profile, BatchProfile):
            raise InvalidInputError(f"profile must be a BatchProfile, got {profile!r}")
        kind, index = parse_device(device or "cuda")
        if kind != "cuda":
            raise InvalidInputError(f"backend 'tensorrt' runs on a CUDA device, not {device!r} (use 'cuda' or 'cuda:N')")
        self.profile.shapes(model)  # the model's dimensions are checked before anything is built
        self.input_shape = tuple(input_dims(model, self.spec.image_input))
        self.cache = Path(cache_dir) if cache_dir is not None else default_engine_dir()
        self.device_outputs = bool(device_outputs)
        self._trt, self._torch = load_tensorrt()
        self.device = self._torch.device("cuda", index)
        self._model = model
        self._engines: dict[object, _Engine] = {}
        self._heads: dict[int, bool] = {}

    def _engine(self, key: object, build_model: Any) -> _Engine:
        if key not in self._engines:
            properties = self._torch.cuda.get_device_properties(self.device)
            fields = {"gpu_name": properties.name, "compute_capability": (properties.major, properties.minor),
                      "precision": self.precision, "profile": self.profile}
            self._engines[key] = _Engine(self._trt, self._torch, build_model(), fields, self.device, self.cache)
        return self._engines[key]

    def _call(self, engine: _Engine, feeds: dict[str, Any], outputs: Sequence[str]) -> list[Any]:
        """Run in chunks of the profile's max batch, or of a static-batch model's batch (the last chunk padded,
        as on ONNX Runtime); host or CuPy results in ``outputs`` order."""
        def run_once(chunk: dict[str, Any]) -> list[Any]:
            results = engine(chunk)
            return [results[name] for name in outputs]

        batch = static_batch(self.input_shape)
        merged = run_in_chunks(run_once, feeds, batch or self.profile.max_batch, batch is not None, self._torch.cat)
        if self.device_outputs:
            import cupy

            return [cupy.from_dlpack(t) for t in merged]
        return [t.cpu().numpy() for t in merged]

    def _check_targets(self, targets: np.ndarray) -> None:
        if targets.ndim < 2 or targets.shape[1] > self.profile.max_targets:
            raise InvalidInputError(f"targets must be [N, K] with K <= max_targets={self.profile.max_targets} "
                                    f"(the engine's profile), got shape {targets.shape}")

    def run(self, images: Any, targets: np.ndarray, objective: str = "logit") -> RunResult:
        return self._run_variant(images, targets, objective, of_input=False)

    def input_gradients(self, images: Any, targets: np.ndarray, objective: str = "logit") -> RunResult:
        return self._run_variant(images, targets, objective, of_input=True)

    def _run_variant(self, images: Any, targets: Any, objective: str, of_input: bool) -> RunResult:
        self._check_targets(np.asarray(targets[0] if objective in WEIGHTED_BOX_OBJECTIVES else targets))  # (weights, boxes)
        engine = self._engine(("variant", objective, of_input),
                              lambda: variant_model(self._model, self.spec, objective, of_input))
        values = self._call(engine, {self.spec.image_input: images, **targets_feed(objective, targets)},
                            output_names(self.spec.logits, 1 if of_input else len(self.spec.target_layers), objective))
        return run_result(values, objective, targets)

    def maps(self, images: Any, targets: Any, method: str, objective: str | None = None) -> MapsResult:
        """``method``'s normalised maps [N, K, H, W] from its map head: the model's own when it has one, else
        an engine of the head alone (``head_only_model``: no weights, so no second copy of the model on
        the GPU per method) run on what the model (or its variant for the method's objective, or for the
        target ``objective`` given in its place) returns."""
        own = closed_form(method, objective, target_objective=True).objective
        if objective in (None, own) and method in self.main_maps:
            self._check_targets(np.asarray(targets))
            engine = self._engine("main", lambda: maps_session_model(self._model, self._added_maps, self.main_maps))
            return MapsResult(*self._call(engine, {self.spec.image_input: images,
                                                   TARGETS_INPUT: np.asarray(targets, np.int64)},
                                          maps_outputs(self.spec, method)))
        result = self.run(images, targets, objective or own)
        engine = self._engine(("maps", method), lambda: head_only_model(self._model, method))
        maps = self._call(engine, map_head_feeds(self.spec, images, result), [maps_output(method)])[0]
        return MapsResult(result.logits, result.targets, maps)

    def defended_input_gradients(self, images: Any, targets: np.ndarray, references: list[np.ndarray] | None = None,
                                 objective: str = "logit") -> tuple[RunResult, list[np.ndarray]]:
        raise BackendUnavailableError("FGVis's defended input gradients are not built for the TensorRT backend yet; "
                                      "use backend='onnxruntime' or 'torch' for method 'fgvis' with a defense")

    def logits(self, images: Any) -> Any:
        engine = self._engine("plain", lambda: original_model(self._model))
        return self._call(engine, {self.spec.image_input: images}, [self.spec.logits])[0]

    def head(self, layer: int, activations: Any, images: Any) -> Any:
        """Logits from replaced activations of one target layer, on an engine of the sub-graph after it."""
        if not 0 <= layer < len(self.spec.target_layers):
            raise InvalidInputError(f"layer must be 0..{len(self.spec.target_layers) - 1}, got {layer}")

        def build() -> onnx.ModelProto:
            head, reads_image = head_model(self._model, self.spec, layer)
            self._heads[layer] = reads_image
            return head

        engine = self._engine(("head", layer), build)
        return self._call(engine, head_feeds(self.spec, layer, activations, images, self._heads[layer]), [self.spec.logits])[0]
