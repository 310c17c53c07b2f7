"""Target-layer layouts: feature maps ``[N, C, h, w]``, channels-last ``[N, h, w, C]`` and tokens ``[N, T, D]``.

Every method works on ``[N, C, h, w]``; a channels-last or token layer is reshaped to it inside
the explainable graph (prefix tokens such as CLS, distillation or register tokens are dropped,
as pytorch-grad-cam's ``reshape_transform`` does), so every runtime returns ordinary
activations and gradients. The layout is told from the graph (what consumes and produces the
tensor) and checked against the sizes (a grid must scale like the image); where it cannot be
told, the error asks for ``layer_layout``: never a guess.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import onnx

from explainrt.autodiff.builder import Dim, GraphBuilder, TensorInfo
from explainrt.errors import UnknownLayerError
from explainrt.export import axes

LAYOUTS = ("nchw", "nhwc", "tokens")
MAX_PREFIX_TOKENS = 8
"""Most prefix tokens looked for when inferring a token grid (CLS, distillation, up to 6 registers)."""

_NCHW_OPERATORS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                   "BatchNormalization", "InstanceNormalization", "LpPool", "Resize", "Upsample"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Relu", "Clip", "Sigmoid", "HardSwish", "HardSigmoid", "Gelu", "Erf",
                "Identity", "Dropout", "LeakyRelu", "Tanh", "Neg", "Cast"}


@dataclass(frozen=True)
class Layout:
    """How a target tensor maps to ``[N, C, h, w]``."""

    kind: str  # "nchw" | "nhwc" | "tokens"
    grid: tuple[int, int]  # (h, w)
    channels: int
    prefix_tokens: int = 0  # tokens before the grid's, dropped (tokens only)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "grid": list(self.grid)}

    @classmethod
    def from_json(cls, fields: Mapping[str, Any]) -> Layout:
        return cls(fields["kind"], tuple(fields["grid"]), fields["channels"], fields.get("prefix_tokens", 0))


@dataclass(frozen=True)
class LayoutRequest:
    """What the user said about one target layer's layout (each None: infer it)."""

    layout: str | None = None
    token_grid: tuple[int, int] | None = None
    prefix_tokens: int | None = None


def requests(count: int, layer_layout: str | Sequence[str] | None, token_grid: Any,
             prefix_tokens: int | Sequence[int] | None) -> list[LayoutRequest]:
    """One request per target layer from arguments given once for all layers or once per layer."""
    layouts = _per_layer(count, layer_layout, "layer_layout", lambda v: isinstance(v, str))
    grids = _per_layer(count, token_grid, "token_grid", lambda v: _is_pair(v))
    prefixes = _per_layer(count, prefix_tokens, "prefix_tokens", lambda v: isinstance(v, int))
    for layout in layouts:
        if layout is not None and layout not in LAYOUTS:
            raise UnknownLayerError(f"layer_layout must be one of {LAYOUTS}, got {layout!r}")
    for prefix in prefixes:
        if prefix is not None and (isinstance(prefix, bool) or prefix < 0):
            raise UnknownLayerError(f"prefix_tokens must be an integer >= 0, got {prefix!r}")
    for grid in grids:
        if grid is not None and not all(isinstance(v, int) and v > 0 for v in grid):
            raise UnknownLayerError(f"token_grid must be two positive integers (h, w), got {grid!r}")
    return [LayoutRequest(layout, tuple(grid) if grid is not None else None, prefix)
            for layout, grid, prefix in zip(layouts, grids, prefixes)]


def _is_pair(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value)


def _per_layer(count: int, value: Any, name: str, is_one: Any) -> list[Any]:
    if value is None or is_one(value):
        return [value] * count
    values = list(value)
    if len(values) != count or not all(v is None or is_one(v) for v in values):
        raise UnknownLayerError(f"{name} must be one value for all {count} target layers or one per layer, "
                                f"got {value!r}")
    return values


def token_layout(name: str, tokens: int, channels: int, image: tuple[Dim, Dim], request: LayoutRequest) -> Layout:
    """The grid of ``tokens`` patch tokens (after prefix tokens) for an image of size ``image``."""
    height, width = image
    if request.token_grid is not None:
        h, w = request.token_grid
        prefix = tokens - h * w
        if prefix < 0 or (request.prefix_tokens is not None and request.prefix_tokens != prefix):
            raise UnknownLayerError(f"target layer {name!r} has {tokens} tokens: token_grid {request.token_grid} "
                                    f"with prefix_tokens {request.prefix_tokens} does not add up")
        return Layout("tokens", (h, w), channels, prefix)
    if not (isinstance(height, int) and isinstance(width, int)):
        raise UnknownLayerError(f"target layer {name!r} holds {tokens} tokens but the image size is dynamic: "
                                "give token_grid=(h, w) (and prefix_tokens)")
    prefixes = [request.prefix_tokens] if request.prefix_tokens is not None else range(MAX_PREFIX_TOKENS + 1)
    found = [(prefix, grid) for prefix in prefixes if tokens - prefix > 0
             for grid in [_grid_like(tokens - prefix, height, width)] if grid is not None]
    if len(found) != 1:
        options = ", ".join(f"{p} prefix + {g[0]}x{g[1]}" for p, g in found) or "none"
        raise UnknownLayerError(f"target layer {name!r} holds {tokens} tokens; which form a grid shaped like the "
                                f"{height}x{width} image cannot be told (candidates: {options}): give "
                                "token_grid=(h, w) and prefix_tokens=k")
    prefix, grid = found[0]
    return Layout("tokens", grid, channels, prefix)


