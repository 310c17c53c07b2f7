"""Zoo coverage: every torchvision classifier and a set of timm families, explained against pytorch-grad-cam.

Driven by ``tests/test_zoo.py`` (``pytest -m zoo tests/test_zoo.py``, opt-in and slow) or run
directly (``python bench/zoo.py [--models a,b] [--budget-s 4500] [--out bench/results/zoo.md]``).
Per model, with random weights (``randomized``) at its input size (``input_size``):

- export once with ``export_torch(model, x, [documented layer])``: the plain ONNX model and the
  documented layer's tensor;
- (a) ``make_explainable(plain, "auto")``: the automatic layer's tensor and layout; its Grad-CAM map
  is compared with pytorch-grad-cam's on the module that produced that tensor, found from the
  exporter's name scopes and confirmed by value (the module's output, reshaped by the layout's
  transform, equals the activations explainrt returns; a module called more than once is not
  used: pytorch-grad-cam would read its first call);
- (b) ``make_explainable(plain, [tap])``: the documented layer (pytorch-grad-cam's README and
  tutorials per family) with its layout inferred; it must be the one the family's
  ``reshape_transform`` assumes, and its map is compared with pytorch-grad-cam's ``GradCAM`` on
  the same module and transform.

Maps are for classes 1 and 7 of two random images; "max diff" is the largest absolute
difference of the two [0, 1] maps. A row passes when every comparison made is below
``TOLERANCE`` and the reference maps vary (an all-constant pair would match trivially). A model
explainrt refuses with its own error is reported as refused, with the message; any other
exception, a wrong layout or a difference above the tolerance is a failure.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explainrt import Explainer, make_explainable  # noqa: E402
from explainrt.errors import ExplainrtError  # noqa: E402
from explainrt.export.spec import ExplainableSpec  # noqa: E402
from explainrt.export.torch_export import export_torch  # noqa: E402

log = logging.getLogger("bench.zoo")

TOLERANCE = 1e-3
MAX_PARAMS_M = 300.0
TARGETS = (1, 7)
MIN_REFERENCE_STD = 0.01  # reference maps flatter than this would make the comparison trivial
RESULTS = Path(__file__).parent / "results" / "zoo.md"

PASS, REFUSED, FAIL, SKIPPED, NOT_RUN = "pass", "refused", "FAIL", "skipped", "not run (time)"
EXPLAINED = "differs (explained)"

_DENSENET = ("pytorch-grad-cam reads the wrong activations here: torchvision's DenseNet applies "
             "`F.relu(features, inplace=True)` to `features[-1]`'s output, and pytorch-grad-cam's hook keeps that "
             "very tensor (`.cpu()` of a CPU tensor is itself), so it weights the ReLU'd activations with the "
             "gradient of the un-ReLU'd ones. explainrt equals torch.autograd's Grad-CAM of the module's output "
             "(see the diff in the row); not a fault of explainrt")
_FLOAT32 = ("float32 noise, not a wrong map: in these 100-layer nets the Grad-CAM sum cancels 13-19x "
            "(sum |w_c A_c| / max |CAM|, measured on resnet101), so the fp32 rounding of 100 layers (activations "
            "3e-4 from a float64 run, ONNX Runtime and torch alike) moves the maps by 1e-3 to 3e-3; the row gives "
            "explainrt's and pytorch-grad-cam's distances to the float64 map, of the same order")
KNOWN: dict[str, str] = {
    **{f"torchvision/{name}": _DENSENET for name in ("densenet121", "densenet161", "densenet169", "densenet201")},
    **{f"torchvision/{name}": _FLOAT32 for name in ("resnet101", "resnet152", "resnext101_32x8d")},
}
"""Differences understood and explained (model key -> why); the report says so, the test marks them xfail."""


# -- the zoo ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One model: how to build it, its documented target layer and that layer's layout."""

    key: str  # "torchvision/resnet50", "timm/vit_tiny_patch16_224"
    build: Callable[[], torch.nn.Module]
    layer: Callable[[Any], torch.nn.Module]
    layer_name: str  # as written in pytorch-grad-cam's docs, e.g. "layer4[-1]"
    layout: str  # "nchw" | "nhwc" | "tokens": what its reshape_transform assumes
    size: int
    params_m: float | None = None  # known before building (torchvision's weight metadata)
    note: str = ""
    biases: bool = True  # redraw zero biases (see ``randomized``)
    top_classes: bool = False  # explain each image's top class instead of TARGETS


