"""An Explainer as a KServe model (the ``kserve`` extra): predictor and explainer of an InferenceService.

``ExplainrtModel(name, explainer)`` is a ``kserve.Model``: KServe's own ``ModelServer`` serves it
(``kserve.ModelServer().start([ExplainrtModel("resnet50", Explainer(...))])``) with its V1 and
Open Inference Protocol (V2) endpoints, binary tensor extension included. It takes and answers exactly
what ``explainrt serve`` does (``explainrt.serve.protocol``, shared with it):

- V1 ``:predict`` ``{"instances": [{"image": {"b64": ...}}, ...], "parameters": {"top_k": 5}}`` ->
  ``{"predictions": [...]}``: per image the top class and the top k (index, label, probability);
- V1 ``:explain`` with ``"parameters": {"method", "targets", "return", "normalize", "caption", options...}``
  -> ``{"explanations": [...]}``: per image its target and its overlay and/or map; ``targets`` are class indices
  or ``explainrt.targets`` objects as JSON (``{"kind": "region", "class": 12, "mask": [[...]]}``,
  ``"box:x1,y1,x2,y2:K"``, ...), one for all, one per image, or a list of K per image (K maps each);
- V2 ``infer`` with input ``input`` (UINT8 [N, H, W, 3] images or FP32 preprocessed, in the model's own layout),
  optionally ``explainrt.targets`` (INT64 [N] or [N, K]) or ``parameters.targets`` as in V1 -> the logits, and
  with parameter ``method`` the maps ``explainrt.maps`` [N, (K,) H, W] (output parameter ``format``: FP32, FP16,
  UINT8, PNG, OVERLAY), ``explainrt.resolved_targets`` and, for target objects, ``explainrt.objective``;
- V2 model metadata: the tensors as one target per image has them (``protocol.metadata_tensors``).

A bad request (a bad target included) is KServe's ``InvalidInput``: a 400 naming the problem (a full queue: 503,
``ServerNotReady``). Requests are micro-batched on the model's worker thread, as ``explainrt serve`` batches them,
off KServe's event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import numpy as np

from explainrt.errors import BackendUnavailableError, InvalidInputError, ServerBusyError
from explainrt.explainer import Explainer
from explainrt.serve import codec, protocol
from explainrt.serve.models import ServedModel
from explainrt.serve.protocol import ServeConfig

try:
    import kserve
    from kserve.errors import InvalidInput, ServerNotReady
except ImportError as error:  # the optional extra
    raise BackendUnavailableError(f"the KServe adapter needs the kserve package: pip install 'explainrt[kserve]' "
                                  f"({error})") from error


class ExplainrtModel(kserve.Model):
    """A ``kserve.Model`` that predicts and explains with an ``Explainer`` (see the module docstring)."""

    def __init__(self, name: str, explainer: Explainer, config: ServeConfig | None = None) -> None:
        super().__init__(name)
        self.config = config or ServeConfig()
        self.served = ServedModel(name, explainer, self.config.max_batch, self.config.max_wait, self.config.max_queue)
        self.ready = True  # the Explainer is loaded already

    def load(self) -> bool:
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict[str, Any]]:
        return protocol.metadata_tensors(self.served)[0]

    def get_output_types(self) -> list[dict[str, Any]]:
        return protocol.metadata_tensors(self.served)[1]

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        """V1 ``:predict``, or V2 ``infer`` (an ``InferRequest``)."""
        if isinstance(payload, kserve.InferRequest):
            return await _answer(self._infer(payload))
        return await _answer(protocol.v1_predict(self.served, payload, self.config.limits))

    async def explain(self, payload: dict, headers: dict[str, str] | None = None) -> dict:
        """V1 ``:explain``."""
        return await _answer(protocol.v1_explain(self.served, payload, self.config.limits))

    async def _infer(self, request: Any) -> Any:
        tensors = {tensor.name: codec.V2Tensor(tensor.name, tensor.datatype, tensor.as_numpy())
                   for tensor in request.inputs}
        if len(tensors) != len(request.inputs):
            raise InvalidInputError("an input is given twice")
        outputs = None if not request.request_outputs else [
            {"name": output.name, "parameters": dict(output.parameters or {})} for output in request.request_outputs]
        answers = await protocol.v2_infer(self.served, tensors, dict(request.parameters or {}), outputs,
                                          self.config.limits)
        return kserve.InferResponse(request.id or "", self.name,
                                    [_output(output.name, array) for output, array in answers],
                                    use_binary_outputs=request.use_binary_outputs,
                                    requested_outputs=request.request_outputs)


async def _answer(answer: Awaitable[Any]) -> Any:
    """``answer`` awaited, explainrt's errors as KServe's: the client's mistakes (a bad target included)
    ``InvalidInput`` (400), a full queue ``ServerNotReady`` (503), each with explainrt's message."""
    try:
        return await answer
    except InvalidInputError as error:
        raise InvalidInput(str(error)) from error
    except ServerBusyError as error:
        raise ServerNotReady(str(error)) from error


def _output(name: str, array: np.ndarray) -> Any:
    """A kserve InferOutput: BYTES for object arrays of bytes (PNG maps), else the array's own datatype."""
    if array.dtype == object:
        return kserve.InferOutput(name, list(array.shape), "BYTES", data=list(array.ravel()))
    array, datatype = codec.v2_datatype(array)
    output = kserve.InferOutput(name, list(array.shape), datatype)
    output.set_data_from_numpy(np.ascontiguousarray(array))
    return output
