"""The reference backend: the original PyTorch module with hooks and autograd (CPU or CUDA).

It needs no ONNX export: its spec comes from one probe forward pass, so models ONNX cannot
express still explain."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from explainrt.errors import BackendUnavailableError, InvalidInputError, InvalidModelError, UnknownLayerError
from explainrt.export.layouts import Layout, LayoutRequest, shape_layout
from explainrt.export.spec import BOX_OBJECTIVES, OBJECTIVES, WEIGHTED_BOX_OBJECTIVES, ExplainableSpec
from explainrt.runtime.base import RunResult, parse_device


@dataclass(frozen=True)
class ModuleSource:
    """What the torch backend runs: a module, its target modules, an example input to probe it with,
    and the preprocessing JSON to report in the spec."""

    module: Any
    target_modules: tuple[Any, ...]
    example: Any
    preprocessing: str | None = None
    output: str | int | None = None  # which of the model's outputs holds the logits (see model_output)
    layouts: tuple[LayoutRequest, ...] = ()  # per target module; () : infer every layout


class TorchSession:
    """The reference backend: the original PyTorch module with hooks and autograd."""

    def __init__(self, module: object, target_modules: Sequence[object], spec: ExplainableSpec,
                 device: str = "cpu", output: str | int | None = None) -> None:
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
        self.output = output
        self.layouts = [Layout.from_json(fields) for fields in spec.layouts]
        self.spec = spec
        self.input_shape = ("N", None, None, None)

    @classmethod
    def probed(cls, source: ModuleSource, device: str = "cpu") -> TorchSession:
        """A session whose spec (layer names, class count) comes from one forward pass of the example,
        which also checks that every target module is a sub-module producing [N, C, h, w]."""
        module, target_modules, example = source.module, source.target_modules, source.example
        names = {id(m): name for name, m in module.named_modules()}
        unknown = [m for m in target_modules if id(m) not in names]
        if unknown:
            raise UnknownLayerError(f"target layer {type(unknown[0]).__name__} is not a sub-module of the model")
        layer_names = tuple(names[id(m)] or type(m).__name__ for m in target_modules)
        spec = ExplainableSpec("input", "logits", 0, layer_names, source.preprocessing)
        session = cls(module, target_modules, spec, device, source.output)
        with session._torch.no_grad():
            logits, activations = session._forward(session._tensor(example))
        if logits.ndim < 2:
            raise InvalidModelError(f"the explained output must be [N, classes] or [N, classes, ...], got shape "
                                    f"{tuple(logits.shape)}")
        requests = source.layouts or (LayoutRequest(),) * len(layer_names)
        votes = session._layout_votes(session._tensor(example))
        layouts = []
        for name, acts, request, vote in zip(layer_names, activations, requests, votes, strict=True):
            if acts is None or not hasattr(acts, "shape"):
                raise UnknownLayerError(f"target layer {name!r} must output one tensor [N, C, h, w], [N, h, w, C] or "
                                        f"tokens [N, T, D] in the forward pass, got {type(acts).__name__}")
            layouts.append(shape_layout(name, tuple(acts.shape), tuple(example.shape[2:]), vote, request))
        session.layouts = layouts
        session.spec = dataclasses.replace(spec, num_classes=int(logits.shape[1]),
                                           layouts=tuple(layout.to_json() for layout in layouts),
                                           output_shape=tuple(int(d) for d in logits.shape[1:]))
        return session

    def _layout_votes(self, images: Any) -> list[set[str]]:
        """What each target module implies about its output's layout (PyTorch's twin of the graph's votes):
        its own type (a LayerNorm: channels-last; a convolution, batch norm or pooling: NCHW), else,
        for element-wise modules, the type of the module whose output it took."""
        nn = self._torch.nn
        made_by: dict[int, tuple[Any, Any]] = {}  # id(tensor) -> (module, tensor), the tensor kept alive
        inputs: dict[int, int] = {}

        def record(module: Any, args: Any, output: Any) -> None:
            if isinstance(output, self._torch.Tensor):
                made_by[id(output)] = (module, output)
            if id(module) in targets and args and isinstance(args[0], self._torch.Tensor):
                inputs[id(module)] = id(args[0])

        targets = {id(m) for m in self.targets}
        handles = [m.register_forward_hook(record) for m in self.module.modules()]  # type: ignore[attr-defined]
        try:
            with self._torch.no_grad():
                self.module(images)  # type: ignore[operator]
        finally:
            for handle in handles:
                handle.remove()
        votes = []
        for target in self.targets:
            vote = _module_vote(nn, target)
            producer = made_by.get(inputs.get(id(target), -1), (None, None))[0]
            votes.append({vote} if vote else {_module_vote(nn, producer)} - {None} if producer is not None else set())
        return votes

    def _forward(self, images: object, replace: dict[int, object] | None = None) -> tuple[object, list[object]]:
        captured: dict[int, object] = {}

        def hook(index: int):  # noqa: ANN202
            def capture(_module, _inputs, output):  # noqa: ANN001, ANN202
                if replace is not None and index in replace:
                    output = from_maps(replace[index], output, self.layouts[index])
                captured[index] = output
                # the model goes on with a copy: an in-place op after the layer (DenseNet's
                # F.relu(features, inplace=True)) must not change the captured activations
                return output.clone()
            return capture

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(self.targets)]  # type: ignore[attr-defined]
        try:
            logits = self._logits_of(self.module(images))  # type: ignore[operator]
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
            given = tuple(map(self._tensor, targets)) if isinstance(targets, tuple) else self._tensor(targets)
            per_seed, resolved = self._objectives(logits, given, objective, wrt)
        layouts = [None] if of_input else self.layouts
        gradients = [to_maps(torch.stack([g[i] for g in per_seed], dim=1), layout, 2).cpu().numpy()
                     for i, layout in enumerate(layouts)]
        activations = [to_maps(w.detach(), layout, 1).cpu().numpy() for w, layout in zip(wrt, layouts)]
        return RunResult(logits.detach().cpu().numpy(), resolved.cpu().numpy(), activations, gradients)

    def _objectives(self, logits: Any, targets: Any, objective: str, wrt: list[Any]) -> tuple[list[Any], Any]:
        """Per seed k, the gradients of its objective w.r.t. ``wrt``, and the resolved class targets."""
        torch = self._torch
        if objective == "weights":  # targets: weights [N, K, *output]
            resolved = torch.full(tuple(targets.shape[:2]), -1, dtype=torch.int64)
            return [torch.autograd.grad((logits * targets[:, k]).sum(), wrt, retain_graph=True)
                    for k in range(targets.shape[1])], resolved
        if objective in WEIGHTED_BOX_OBJECTIVES:  # targets: (weights [N, K, *output], boxes [N, K, B, 6])
            weights, boxes = targets
            n, k, b = boxes.shape[:3]
            scores, matches = self._box_scores(logits, boxes.reshape(n, k * b, 6), BOX_OBJECTIVES[objective])
            totals = scores.reshape(n, k, b).sum(dim=2) + (logits[:, None] * weights).flatten(2).sum(dim=2)
            return [torch.autograd.grad(totals[:, j].sum(), wrt, retain_graph=True) for j in range(k)], \
                matches.reshape(n, k, b)
        if objective in BOX_OBJECTIVES:  # targets: boxes [N, K, 6]; resolved: each box's matched predictions
            scores, matches = self._box_scores(logits, targets, BOX_OBJECTIVES[objective])
            return [torch.autograd.grad(scores[:, j].sum(), wrt, retain_graph=True)
                    for j in range(scores.shape[1])], matches
        if objective != "logit" and logits.ndim != 2:
            raise InvalidInputError(f"objective {objective!r} needs an output [N, classes], got {tuple(logits.shape)}")
        summed = logits.detach().flatten(2).sum(dim=2) if logits.ndim > 2 else logits.detach()
        order = torch.argsort(summed, dim=1, descending=True)
        by_rank = torch.gather(order, 1, (-targets - 1).clamp(min=0))
        resolved = torch.where(targets < 0, by_rank, targets)
        rows = torch.arange(logits.shape[0], device=self.device)
        scores = {"logit": lambda: logits.flatten(2).sum(dim=2) if logits.ndim > 2 else logits,
                  "cross_entropy": lambda: -torch.log_softmax(logits, dim=1),
                  "probability": lambda: torch.softmax(logits, dim=1)}[objective]()
        return [torch.autograd.grad(scores[rows, resolved[:, k]].sum(), wrt, retain_graph=True)
                for k in range(resolved.shape[1])], resolved

    def _box_scores(self, logits: Any, boxes: Any, layout: str) -> tuple[Any, Any]:
        """Per box k [N, K]: its class score summed over the predictions it matched (IoU of their box with
        boxes[:, k, :4] >= boxes[:, k, 5], decided on this forward pass; differentiable in the scores), and the
        match counts [N, K]."""
        torch = self._torch
        if logits.ndim != 3:
            raise InvalidInputError(f"a box objective needs a raw detector output of rank 3, got {tuple(logits.shape)}")
        fields = logits if layout == "yolov8" else logits.transpose(1, 2)  # [N, F, A]
        with torch.no_grad():
            cx, cy, w, h = (fields[:, i, None, :] for i in range(4))  # [N, 1, A]
            bx1, by1, bx2, by2, _, threshold = (boxes[:, :, i, None] for i in range(6))  # [N, K, 1]
            across = (torch.minimum(cx + w * 0.5, bx2) - torch.maximum(cx - w * 0.5, bx1)).clamp(min=0)
            down = (torch.minimum(cy + h * 0.5, by2) - torch.maximum(cy - h * 0.5, by1)).clamp(min=0)
            inter = across * down
            union = (w * h).abs() + (bx2 - bx1) * (by2 - by1) - inter
            mask = (inter / union.clamp(min=1e-12) >= threshold).to(fields.dtype)  # [N, K, A]
        classes = boxes[:, :, 4].long()
        first = 4 if layout == "yolov8" else 5
        per_box = []
        for k in range(boxes.shape[1]):
            index = (classes[:, k] + first)[:, None, None].expand(-1, 1, fields.shape[2])
            scores = fields.gather(1, index)[:, 0]  # [N, A]
            if layout == "yolov5":
                scores = scores * fields[:, 4]
            per_box.append((mask[:, k] * scores).sum(dim=1))
        return torch.stack(per_box, dim=1), mask.sum(dim=2).long()

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
            return self._logits_of(self.module(self._tensor(images))).cpu().numpy()  # type: ignore[operator]

    def _logits_of(self, value: Any) -> Any:
        from explainrt.export.torch_export import model_output  # imports torch: only once a module runs

        return model_output(value, self.output)

    def head(self, layer: int, activations: np.ndarray, images: np.ndarray) -> np.ndarray:
        repeated = np.repeat(images, activations.shape[0] // images.shape[0], axis=0)
        with self._torch.no_grad():
            logits, _ = self._forward(self._tensor(repeated), {layer: self._tensor(activations)})
        return logits.cpu().numpy()  # type: ignore[attr-defined]


def to_maps(x: Any, layout: Layout | None, leading: int) -> Any:
    """A target's tensor ([*lead, N, ...], ``leading`` axes up to N) as [*lead, N, C, h, w]: the
    torch twin of ``explainrt.export.layouts.to_nchw`` (None: the model input, kept as it is)."""
    if layout is None or layout.kind == "nchw":
        return x
    if layout.kind == "tokens":
        x = x[(slice(None),) * leading + (slice(layout.prefix_tokens, None),)]
        x = x.reshape(*x.shape[:leading], *layout.grid, layout.channels)
    return x.movedim(-1, leading)


def from_maps(maps: Any, original: Any, layout: Layout) -> Any:
    """The inverse of ``to_maps`` for a replaced activation [N, C, h, w]; prefix tokens come from ``original``."""
    if layout.kind == "nchw":
        return maps
    channels_last = maps.movedim(1, -1)
    if layout.kind == "nhwc":
        return channels_last
    tokens = channels_last.reshape(maps.shape[0], -1, layout.channels)
    prefix = original[:, :layout.prefix_tokens].expand(maps.shape[0], -1, -1)
    import torch

    return torch.cat([prefix, tokens], dim=1)


def _module_vote(nn: Any, module: Any) -> str | None:
    """The layout a module's output has by its type: LayerNorm over one axis normalises channels-last
    maps; convolutions, batch norms and pooling produce NCHW; a Sequential has its last module's."""
    if isinstance(module, nn.Sequential) and len(module):
        return _module_vote(nn, module[-1])
    if isinstance(module, nn.LayerNorm):
        return "nhwc" if len(module.normalized_shape) == 1 else None
    nchw = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.pooling._MaxPoolNd,
            nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.GroupNorm,
            nn.modules.instancenorm._InstanceNorm)
    return "nchw" if isinstance(module, nchw) else None
