"""Latency of explainrt's Grad-CAM against plain inference, pytorch-grad-cam and Captum, on the CPU.

Run from the repository root (a few minutes):

    python bench/latency.py [--runs 20] [--models resnet50,default] [--batches 1,8] [--out bench/results/latency.md]

Models (``--models``, comma-separated keys): ``resnet50`` (torchvision ResNet-50, random init with a
fixed seed: no weights can be downloaded; the timing does not depend on the weights), ``default``
(the shipped EfficientNet-Lite0 with ImageNet weights), ``fcn_resnet50`` (torchvision segmentation,
random init, ``backbone.layer4``, explained with a ``Region`` target: class 1 over the centre
quarter) and ``yolov8n`` (Ultralytics YOLOv8n built from its yaml, random init, the raw head
[N, 84, 8400] at 640x640, ``model.15`` (the P3 features), explained with a ``Box`` target: the box
and class of the top P3 prediction, IoU >= 0.5; pytorch-grad-cam is given the same objective as a
callable target), and the transformers and their kin,
torchvision ``vit_b_16`` (tokens at ``encoder.layers[-1].ln_1``), ``swin_t`` (channels-last at
``features[-1][-1].norm1``) and ``convnext_tiny`` (``features[-1]``), with every parameter their
init leaves constant redrawn (``bench.zoo.randomized``: ViT's head starts at zero, and maps of a
constant model would compare nothing). 224x224 inputs, one random batch per batch size, the same
tensor for every contender:

- ``ort plain``: ONNX Runtime on the plain exported model, with explainrt's session options;
- ``explainrt gradcam``: ``Explainer(model, [layer]).explain(images, method="gradcam")``, end to end, given
  the NumPy array plain ONNX Runtime is given (a torch tensor costs a conversion first)
  (one runtime call: the Explainer puts Grad-CAM's map head into its session's model, so the
  runtime returns the logits and the maps at 224x224 in [0, 1]);
- ``explainrt head alone``: the same with ``map_heads=()``: the model's call, then Grad-CAM's head as
  a small model of its own in a second call (what an Explainer does for a closed-form method whose
  head is not in its call; Grad-CAM's path before the head joined the call);
- ``explainrt python path``: the same with ``map_heads=False``: the runtime returns activations and
  gradients, and the weights, weighted sum, resize and normalisation run in Python (the kernels);
- ``explainrt runtime``: only that runtime call, ``explainer.session.maps(x, targets, "gradcam")``
  (``explainrt gradcam`` minus it is explainrt's Python overhead; with target objects,
  ``explainer.session.run`` of the objective: its gradients, without the map head or skipped scales);
- ``pytorch-grad-cam``: ``GradCAM(model=..., target_layers=[layer])(input_tensor=x, targets=None)``,
  with its ViT or Swin ``reshape_transform`` for token and channels-last layers;
- ``captum``: ``LayerGradCam(model, layer).attribute(x, target)`` + ``LayerAttribution.interpolate``
  to 224x224 (bilinear), what a Captum user needs for an input-sized map (feature-map layers only:
  Captum has no reshape for token or channels-last layers);
- ``torch eager``: ``with torch.no_grad(): model(x)``.

Preprocessing is outside both sides: every contender is given the same preprocessed float32 batch
(explainrt's ``prepare`` only checks it: shape, dtype, finite values), as plain ONNX Runtime is.

Contenders are interleaved round-robin per repetition (see ``bench.common.interleaved``).
Progress is logged to stderr; the markdown report goes to ``--out`` and the table to stdout.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    Contender,
    PairedRatio,
    Stats,
    header_lines,
    interleaved,
    load_average,
    markdown_table,
    physical_cores,
    setup_logging,
    thread_environment,
    usable_cpus,
)
from explainrt import kernels  # noqa: E402
from explainrt.explainer import Explainer  # noqa: E402
from explainrt.export.torch_export import export_torch  # noqa: E402

log = logging.getLogger("bench.latency")
DEFAULT_OUT = Path(__file__).parent / "results" / "latency.md"

SIZE = 224
PLAIN = "ort plain"
EXPLAINRT = "explainrt gradcam"
HEAD_ALONE = "explainrt head alone"
PYTHON_PATH = "explainrt python path"
RUNTIME = "explainrt runtime"
GRAD_CAM = "pytorch-grad-cam"
CAPTUM = "captum"
EAGER = "torch eager"
CONTENDERS = (PLAIN, EXPLAINRT, HEAD_ALONE, PYTHON_PATH, RUNTIME, GRAD_CAM, CAPTUM, EAGER)
STAGES = ("preprocess", "runtime", "method", "maps")
TARGET_RATIO = 1.05  # issue 2, section 9: explainrt Grad-CAM <= 1.05x plain inference
TRANSFORMER_TARGET_RATIO = 1.10  # the transformers and their kin: <= 1.10x
RESNET50_TARGET_RATIO = 1.03  # issue 16: ResNet-50's Grad-CAM with its map head <= 1.03x
TARGET_SPEEDUP = 5.0  # ... and >= 5x faster than pytorch-grad-cam


@dataclass(frozen=True)
class Model:
    key: str
    title: str
    module: torch.nn.Module
    target: torch.nn.Module
    target_name: str
    layout: str = "nchw"  # of the target layer: "nchw", "nhwc" or "tokens" (ViT: 14x14 + CLS)
    target_ratio: float = TARGET_RATIO
    size: int = SIZE  # input height and width
    objective: Callable[[torch.nn.Module, torch.Tensor], Objective] | None = None  # None: the top class


@dataclass(frozen=True)
class Objective:
    """What every contender explains when it is not the top class: explainrt's target objects, the same
    objective as pytorch-grad-cam targets (and the module it is given), and explainrt's runtime call alone."""

    targets: list[Any]
    grad_cam_targets: list[Any]
    grad_cam_module: torch.nn.Module
    runtime_feed: np.ndarray
    runtime_objective: str