def _grid_like(count: int, height: int, width: int) -> tuple[int, int] | None:
    """(h, w) with h * w = count and h : w = height : width, each dividing the image's side, if any."""
    for h in range(1, count + 1):
        if count % h == 0:
            w = count // h
            if h * width == w * height and height % h == 0 and width % w == 0:
                return h, w
    return None


def spatial_layout(name: str, shape: Sequence[Dim], image: tuple[Dim, Dim], votes: set[str],
                   request: LayoutRequest) -> Layout:
    """NCHW or NHWC for a rank-4 tensor: as requested, else from the graph's votes checked against the sizes."""
    as_nchw = Layout("nchw", (shape[2], shape[3]), shape[1]) if isinstance(shape[1], int) else None  # type: ignore[arg-type]
    as_nhwc = Layout("nhwc", (shape[1], shape[2]), shape[3]) if isinstance(shape[3], int) else None  # type: ignore[arg-type]
    candidates = {"nchw": as_nchw, "nhwc": as_nhwc}
    if request.layout is not None:
        chosen = candidates[request.layout] if request.layout in candidates else None
        if chosen is None or not _static_grid(chosen):
            raise UnknownLayerError(f"target layer {name!r} of shape {list(shape)} cannot be read as "
                                    f"{request.layout!r} (its channels and grid must be static)")
        return chosen
    consistent = {kind for kind, layout in candidates.items()
                  if layout is not None and _static_grid(layout) and _scales_like(layout.grid, image)}
    told = votes & consistent if votes else consistent
    if len(votes) > 1 or len(told) != 1:
        why = (f"the graph uses it both ways ({', '.join(sorted(votes))})" if len(votes) > 1 else
               "neither reading has a grid that scales like the image" if not told else
               "both readings fit its sizes and the graph does not tell")
        raise UnknownLayerError(f"target layer {name!r} of shape {list(shape)}: whether it is [N, C, h, w] or "
                                f"[N, h, w, C] cannot be told ({why}): give layer_layout='nchw' or 'nhwc'")
    return candidates[told.pop()]  # type: ignore[return-value]


def _static_grid(layout: Layout) -> bool:
    return all(isinstance(v, int) and v > 0 for v in (*layout.grid, layout.channels))


def _scales_like(grid: tuple[int, int], image: tuple[Dim, Dim]) -> bool:
    """Whether a grid is a downscaled image: same stride along both axes (within rounding), no larger than it.
    Dynamic image sizes accept any grid."""
    height, width = image
    if not (isinstance(height, int) and isinstance(width, int)):
        return True
    h, w = grid
    if h > height or w > width:
        return False
    return abs(height / h - width / w) <= 0.25 * max(height / h, width / w)