def _torchvision_layer(name: str) -> tuple[Callable[[Any], torch.nn.Module], str, str]:
    """pytorch-grad-cam's documented layer per torchvision family (README "Chosing the target layer"
    and tutorials; the closest equivalent where a family is not named there)."""
    families: list[tuple[tuple[str, ...], Callable[[Any], torch.nn.Module], str, str]] = [
        (("resnet", "resnext", "wide_resnet"), lambda m: m.layer4[-1], "layer4[-1]", "nchw"),
        (("vgg", "alexnet", "squeezenet", "densenet", "mobilenet", "efficientnet", "convnext"),
         lambda m: m.features[-1], "features[-1]", "nchw"),
        (("mnasnet",), lambda m: m.layers[-1], "layers[-1]", "nchw"),
        (("regnet",), lambda m: m.trunk_output, "trunk_output", "nchw"),
        (("vit_",), lambda m: m.encoder.layers[-1].ln_1, "encoder.layers[-1].ln_1", "tokens"),
        (("swin",), lambda m: m.features[-1][-1].norm1, "features[-1][-1].norm1", "nhwc"),
        (("maxvit",), lambda m: m.blocks[-1], "blocks[-1]", "nchw"),
        (("googlenet",), lambda m: m.inception5b, "inception5b", "nchw"),
        (("inception",), lambda m: m.Mixed_7c, "Mixed_7c", "nchw"),
        (("shufflenet",), lambda m: m.conv5, "conv5", "nchw"),
    ]
    for prefixes, layer, layer_name, layout in families:
        if name.startswith(prefixes):
            return layer, layer_name, layout
    raise KeyError(f"no documented layer for torchvision model {name!r}")


def torchvision_entries() -> list[Entry]:
    import torchvision
    from torchvision.models import get_model_weights

    entries = []
    for name in torchvision.models.list_models(module=torchvision.models):
        weights = list(get_model_weights(name))[0]
        crop = int(weights.transforms().crop_size[0])
        smallest = int(weights.meta.get("min_size", (1, 1))[0])
        # the weights' crop size; above 300 pixels 224 (or the smallest size the model takes) keeps
        # the run affordable on 2 cores
        size = crop if crop <= 300 else max(224, smallest)
        note = f"weights use {crop}x{crop}; run at {size}" if size != crop else ""
        layer, layer_name, layout = _torchvision_layer(name)
        biases, top = not name.startswith("swin_v2"), name.startswith("squeezenet")
        note = "; ".join(filter(None, [note, "" if biases else SWIN_V2_NOTE, SQUEEZENET_NOTE if top else ""]))
        entries.append(Entry(f"torchvision/{name}", _torchvision_builder(name), layer, layer_name, layout, size,
                             weights.meta["num_params"] / 1e6, note, biases, top))
    return entries


SWIN_V2_NOTE = ("zero biases kept at zero: redrawn, they make every token of the random Swin V2 alike (its "
                "spatial variation falls 20x) and every Grad-CAM map 0")


SQUEEZENET_NOTE = ("its class scores pass a ReLU: classes 1 and 7 can score 0 for both images, with a zero "
                   "gradient and a flat map, so each image's top class is explained")