# key: (torchvision builder, target layer path, its layout)
TRANSFORMERS = {
    "vit_b_16": ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1", "tokens"),
    "swin_t": ("swin_t", "features.7.1.norm1", "nhwc"),
    "convnext_tiny": ("convnext_tiny", "features.7", "nchw"),
}
TARGET_MODELS = ("fcn_resnet50", "yolov8n")
MODELS = ("resnet50", "default", *TRANSFORMERS, *TARGET_MODELS)


def reshape_transform(layout: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """pytorch-grad-cam's recipes: ViT tokens (CLS dropped) and Swin channels-last to [N, C, h, w]."""
    if layout == "tokens":
        return lambda t: t[:, 1:, :].reshape(t.size(0), 14, 14, t.size(2)).permute(0, 3, 1, 2)
    if layout == "nhwc":
        return lambda t: t.permute(0, 3, 1, 2)
    return None


def load_model(key: str, seed: int) -> Model:
    if key in TRANSFORMERS:
        import torchvision

        from bench.zoo import randomized

        builder, target, layout = TRANSFORMERS[key]
        torch.manual_seed(seed)
        module = randomized(torchvision.models.get_model(builder, weights=None), seed)
        return Model(key, f"{builder} (torchvision, random init with constant parameters redrawn, seed {seed})",
                     module, module.get_submodule(target), target, layout, TRANSFORMER_TARGET_RATIO)
    if key == "resnet50":
        import torchvision

        torch.manual_seed(seed)
        module = torchvision.models.resnet50(weights=None).eval()
        return Model(key, f"ResNet-50 (torchvision, random init, seed {seed})", module, module.layer4, "layer4",
                     target_ratio=RESNET50_TARGET_RATIO)
    if key == "default":
        from explainrt.models.default import DEFAULT_TARGET_MODULE
        from explainrt.models.default_torch import default_target_module, load_default_torch_model

        module = load_default_torch_model()
        return Model(key, "EfficientNet-Lite0 (explainrt default, ImageNet weights)", module,
                     default_target_module(module), DEFAULT_TARGET_MODULE)
    if key == "fcn_resnet50":
        import torchvision

        torch.manual_seed(seed)
        module = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None).eval()
        return Model(key, f"FCN-ResNet50 (torchvision, random init, seed {seed}), Region target", module,
                     module.backbone.layer4, "backbone.layer4", target_ratio=TRANSFORMER_TARGET_RATIO,
                     objective=region_objective)
    if key == "yolov8n":
        module = yolov8n(seed)
        return Model(key, f"YOLOv8n (Ultralytics yaml, random init, seed {seed}), Box target", module,
                     module.model[15], "model.15", target_ratio=TRANSFORMER_TARGET_RATIO, size=640,
                     objective=box_objective)
    raise SystemExit(f"unknown model {key!r}: choose from {', '.join(MODELS)}")