def graph_votes(graph: onnx.GraphProto, tensor: str, depth: int = 4) -> set[str]:
    """Layouts the operators around ``tensor`` imply (through element-wise operators, ``depth`` steps)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
        for value in node.output:
            producers[value] = node
    votes: set[str] = set()
    seen = {tensor}
    frontier = [tensor]
    for _ in range(depth):
        following = []
        for value in frontier:
            for node in consumers.get(value, []):
                vote = _vote(node, consumes=True)
                if vote:
                    votes.add(vote)
                elif node.op_type in _ELEMENTWISE:
                    following += [o for o in node.output if o not in seen]
            producer = producers.get(value)
            if producer is not None:
                vote = _vote(producer, consumes=False)
                if vote:
                    votes.add(vote)
                elif producer.op_type in _ELEMENTWISE:
                    following += [i for i in producer.input if i and i not in seen]
        seen.update(following)
        frontier = following
    return votes


def _perm(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _axis(node: onnx.NodeProto, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), default)


_TRANSPOSED_TO = {(0, 3, 1, 2): "nchw", (0, 2, 3, 1): "nhwc"}
"""Transpose permutations that change the layout, and the layout of their output."""


def _vote(node: onnx.NodeProto, consumes: bool) -> str | None:
    """The layout ``node`` implies for the tensor it consumes (``consumes``) or produces."""
    if node.op_type in _NCHW_OPERATORS and (consumes or node.op_type not in ("Resize", "Upsample")):
        return "nchw"
    if node.op_type == "LayerNormalization":
        return "nhwc" if _axis(node, -1) in (-1, 3) else None
    if node.op_type == "Transpose":
        made = _TRANSPOSED_TO.get(tuple(_perm(node)))
        return {"nchw": "nhwc", "nhwc": "nchw"}.get(made) if consumes else made  # type: ignore[arg-type]
    return None


def layout_of(graph: onnx.GraphProto, name: str, info: TensorInfo, image: tuple[Dim, Dim], batch: Dim,
              request: LayoutRequest, labels: Mapping[str, axes.Labels] | None = None) -> Layout:
    """The layout of target tensor ``name``, or UnknownLayerError saying why it is no target layer.
    ``labels`` (``axes.axis_labels``): where known, an inferred grid's axes must be the image's rows and
    columns (a ``layer_layout`` given by the user is taken as said)."""
    shape = info.shape
    if shape is None or not info.is_float or len(shape) not in (3, 4):
        raise UnknownLayerError(f"target layer {name!r} must be a float tensor [N, C, h, w], [N, h, w, C] or "
                                f"tokens [N, T, D], got {'shape ' + str(list(shape)) if shape else 'no known shape'}")
    if not _is_batch(shape[0], batch):
        raise UnknownLayerError(f"target layer {name!r} of shape {list(shape)} does not have the image batch on axis 0")
    votes = graph_votes(graph, name) if len(shape) == 4 and request.layout is None else set()
    layout = shape_layout(name, shape, image, votes, request)
    known = (labels or {}).get(name)
    if layout.kind in ("nchw", "nhwc") and known is not None and request.layout is None:
        rows, columns = (known[2], known[3]) if layout.kind == "nchw" else (known[1], known[2])
        mixed = [f"{what} from {'/'.join(sorted({a.origin or 'channels' for a in label}))}"
                 for what, label, origin in (("rows", rows, "H"), ("columns", columns, "W"))
                 if any(atom.origin != origin for atom in label)]
        if mixed:
            raise UnknownLayerError(f"target layer {name!r} of shape {list(shape)} read as {layout.kind}: its grid "
                                    f"axes are not the image's rows and columns ({', '.join(mixed)}; a window "
                                    "partition?): its maps would be wrong (layer_layout= overrides this)")
    return layout


def shape_layout(name: str, shape: Sequence[Dim], image: tuple[Dim, Dim], votes: set[str],
                 request: LayoutRequest) -> Layout:
    """The layout of a target of ``shape`` (batch first) for an image of size ``image``; ``votes``: what
    the graph around it implies (none where no graph is known, e.g. a hooked PyTorch module)."""
    if len(shape) not in (3, 4):
        raise UnknownLayerError(f"target layer {name!r} must output [N, C, h, w], [N, h, w, C] or tokens [N, T, D], "
                                f"got shape {list(shape)}")
    if len(shape) == 3:
        if request.layout not in (None, "tokens"):
            raise UnknownLayerError(f"target layer {name!r} of shape {list(shape)} has rank 3: only "
                                    "layer_layout='tokens' applies")
        tokens, channels = shape[1], shape[2]
        if not (isinstance(tokens, int) and isinstance(channels, int)):
            raise UnknownLayerError(f"target layer {name!r} of shape {list(shape)} needs static token and channel counts")
        return token_layout(name, tokens, channels, image, request)
    if request.layout == "tokens":
        raise UnknownLayerError(f"target layer {name!r} of shape {list(shape)} has rank 4: tokens are [N, T, D]")
    if request.token_grid is not None or request.prefix_tokens is not None:
        raise UnknownLayerError(f"token_grid and prefix_tokens apply to token layers [N, T, D], not {name!r} "
                                f"of shape {list(shape)}")
    return spatial_layout(name, shape, image, votes, request)


def _is_batch(dim: Dim, batch: Dim) -> bool:
    """Whether a tensor's first axis is the image batch: the same symbol or static size; where the
    batch has no name, any axis that is not a fixed size."""
    return dim == batch if batch is not None else not isinstance(dim, int)


def to_nchw(b: GraphBuilder, x: str, layout: Layout, leading: int) -> str:
    """``x`` ([*lead, N, ...] with ``leading`` axes up to and including N) as [*lead, N, C, h, w], in the graph."""
    if layout.kind == "nchw":
        return x
    lead = list(range(leading))
    if layout.kind == "nhwc":
        return b.op("Transpose", [x], perm=[*lead, leading + 2, leading, leading + 1])
    if layout.prefix_tokens:
        x = b.op("Slice", [x, b.ints([layout.prefix_tokens]), b.ints([2 ** 62]), b.ints([leading])])
    grid = b.op("Reshape", [x, b.ints([0] * leading + [*layout.grid, layout.channels])])
    return b.op("Transpose", [grid], perm=[*lead, leading + 2, leading, leading + 1])
