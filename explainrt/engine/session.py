"""Sessions: one explainable model on one backend, behind the three calls methods need.

- ``run(images, targets, objective)``: logits, resolved targets, activations and gradients of
  every target layer, in one runtime call;
- ``input_gradients(images, targets, objective)``: the same with the model input as the one
  "layer" (Saliency, Integrated Gradients, SmoothGrad, FGVis);
- ``logits(images)``: a plain forward pass (perturbation methods);
- ``head(layer, activations, images)``: logits with the target layer's activations replaced
  (ablation), re-running only what comes after the layer where the backend allows.

Backends: ``onnxruntime`` (any execution providers, validated up front, never a silent fallback;
with CUDAExecutionProvider first, inputs and outputs are bound on the device by IO binding),
``torch`` (the reference: hooks and autograd on the original module, on the CPU or a CUDA device)
and ``tensorrt`` (``explainrt.engine.tensorrt_session``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx

from explainrt.errors import BackendUnavailableError, InvalidInputError, InvalidModelError, UnknownLayerError
from explainrt.export.explainable import (
    OBJECTIVES,
    REFERENCE_PREFIX,
    RESOLVED_TARGETS_OUTPUT,
    TARGETS_INPUT,
    ExplainableSpec,
    activations_output,
    gradients_output,
    make_explainable,
    original_model,
    reference_input,
    relu_output,
)
from explainrt.export.gradients import ancestors

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"


@dataclass(frozen=True)
class RunResult:
    """Everything one explaining call of the model returns (host arrays)."""

    logits: np.ndarray  # [N, classes]
    targets: np.ndarray  # [N, K] resolved class indices
    activations: list[np.ndarray]  # per target layer [N, C, h, w]
    gradients: list[np.ndarray]  # per target layer [N, K, C, h, w]


class Session(Protocol):
    spec: ExplainableSpec
    input_shape: tuple[int | str | None, ...]

    def run(self, images: np.ndarray, targets: np.ndarray, objective: str = "logit") -> RunResult: ...

    def input_gradients(self, images: np.ndarray, targets: np.ndarray, objective: str = "logit") -> RunResult: ...

    def defended_input_gradients(self, images: np.ndarray, targets: np.ndarray, references: list[np.ndarray] | None = None,
                                 objective: str = "logit") -> tuple[RunResult, list[np.ndarray]]: ...

    def logits(self, images: np.ndarray) -> np.ndarray: ...

    def head(self, layer: int, activations: np.ndarray, images: np.ndarray) -> np.ndarray: ...


class OnnxRuntimeSession:
    """An explainable ONNX model in ONNX Runtime, plus lazily built plain, head and variant sessions.

    A variant is the same original model made explainable for another objective (a loss instead of
    a logit) or with the model input as the target (input gradients); each is built on first use.
    """

    def __init__(self, model: onnx.ModelProto, providers: Sequence[str] | None = None, device_id: int = 0,
                 device_outputs: bool = False) -> None:
        """``device_id``: the CUDA device of CUDAExecutionProvider. ``device_outputs=True`` (CUDA only)
        returns CuPy arrays that share ONNX Runtime's output buffers (DLPack) instead of host arrays."""
        import onnxruntime as ort

        self.spec = ExplainableSpec.from_model(model)
        self.providers = _validated_providers(ort, providers)
        self.device_id = int(device_id)
        self.on_cuda = self.providers[0] == CUDA_PROVIDER
        self.io_device = "cuda"  # where IO binding places buffers (the tests bind host memory through it)
        if device_outputs and not self.on_cuda:
            raise InvalidInputError(f"device_outputs=True needs {CUDA_PROVIDER} first in providers, got {self.providers}")
        self.device_outputs = bool(device_outputs)
        self._model = model
        self._ort = ort
        self._main = self._session(model)
        self._plain: object | None = None
        self._heads: dict[int, tuple[object, bool]] = {}
        # (objective, of_input, defended) -> (session, output names, shapes of the defence's reference inputs)
        self._variants: dict[tuple[str, bool, bool], tuple[object, list[str], list[list[int | str | None]]]] = {
            (self.spec.objective, False, False): (self._main, _outputs(self.spec.logits, len(self.spec.target_layers)), [])}
        self.input_shape = tuple(_input_dims(model, self.spec.image_input))

    def _session(self, model: onnx.ModelProto, spinning: bool = True) -> object:
        """An ONNX Runtime session on this session's providers. ``spinning=False`` for sessions run in
        quick alternation (incremental stages): their idle threads would otherwise spin and starve the next."""
        options = self._ort.SessionOptions()
        options.log_severity_level = 3
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            provider_options = [{"device_id": str(self.device_id)} if p == CUDA_PROVIDER else {} for p in self.providers]
            session = self._ort.InferenceSession(model.SerializeToString(), options, providers=self.providers,
                                                 provider_options=provider_options)
        except Exception as error:  # onnxruntime raises its own untyped exceptions
            raise InvalidModelError(f"onnxruntime cannot load the model: {error}") from error
        active = session.get_providers()
        if active[0] != self.providers[0]:
            raise BackendUnavailableError(f"onnxruntime did not enable {self.providers[0]} (active: {active})")
        return session

    def run(self, images: np.ndarray, targets: np.ndarray, objective: str = "logit") -> RunResult:
        return self._run_variant(images, targets, objective, of_input=False)

    def input_gradients(self, images: np.ndarray, targets: np.ndarray, objective: str = "logit") -> RunResult:
        return self._run_variant(images, targets, objective, of_input=True)

    def _variant(self, objective: str, of_input: bool, defended: bool = False) -> tuple[object, list[str], list[list[int | str | None]]]:
        """The session of a variant (built on first use), its outputs and its reference inputs' shapes."""
        key = (objective, of_input, defended)
        if key not in self._variants:
            log.info("building the %s variant of the model (objective %s)", _variant_kind(of_input, defended), objective)
            variant = variant_model(self._model, self.spec, objective, of_input, defended)
            shapes = [_input_dims(variant, reference_input(k))
                      for k in range(sum(v.name.startswith(REFERENCE_PREFIX) for v in variant.graph.input))]
            outputs = _outputs(self.spec.logits, 1 if of_input else len(self.spec.target_layers))
            self._variants[key] = (self._session(variant), outputs + [relu_output(k) for k in range(len(shapes))], shapes)
        return self._variants[key]

    def _run_variant(self, images: np.ndarray, targets: np.ndarray, objective: str, of_input: bool) -> RunResult:
        session, outputs, _ = self._variant(objective, of_input)
        values = self._run(session, outputs, {self.spec.image_input: images, TARGETS_INPUT: targets})
        return RunResult(values[0], values[1], values[2::2], values[3::2])

    def _run(self, session: object, outputs: list[str], feeds: dict[str, Any]) -> list[Any]:
        """One runtime call. On CUDA, through IO binding: CUDA arrays (CuPy, torch) are bound in
        place, host arrays copied once, outputs allocated on the device; they come back as CuPy
        arrays (DLPack, no copy) with ``device_outputs``, else copied to the host."""
        if not self.on_cuda:
            return session.run(outputs, feeds)  # type: ignore[attr-defined]
        binding = session.io_binding()  # type: ignore[attr-defined]
        for name, value in feeds.items():
            if hasattr(value, "__cuda_array_interface__"):
                interface = value.__cuda_array_interface__
                if interface.get("strides") is not None and not _is_contiguous(value):
                    raise InvalidInputError(f"the CUDA array for {name!r} must be C-contiguous")
                binding.bind_input(name, self.io_device, self.device_id, np.dtype(interface["typestr"]),
                                   tuple(interface["shape"]), interface["data"][0])
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in outputs:
            binding.bind_output(name, self.io_device, self.device_id)
        session.run_with_iobinding(binding)  # type: ignore[attr-defined]
        values = binding.get_outputs()
        if self.device_outputs:
            from explainrt.kernels._cupy import load_cupy

            cupy = load_cupy()
            return [cupy.from_dlpack(value) for value in values]
        return [value.numpy() for value in values]

    def defended_input_gradients(self, images: np.ndarray, targets: np.ndarray, references: list[np.ndarray] | None = None,
                                 objective: str = "logit") -> tuple[RunResult, list[np.ndarray]]:
        """Input gradients with FGVis's defence: a Relu passes the gradient only where
        0 < activation <= reference, its activation on the unperturbed image (``references``, as an
        earlier call on the unperturbed images returned them; None: no upper bound). Returns the
        result and these images' Relu activations (the references for their perturbations)."""
        session, outputs, shapes = self._variant(objective, of_input=True, defended=True)
        if references is None:
            references = [np.full([images.shape[0], *_static(shape[1:])], np.inf, dtype=images.dtype) for shape in shapes]
        elif len(references) != len(shapes):
            raise InvalidInputError(f"the model has {len(shapes)} defended Relus; got {len(references)} references")
        feeds = {self.spec.image_input: images, TARGETS_INPUT: targets,
                 **{reference_input(k): reference for k, reference in enumerate(references)}}
        values = self._run(session, outputs, feeds)
        return RunResult(values[0], values[1], [values[2]], [values[3]]), list(values[4:])

    @property
    def model(self) -> onnx.ModelProto:
        """The explainable model this session runs."""
        return self._model

    def submodel_runner(self, model: onnx.ModelProto) -> Callable[[np.ndarray], np.ndarray]:
        """Run ``model``, one input to one output, derived from this one (a stage of incremental
        inference) on the same providers and device."""
        session = self._session(model, spinning=False)
        source, result = model.graph.input[0].name, model.graph.output[0].name
        return lambda values: self._run(session, [result], {source: values})[0]

    def logits(self, images: np.ndarray) -> np.ndarray:
        if self._plain is None:
            self._plain = self._session(original_model(self._model))
        return self._run(self._plain, [self.spec.logits], {self.spec.image_input: images})[0]

    def head(self, layer: int, activations: np.ndarray, images: np.ndarray) -> np.ndarray:
        if layer not in self._heads:
            head, reads_image = _head_model(self._model, self.spec, layer)
            self._heads[layer] = (self._session(head), reads_image)
        session, reads_image = self._heads[layer]
        return self._run(session, [self.spec.logits], head_feeds(self.spec, layer, activations, images, reads_image))[0]


