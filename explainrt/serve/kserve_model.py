"""An Explainer as a KServe model (the ``kserve`` extra): predictor and explainer of an InferenceService.

``ExplainrtModel(name, explainer)`` is a ``kserve.Model``: KServe's own ``ModelServer`` serves it
(``kserve.ModelServer().start([ExplainrtModel("resnet50", Explainer(...))])``) with its V1 and
Open Inference Protocol (V2) endpoints, binary tensor extension included:

- V1 ``:predict`` ``{"instances": [{"image": {"b64": ...}}, ...]}`` -> ``{"predictions": [...]}``:
  per image the top class and the top 5 (index, label, probability);
- V1 ``:explain`` with ``"parameters": {"method", "targets", "normalize", "maps_format", options...}``
  -> ``{"explanations": [...]}``: per image the explained class and its map (nested lists, or a
  base64 8-bit grayscale PNG with ``"maps_format": "PNG"``);
- V2 ``infer`` with input ``input`` (UINT8 [N, H, W, 3] images or FP32 preprocessed, in the model's own layout) and
  optionally ``explainrt.targets`` (INT64 [N]) -> the logits, and with parameter ``method`` the maps
  ``explainrt.maps`` [N, H, W] (parameter ``maps_format``: FP32, FP16, UINT8, PNG) and
  ``explainrt.resolved_targets``.

Requests are decoded and checked by the server's own codec, so the rules (and errors) are those of
``explainrt serve``; the explainer runs in a worker thread, off KServe's event loop.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np

from explainrt.errors import BackendUnavailableError, ExplainrtError, InvalidInputError
from explainrt.explainer import Explainer
from explainrt.methods.base import softmax
from explainrt.serve import codec
from explainrt.serve.models import preprocessed_shape
from explainrt.validation import check_class_range

try:
    import kserve
    from kserve.errors import InvalidInput
except ImportError as error:  # the optional extra
    raise BackendUnavailableError(f"the KServe adapter needs the kserve package: pip install 'explainrt[kserve]' "
                                  f"({error})") from error

MAPS_OUTPUT = "explainrt.maps"
TARGETS_INPUT = "explainrt.targets"
RESOLVED_TARGETS_OUTPUT = "explainrt.resolved_targets"
TOP_K = 5
RESERVED = ("method", "targets", "normalize", "maps_format", "binary_data_output")
"""Parameters the adapter reads itself; the others are options of the method."""


class ExplainrtModel(kserve.Model):
    """A ``kserve.Model`` that predicts and explains with an ``Explainer`` (see the module docstring)."""

    def __init__(self, name: str, explainer: Explainer, limits: codec.Limits | None = None) -> None:
        super().__init__(name)
        self.explainer = explainer
        self.limits = limits or codec.Limits()
        self.ready = True  # the Explainer is loaded already

    def load(self) -> bool:
        self.ready = True
        return self.ready

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        """V1: top-5 predictions per instance; V2 (InferRequest): logits, and maps when a method is given."""
        try:
            if isinstance(payload, kserve.InferRequest):
                return await asyncio.to_thread(self._infer, payload)
            images = codec.decode_instances(codec.json_object(payload, "the request body"), self.limits)
            logits = await asyncio.to_thread(self.explainer.predict, images)
            return {"predictions": [self._top(row) for row in logits]}
        except ExplainrtError as error:
            raise InvalidInput(str(error)) from error

    async def explain(self, payload: dict, headers: dict[str, str] | None = None) -> dict:
        """V1 ``:explain``: per instance the explained class and its map."""
        try:
            body = codec.json_object(payload, "the request body")
            images = codec.decode_instances(body, self.limits)
            parameters = codec.json_object(body.get("parameters", {}), '"parameters"')
            method, options, normalize, form = _method(parameters)
            targets = _targets(parameters.get("targets"), len(images), self.explainer.spec.num_classes)
            explanation = await asyncio.to_thread(self.explainer.explain, images, method, targets,
                                                  normalize=normalize, **options)
            maps = codec.encode_maps(explanation.maps, form, normalize)
            probabilities = softmax(explanation.logits)
            return {"explanations": [
                {"method": method, "target": self._class(int(t), probabilities[i, t]),
                 "map": base64.b64encode(m).decode("ascii") if form == "PNG" else np.asarray(m).tolist()}
                for i, (t, m) in enumerate(zip(explanation.targets, maps, strict=True))]}
        except ExplainrtError as error:
            raise InvalidInput(str(error)) from error

    def _infer(self, request: Any) -> Any:
        inputs = {tensor.name: tensor for tensor in request.inputs}
        image_name = self.explainer.spec.image_input
        unknown = sorted(set(inputs) - {image_name, TARGETS_INPUT})
        if unknown or image_name not in inputs:
            raise InvalidInputError(f"unknown input(s) {unknown or 'none'}: model {self.name!r} takes {image_name!r} "
                                    f"(UINT8 [N, H, W, 3] images or FP32 {preprocessed_shape(self.explainer)}) and "
                                    f"optionally {TARGETS_INPUT!r}")
        image = inputs[image_name]
        array = image.as_numpy()
        if image.datatype == "UINT8" and array.ndim == 4 and array.shape[3] == 3:
            images: Any = list(array)
        elif image.datatype == "FP32" and array.ndim == 4:
            images = array
        else:
            raise InvalidInputError(f"input {image_name!r} is {image.datatype} {list(array.shape)}; expected UINT8 "
                                    f"[N, H, W, 3] images or FP32 {preprocessed_shape(self.explainer)} preprocessed "
                                    "input")
        parameters = dict(request.parameters or {})
        count = len(images)
        outputs = []
        if "method" in parameters:
            method, options, normalize, form = _method(parameters)
            given = inputs[TARGETS_INPUT].as_numpy().ravel().tolist() if TARGETS_INPUT in inputs else None
            targets = _targets(given, count, self.explainer.spec.num_classes)
            explanation = self.explainer.explain(images, method, targets, normalize=normalize, **options)
            logits = explanation.logits
            maps = codec.encode_maps(explanation.maps, form, normalize)
            outputs += [_output(MAPS_OUTPUT, maps), _output(RESOLVED_TARGETS_OUTPUT, explanation.targets)]
        else:
            logits = self.explainer.predict(images)
        outputs.insert(0, _output(self.explainer.spec.logits, logits.astype(np.float32)))
        return kserve.InferResponse(request.id or "", self.name, outputs,
                                    use_binary_outputs=request.use_binary_outputs,
                                    requested_outputs=request.request_outputs)

    def _top(self, logits: np.ndarray) -> dict[str, Any]:
        probabilities = softmax(logits[None])[0]
        order = np.argsort(-logits, kind="stable")[:TOP_K]
        return {**self._class(int(order[0]), probabilities[order[0]]),
                "top_k": [self._class(int(c), probabilities[c]) for c in order]}

    def _class(self, index: int, probability: float) -> dict[str, Any]:
        labels = self.explainer.preprocessing.labels if self.explainer.preprocessing else None
        return {"index": index, "label": labels[index] if labels else str(index), "probability": float(probability)}


def _method(parameters: dict[str, Any]) -> tuple[str, dict[str, Any], bool, str]:
    """The method (checked), its options (checked), ``normalize`` and the maps' format."""
    method, options, normalize = codec.method_parameters(parameters, RESERVED)
    form = parameters.get("maps_format", "FP32")
    if form not in codec.MAP_FORMATS:
        raise InvalidInputError(f"parameter maps_format must be one of {', '.join(codec.MAP_FORMATS)}, got {form!r}")
    return method, options, normalize, form


def _targets(value: Any, count: int, classes: int) -> np.ndarray | None:
    """None (top class), one class for all, or one per image; checked against the model's classes."""
    if value is None:
        return None
    targets = np.asarray([value] * count if isinstance(value, int) else value)
    if targets.shape != (count,) or targets.dtype.kind not in "iu":
        raise InvalidInputError(f"targets must be one class index or {count} (one per image), got {value!r}")
    check_class_range(targets.astype(np.int64), classes)
    return targets.astype(np.int64)


def _output(name: str, array: np.ndarray) -> Any:
    """A kserve InferOutput: BYTES for object arrays of bytes (PNG maps), else the array's own datatype."""
    if array.dtype == object:
        return kserve.InferOutput(name, list(array.shape), "BYTES", data=list(array))
    datatypes = {np.dtype(t): n for n, t in codec.V2_OUTPUT_DATATYPES.items()}
    output = kserve.InferOutput(name, list(array.shape), datatypes[array.dtype])
    output.set_data_from_numpy(np.ascontiguousarray(array))
    return output