class _SegmentationOut(torch.nn.Module):
    """A segmentation model's "out" tensor: what pytorch-grad-cam's SemanticSegmentationTarget reads."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def region_objective(module: torch.nn.Module, x: torch.Tensor) -> Objective:
    """Class 1's scores over the centre quarter of the image (pytorch-grad-cam's SemanticSegmentationTarget)."""
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    from explainrt.targets import Region

    size = x.shape[2]
    mask = np.zeros((size, size), np.float32)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    weights = np.zeros((x.shape[0], 1, 21, size, size), np.float32)
    weights[:, 0, 1] = mask
    return Objective([Region(1, mask)] * x.shape[0], [SemanticSegmentationTarget(1, mask)] * x.shape[0],
                     _SegmentationOut(module), weights, "weights")


def yolov8n(seed: int) -> torch.nn.Module:
    """YOLOv8n from its yaml, returning the raw head [N, 84, anchors] as exported; convolutions re-drawn so
    that class scores vary (PyTorch's init fades the signal over 22 blocks) and untrained class biases zeroed."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    model = DetectionModel("yolov8n.yaml", verbose=False).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.weight.requires_grad:
            torch.nn.init.normal_(module.weight, std=(2.7 / module.weight[0].numel()) ** 0.5)
        if type(module).__name__ == "Detect":
            module.export, module.format = True, "onnx"
            for branch in module.cv3:
                torch.nn.init.zeros_(branch[-1].bias)
    return model


def box_objective(module: torch.nn.Module, x: torch.Tensor) -> Objective:
    """Per image, the box and class of its most confident P3 prediction, IoU >= 0.5 (explainrt's Box; for
    pytorch-grad-cam the same predictions' class scores summed, as a callable target)."""
    from explainrt.targets import Box

    with torch.no_grad():
        out = module(x).numpy()
    p3 = (x.shape[2] // 8) ** 2
    targets, callables, boxes = [], [], []
    for head in out:
        anchor, class_index = np.unravel_index(np.argmax(head[4:, :p3].T), (p3, head.shape[0] - 4))
        cx, cy, w, h = head[:4, anchor]
        box = np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, x.shape[2]).tolist()
        target = Box(box, int(class_index), iou=0.5)
        chosen = torch.from_numpy(target._overlapping(head))
        targets.append(target)
        callables.append(lambda output, c=int(class_index), m=chosen: output[4 + c, m].sum())
        boxes.append([[*box, float(class_index), 0.5]])
    return Objective(targets, callables, module, np.asarray(boxes, np.float32), "boxes_yolov8")


def plain_session(model: Model) -> ort.InferenceSession:
    """The original exported model in ONNX Runtime, with the options OnnxRuntimeSession._session uses."""
    copied = copy.deepcopy(model.module)  # an export may leave traced tensors cached on it (YOLO's anchors)
    proto, _ = export_torch(copied, torch.zeros(1, 3, model.size, model.size), [copied.get_submodule(model.target_name)])
    options = ort.SessionOptions()
    options.log_severity_level = 3  # as explainrt; intra-op threads left at ORT's default, as explainrt
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


@dataclass
class Case:
    """One model at one batch size: the timings, and explainrt's own per-stage timings."""

    model: Model
    batch: int
    stats: dict[str, Stats]
    stages: dict[str, Stats]
    paired: dict[str, PairedRatio]  # each contender's time over plain ORT's in the same round


def contenders(model: Model, explainer: Explainer, head_alone: Explainer, python_path: Explainer,
               plain: ort.InferenceSession, x: torch.Tensor, stage_log: list[dict[str, float]]) -> list[Contender]:
    from captum.attr import LayerAttribution, LayerGradCam
    from pytorch_grad_cam import GradCAM

    images = x.numpy()  # shares memory with x
    plain_input = plain.get_inputs()[0].name
    objective = model.objective(model.module, x) if model.objective else None
    targets = objective.targets if objective else None  # explainrt: None = the most likely class
    runtime_feed = objective.runtime_feed if objective else np.full((x.shape[0], 1), -1, dtype=np.int64)
    runtime_objective = objective.runtime_objective if objective else "logit"
    with torch.no_grad():
        predicted = None if objective else model.module(x).argmax(dim=1)
    # pytorch-grad-cam's hooks stay on the model it is given: give it a copy of its own, so that
    # they do not run inside the other contenders' forward passes.
    grad_cam_model = copy.deepcopy(objective.grad_cam_module if objective else model.module)
    prefix = "model." if isinstance(grad_cam_model, _SegmentationOut) else ""  # the wrapper's own attribute
    grad_cam_layer = grad_cam_model.get_submodule(prefix + model.target_name)
    grad_cam = GradCAM(model=grad_cam_model, target_layers=[grad_cam_layer], reshape_transform=reshape_transform(model.layout))
    grad_cam_targets = objective.grad_cam_targets if objective else None
    captum = LayerGradCam(model.module, model.target)

    def run_explainrt() -> object:
        explanation = explainer.explain(images, method="gradcam", targets=targets)
        stage_log.append(explanation.timings)
        return explanation

    def run_captum() -> object:
        # The target must be known up front: a Captum user has it from an earlier prediction
        # (not timed here; explainrt and pytorch-grad-cam find the top class themselves).
        attribution = captum.attribute(x, target=predicted, relu_attributions=True)
        return LayerAttribution.interpolate(attribution, (SIZE, SIZE), interpolate_mode="bilinear")

    def run_eager() -> object:
        with torch.no_grad():
            return model.module(x)

    runs: dict[str, Callable[[], object]] = {
        PLAIN: lambda: plain.run(None, {plain_input: images}),
        EXPLAINRT: run_explainrt,
        HEAD_ALONE: lambda: head_alone.explain(images, method="gradcam", targets=targets),
        PYTHON_PATH: lambda: python_path.explain(images, method="gradcam", targets=targets),
        # the call Grad-CAM makes: its maps in one call for class targets; the objective's gradients for target objects
        RUNTIME: (lambda: explainer.session.run(images, runtime_feed, runtime_objective)) if objective else (
            lambda: explainer.session.maps(images, runtime_feed, "gradcam")),  # type: ignore[attr-defined]
        GRAD_CAM: lambda: grad_cam(input_tensor=x, targets=grad_cam_targets),
        CAPTUM: run_captum,
        EAGER: run_eager,
    }
    check(explainer, python_path, grad_cam, x, predicted, targets, grad_cam_targets)
    return [Contender(name, runs[name]) for name in contender_names(model)]


def contender_names(model: Model) -> tuple[str, ...]:
    """Captum's LayerGradCam has no reshape for token or channels-last layers (feature maps only) and explains
    a class index of an [N, classes] output (no region or box objective)."""
    return CONTENDERS if model.layout == "nchw" and not model.objective else tuple(n for n in CONTENDERS if n != CAPTUM)


def check(explainer: Explainer, python_path: Explainer, grad_cam: object, x: torch.Tensor,
          predicted: torch.Tensor | None, targets: list[Any] | None = None, grad_cam_targets: list[Any] | None = None) -> None:
    """Everyone explains the same class (or objective) and the maps agree: the contenders do the same work."""
    ours = explainer.explain(x, method="gradcam", targets=targets)
    python = python_path.explain(x, method="gradcam", targets=targets)
    theirs = grad_cam(input_tensor=x, targets=grad_cam_targets)  # type: ignore[operator]
    if predicted is not None and not np.array_equal(ours.targets, predicted.numpy()):
        log.warning("explainrt explains classes %s, torch predicts %s", ours.targets.tolist(), predicted.tolist())
    log.info("  maps %s; max |explainrt - pytorch-grad-cam| = %.2e, max |map head - Python path| = %.2e",
             ours.maps.shape, float(np.abs(ours.maps - theirs).max()), float(np.abs(ours.maps - python.maps).max()))


def bench_model(key: str, batches: list[int], runs: int, warmup: int, pause_s: float, seed: int) -> list[Case]:
    model = load_model(key, seed)
    log.info("%s: exporting the plain and the explainable ONNX models", model.title)
    plain = plain_session(model)
    exported = copy.deepcopy(model.module)  # the eager contenders keep a module no export has traced
    explainer = Explainer(exported, [exported.get_submodule(model.target_name)], input_size=(model.size, model.size))
    # the same explainable model (the session's model stays without the head it added), no re-export
    head_alone = Explainer(explainer.session.model, map_heads=())
    python_path = Explainer(explainer.session.model, map_heads=False)
    cases = []
    for batch in batches:
        generator = torch.Generator().manual_seed(seed + batch)
        x = torch.randn(batch, 3, model.size, model.size, generator=generator)
        if model.key == "yolov8n":  # pixels in [0, 1], as YOLO takes them
            x = torch.rand(batch, 3, model.size, model.size, generator=generator)
        stage_log: list[dict[str, float]] = []
        entries = contenders(model, explainer, head_alone, python_path, plain, x, stage_log)
        log.info("%s, batch %d: %d warm-up + %d timed rounds of %d contenders", model.key, batch, warmup, runs, len(entries))
        times = interleaved(entries, runs, warmup, pause_s)
        timed = stage_log[-runs:]
        # the map head's explanations have no "method" stage (it runs in the graph)
        stages = {name: Stats.of([t.get(name, 0.0) for t in timed]) for name in (*STAGES, "total")}
        names = contender_names(model)
        cases.append(Case(model, batch, {name: Stats.of(times[name]) for name in names}, stages,
                          {name: PairedRatio.of(times[name], times[PLAIN]) for name in names}))
    return cases


# -- where the time goes: ONNX Runtime's profile of the explainable model ---------------------------
@dataclass
class Profile:
    """Per-node time in ONNX Runtime of the model the Explainer's Grad-CAM call runs (the explainable model's
    maps-only copy with the Grad-CAM head), median over runs of the summed node times."""

    model: str
    batch: int
    plain_ms: float  # the plain exported model's nodes
    forward_ms: float  # the explainable model's own nodes (as ORT fused them)
    gradient_ms: float  # nodes explainrt added (named explainrt/...)
    top: list[tuple[str, float]]  # the costliest added nodes, grouped by the forward operator they differentiate


def _node_events(proto: object, feeds: dict[str, np.ndarray], runs: int) -> list[dict]:
    """ONNX Runtime's per-node kernel events of ``runs + 2`` calls (explainrt's session options plus profiling)."""
    import json
    import os
    import tempfile

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="explainrt-profile-"), "ort")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    for _ in range(runs + 2):
        session.run(None, feeds)
    with open(session.end_profiling()) as handle:
        return [e for e in json.load(handle) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def _per_run(events: list[dict]) -> list[list[dict]]:
    """Node events split into runs (each starts with the model's first node), the first two (warm-up) dropped."""
    names = [e["name"] for e in events]
    starts = [i for i, name in enumerate(names) if names and name == names[0]]
    return [events[start:stop] for start, stop in zip(starts[2:], [*starts[3:], len(events)])]


def profile_case(model: Model, batch: int, runs: int, seed: int) -> Profile:
    """Profile ``runs`` calls of the plain model and of the model the Explainer's Grad-CAM call runs."""
    from explainrt.export.explainable import make_explainable, shallow_target_ranking
    from explainrt.export.torch_export import LOGITS_OUTPUT
    from explainrt.runtime.base import maps_session_model

    plain, taps = export_torch(model.module, torch.zeros(1, 3, SIZE, SIZE), [model.target])
    # what the Explainer's one Grad-CAM call runs: the maps-only copy with the Grad-CAM head
    proto = shallow_target_ranking(maps_session_model(make_explainable(plain, taps, logits=LOGITS_OUTPUT), ["gradcam"],
                                                      ["gradcam"]))
    x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed + batch)).numpy()
    plain_runs = _per_run(_node_events(plain, {"input": x}, runs))
    plain_ms = float(np.median([sum(e["dur"] for e in run) / 1e3 for run in plain_runs]))
    events = _node_events(proto, {"input": x, "explainrt.targets": np.full((batch, 1), -1, dtype=np.int64)}, runs)
    per_run: dict[str, list[float]] = {"forward": [], "gradient": []}
    groups: dict[str, list[float]] = {}
    for run in _per_run(events):
        totals = {"forward": 0.0, "gradient": 0.0}
        run_groups: dict[str, float] = {}
        for event in run:
            name = event["name"][: -len("_kernel_time")]
            added = name.startswith("explainrt/")
            totals["gradient" if added else "forward"] += event["dur"] / 1e3
            if added:
                parts = name.split("/")
                key = f"{event['args'].get('op_name', '?')} for {parts[2] if len(parts) > 3 else parts[1]}"
                run_groups[key] = run_groups.get(key, 0.0) + event["dur"] / 1e3
        for part, value in totals.items():
            per_run[part].append(value)
        for key, value in run_groups.items():
            groups.setdefault(key, []).append(value)
    top = sorted(((k, float(np.median(v))) for k, v in groups.items()), key=lambda kv: -kv[1])[:6]
    return Profile(model.key, batch, plain_ms, float(np.median(per_run["forward"])),
                   float(np.median(per_run["gradient"])), top)