def variant_model(model: onnx.ModelProto, spec: ExplainableSpec, objective: str, of_input: bool,
                  defended: bool = False) -> onnx.ModelProto:
    """The explainable model for an objective, w.r.t. the target layers or the input (FGVis's defence
    optional): ``model`` itself when it is that one, else the original model made explainable again."""
    if (objective, of_input, defended) == (spec.objective, False, False):
        return model
    layers = [spec.image_input] if of_input else list(spec.target_layers)
    return make_explainable(original_model(model), layers, logits=spec.logits, objective=objective,
                            defended_relus=defended)


def _variant_kind(of_input: bool, defended: bool) -> str:
    return ("defended " if defended else "") + ("input-gradient" if of_input else "layer")


def head_feeds(spec: ExplainableSpec, layer: int, activations: Any, images: Any, reads_image: bool) -> dict[str, Any]:
    """Inputs of a head sub-graph: the replaced activations, and the images repeated to match when it reads them."""
    feeds = {spec.target_layers[layer]: activations}
    if reads_image:
        feeds[spec.image_input] = np.repeat(np.asarray(images), activations.shape[0] // images.shape[0], axis=0)
    return feeds


def _outputs(logits: str, layers: int) -> list[str]:
    names = [logits, RESOLVED_TARGETS_OUTPUT]
    for index in range(layers):
        names += [activations_output(index), gradients_output(index)]
    return names


def _validated_providers(ort: object, providers: Sequence[str] | None) -> list[str]:
    available = ort.get_available_providers()  # type: ignore[attr-defined]
    wanted = list(providers) if providers else ["CPUExecutionProvider"]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise BackendUnavailableError(
            f"onnxruntime execution provider(s) {missing} are not available here (available: {available}); "
            "install onnxruntime-gpu for CUDAExecutionProvider"
        )
    return wanted


def _is_contiguous(array: Any) -> bool:
    return bool(getattr(array, "flags", None) is not None and array.flags.c_contiguous) or (
        hasattr(array, "is_contiguous") and array.is_contiguous())


def onnxruntime_placement(providers: Sequence[str] | None, device: str | None) -> tuple[list[str] | None, int]:
    """Providers and CUDA device id for ONNX Runtime from ``providers`` and ``device``.

    ``device="cuda[:N]"`` with no providers means CUDAExecutionProvider (CPU for the operators
    it lacks); a device that contradicts the first provider is an error, never a silent switch.
    """
    if device is None:
        return (list(providers) if providers else None), 0
    kind, index = parse_device(device)
    if providers:
        if (providers[0] == CUDA_PROVIDER) != (kind == "cuda"):
            raise InvalidInputError(f"device {device!r} contradicts the first provider {providers[0]!r}")
        return list(providers), index
    return ([CUDA_PROVIDER, "CPUExecutionProvider"] if kind == "cuda" else ["CPUExecutionProvider"]), index


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as (kind, index); anything else is an InvalidInputError."""
    kind, _, index = str(device).partition(":")
    if kind == "cpu" and not index:
        return "cpu", 0
    if kind == "cuda" and (not index or index.isdigit()):
        return "cuda", int(index or 0)
    raise InvalidInputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _input_dims(model: onnx.ModelProto, name: str) -> list[int | str | None]:
    value = next(v for v in model.graph.input if v.name == name)
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value.type.tensor_type.shape.dim]


def _static(dims: Sequence[int | str | None]) -> list[int]:
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise InvalidModelError(f"defended gradients need Relu activations of a static size, got {list(dims)}")
    return list(dims)  # type: ignore[arg-type]


def _head_model(model: onnx.ModelProto, spec: ExplainableSpec, layer: int) -> tuple[onnx.ModelProto, bool]:
    """The sub-graph from one target layer to the logits, and whether it also reads the image.

    Exporters often compute reshape targets from ``Shape(image)``; such a head takes the image
    as a second input (only its shape is then read; whatever else it reads stays exact).
    """
    plain = original_model(model)
    tensor = spec.target_layers[layer]
    reads_image = spec.image_input in ancestors(plain.graph, spec.logits, stop=tensor)
    inputs = [tensor, spec.image_input] if reads_image else [tensor]
    return onnx.utils.Extractor(plain).extract_model(inputs, [spec.logits]), reads_image


class TorchSession:
    """The reference backend: the original PyTorch module with hooks and autograd."""

    def __init__(self, module: object, target_modules: Sequence[object], spec: ExplainableSpec,
                 device: str = "cpu") -> None:
        """``device``: "cpu", "cuda" or "cuda:N"; the module is moved there (``module.to``, in place)."""
        import torch

        self._torch = torch
        kind, index = parse_device(device)
        if kind == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(f"backend 'torch' on {device!r} needs a PyTorch build with CUDA and a CUDA "
                                          "device; torch.cuda.is_available() is False here")
        self.device = torch.device(kind, index) if kind == "cuda" else torch.device("cpu")
        self.module = module.eval().to(self.device)  # type: ignore[attr-defined]
        self.targets = list(target_modules)
        self.spec = spec
        self.input_shape = ("N", None, None, None)

    @classmethod
    def probed(cls, module: Any, target_modules: Sequence[object], example: Any, preprocessing: str | None,
               device: str = "cpu") -> TorchSession:
        """A session whose spec (layer names, class count) comes from one forward pass of ``example``,
        which also checks that every target module is a sub-module producing [N, C, h, w]."""
        names = {id(m): name for name, m in module.named_modules()}
        unknown = [m for m in target_modules if id(m) not in names]
        if unknown:
            raise UnknownLayerError(f"target layer {type(unknown[0]).__name__} is not a sub-module of the model")
        layer_names = tuple(names[id(m)] or type(m).__name__ for m in target_modules)
        session = cls(module, target_modules, ExplainableSpec("input", "logits", 0, layer_names, preprocessing), device)
        with session._torch.no_grad():
            logits, activations = session._forward(session._tensor(example))
        if logits.ndim != 2:
            raise InvalidModelError(f"the model must return logits [N, classes], got shape {tuple(logits.shape)}")
        for name, acts in zip(layer_names, activations):
            if acts is None or acts.ndim != 4:
                shape = None if acts is None else tuple(acts.shape)
                raise UnknownLayerError(f"target layer {name!r} must output [N, C, h, w] in the forward pass, got {shape}")
        session.spec = dataclasses.replace(session.spec, num_classes=int(logits.shape[1]))
        return session

    def _forward(self, images: object, replace: dict[int, object] | None = None) -> tuple[object, list[object]]:
        captured: dict[int, object] = {}

        def hook(index: int):  # noqa: ANN202
            def capture(_module, _inputs, output):  # noqa: ANN001, ANN202
                if replace is not None and index in replace:
                    output = replace[index]
                captured[index] = output
                # the model goes on with a copy: an in-place op after the layer (DenseNet's
                # F.relu(features, inplace=True)) must not change the captured activations
                return output.clone()
            return capture

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(self.targets)]  # type: ignore[attr-defined]
        try:
            logits = self.module(images)
        finally:
            for handle in handles:
                handle.remove()
        return logits, [captured.get(i) for i in range(len(self.targets))]

    def run(self, images: np.ndarray, targets: np.ndarray, objective: str = "logit") -> RunResult:
        return self._differentiate(images, targets, objective, of_input=False)

    def input_gradients(self, images: np.ndarray, targets: np.ndarray, objective: str = "logit") -> RunResult:
        return self._differentiate(images, targets, objective, of_input=True)

    def _differentiate(self, images: np.ndarray, targets: np.ndarray, objective: str, of_input: bool) -> RunResult:
        torch = self._torch
        if objective not in OBJECTIVES:
            raise InvalidInputError(f"unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
        with torch.enable_grad():
            inputs = self._tensor(images).requires_grad_(of_input)
            logits, acts = self._forward(inputs)
            wrt = [inputs] if of_input else acts
            order = torch.argsort(logits.detach(), dim=1, descending=True)
            requested = self._tensor(targets)
            by_rank = torch.gather(order, 1, (-requested - 1).clamp(min=0))
            resolved = torch.where(requested < 0, by_rank, requested)
            rows = torch.arange(logits.shape[0], device=self.device)
            scores = logits if objective == "logit" else -torch.log_softmax(logits, dim=1)
            per_seed = [torch.autograd.grad(scores[rows, resolved[:, k]].sum(), wrt, retain_graph=True)
                        for k in range(resolved.shape[1])]
        gradients = [torch.stack([g[i] for g in per_seed], dim=1).cpu().numpy() for i in range(len(wrt))]
        return RunResult(logits.detach().cpu().numpy(), resolved.cpu().numpy(), [w.detach().cpu().numpy() for w in wrt],
                         gradients)

    def _tensor(self, array: Any) -> Any:
        """A tensor on the session's device: host arrays copied once, CUDA arrays shared by DLPack."""
        torch = self._torch
        if isinstance(array, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        return (array if isinstance(array, torch.Tensor) else torch.from_dlpack(array)).to(self.device)

    def defended_input_gradients(self, images: np.ndarray, targets: np.ndarray, references: list[np.ndarray] | None = None,
                                 objective: str = "logit") -> tuple[RunResult, list[np.ndarray]]:
        """As ``OnnxRuntimeSession.defended_input_gradients``; every relu the forward calls
        (``nn.ReLU``, ``F.relu``, ``torch.relu``; ReLU6 and hardtanh from 0) is defended, in call order."""
        torch = self._torch
        functional = torch.nn.functional
        relus = {torch.relu, torch.relu_, functional.relu, torch.Tensor.relu, torch.Tensor.relu_, functional.relu6}
        recorded: list[np.ndarray] = []
        session = self

        def activation(func, args, kwargs):  # noqa: ANN001, ANN202
            """The relu's output, out of place even for inplace=True (the graph must keep it); None if not a relu."""
            if func in relus:
                return torch.clamp(args[0], 0.0, 6.0) if func is functional.relu6 else torch.relu(args[0])
            if func is functional.hardtanh:
                bounds = {"min_val": -1.0, "max_val": 1.0, **dict(zip(("min_val", "max_val"), args[1:3])), **kwargs}
                if bounds["min_val"] == 0:
                    return functional.hardtanh(args[0], 0.0, bounds["max_val"])
            return None

        class DefendedRelus(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                out = activation(func, args, kwargs or {})
                if out is None:
                    return func(*args, **(kwargs or {}))
                recorded.append(out.detach().cpu().numpy().copy())
                if references is not None and out.requires_grad:
                    if len(recorded) > len(references):
                        raise InvalidInputError(f"the forward calls more relus than the {len(references)} references given")
                    passes = out.detach() <= session._tensor(references[len(recorded) - 1])
                    out.register_hook(lambda grad: grad * passes)
                return out

        with DefendedRelus():
            result = self._differentiate(images, targets, objective, of_input=True)
        if references is not None and len(references) != len(recorded):
            raise InvalidInputError(f"the forward calls {len(recorded)} relus; got {len(references)} references")
        return result, recorded

    def logits(self, images: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            return self.module(self._tensor(images)).cpu().numpy()  # type: ignore[operator]

    def head(self, layer: int, activations: np.ndarray, images: np.ndarray) -> np.ndarray:
        repeated = np.repeat(images, activations.shape[0] // images.shape[0], axis=0)
        with self._torch.no_grad():
            logits, _ = self._forward(self._tensor(repeated), {layer: self._tensor(activations)})
        return logits.cpu().numpy()  # type: ignore[attr-defined]
