"""The one load step: any model argument -> a model a runtime can run, with its preprocessing.

``load`` is used by the API (``Explainer``), the command line (``explain``, ``export``,
``batch``, ``evaluate``) and the server, so a model argument means the same everywhere:

- ``None`` or ``"default"``: the shipped EfficientNet-Lite0 (ImageNet weights, stored preprocessing);
- a ``torch.nn.Module``: exported to explainable ONNX (or hooked, for ``backend="torch"``);
  target layers are modules or dotted module names;
- an ONNX path, serialized bytes or ``onnx.ModelProto``, explainable already or not; target
  layers are tensor names;
- the name of a torchvision architecture with ``weights`` (a state dict file; nothing is downloaded).

Preprocessing: the one given, else the model's stored one. With ``overrides`` (the CLI flags,
possibly all unset) a model without stored preprocessing gets torchvision's ImageNet recipe at
its input size, and the flags replace parts of whichever applies; so does a PyTorch module given
without preprocessing (with a logged note), as it cannot store any. A 1000-class model whose
preprocessing names no classes gets ImageNet's labels.

A torchvision architecture with ``weights`` is exported once and cached by the weights' hash
(``$EXPLAINRT_CACHE``), like the default model.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from explainrt.errors import (
    BackendUnavailableError,
    InvalidInputError,
    InvalidModelError,
    UnknownLayerError,
    UnknownSizeError,
)
from explainrt.export import layouts
from explainrt.export.explainable import make_explainable
from explainrt.export.inputs import InputForm, checked_layout, input_form
from explainrt.export.spec import ExplainableSpec, is_explainable, load_model, original_model, with_preprocessing
from explainrt.files import cache_dir, write_atomic
from explainrt.optional import require
from explainrt.preprocessing import Preprocessing
from explainrt.progress import note
from explainrt.runtime.base import input_dims
from explainrt.runtime.torch import ModuleSource
from explainrt.version import __version__

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
"""The name of the shipped model (EfficientNet-Lite0 with ImageNet weights)."""

# torchvision's ImageNet preprocessing: Resize(256) -> CenterCrop(224) -> Normalize(mean, std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = (224, 224)


@dataclass(frozen=True)
class PreprocessingOverrides:
    """Parts of the preprocessing the user set (the CLI's --input-size, --mean, --std, --labels)."""

    input_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    labels_file: str | None = None

    def any(self) -> bool:
        return any(value is not None for value in dataclasses.astuple(self))


@dataclass(frozen=True)
class Outputs:
    """What of the model is explained: which output holds the logits, and how target layers are laid out.

    ``output``: an ONNX output name or index, or for a PyTorch model a dict key, attribute or tuple index
    (default: the first output; a Hugging Face ModelOutput's ``logits``; a dict's ``"out"``).
    ``layer_layout`` ("nchw", "nhwc", "tokens"), ``token_grid`` and ``prefix_tokens``: see
    ``explainrt.export.layouts`` (None: told from the graph and the sizes).
    """

    output: str | int | None = None
    layer_layout: str | Sequence[str] | None = None
    token_grid: Any = None
    prefix_tokens: int | Sequence[int] | None = None
    input_layout: str | None = None  # the image input's: "nchw" or "nhwc" (None: told from the graph)

    def __post_init__(self) -> None:
        checked_layout(self.input_layout)

    def given(self) -> bool:
        return any(value is not None for value in dataclasses.astuple(self))

    def layouts(self) -> dict[str, Any]:
        return {"layer_layout": self.layer_layout, "token_grid": self.token_grid, "prefix_tokens": self.prefix_tokens}

    def onnx_options(self) -> dict[str, Any]:
        """The layouts and the input layout, as ``make_explainable`` takes them."""
        return {**self.layouts(), "input_layout": self.input_layout}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for a runtime: the explainable ONNX model, or the module to hook (backend="torch")."""

    explainable: onnx.ModelProto | None
    module: ModuleSource | None
    preprocessing: Preprocessing | None

    @property
    def runnable(self) -> onnx.ModelProto | ModuleSource:
        return self.module if self.module is not None else self.explainable  # type: ignore[return-value]


def load(model: Any = None, target_layers: Sequence[Any] | None = None, *, backend: str = "onnxruntime",
         weights: str | os.PathLike | None = None, outputs: Outputs | None = None,
         preprocessing: Preprocessing | None = None, input_size: tuple[int, int] | None = None,
         overrides: PreprocessingOverrides | None = None) -> LoadedModel:
    """The model ``model`` names, explainable w.r.t. ``target_layers`` (None: its own, else automatic).

    ``backend="torch"`` keeps a PyTorch model as a module (hooks and autograd, no export);
    every other backend gets explainable ONNX. ``weights`` goes with a torchvision architecture
    name; ``outputs`` says which output and how the target layers are laid out.
    """
    outputs = outputs or Outputs()
    fallback = overrides is not None  # the CLI's promise: ImageNet's recipe where the model stores none
    overrides = overrides or PreprocessingOverrides()
    layers = list(target_layers) if target_layers else None
    if weights is not None and not (isinstance(model, str) and not _is_onnx_path(model) and model != DEFAULT_MODEL):
        raise InvalidInputError("weights apply to a torchvision architecture name (such as 'resnet50'), "
                                f"not to {_described(model)}")
    if model is None or model == DEFAULT_MODEL:
        if outputs.input_layout not in (None, "nchw"):
            raise InvalidInputError(f"input_layout={outputs.input_layout!r}: the default model takes [N, C, H, W] "
                                    "images")
        return _default_model(layers, backend, preprocessing, overrides)
    if isinstance(model, str) and not _is_onnx_path(model):
        return _torchvision(model, weights, layers, backend, preprocessing, outputs,
                            overrides.input_size or input_size or DEFAULT_INPUT_SIZE, overrides)
    if _is_torch_module(model):
        fixed = overrides.input_size or input_size
        size = fixed or (preprocessing.input_size if preprocessing else DEFAULT_INPUT_SIZE)
        if preprocessing is None and not fallback:
            log.info("the PyTorch model comes without preprocessing: image files get torchvision's ImageNet recipe "
                     "at %dx%d (pass preprocessing= to set another)", *size)
        return _from_module(model, layers, backend, preprocessing or recipe(overrides, size, None), outputs, size,
                            dynamic_size=fixed is None)
    if backend == "torch":
        raise BackendUnavailableError("backend='torch' needs a torch.nn.Module (or a torchvision architecture "
                                      "name), not an ONNX model")
    return _from_onnx(load_model(model), layers, outputs, preprocessing, input_size, overrides, fallback)


def _default_model(layers: list[Any] | None, backend: str, preprocessing: Preprocessing | None,
                   overrides: PreprocessingOverrides) -> LoadedModel:
    from explainrt.models import default

    chosen = preprocessing or default.DEFAULT_PREPROCESSING
    if overrides.any():
        chosen = recipe(overrides, overrides.input_size or chosen.input_size, len(chosen.labels or ()) or None, chosen)
    if backend == "torch" or (layers and not all(isinstance(layer, str) for layer in layers)):
        from explainrt.models import default_torch

        module = default_torch.load_default_torch_model()
        return _from_module(module, layers or [default_torch.default_target_module(module)], backend, chosen, None,
                            chosen.input_size)
    proto = default.default_explainable_model()
    if layers:  # tensor names of the explainable default model
        proto = make_explainable(original_model(proto), layers)
    return LoadedModel(with_preprocessing(proto, chosen.to_json()), None, chosen)


def _from_module(module: Any, layers: list[Any] | None, backend: str, preprocessing: Preprocessing | None,
                 outputs: Outputs | None, input_size: tuple[int, int], dynamic_size: bool = False) -> LoadedModel:
    """A PyTorch model: hooked as it is (torch backend), else exported at ``input_size`` (``dynamic_size``:
    with dynamic height and width where the model allows, so images of any size work)."""
    outputs = outputs or Outputs()
    if outputs.input_layout not in (None, "nchw"):
        raise InvalidInputError(f"input_layout={outputs.input_layout!r}: a PyTorch module takes [N, C, H, W] images")
    targets = modules(module, layers) if layers else None
    example = example_input(input_size, input_channels(module))
    stored = preprocessing.to_json() if preprocessing else None
    if backend == "torch":
        if not targets:
            raise InvalidInputError("backend='torch' needs target_layers (modules or dotted module names) to hook")
        requests = tuple(layouts.requests(len(targets), **outputs.layouts()))
        return LoadedModel(None, ModuleSource(module, tuple(targets), example, stored, outputs.output, requests),
                           preprocessing)
    from explainrt.export.torch_export import fixed_size_reason, from_torch

    # Token layers (ViT) tie their grid, and usually their position embeddings, to one size; some graphs
    # (Swin's padded windows) leave the target's shape unknown to ONNX shape inference at any size. Where that
    # shows before exporting, the model is exported once at its size; else a dynamic export is tried first.
    reason = fixed_size_reason(module, example, targets or (), outputs.token_grid is not None) if dynamic_size else None
    if reason is not None:
        log.info("exporting at %dx%d only: %s", *input_size, reason)
    elif dynamic_size:
        log.info("exporting with a dynamic image size (falls back to %dx%d if the target layers cannot be read)",
                 *input_size)
    try:
        proto = from_torch(module, example, targets, preprocessing=stored, output=outputs.output,
                           dynamic_size=dynamic_size and reason is None, **outputs.layouts())
    except (UnknownLayerError, UnknownSizeError) as error:
        if not dynamic_size or reason is not None:
            raise
        # e.g. torch writes an adaptive pool that keeps the example's size as a fixed AveragePool: the dynamic
        # graph holds that one size, and the pool's gradient rule cannot read the others
        log.info("exported at %dx%d: with a dynamic image size the target layers or their gradients cannot be "
                 "built (%s)", *input_size, error)
        proto = from_torch(module, example, targets, preprocessing=stored, output=outputs.output,
                           **outputs.layouts())
    named = _named_classes(preprocessing, ExplainableSpec.from_model(proto).num_classes)
    return LoadedModel(with_preprocessing(proto, named.to_json()) if named is not preprocessing else proto, None, named)


def _torchvision(name: str, weights: str | os.PathLike | None, layers: list[Any] | None, backend: str,
                 preprocessing: Preprocessing | None, outputs: Outputs, size: tuple[int, int],
                 overrides: PreprocessingOverrides) -> LoadedModel:
    """A torchvision architecture with local weights, its explainable export cached by everything it depends on.

    A cached export is read without building the module or importing torchvision (which took most of
    a cached call's 15-20 s): a file is cached only under a name that was checked when it was exported.
    Its preprocessing is the one stored in the export."""
    if backend == "torch" or not all(isinstance(layer, str) for layer in layers or ()):
        module, num_classes = torchvision_model(_architecture(name), weights)
        return _from_module(module, layers, backend, preprocessing or recipe(overrides, size, num_classes), outputs,
                            size)
    if weights is None or not Path(weights).is_file():
        _architecture(name)  # an unknown name is said before a missing weights file
    digest = hashlib.sha256(_weights_file(name, weights).read_bytes()).hexdigest()
    labels = (hashlib.sha256(Path(overrides.labels_file).read_bytes()).hexdigest()
              if overrides.labels_file and Path(overrides.labels_file).is_file() else overrides.labels_file)
    key = hashlib.sha256(json.dumps([__version__, name, digest, layers, list(size),
                                     preprocessing.to_json() if preprocessing else None, overrides.input_size,
                                     overrides.mean, overrides.std, labels, repr(outputs)]).encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{key}.onnx"
    if path.is_file():
        try:
            proto = load_model(path)
            stored = ExplainableSpec.from_model(proto).preprocessing
            if stored:
                return LoadedModel(proto, None, Preprocessing.from_json(stored))
            log.warning("cached model %s stores no preprocessing: exporting it again", path)
        except InvalidModelError:
            log.warning("cached model %s is corrupt: exporting it again", path)
    name = _architecture(name)
    note(f"exporting {name} to explainable ONNX on first use (cached in {path.parent})")
    module, num_classes = torchvision_model(name, weights)
    loaded = _from_module(module, layers, backend, preprocessing or recipe(overrides, size, num_classes), outputs, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, loaded.explainable.SerializeToString())  # type: ignore[union-attr]
    return loaded


def _named_classes(preprocessing: Preprocessing | None, num_classes: int) -> Preprocessing | None:
    """``preprocessing`` with ImageNet's labels where it names no classes and the model has 1000."""
    if preprocessing is None or preprocessing.labels is not None or num_classes != 1000:
        return preprocessing
    from explainrt.models.labels import imagenet_labels

    return dataclasses.replace(preprocessing, labels=imagenet_labels())


def _from_onnx(proto: onnx.ModelProto, layers: list[Any] | None, outputs: Outputs,
               preprocessing: Preprocessing | None, input_size: tuple[int, int] | None,
               overrides: PreprocessingOverrides, fallback: bool) -> LoadedModel:
    stored = None
    if is_explainable(proto):
        stored_json = ExplainableSpec.from_model(proto).preprocessing
        stored = Preprocessing.from_json(stored_json) if stored_json else None
        if layers or outputs.given():
            proto = make_explainable(original_model(proto), layers or "auto", logits=_onnx_output(outputs.output),
                                     **outputs.onnx_options())
    else:
        proto = make_explainable(proto, layers or "auto", logits=_onnx_output(outputs.output), **outputs.onnx_options())
    spec = ExplainableSpec.from_model(proto)
    chosen = preprocessing or stored or _pixels_unchanged(input_form(proto))
    if (chosen is None and fallback) or overrides.any():
        dims = input_dims(proto, spec.image_input)
        size = overrides.input_size or input_size or _static_size(dims) or (stored.input_size if stored else None)
        if size is None:
            log.info("the model's input size is dynamic: assuming %dx%d (set the input size)", *DEFAULT_INPUT_SIZE)
            size = DEFAULT_INPUT_SIZE
        chosen = recipe(overrides, size, spec.num_classes, chosen)
    chosen = _named_classes(chosen, spec.num_classes)
    return LoadedModel(with_preprocessing(proto, chosen.to_json()) if chosen else proto, None, chosen)


def _pixels_unchanged(form: InputForm) -> Preprocessing | None:
    """For a model taking uint8 pixels (its preprocessing baked in) of a static size: image files resized to
    that size and passed as pixels, unnormalised (uint8 batches of the model's size pass unchanged anyway)."""
    _, channels, height, width = form.nchw
    if not form.is_integer or channels != 3 or not all(isinstance(v, int) and v > 0 for v in (height, width)):
        return None
    return Preprocessing(input_size=(height, width), resize_shorter=None, mean=(0.0, 0.0, 0.0),  # type: ignore[arg-type]
                         std=(1 / 255,) * 3)


def _onnx_output(output: str | int | None) -> str | int | None:
    """An ONNX output by its name or its index among the graph's outputs."""
    if output is not None and (isinstance(output, bool) or not isinstance(output, (str, int))):
        raise InvalidInputError(f"output names an ONNX output by its name or index, got {output!r}")
    return output


def recipe(overrides: PreprocessingOverrides, input_size: Sequence[int], num_classes: int | None,
           stored: Preprocessing | None = None) -> Preprocessing:
    """Preprocessing from the overrides, else from ``stored`` (a model's own), else torchvision's
    ImageNet recipe: resize the shorter side to 8/7 of the input size, centre-crop, normalise."""
    height, width = (int(v) for v in input_size)
    same_size = stored is not None and stored.input_size == (height, width)
    return Preprocessing(
        input_size=(height, width),
        resize_shorter=stored.resize_shorter if same_size else max(height, width) * 8 // 7,  # type: ignore[union-attr]
        mean=tuple(overrides.mean or (stored.mean if stored else IMAGENET_MEAN)),
        std=tuple(overrides.std or (stored.std if stored else IMAGENET_STD)),
        labels=_labels(overrides.labels_file, num_classes, stored.labels if stored else None),
        interpolation=stored.interpolation if stored else "bilinear",
    )


def _labels(labels_file: str | None, num_classes: int | None, stored: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The labels file, else the model's stored labels, else ImageNet's for 1000 classes."""
    if labels_file is None:
        if stored is not None or num_classes != 1000:
            return stored
        from explainrt.models.labels import imagenet_labels

        return imagenet_labels()
    path = Path(labels_file)
    try:
        labels = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"cannot read labels file {str(path)!r}: {error}") from error
    if num_classes is not None and len(labels) != num_classes:
        raise InvalidInputError(f"labels file {str(path)!r} has {len(labels)} names; the model has {num_classes} classes")
    return labels


def _static_size(dims: Sequence[Any]) -> tuple[int, int] | None:
    spatial = list(dims[2:4])
    if len(spatial) == 2 and all(isinstance(v, int) and v > 0 for v in spatial):
        return spatial[0], spatial[1]
    return None


def example_input(input_size: Sequence[int], channels: int = 3) -> Any:
    """A zero batch of one image of ``input_size`` with ``channels`` channels, for export and probing."""
    import torch

    return torch.zeros(1, channels, *input_size)


def input_channels(module: Any) -> int:
    """The channels the module's first convolution takes (3 where it has none, e.g. a patch MLP)."""
    import torch

    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d):
            return int(layer.in_channels)
        if isinstance(layer, torch.nn.Linear):
            break
    return 3


def modules(model: Any, layers: Sequence[Any]) -> list[Any]:
    """Target modules: modules of ``model`` as given, or looked up by dotted name (``layer4``, ``features.28``)."""
    found = []
    for layer in layers:
        if not isinstance(layer, str):
            found.append(layer)
            continue
        try:
            found.append(model.get_submodule(layer))
        except AttributeError:
            known = [name for name, _ in model.named_modules() if name]
            close = difflib.get_close_matches(layer, known, n=3)
            top = [name for name, _ in model.named_children()]
            hint = (f"did you mean {', '.join(map(repr, close))}?" if close else
                    f"its top-level modules are {', '.join(map(repr, top[:12]))}{', ...' if len(top) > 12 else ''}")
            raise UnknownLayerError(f"the model has no module {layer!r}: {hint}") from None
    return found


def torchvision_model(name: str, weights: str | os.PathLike | None) -> tuple[Any, int]:
    """A torchvision classifier with local weights, in eval mode, and its number of classes."""
    torch = require("torch", f"torchvision architecture {name!r}")
    models = require("torchvision.models", f"torchvision architecture {name!r}")

    path = _weights_file(name, weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises pickle, zip and runtime errors alike
        raise InvalidModelError(f"cannot read weights file {str(path)!r}: {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidModelError(f"weights file {str(path)!r} does not hold a state dict (name -> tensor)")
    # The classifier is the last matrix of every torchvision classifier's state dict.
    matrices = [value for value in state.values() if value.dim() == 2]
    num_classes = int(matrices[-1].shape[0]) if matrices else 1000
    try:
        model = models.get_model(name, weights=None, num_classes=num_classes)
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as error:
        first_lines = "\n".join(str(error).splitlines()[:3])
        raise InvalidModelError(f"weights file {str(path)!r} does not fit torchvision's {name}: {first_lines}") from error
    return model.eval(), num_classes


def _weights_file(name: str, weights: str | os.PathLike | None) -> Path:
    """The weights file of torchvision architecture ``name``; an error where none is given or it does not exist."""
    if weights is None:
        raise InvalidInputError(f"torchvision architecture {name!r} needs --weights FILE (weights= in the API): a "
                                "state dict saved with torch.save(model.state_dict(), FILE); explainrt downloads "
                                "no weights")
    path = Path(weights)
    if not path.is_file():
        raise InvalidModelError(f"weights file not found: {path}")
    return path


def _architecture(name: str) -> str:
    models = require("torchvision.models", f"model {name!r}, which is not an ONNX file (so read as a torchvision "
                     "architecture name),")

    known = models.list_models(module=models)
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise InvalidModelError(f"model {name!r} is neither an ONNX file nor a torchvision architecture{hint}")


def _is_onnx_path(model: str) -> bool:
    return model.lower().endswith(".onnx") or os.path.exists(model)


def _is_torch_module(value: Any) -> bool:
    """Whether ``value`` is a torch.nn.Module, without importing torch for anything else."""
    return any(cls.__module__.startswith("torch.nn") and cls.__name__ == "Module" for cls in type(value).__mro__)


def _described(model: Any) -> str:
    if model is None or model == DEFAULT_MODEL:
        return "the default model"
    return f"an ONNX model ({model!r})" if isinstance(model, str) else f"a {type(model).__name__}"