def profile_table(profiles: list[Profile]) -> list[str]:
    rows = [[p.model, p.batch, f"{p.plain_ms:.1f}", f"{p.forward_ms:.1f}", f"{p.gradient_ms:.1f}",
             f"{(p.forward_ms + p.gradient_ms) / max(p.plain_ms, 1e-9):.2f}x",
             "; ".join(f"{name} {ms:.2f}" for name, ms in p.top)] for p in profiles]
    return markdown_table(["model", "batch", "plain model nodes ms", "its own nodes ms", "added nodes ms",
                           "explainable / plain", "costliest added nodes (op for forward node: ms)"], rows,
                          [False, True, True, True, True, True, False])


# -- report -------------------------------------------------------------------------------------
def results_table(cases: list[Case]) -> list[str]:
    rows = []
    for case in cases:
        base = case.stats[PLAIN].median_ms
        for name in CONTENDERS:
            if name not in case.stats:
                rows.append([case.model.key, case.batch, name, "n/a", "n/a", "n/a", "n/a"])
                continue
            s, paired = case.stats[name], case.paired[name]
            rows.append([case.model.key, case.batch, name, f"{s.median_ms:.1f}", f"{s.p90_ms:.1f}", f"{s.median_ms / base:.2f}x",
                         f"{paired.median:.2f}x ({paired.p10:.2f}-{paired.p90:.2f})"])
    return markdown_table(["model", "batch", "contender", "median ms", "p90 ms", "vs ort plain (median)",
                           "per round vs ort plain: median (p10-p90)"], rows, [False, True, False, True, True, True, True])


