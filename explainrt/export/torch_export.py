"""The PyTorch front door: export a ``torch.nn.Module`` and find its target modules' tensors.

Asking ``torch.onnx.export`` to trace ``torch.autograd.grad`` fails, so the model is exported
for inference only and the gradient graph is built on the ONNX side. To know which ONNX tensor
``model.layer4`` became, the export runs through a wrapper whose forward hooks also return each
target module's output as an extra graph output; those outputs are then dropped again, leaving
their (now known) tensor names inside the graph.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import onnx

from explainrt.errors import ExplainrtError, InvalidInputError, InvalidModelError, UnknownLayerError
from explainrt.export.explainable import make_explainable
from explainrt.export.spec import TAP_PREFIX
from explainrt.optional import require

torch = require("torch", "exporting a PyTorch module (from_torch)")

log = logging.getLogger(__name__)

IMAGE_INPUT = "input"
LOGITS_OUTPUT = "logits"


class _Tapped(torch.nn.Module):
    """Returns the model's output followed by each target module's output."""

    def __init__(self, model: torch.nn.Module, taps: Sequence[torch.nn.Module], output: str | int | None) -> None:
        super().__init__()
        self.model = model
        self.taps = list(taps)
        self.output = output

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        captured: dict[int, torch.Tensor] = {}
        def tap(index: int):
            def hook(_module, _inputs, out):
                captured[index] = out
                # The model goes on with a copy, so in-place ops after the module (densenet's
                # F.relu(features, inplace=True)) cannot change what the tap reports.
                return out.clone() if isinstance(out, torch.Tensor) else out
            return hook

        handles = [module.register_forward_hook(tap(index)) for index, module in enumerate(self.taps)]
        try:
            logits = self.model(images)
        finally:
            for handle in handles:
                handle.remove()
        missing = [i for i in range(len(self.taps)) if i not in captured]
        if missing:
            raise UnknownLayerError(f"target modules {missing} were not called by the model's forward")
        for index, value in captured.items():
            if not isinstance(value, torch.Tensor) or value.dim() not in (3, 4):
                raise UnknownLayerError(f"target module {index} must output one tensor [N, C, h, w], [N, h, w, C] "
                                        "or tokens [N, T, D]")
        return (model_output(logits, self.output), *(captured[i] for i in range(len(self.taps))))


def _own_error(error: BaseException | None) -> ExplainrtError | None:
    """An explainrt error raised inside the traced forward, however torch wrapped it."""
    while error is not None:
        if isinstance(error, ExplainrtError):
            return error
        error = error.__cause__ or error.__context__
    return None


ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")
"""Terminal colour codes, which torch.export puts in its messages."""


def _export_failure(error: BaseException, size: tuple[int, ...]) -> InvalidModelError:
    """The error of a failed export, told by its first cause (the model's own exception where it raised one,
    e.g. a ViT's image size check) in one plain line, not torch.export's multi-page report."""
    cause = error
    while (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    text = ANSI_CODES.sub("", str(cause)).strip()
    line = text.splitlines()[0] if text else ""
    return InvalidModelError(f"torch.onnx.export of the model on a {'x'.join(map(str, size))} image failed: "
                             f"{type(cause).__name__}: {line} "
                             "(a model that takes only one image size needs input_size to be that size)")


def export_torch(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    target_modules: Sequence[torch.nn.Module],
    opset: int = 18,
    output: str | int | None = None,
    dynamic_size: bool = False,
) -> tuple[onnx.ModelProto, list[str]]:
    """Export ``model`` to ONNX (dynamic batch) and return it with each target module's tensor.

    ``dynamic_size``: height and width dynamic too, where the model allows (``Dim.AUTO``: a model whose
    code fixes a size keeps the example's, and images of another size are refused with that size)."""
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise InvalidInputError("example_input must be a float tensor [N, C, H, W]")
    owned = {id(m) for m in model.modules()}
    for module in target_modules:
        if not isinstance(module, torch.nn.Module) or id(module) not in owned:
            raise UnknownLayerError(f"target layer {module!r} is not a sub-module of the model")
    # A batch of 1 would be specialised by torch.export; trace with 2 and keep the batch dynamic.
    example = example_input[:1].detach().float().repeat(2, 1, 1, 1)
    wrapper = _Tapped(model, target_modules, output)
    modes = {m: m.training for m in model.modules()}
    wrapper.eval()  # evaluates dropout/batch-norm as at inference; restored below
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[IMAGE_INPUT],
                output_names=[LOGITS_OUTPUT, *(f"{TAP_PREFIX}{i}" for i in range(len(target_modules)))],
                dynamic_shapes=({0: torch.export.Dim("N", min=1),
                                 **({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO} if dynamic_size else {})},),
                verbose=False,
            )
        program.save(buffer)
    except Exception as error:  # torch.export raises many unrelated types and wraps ours
        raise _own_error(error) or _export_failure(error, tuple(example.shape[2:])) from error
    finally:
        for module, training in modes.items():
            module.train(training)
    proto = onnx.load_from_string(buffer.getvalue())
    taps = [o.name for o in proto.graph.output[1:]]
    kept = [o for o in proto.graph.output if o.name not in taps]
    # The exporter's shapes of the taps (batch axis "N" included) stay as value_info: ONNX shape
    # inference cannot always carry the batch symbol through a computed Reshape (MaxViT's window
    # un-partitioning), and a target layer must show the image batch on axis 0.
    known = {v.name for v in proto.graph.value_info}
    proto.graph.value_info.extend(o for o in proto.graph.output[1:] if o.name not in known)
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    return proto, taps


PROBE_STEP = 32
"""How much larger than the example the image is that tells whether a module takes other sizes (a multiple of
the strides and patch sizes of common models, so a model that takes any size takes this one)."""


def fixed_size_reason(model: torch.nn.Module, example_input: torch.Tensor,
                      target_modules: Sequence[torch.nn.Module] = (), token_grid_given: bool = False) -> str | None:
    """Why an export of ``model`` with a dynamic image size cannot serve other sizes, told without exporting
    it (an export takes seconds to minutes); None where that cannot be told so.

    One forward pass in torch on an image ``PROBE_STEP`` pixels larger: a model that refuses it (a ViT's
    checked size or position embeddings) holds one size, and a target module that outputs tokens [N, T, D]
    has a grid a dynamic size leaves unknown (unless ``token_grid_given``). torchvision's Swin is known by its type: it takes other sizes,
    but its window partition leaves its blocks' shapes unknown to ONNX shape inference at a dynamic size."""
    if example_input.dim() != 4:
        return None
    swin = _torchvision_class("swin_transformer", "SwinTransformer")
    if swin is not None and isinstance(model, swin):
        return "torchvision's Swin partitions windows whose shapes ONNX shape inference cannot follow at a dynamic size"
    height, width = example_input.shape[2] + PROBE_STEP, example_input.shape[3] + PROBE_STEP
    probe = example_input.new_zeros((1, example_input.shape[1], height, width), dtype=torch.float32)
    ranks: dict[int, int] = {}

    def hook(index: int):
        def record(_module, _inputs, out):
            if isinstance(out, torch.Tensor):
                ranks[index] = out.dim()
        return record

    modes = {m: m.training for m in model.modules()}
    handles = [module.register_forward_hook(hook(index)) for index, module in enumerate(target_modules)]
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(probe)
    except Exception as error:  # noqa: BLE001 - a model's own size check raises any type (AssertionError, ...)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"the model refuses a {height}x{width} image ({first})"
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
    tokens = [index for index, rank in sorted(ranks.items()) if rank == 3]
    if tokens and not token_grid_given:
        return f"target layer {tokens[0]} outputs tokens, whose grid a dynamic image size leaves unknown"
    return None


def _torchvision_class(module: str, name: str) -> type | None:
    """A torchvision model class where torchvision is already imported (a module of it was built), else None."""
    loaded = sys.modules.get(f"torchvision.models.{module}")
    return getattr(loaded, name, None) if loaded is not None else None


def from_torch(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    target_layers: Sequence[torch.nn.Module] | None = None,
    preprocessing: str | None = None,
    output: str | int | None = None,
    dynamic_size: bool = False,
    **layouts: Any,
) -> onnx.ModelProto:
    """Export a PyTorch classifier as an explainable ONNX model.

    ``target_layers`` are sub-modules (e.g. ``[model.layer4]``, or a transformer block's
    ``norm1``) whose outputs are explained; ``None`` picks one automatically. ``output`` picks
    the logits from a model returning several outputs (see ``model_output``). ``dynamic_size``: export
    with dynamic height and width where the model allows (see ``export_torch``). ``layouts``:
    ``layer_layout``, ``token_grid``, ``prefix_tokens`` (and the map heads' ``maps``, ``maps_only``,
    ``maps_dtype``) as ``make_explainable`` takes them.
    """
    modules = list(target_layers or [])
    proto, tensors = export_torch(model, example_input, modules, output=output, dynamic_size=dynamic_size)
    for module, tensor in zip(modules, tensors):
        log.info("target module %s is ONNX tensor %s", type(module).__name__, tensor)
    return make_explainable(proto, tensors or "auto", logits=LOGITS_OUTPUT, preprocessing=preprocessing, **layouts)


def model_output(value: Any, output: str | int | None = None) -> torch.Tensor:
    """The logits among a model's outputs: a tensor as it is (``output`` None or 0); ``output`` (a key, attribute
    or index) where given; else a Hugging Face ``ModelOutput``'s ``logits``, a dict's ``"out"`` (torchvision
    segmentation) or ``"logits"``, a tuple's first element."""
    if output is not None and isinstance(value, torch.Tensor):
        if output != 0:  # indexing the tensor would pick along its batch axis
            raise InvalidModelError(f"the model returns one tensor {tuple(value.shape)}: output={output!r} has nothing "
                                    "to choose (leave it out, or 0)")
        chosen = value
    elif output is not None:
        try:
            chosen = value[output] if isinstance(value, (dict, tuple, list)) or isinstance(output, int) else (
                getattr(value, output) if hasattr(value, output) else value[output])
        except (KeyError, IndexError, TypeError, AttributeError):
            raise InvalidModelError(f"the model's output has no {output!r} ({_described(value)})") from None
    elif isinstance(value, torch.Tensor):
        chosen = value
    elif hasattr(value, "logits") and isinstance(value.logits, torch.Tensor):
        chosen = value.logits
    elif isinstance(value, dict):
        key = next((k for k in ("out", "logits") if k in value), None)
        if key is None:
            raise InvalidModelError(f"the model returns {_described(value)}: choose one with output=")
        chosen = value[key]
    elif isinstance(value, (tuple, list)) and value:
        chosen = value[0]
    else:
        raise InvalidModelError(f"the model returns {_described(value)}, not a logits tensor")
    if not isinstance(chosen, torch.Tensor):
        raise InvalidModelError(f"the model's output {output!r} is a {type(chosen).__name__}, not a tensor")
    return chosen


def _described(value: Any) -> str:
    if isinstance(value, dict):
        return f"a dict with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"
