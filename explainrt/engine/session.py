"""Sessions: one explainable model on one backend, behind the three calls methods need.

- ``run(images, targets, objective)``: logits, resolved targets, activations and gradients of
  every target layer, in one runtime call;
- ``input_gradients(images, targets, objective)``: the same with the model input as the one
  "layer" (Saliency, Integrated Gradients, SmoothGrad, FGVis);
- ``logits(images)``: a plain forward pass (perturbation methods);
- ``head(layer, activations, images)``: logits with the target layer's activations replaced
  (ablation), re-running only what comes after the layer where the backend allows.

Backends: ``onnxruntime`` (any execution providers, validated up front, never a silent fallback)
and ``torch`` (the reference: hooks and autograd on the original module).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx

from explainrt.errors import BackendUnavailableError, InvalidInputError, InvalidModelError
from explainrt.export.explainable import (
    OBJECTIVES,
    RESOLVED_TARGETS_OUTPUT,
    TARGETS_INPUT,
    ExplainableSpec,
    activations_output,
    gradients_output,
    make_explainable,
    original_model,
)
from explainrt.export.gradients import ancestors

log = logging.getLogger(__name__)


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

    def logits(self, images: np.ndarray) -> np.ndarray: ...

    def head(self, layer: int, activations: np.ndarray, images: np.ndarray) -> np.ndarray: ...


class OnnxRuntimeSession:
    """An explainable ONNX model in ONNX Runtime, plus lazily built plain, head and variant sessions.

    A variant is the same original model made explainable for another objective (a loss instead of
    a logit) or with the model input as the target (input gradients); each is built on first use.
    """

    def __init__(self, model: onnx.ModelProto, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        self.spec = ExplainableSpec.from_model(model)
        self.providers = _validated_providers(ort, providers)
        self._model = model
        self._ort = ort
        self._main = self._session(model)
        self._plain: object | None = None
        self._heads: dict[int, tuple[object, bool]] = {}
        self._variants: dict[tuple[str, bool], tuple[object, list[str]]] = {
            (self.spec.objective, False): (self._main, _outputs(self.spec.logits, len(self.spec.target_layers)))}
        self.input_shape = tuple(_input_dims(model, self.spec.image_input))

    def _session(self, model: onnx.ModelProto) -> object:
        options = self._ort.SessionOptions()
        options.log_severity_level = 3
        try:
            session = self._ort.InferenceSession(model.SerializeToString(), options, providers=self.providers)
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

    def _run_variant(self, images: np.ndarray, targets: np.ndarray, objective: str, of_input: bool) -> RunResult:
        key = (objective, of_input)
        if key not in self._variants:
            layers = [self.spec.image_input] if of_input else list(self.spec.target_layers)
            log.info("building the %s variant of the model (objective %s)", "input-gradient" if of_input else "layer", objective)
            variant = make_explainable(original_model(self._model), layers, logits=self.spec.logits, objective=objective)
            self._variants[key] = (self._session(variant), _outputs(self.spec.logits, len(layers)))
        session, outputs = self._variants[key]
        values = session.run(outputs, {self.spec.image_input: images, TARGETS_INPUT: targets})  # type: ignore[attr-defined]
        return RunResult(values[0], values[1], values[2::2], values[3::2])

    def logits(self, images: np.ndarray) -> np.ndarray:
        if self._plain is None:
            self._plain = self._session(original_model(self._model))
        return self._plain.run([self.spec.logits], {self.spec.image_input: images})[0]  # type: ignore[attr-defined]

    def head(self, layer: int, activations: np.ndarray, images: np.ndarray) -> np.ndarray:
        if layer not in self._heads:
            head, reads_image = _head_model(self._model, self.spec, layer)
            self._heads[layer] = (self._session(head), reads_image)
        session, reads_image = self._heads[layer]
        feeds = {self.spec.target_layers[layer]: activations}
        if reads_image:
            feeds[self.spec.image_input] = np.repeat(images, activations.shape[0] // images.shape[0], axis=0)
        return session.run([self.spec.logits], feeds)[0]  # type: ignore[attr-defined]


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


def _input_dims(model: onnx.ModelProto, name: str) -> list[int | str | None]:
    value = next(v for v in model.graph.input if v.name == name)
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value.type.tensor_type.shape.dim]


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

    def __init__(self, module: object, target_modules: Sequence[object], spec: ExplainableSpec) -> None:
        import torch

        self._torch = torch
        self.module = module.eval()  # type: ignore[attr-defined]
        self.targets = list(target_modules)
        self.spec = spec
        self.input_shape = ("N", None, None, None)

    def _forward(self, images: object, replace: dict[int, object] | None = None) -> tuple[object, list[object]]:
        torch = self._torch
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
            inputs = torch.from_numpy(np.ascontiguousarray(images)).requires_grad_(of_input)
            logits, acts = self._forward(inputs)
            wrt = [inputs] if of_input else acts
            order = torch.argsort(logits.detach(), dim=1, descending=True)
            requested = torch.from_numpy(targets)
            by_rank = torch.gather(order, 1, (-requested - 1).clamp(min=0))
            resolved = torch.where(requested < 0, by_rank, requested)
            rows = torch.arange(logits.shape[0])
            scores = logits if objective == "logit" else -torch.log_softmax(logits, dim=1)
            per_seed = [torch.autograd.grad(scores[rows, resolved[:, k]].sum(), wrt, retain_graph=True)
                        for k in range(resolved.shape[1])]
        gradients = [np.stack([g[i].numpy() for g in per_seed], axis=1) for i in range(len(wrt))]
        return RunResult(logits.detach().numpy(), resolved.numpy(), [w.detach().numpy() for w in wrt], gradients)

    def logits(self, images: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            return self.module(self._torch.from_numpy(np.ascontiguousarray(images))).numpy()  # type: ignore[operator]

    def head(self, layer: int, activations: np.ndarray, images: np.ndarray) -> np.ndarray:
        repeated = np.repeat(images, activations.shape[0] // images.shape[0], axis=0)
        with self._torch.no_grad():
            logits, _ = self._forward(self._torch.from_numpy(repeated), {layer: self._torch.from_numpy(activations)})
        return logits.numpy()  # type: ignore[attr-defined]