def stages_table(cases: list[Case]) -> list[str]:
    rows = []
    for case in cases:
        wall = case.stats[EXPLAINRT].median_ms
        st = case.stages
        rows.append([case.model.key, case.batch, *(f"{st[name].median_ms:.2f}" for name in STAGES),
                     f"{st['total'].median_ms:.2f}", f"{wall:.2f}", f"{wall - st['total'].median_ms:.2f}"])
    return markdown_table(["model", "batch", *STAGES, "total (timings)", "wall (explain)", "outside timings"], rows,
                          [False, *[True] * 8])


def verdicts(cases: list[Case]) -> list[str]:
    lines = []
    for case in cases:
        plain, ours, theirs = (case.stats[n].median_ms for n in (PLAIN, EXPLAINRT, GRAD_CAM))
        ratio, speedup = ours / plain, theirs / ours
        target, paired = case.model.target_ratio, case.paired[EXPLAINRT]
        lines.append(
            f"- {case.model.key}, batch {case.batch}: explainrt Grad-CAM = {ratio:.2f}x plain ORT inference "
            f"(target <= {target:.2f}x): **{'MET' if ratio <= target else 'NOT MET'}** (per round: median "
            f"{paired.median:.2f}x, {paired.p10:.2f}-{paired.p90:.2f}x from the 10th to the 90th percentile); "
            f"{speedup:.1f}x faster than pytorch-grad-cam (target >= {TARGET_SPEEDUP:.0f}x): "
            f"**{'MET' if speedup >= TARGET_SPEEDUP else 'NOT MET'}**"
        )
    return lines