def _torchvision_builder(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import torchvision

        options = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        return torchvision.models.get_model(name, weights=None, **options)
    return build


def _timm_builder(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)
    return build


# timm: one small variant per family; the documented layer as pytorch-grad-cam's tutorials (ViT,
# DeiT: blocks[-1].norm1; Swin: layers[-1].blocks[-1].norm1) or the last stage's feature map.
TIMM = [
    ("vit_tiny_patch16_224", lambda m: m.blocks[-1].norm1, "blocks[-1].norm1", "tokens", 224),
    ("deit_tiny_distilled_patch16_224", lambda m: m.blocks[-1].norm1, "blocks[-1].norm1", "tokens", 224),
    ("swin_tiny_patch4_window7_224", lambda m: m.layers[-1].blocks[-1].norm1, "layers[-1].blocks[-1].norm1",
     "nhwc", 224),
    ("convnext_atto", lambda m: m.stages[-1], "stages[-1]", "nchw", 224),
    ("efficientnet_b0", lambda m: m.bn2, "bn2", "nchw", 224),
    ("regnety_002", lambda m: m.s4, "s4", "nchw", 224),
    ("resnet18", lambda m: m.layer4[-1], "layer4[-1]", "nchw", 224),
    ("mobilenetv3_small_100", lambda m: m.blocks[-1], "blocks[-1]", "nchw", 224),
    ("maxvit_nano_rw_256", lambda m: m.stages[-1], "stages[-1]", "nchw", 256),
    ("efficientformer_l1", lambda m: m.stages[-1], "stages[-1]", "tokens", 224),
    ("efficientformerv2_s0", lambda m: m.stages[-1], "stages[-1]", "nchw", 224),
]


def timm_entries() -> list[Entry]:
    return [Entry(f"timm/{name}", _timm_builder(name), layer, layer_name, layout, size)
            for name, layer, layer_name, layout, size in TIMM]


# README-named families and a broad spread first; then the rest of torchvision, smallest first.
FIRST = [
    "torchvision/resnet50", "torchvision/vgg16", "torchvision/densenet121", "torchvision/mobilenet_v3_large",
    "torchvision/efficientnet_b0", "torchvision/regnet_y_400mf", "torchvision/vit_b_16", "torchvision/swin_t",
    "torchvision/convnext_tiny", "torchvision/mnasnet1_0", "torchvision/maxvit_t", "torchvision/resnet18",
    "timm/vit_tiny_patch16_224", "timm/deit_tiny_distilled_patch16_224", "timm/swin_tiny_patch4_window7_224",
    "timm/convnext_atto", "timm/efficientnet_b0", "timm/regnety_002", "timm/resnet18",
    "timm/mobilenetv3_small_100", "timm/maxvit_nano_rw_256", "timm/efficientformer_l1",
    "timm/efficientformerv2_s0",
    "torchvision/densenet161", "torchvision/mobilenet_v2", "torchvision/mobilenet_v3_small",
    "torchvision/googlenet", "torchvision/inception_v3", "torchvision/shufflenet_v2_x1_0",
    "torchvision/squeezenet1_1", "torchvision/alexnet", "torchvision/swin_v2_t", "torchvision/vit_b_32",
    "torchvision/regnet_x_400mf", "torchvision/resnext50_32x4d", "torchvision/efficientnet_v2_s",
    "torchvision/wide_resnet50_2",
]


def zoo() -> list[Entry]:
    """Every entry, in run order."""
    entries = {e.key: e for e in [*torchvision_entries(), *timm_entries()]}
    rest = sorted((e for k, e in entries.items() if k not in FIRST), key=lambda e: (e.params_m or 0.0, e.key))
    return [entries[k] for k in FIRST] + rest


# -- one model ----------------------------------------------------------------------------------
def randomized(model: torch.nn.Module, seed: int = 0, calibration: torch.Tensor | None = None,
               biases: bool = True) -> torch.nn.Module:
    """Random weights that make every layer matter: the builder's own init (sensible scales for deep
    nets), then every parameter its init leaves constant redrawn (zero heads as torchvision's
    ViT, zero class tokens, layer scales of 1e-6, unit norm weights, zero biases). Batch-norm
    statistics are those of the ``calibration`` images where given (one forward pass, each layer
    measured on what the layers before it produce: what training would leave), else random.
    Without calibration, a net initialised with small weights (GoogLeNet's N(0, 0.01)) shrinks
    its activations layer after layer until Grad-CAM's min-max scaling (epsilon 1e-7) flattens
    every map to 0. ``biases=False`` leaves zero biases at zero. Seeded; eval mode."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.rand(t.shape, generator=generator) * (high - low) + low

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            flat = parameter.detach().reshape(-1)
            if flat.numel() < 2 or not bool((flat == flat[0]).all()):
                continue
            value = float(flat[0])
            if abs(value - 1.0) < 1e-6:  # norm weights
                parameter.copy_(uniform(parameter, 0.5, 1.5))
            elif abs(value) < 1e-4 and (name.endswith(("gamma", "layer_scale", "scale")) or ".ls" in name):
                parameter.copy_(uniform(parameter, 0.2, 1.0))  # layer scales: 1e-6 would mute the blocks
            elif abs(value) < 1e-4 and parameter.dim() >= 2:  # zero heads, class tokens, embeddings
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / max(fan_in, 1) ** 0.5)
            elif abs(value) < 1e-4 and biases:
                parameter.copy_(uniform(parameter, -0.1, 0.1))
        norms = [m for m in model.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
        for module in norms:
            module.running_mean.copy_(uniform(module.running_mean, -0.1, 0.1))
            module.running_var.copy_(uniform(module.running_var, 0.5, 1.5))
        model.eval()
        if calibration is not None and norms:
            def measure(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                axes = [0, *range(2, inputs[0].dim())]
                module.running_mean.copy_(inputs[0].mean(dim=axes))
                module.running_var.copy_(inputs[0].var(dim=axes))
            handles = [m.register_forward_pre_hook(measure) for m in norms]
            try:
                model(calibration)
            finally:
                for handle in handles:
                    handle.remove()
    return model


def reshape_transform(layout: dict[str, Any] | str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """pytorch-grad-cam's reshape_transform for an explainrt layout (its ViT and Swin recipes)."""
    kind = layout if isinstance(layout, str) else layout["kind"]
    if kind == "nchw":
        return None
    if kind == "nhwc":
        return lambda tensor: tensor.permute(0, 3, 1, 2)
    assert isinstance(layout, dict), "a token transform needs the grid"
    (height, width), prefix = layout["grid"], layout["prefix_tokens"]

    def tokens(tensor: torch.Tensor) -> torch.Tensor:
        grid = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return grid.transpose(2, 3).transpose(1, 2)
    return tokens


@dataclass
class Row:
    key: str
    params_m: float | None = None
    size: int | None = None
    auto: str = ""  # "tensor (layout, grid) = module"
    auto_diff: float | None = None
    documented: str = ""
    documented_diff: float | None = None
    seconds: float | None = None
    status: str = NOT_RUN
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in (PASS, REFUSED, SKIPPED)


class _Logits(torch.nn.Module):
    """The logits of a model returning several outputs (pytorch-grad-cam needs a tensor)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.model(images)
        if hasattr(output, "logits"):
            return output.logits
        return output[0] if isinstance(output, (tuple, list)) else output


def reference_maps(model: torch.nn.Module, module: torch.nn.Module, transform: Any, images: np.ndarray,
                   classes: Sequence[int] = TARGETS) -> np.ndarray:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=_Logits(model), target_layers=[module], reshape_transform=transform) as cam:
        return cam(input_tensor=torch.from_numpy(images), targets=[ClassifierOutputTarget(c) for c in classes])


def autograd_maps(model: torch.nn.Module, module: torch.nn.Module, transform: Any, images: np.ndarray,
                  classes: Sequence[int] = TARGETS) -> np.ndarray:
    """Grad-CAM of ``module``'s output by torch.autograd, independent of pytorch-grad-cam's hooks: the
    output is captured and the model goes on with a copy (as explainrt's exporter does), so later
    in-place operations (densenet's ``F.relu(features, inplace=True)``) cannot change it; maps
    scaled, resized and scaled again by pytorch-grad-cam's own ``scale_cam_image``, as its
    ``GradCAM`` does."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    captured: list[torch.Tensor] = []

    def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        captured.append(output)
        return output.clone()

    handle = module.register_forward_hook(hook)
    try:
        logits = _Logits(model)(torch.from_numpy(images))
    finally:
        handle.remove()
    (gradient,) = torch.autograd.grad(logits[torch.arange(len(classes)), list(classes)].sum(), captured[0])
    as_maps = transform or (lambda t: t)
    activations, gradients = as_maps(captured[0]).detach(), as_maps(gradient)
    cams = torch.relu((gradients.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1)).numpy()
    # per layer: scaled and resized; then the layers' maps (one here) averaged and scaled again
    return scale_cam_image(np.maximum(scale_cam_image(cams, (images.shape[3], images.shape[2])), 0))


def _layout_text(layout: dict[str, Any]) -> str:
    grid = "x".join(map(str, layout["grid"]))
    prefix = f", {layout['prefix_tokens']} prefix" if layout.get("prefix_tokens") else ""
    return f"{layout['kind']} {grid}x{layout['channels']}{prefix}"


def _scopes(proto: onnx.ModelProto, tensor: str) -> list[str]:
    """Module paths (deepest first) of the exporter's name scopes on the node producing ``tensor``."""
    node = next((n for n in proto.graph.node if tensor in n.output), None)
    if node is None:
        return []
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    if scopes is None:
        return []
    import ast

    paths = [s for s in ast.literal_eval(scopes) if s.startswith("model.")]
    return [p[len("model."):] for p in reversed(paths)]


def producing_module(model: torch.nn.Module, proto: onnx.ModelProto, tensor: str, layout: dict[str, Any],
                     images: np.ndarray, activations: np.ndarray) -> tuple[str, torch.nn.Module] | None:
    """The module whose (only) call returns ``tensor``: a name scope whose output, reshaped as the layout
    says, equals the activations explainrt returns for it."""
    candidates = []
    for path in _scopes(proto, tensor):
        try:
            candidates.append((path, model.get_submodule(path)))
        except AttributeError:
            continue
    if not candidates:
        return None
    outputs: dict[int, list[torch.Tensor]] = {}

    def hook(index: int) -> Callable[..., None]:
        def record(_module: Any, _inputs: Any, output: Any) -> None:
            outputs.setdefault(index, []).append(output.detach().clone() if isinstance(output, torch.Tensor) else None)
        return record

    handles = [module.register_forward_hook(hook(i)) for i, (_, module) in enumerate(candidates)]
    try:
        with torch.no_grad():
            model(torch.from_numpy(images))
    finally:
        for handle in handles:
            handle.remove()
    transform = reshape_transform(layout) or (lambda t: t)
    scale = max(float(np.abs(activations).max()), 1e-6)
    for index, (path, module) in enumerate(candidates):
        calls = outputs.get(index, [])
        if len(calls) != 1 or calls[0] is None or calls[0].dim() not in (3, 4):
            continue
        try:
            value = transform(calls[0]).numpy()
        except RuntimeError:
            continue
        if value.shape == activations.shape and float(np.abs(value - activations).max()) <= 1e-4 * scale:
            return path, module
    return None


def _explain(proto: onnx.ModelProto, images: np.ndarray, classes: Sequence[int]) -> tuple[Explainer, np.ndarray]:
    explainer = Explainer(proto)
    maps = explainer.explain(images, targets=list(classes)).maps
    if not np.isfinite(maps).all():
        raise AssertionError("explainrt's maps are not finite")
    return explainer, maps


def _compare(row: Row, ours: np.ndarray, reference: np.ndarray, what: str) -> float:
    if not np.isfinite(reference).all():
        row.notes.append(f"{what}: pytorch-grad-cam's map is not finite")
        return float("nan")
    if float(reference.std()) < MIN_REFERENCE_STD:
        raise DegenerateReference(f"{what} layer: pytorch-grad-cam's maps are nearly constant (std "
                                  f"{reference.std():.1e}): the comparison would be trivial")
    return float(np.abs(ours - reference).max())


class DegenerateReference(AssertionError):
    """Reference maps that would match anything: the random model is at fault, not the comparison."""


def run_entry(entry: Entry, seed: int = 0) -> Row:
    """Explain one model with the automatic and the documented layer and compare with pytorch-grad-cam."""
    row = Row(entry.key, entry.params_m, entry.size, documented=entry.layer_name, notes=[entry.note] if entry.note else [])
    if entry.params_m is not None and entry.params_m > MAX_PARAMS_M:
        row.status = SKIPPED
        row.notes.append(f"{entry.params_m:.0f}M parameters > {MAX_PARAMS_M:.0f}M: too large for this run")
        return row
    for noisy in ("onnx_ir", "onnxscript"):  # one line per rewrite or deduplicated initializer
        logging.getLogger(noisy).setLevel(logging.WARNING)
    start = time.perf_counter()
    try:
        _run(entry, row, seed)
    except ExplainrtError as error:
        row.status = REFUSED
        row.notes.append(f"explainrt refused: {type(error).__name__}: {_short(str(error))}")
    except Exception as error:  # noqa: BLE001 - every failure is recorded, then reported by the test
        row.status = FAIL
        row.notes.append(f"{type(error).__name__}: {_short(str(error))}")
        log.error("%s failed:\n%s", entry.key, traceback.format_exc())
    row.seconds = time.perf_counter() - start
    if row.status == FAIL and entry.key in KNOWN:
        row.status = EXPLAINED
        row.notes.append(KNOWN[entry.key])
    gc.collect()
    return row


def _short(message: str, limit: int = 400) -> str:
    """One line of an error message: colour codes dropped; torch.export's exception summary kept."""
    import re

    plain = re.sub(r"\x1b\[[0-9;]*m", "", message)
    summary = plain.split("## Exception summary", 1)
    if len(summary) == 2:
        plain = summary[0].split(".")[0] + ": " + summary[1].strip().split("\n")[0]
    plain = " ".join(plain.split())
    return plain if len(plain) <= limit else plain[:limit] + "..."


def _run(entry: Entry, row: Row, seed: int) -> None:
    torch.manual_seed(seed)
    calibration = torch.randn(4, 3, entry.size, entry.size, generator=torch.Generator().manual_seed(seed + 2))
    model = randomized(entry.build(), seed, calibration, entry.biases)
    row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
    if row.params_m > MAX_PARAMS_M:
        row.status = SKIPPED
        row.notes.append(f"{row.params_m:.0f}M parameters > {MAX_PARAMS_M:.0f}M: too large for this run")
        return
    images = np.random.default_rng(seed + 1).standard_normal((2, 3, entry.size, entry.size)).astype(np.float32)
    documented = entry.layer(model)
    classes: Sequence[int] = TARGETS
    if entry.top_classes:
        with torch.no_grad():
            classes = [int(c) for c in _Logits(model)(torch.from_numpy(images)).argmax(dim=1)]
        row.notes.append(f"classes {classes}: each image's top class")
    tick = time.perf_counter()
    plain, (tap,) = export_torch(model, torch.from_numpy(images), [documented])
    log.info("%s: exported in %.1f s", entry.key, time.perf_counter() - tick)
    failures: list[str] = []
    refusals: list[str] = []

    # (b) the documented layer, its layout inferred
    reference = None
    try:
        doc_explainer, doc_maps = _explain(make_explainable(plain, [tap]), images, classes)
        layout = doc_explainer.spec.layouts[0]
        row.documented = f"{entry.layer_name} ({_layout_text(layout)})"
        if layout["kind"] != entry.layout:
            failures.append(f"documented layer read as {layout['kind']}, pytorch-grad-cam's recipe is {entry.layout}")
        else:
            reference = reference_maps(model, documented, reshape_transform(layout), images, classes)
            if float(reference.std()) < MIN_REFERENCE_STD:  # every map 0 for these classes: try the top ones
                with torch.no_grad():
                    ranked = _Logits(model)(torch.from_numpy(images)).argsort(dim=1, descending=True)
                for rank in range(5):
                    tried = [int(c) for c in ranked[:, rank]]
                    candidate = reference_maps(model, documented, reshape_transform(layout), images, tried)
                    if float(candidate.std()) >= MIN_REFERENCE_STD:
                        row.notes.append(f"classes {list(classes)} give all-0 maps (pytorch-grad-cam's); explained: "
                                         f"each image's top-{rank + 1} class {tried}")
                        classes, reference = tried, candidate
                        doc_maps = doc_explainer.explain(images, targets=list(classes)).maps
                        break
            row.documented_diff = _compare(row, doc_maps, reference, "documented")
            if not row.documented_diff <= TOLERANCE:
                failures.append(f"documented layer: max diff {row.documented_diff:.2e} > {TOLERANCE:g}"
                                + _autograd_note(model, documented, layout, images, doc_maps, classes, reference))
    except ExplainrtError as error:
        refusals.append(f"documented layer refused: {type(error).__name__}: {_short(str(error))}")

    # (a) the automatic layer
    try:
        auto = make_explainable(plain, "auto")
        explainer, maps = _explain(auto, images, classes)
        spec: ExplainableSpec = explainer.spec
        tensor, layout = spec.target_layers[0], spec.layouts[0]
        row.auto = f"`{tensor}` ({_layout_text(layout)})"
        activations = explainer.session.run(images, np.array(classes).reshape(-1, 1)).activations[0]
        found = (entry.layer_name, documented) if tensor == tap else producing_module(
            model, auto, tensor, layout, images, activations)
        if found is None:
            row.auto += " = module not identified"
            row.notes.append("automatic layer: no single-call module returns that tensor; not compared")
        else:
            path, module = found
            row.auto += f" = `{path}`"
            auto_reference = (reference if module is documented and reference is not None
                              else reference_maps(model, module, reshape_transform(layout), images, classes))
            row.auto_diff = _compare(row, maps, auto_reference, "automatic")
            if not row.auto_diff <= TOLERANCE:
                failures.append(f"automatic layer: max diff {row.auto_diff:.2e} > {TOLERANCE:g}"
                                + _autograd_note(model, module, layout, images, maps, classes, auto_reference))
    except ExplainrtError as error:
        refusals.append(f"automatic layer refused: {type(error).__name__}: {_short(str(error))}")
    row.notes += failures + refusals
    row.status = FAIL if failures else REFUSED if refusals else PASS


def _autograd_note(model: torch.nn.Module, module: torch.nn.Module, layout: dict[str, Any], images: np.ndarray,
                   ours: np.ndarray, classes: Sequence[int], reference: np.ndarray) -> str:
    """Where explainrt and pytorch-grad-cam differ: how far each is from torch.autograd's Grad-CAM of the
    module's output, in float32 and in float64 (the float32 noise floor of this model)."""
    import copy

    transform = reshape_transform(layout)
    try:
        diff = float(np.abs(ours - autograd_maps(model, module, transform, images, classes)).max())
        path = next(name for name, m in model.named_modules() if m is module)
        double = copy.deepcopy(model).double()
        exact = autograd_maps(double, double.get_submodule(path), transform, images.astype(np.float64), classes)
        del double
    except Exception as error:  # noqa: BLE001 - evidence only
        return f" (autograd reference failed: {type(error).__name__}: {error})"
    return (f" (vs torch.autograd Grad-CAM of the same output: {diff:.1e}; vs that map in float64: explainrt "
            f"{float(np.abs(ours - exact).max()):.1e}, pytorch-grad-cam {float(np.abs(reference - exact).max()):.1e})")


FINDINGS = [
    "## What the zoo found, and what became of it",
    "",
    "Fixed in explainrt (each with a test):",
    "",
    "- **A window partition read as a feature map (a silently wrong map).** The first run's automatic layer "
    "for `torchvision/maxvit_t` was `layer_norm_7`, the norm of block 0's grid attention: a tensor "
    "`[N, 64 windows, 49 pixels, 64]` whose sizes pass for a 64x49 channels-last grid of a 224x224 image. "
    "pytorch-grad-cam, given the same permute, agreed with it (max diff 1.1e-5): the comparison cannot see "
    "this. Every tensor axis is now labelled with the image axes it comes from (`explainrt/export/axes.py`, "
    "through Reshape, Transpose, Einsum, element-wise, window and matrix operators); a grid whose axes are not "
    "the image's rows and columns is refused when named (unless `layer_layout` is given) and never chosen "
    "automatically: `maxvit_t`'s automatic layer is now its last block's output. "
    "`tests/test_zoo_fixes.py::test_a_window_partition_shaped_like_a_feature_map_is_no_target_layer`, "
    "`::test_axis_labels_follow_reshapes_and_transposes`. `python bench/zoo.py --layer-check` exported every "
    "model here again and compared the automatic layer with and without the labels: only `maxvit_t`'s "
    "changed, and every documented layer is still accepted (`bench/results/zoo-layer-check.md`).",
    "- **MaxViT's last block had no batch axis.** ONNX shape inference loses the batch symbol through its "
    "window un-partitioning Reshape (`['unk__164', 512, 7, 7]`), so `blocks[-1]` was refused; `export_torch` "
    "now keeps the exporter's own shapes of the target modules (`explainrt/export/torch_export.py`). "
    "`tests/test_zoo_fixes.py::test_maxvit_last_block_keeps_its_batch_axis`.",
    "- **Einsum had no VJP rule** (MaxViT's attention, `torch.einsum`). Rule in `explainrt/autodiff/rules.py`: "
    "each operand's gradient is the einsum of the output's gradient with the other operands; a repeated "
    "subscript (diagonal) or one summed within a single operand is refused by name. 9 finite-difference cases "
    "in `tests/test_vjp_rules.py` (attention scores and values as torchvision exports them, implicit output, "
    "three operands, broadcast ellipsis, constant operand with dynamic batch) and a refusal test.",
    "- **ReduceL2 had no VJP rule** (Swin V2's cosine attention, `F.normalize`): `g x / y`, 0 where the norm "
    "is 0 (torch's value). 14 finite-difference cases and a zero-norm case against torch.autograd.",
    "",
    "Fixed in the zoo harness (`bench/zoo.py`), found as reference maps that were all 0 (an all-0 pair "
    "matches anything; such rows now fail as `DegenerateReference` instead of passing):",
    "",
    "- batch-norm statistics are measured on random calibration images (`randomized(calibration=...)`): "
    "with random statistics, nets initialised with small weights (GoogLeNet, ShuffleNet, MNASNet, RegNet, "
    "ResNeXt) shrank their activations until pytorch-grad-cam's `1e-7` in `scale_cam_image` flattened "
    "every map;",
    "- Swin V2 keeps its zero biases (redrawn, they make every token alike: the maps were 0);",
    "- SqueezeNet's class scores pass a ReLU: classes 1 and 7 scored 0 (zero gradient), so each image's "
    "top class is explained there; where pytorch-grad-cam's maps for classes 1 and 7 are all 0 (a random "
    "Swin V2-S/B: every pixel alike to 1%, the CAM negative everywhere), the images' top classes are tried "
    "in turn and the row names the classes used;",
    "- the torch.autograd reference used for evidence scales maps twice, as pytorch-grad-cam does.",
    "",
    "Explained, not fixed (`differs (explained)`):",
    "",
    "- the DenseNets. pytorch-grad-cam hooks `features[-1]` and keeps its output tensor, which torchvision "
    "then changes in place (`F.relu(features, inplace=True)`): it multiplies the ReLU'd activations by the "
    "gradient of the un-ReLU'd ones. explainrt's map equals torch.autograd's Grad-CAM of the module's output "
    "(the number in each row).",
    "- ResNet-101, ResNet-152, ResNeXt-101 32x8d: 1.3e-3 to 2.6e-3, float32 noise. Their Grad-CAM sums "
    "cancel 13-19x (measured on ResNet-101: sum |w_c A_c| / max |CAM|), and after 100 layers float32 "
    "activations are 3e-4 (relative) from a float64 run, in ONNX Runtime and in torch alike; the rows give "
    "each library's distance to the float64 map: explainrt 3.0e-3 / 1.5e-3 / 5.2e-4, pytorch-grad-cam "
    "1.5e-3 / 2.2e-3 / 9.0e-4. The 1e-3 tolerance is below the float32 noise floor of these nets.",
    "",
    "Refused with an explainrt error: `timm/maxvit_nano_rw_256`: `torch.onnx.export` (torch.export) itself "
    "fails on timm's `view` of a transposed tensor with a dynamic batch; nothing to explain without an ONNX "
    "graph. Skipped: the four models over 300M parameters.",
    "",
    "`module not identified` in the automatic column: the chosen tensor is made by no module called once "
    "(DenseNet's functional `F.relu` after `features`); pytorch-grad-cam can only hook modules, so that map "
    "is not compared, only recorded. Rows rerun after the main run (with the fixes above) are named below "
    "the table.",
    "",
]


# -- report -------------------------------------------------------------------------------------
def _number(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def report(rows: Sequence[Row], header: Sequence[str] = (), footer: Sequence[str] = ()) -> str:
    counts = {status: sum(r.status == status for r in rows)
              for status in (PASS, REFUSED, EXPLAINED, FAIL, SKIPPED, NOT_RUN)}
    lines = [
        "# Zoo coverage: explainrt Grad-CAM against pytorch-grad-cam",
        "",
        *header,
        "",
        "Summary: " + ", ".join(f"{count} {status}" for status, count in counts.items()) + f" (of {len(rows)}).",
        "",
        *FINDINGS,
        "## Models",
        "",
        "| model | params (M) | input | automatic layer (tensor, layout, module) | max diff auto | documented layer "
        "(layout) | max diff documented | seconds | status | notes |",
        "|---|---:|---:|---|---:|---|---:|---:|---|---|",
    ]
    for r in rows:
        notes = "; ".join(n.replace("|", "\\|").replace("\n", " ") for n in r.notes)
        lines.append(f"| {r.key} | {_number(r.params_m, '.1f')} | {r.size or ''} | {r.auto} | "
                     f"{_number(r.auto_diff, '.1e')} | {r.documented} | {_number(r.documented_diff, '.1e')} | "
                     f"{_number(r.seconds, '.0f')} | {r.status} | {notes} |")
    return "\n".join([*lines, "", *footer]) + "\n"


def read_report(text: str) -> list[Row]:
    """The rows of a report this module wrote (to update some rows and keep the others)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 10 or "/" not in cells[0] or cells[0] == "model":
            continue
        key, params, size, auto, auto_diff, documented, doc_diff, seconds, status, notes = cells

        def number(value: str) -> float | None:
            return float(value) if value else None
        row = Row(key, number(params), int(size) if size else None, auto, number(auto_diff), documented,
                  number(doc_diff), number(seconds), status, [notes.replace("\\|", "|")] if notes else [])
        if row.status == FAIL and key in KNOWN:  # explained since it ran: the row's numbers are its evidence
            row.status = EXPLAINED
            row.notes.append(KNOWN[key])
        rows.append(row)
    return rows


def layer_check(entry: Entry, seed: int = 0) -> str:
    """Whether the axis labels (``explainrt.export.axes``) change this model's automatic layer or refuse its
    documented one: one export, no maps."""
    from explainrt.export import layers

    torch.manual_seed(seed)
    model = randomized(entry.build(), seed)
    documented = entry.layer(model)
    plain, (tap,) = export_torch(model, torch.zeros(1, 3, entry.size, entry.size), [documented])
    found = []
    real = layers.axis_labels
    try:
        for name, labelled in (("labels", True), ("no labels", False)):
            layers.axis_labels = real if labelled else (lambda *args, **kwargs: {})
            try:
                spec = ExplainableSpec.from_model(make_explainable(plain, "auto"))
                found.append(f"{spec.target_layers[0]} {_layout_text(spec.layouts[0])}")
            except ExplainrtError as error:
                found.append(f"refused: {type(error).__name__}: {_short(str(error), 200)}")
        layers.axis_labels = real
        try:
            make_explainable(plain, [tap])
            documented_text = "documented accepted"
        except ExplainrtError as error:
            documented_text = f"documented refused: {_short(str(error), 200)}"
    finally:
        layers.axis_labels = real
    same = "auto unchanged" if found[0] == found[1] else f"auto CHANGED: {found[1]} -> {found[0]}"
    return f"{entry.key}: {same} ({found[0]}); {documented_text}"


LAYER_CHECK = Path(__file__).parent / "results" / "zoo-layer-check.md"


def layer_check_report(lines: Sequence[str]) -> str:
    changed = [line for line in lines if "auto unchanged" not in line or "documented accepted" not in line]
    return "\n".join([
        "# Zoo: does the axis-label check change any target layer?",
        "",
        "`python bench/zoo.py --layer-check`: each model exported once with its documented layer (random weights, "
        "its zoo input size); the automatic layer chosen with and without `explainrt.export.axes` labels, and "
        "the documented layer made explainable with them.",
        "",
        f"{len(lines)} models; {len(lines) - len(changed)} with the automatic layer unchanged and the documented "
        "layer accepted. The others:",
        "",
        *[f"- {line}" for line in changed],
        "",
        "All:",
        "",
        *[f"- {line}" for line in lines],
    ]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated keys (default: the whole zoo)")
    parser.add_argument("--budget-s", type=float, default=4500.0, help="models not started by then: not run (time)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--layer-check", action="store_true",
                        help="only: does the axis-label check change the automatic layer or refuse the documented one?")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    entries = zoo()
    if args.models:
        wanted = args.models.split(",")
        entries = [e for e in entries if e.key in wanted or e.key.split("/")[1] in wanted]
    if args.layer_check:
        for noisy in ("onnx_ir", "onnxscript"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        lines = []
        for entry in entries:
            if entry.params_m is not None and entry.params_m > MAX_PARAMS_M:
                continue
            try:
                lines.append(layer_check(entry))
            except Exception as error:  # noqa: BLE001 - a line per model, whatever happens
                lines.append(f"{entry.key}: check failed: {type(error).__name__}: {_short(str(error), 200)}")
            print(lines[-1], flush=True)
        LAYER_CHECK.write_text(layer_check_report(lines))
        return
    start = time.perf_counter()
    rows = []
    for entry in entries:
        if time.perf_counter() - start > args.budget_s:
            rows.append(Row(entry.key, entry.params_m, entry.size, documented=entry.layer_name))
            continue
        rows.append(run_entry(entry))
        log.info("%s: %s", entry.key, rows[-1].status)
        args.out.write_text(report(rows))
    args.out.write_text(report(rows))


if __name__ == "__main__":
    main()