def kernel_backend() -> str:
    """The backend kernels.cam_maps picks ("auto") for host arrays."""
    return "cpp" if "cpp" in kernels.available_backends() else "numpy"


def report(cases: list[Case], args: argparse.Namespace, threads: int, load: tuple[str, str],
           profiles: list[Profile] | None = None) -> tuple[list[str], list[str]]:
    titles = sorted({f"`{c.model.key}` = {c.model.title}, target layer `{c.model.target_name}` ({c.model.layout}), "
                     f"target <= {c.model.target_ratio:.2f}x plain ORT" for c in cases})
    yolo_input = "; YOLOv8n: [N, 3, 640, 640] in [0, 1]" if any(c.model.key == "yolov8n" for c in cases) else ""
    notes = [
        *titles,
        f"Input: random float32 [N, 3, {SIZE}, {SIZE}] (fixed seed{yolo_input}), the same values "
        "for every contender: one NumPy array for plain ONNX Runtime and explainrt, its torch view for the torch "
        "contenders; CPU only.",
        f"Threads: torch.set_num_threads({threads}); ONNX Runtime intra-op threads at its default "
        f"(one per physical core = {physical_cores()}), the same for plain ORT and explainrt's session. "
        f"Thread environment: {thread_environment()}. explainrt kernels: `{kernel_backend()}` backend.",
        f"Load average (1/5/15 min) at start {load[0]}, at end {load[1]}: above {usable_cpus()} means other "
        "processes shared the cores (see bench/README.md on what that does to OpenMP code).",
        f"Timing: {args.warmup} warm-up rounds, then {args.runs} rounds; each round runs every contender once "
        f"(round-robin, rotated start), after a gc.collect() and a {args.pause_ms:g} ms pause (not timed). "
        "`vs ort plain (median)`: the ratio of the two medians (the targets' verdicts); `per round`: each round's "
        "time over plain ORT's in that round (a slow spell of the machine that spans a round cancels out).",
        "Captum is given the predicted class (computed beforehand, not timed); explainrt and "
        "pytorch-grad-cam find the top class themselves. Captum: `relu_attributions=True`, bilinear "
        "interpolation; it does not min-max normalise, the others do.",
    ]
    table = results_table(cases)
    lines = [
        *header_lines("Latency: explainrt Grad-CAM vs plain inference, pytorch-grad-cam, Captum", (
            "torch", "torchvision", "onnxruntime", "explainrt", "grad-cam", "captum", "numpy"), notes),
        "",
        "## Results",
        "",
        *table,
        "",
        "## Where explainrt's time goes (median ms of `Explanation.timings` stages)",
        "",
        *stages_table(cases),
        "",
        "## Targets (issue 2, section 9; issue 16: ResNet-50 <= 1.03x with the map head)",
        "",
        *verdicts(cases),
        "",
    ]
    if profiles:
        lines += [
            "## Where the explainable model's time goes (ONNX Runtime profile, median per call)",
            "",
            "Sum of node kernel times (no scheduling or copies): of the plain exported model; of the "
            "explainable model's own nodes, as ONNX Runtime fused them; of the nodes explainrt added (named "
            "`explainrt/...`: the targets, the seed, the gradient graph, the Grad-CAM map head, in the maps-only "
            "copy the Explainer's Grad-CAM call runs), the costliest grouped by "
            "operator and the forward node they differentiate. Profiling runs after the timed rounds, "
            "separately.",
            "",
            *profile_table(profiles),
            "",
        ]
    lines += [
        f"Command: `python bench/latency.py --runs {args.runs} --warmup {args.warmup} --models {args.models} "
        f"--batches {args.batches} --pause-ms {args.pause_ms:g}{' --profile' if profiles else ''}"
        f"{' --out ' + str(args.out) if args.out != DEFAULT_OUT else ''}`",
    ]
    return lines, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed rounds (>= 20 for the report)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (>= 3)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--pause-ms", type=float, default=20.0, help="untimed sleep before each call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--profile", action="store_true",
                        help="then profile the model of the Explainer's Grad-CAM call in ONNX Runtime (forward vs added nodes)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")
    setup_logging()
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one line per deduplicated initializer
    threads = usable_cpus()
    torch.set_num_threads(threads)
    if physical_cores() not in (None, threads):
        log.warning("ONNX Runtime uses %s threads (one per physical core) but torch %d (nproc): explainrt's "
                    "session takes no thread setting", physical_cores(), threads)
    batches = [int(b) for b in args.batches.split(",")]
    start_load = load_average()
    log.info("load average at start: %s", start_load)
    cases = []
    for key in args.models.split(","):
        cases += bench_model(key.strip(), batches, args.runs, args.warmup, args.pause_ms / 1e3, args.seed)
    end_load = load_average()
    log.info("load average at end: %s", end_load)
    profiles = []
    if args.profile:
        for case in cases:
            log.info("%s, batch %d: ONNX Runtime profile", case.model.key, case.batch)
            profiles.append(profile_case(case.model, case.batch, max(args.runs // 2, 5), args.seed))
    lines, table = report(cases, args, threads, (start_load, end_load), profiles)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)
    print("\n".join(table + [""] + verdicts(cases)))


if __name__ == "__main__":
    main()
