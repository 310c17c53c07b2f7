"""Which image axes each tensor's axes come from: a target layer's grid must be the image's rows and columns.

A window partition (MaxViT's ``[N, windows, pixels, C]``) can have the very shape of a
channels-last feature map (``[N, 4, 4, C]`` for 4 windows of 4 pixels) while its axes mix rows
and columns: read as ``[N, h, w, C]`` its maps would be silently wrong. So every axis is labelled,
from the image input forward, with the image axes it was made from: atoms of origin ``"N"``,
``"H"``, ``"W"`` (or ``""``: channels, features, anything else), split and merged by Reshape and
moved by Transpose. An axis is a grid axis of rows only when all its atoms come from ``"H"``;
where the graph holds an operator this module does not know, labels are unknown and nothing is
concluded (the layout checks on shapes still apply).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx
from onnx import helper, numpy_helper

from explainrt.autodiff.builder import Dim, TensorInfo

_ids = itertools.count()


@dataclass(frozen=True)
class Atom:
    """A run of one image axis (or of something else) inside a tensor axis."""

    origin: str  # "N", "H", "W", or "" (channels, features, mixed)
    size: int | None  # None: dynamic (the batch)
    parent: Atom | None = None  # the atom this one is a part of
    index: int = 0  # which part of the parent (0: the major one)
    parts: int = 1  # how many parts the parent was split into
    uid: int = field(default_factory=lambda: next(_ids))


Label = tuple[Atom, ...]  # one tensor axis: its atoms, major first (() for a size-1 axis)
Labels = tuple[Label, ...]


def fresh(origin: str, size: Dim) -> Label:
    return () if size == 1 else (Atom(origin, size if isinstance(size, int) else None),)


def origin_of(label: Label) -> str | None:
    """The one origin of a label's atoms; None when it mixes origins."""
    origins = {atom.origin for atom in label}
    return origins.pop() if len(origins) == 1 else None


def _collapse(label: Label) -> Label:
    """Parts of one atom, all present and in order, become that atom again."""
    atoms = list(label)
    changed = True
    while changed:
        changed = False
        for start, atom in enumerate(atoms):
            parent = atom.parent
            if parent is None or atom.index != 0:
                continue
            run = atoms[start:start + atom.parts]
            if len(run) == atom.parts and all(a.parent is parent and a.index == i for i, a in enumerate(run)):
                atoms[start:start + atom.parts] = [parent]
                changed = True
                break
    return tuple(atoms)


def _split(atom: Atom, major: int) -> tuple[Atom, Atom]:
    assert atom.size is not None
    return (Atom(atom.origin, major, atom, 0, 2), Atom(atom.origin, atom.size // major, atom, 1, 2))


def _joined(major: Atom, minor: Atom) -> Atom:
    """Two neighbouring atoms as one: their parent where they are all of it, else a new atom of their
    common origin ("" where they mix origins)."""
    whole = _collapse((major, minor))
    if len(whole) == 1:
        return whole[0]
    origins = {major.origin, minor.origin}
    return Atom(origins.pop() if len(origins) == 1 else "", major.size * minor.size)  # type: ignore[operator]


def reshaped(labels: Labels, shape: Sequence[Dim]) -> Labels | None:
    """Labels of a tensor reshaped to ``shape``: atoms are regrouped (split where a size needs it) in
    order; None where the sizes do not line up or more than one axis is dynamic."""
    flat = [atom for label in labels for atom in label if atom.size != 1]
    out: list[Label] = []
    for axis, dim in enumerate(shape):
        if dim == 1:
            out.append(())
            continue
        taken: list[Atom] = []
        if not isinstance(dim, int):
            rest = shape[axis + 1:]
            if not all(isinstance(d, int) for d in rest):
                return None
            needed = math.prod(rest)  # type: ignore[arg-type]
            if flat and flat[0].size is None:
                taken.append(flat.pop(0))
            while flat and all(a.size is not None for a in flat) and math.prod(a.size for a in flat) > needed:  # type: ignore[misc]
                taken.append(flat.pop(0))
            if not taken:
                return None
        else:
            need = dim
            while need > 1:
                if not flat or flat[0].size is None:
                    return None
                atom = flat[0]
                if need % atom.size == 0:  # type: ignore[operator]
                    taken.append(flat.pop(0))
                    need //= atom.size  # type: ignore[operator]
                elif atom.size % need == 0:  # type: ignore[operator]
                    major, flat[0] = _split(atom, need)
                    taken.append(major)
                    need = 1
                elif len(flat) > 1 and flat[1].size is not None:  # regrouped differently: (8, 7) -> (7, 8)
                    flat[0:2] = [_joined(atom, flat[1])]
                else:
                    return None
        out.append(_collapse(tuple(taken)))
    return tuple(out) if not flat else None


def merged(labels: Sequence[Label | None], size: Dim) -> Label:
    """One axis of an element-wise result from its operands' (None: a constant or unknown)."""
    known = [label for label in labels if label is not None and label != ()]
    if not known:
        return fresh("", size)
    if all(label == known[0] for label in known):
        return known[0]
    origins = {origin_of(label) for label in known}
    return fresh(origins.pop() or "", size) if len(origins) == 1 else fresh("", size)


_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Relu", "LeakyRelu", "Clip",
    "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Abs", "Neg", "Softplus",
    "Erf", "Gelu", "Mish", "Identity", "Dropout", "Cast", "BatchNormalization", "LayerNormalization", "Softmax",
    "LogSoftmax", "Equal", "Greater", "Less", "Not", "And", "Or", "Sign", "Floor", "Ceil", "Round",
}
_WINDOWS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "Resize", "Upsample"}
_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def axis_labels(graph: onnx.GraphProto, infos: Mapping[str, TensorInfo], image: str) -> dict[str, Labels]:
    """Labels of every tensor reached from ``image`` [N, C, H, W] whose labels can be told."""
    shape = infos[image].shape or (None, None, None, None)
    labels: dict[str, Labels] = {image: (fresh("N", shape[0]), fresh("", shape[1]), fresh("H", shape[2]),
                                         fresh("W", shape[3]))}
    constants = {t.name for t in graph.initializer}
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
        if all(i in constants for i in node.input if i):
            constants.update(node.output)
            continue
        if not any(i in labels for i in node.input):
            continue
        try:
            result = _propagate(node, labels, infos, constants, values)
        except (KeyError, IndexError, ValueError, TypeError, AssertionError):
            result = None
        if result is not None:
            for output, value in zip(node.output, result):
                if value is not None and output:
                    labels[output] = value
    return labels


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _shape(infos: Mapping[str, TensorInfo], name: str) -> tuple[Dim, ...]:
    shape = infos[name].shape
    if shape is None:
        raise KeyError(name)
    return shape


def _propagate(node: onnx.NodeProto, labels: Mapping[str, Labels], infos: Mapping[str, TensorInfo],
               constants: set[str], values: Mapping[str, object]) -> list[Labels | None] | None:
    op = node.op_type
    first = labels.get(node.input[0]) if node.input else None
    if op in _ELEMENTWISE:
        out = _shape(infos, node.output[0])
        # an operand of unknown labels is passed over: a known one of full size tells how the
        # result is indexed (a window partition stays one after adding anything to it)
        operands = [(labels[i], _shape(infos, i)) for i in node.input if i and i in labels]
        rank = len(out)
        result = []
        for axis in range(rank):
            at = []
            for label, shape in operands:
                position = axis - rank + len(shape)
                if position >= 0 and shape[position] != 1:
                    at.append(label[position])  # type: ignore[index]
            result.append(merged(at, out[axis]))
        return [tuple(result)]
    if first is None:
        return None
    if op in _RESHAPES:
        out = reshaped(first, _shape(infos, node.output[0]))
        return None if out is None else [out]
    if op == "Transpose":
        perm = _attr(node, "perm") or list(reversed(range(len(first))))
        return [tuple(first[p] for p in perm)]  # type: ignore[union-attr]
    if op in _WINDOWS:  # an axis of unchanged size keeps its indexing (a 1x1 or same-padded window)
        out, source = _shape(infos, node.output[0]), _shape(infos, node.input[0])
        spatial = [first[a] if out[a] == source[a] else fresh(origin_of(first[a]) or "", out[a])
                   for a in range(2, len(out))]
        return [(first[0], fresh("", out[1]), *spatial)]
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        return [(first[0], first[1], *[() for _ in first[2:]])]
    if op.startswith("Reduce"):
        return _reduced(node, first, values)
    if op in ("Slice", "Pad"):
        return [_resized(first, _shape(infos, node.input[0]), _shape(infos, node.output[0]))]
    if op == "Split":
        source = _shape(infos, node.input[0])
        return [_resized(first, source, _shape(infos, o)) for o in node.output]
    if op == "Concat":
        return _concatenated(node, labels, infos)
    if op == "MatMul":
        return _matmul(node, labels, infos, constants)
    if op == "Einsum":
        return _einsum(node, labels)
    if op == "Gemm":
        a = labels.get(node.input[0])
        if a is None or len(a) != 2:
            return None
        return [(a[1] if _attr(node, "transA", 0) else a[0], fresh("", _shape(infos, node.output[0])[1]))]
    if op == "Gather":
        axis = int(_attr(node, "axis", 0)) % len(first)  # type: ignore[arg-type]
        indices = _shape(infos, node.input[1])
        return [(*first[:axis], *[fresh("", d) for d in indices], *first[axis + 1:])]
    if op == "Expand":
        out = _shape(infos, node.output[0])
        source = _shape(infos, node.input[0])
        lead = len(out) - len(source)
        return [tuple(first[a - lead] if a >= lead and source[a - lead] == d else fresh("", d)
                      for a, d in enumerate(out))]
    return None


def _einsum(node: onnx.NodeProto, labels: Mapping[str, Labels]) -> list[Labels | None] | None:
    """Each output subscript takes its axis from an operand that has it (an explicit output, no ellipsis)."""
    value = _attr(node, "equation", b"")
    equation = (value.decode() if isinstance(value, bytes) else str(value)).replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    if not arrow or "." in equation:
        return None
    found: dict[str, Label] = {}
    for term, name in zip(inputs.split(","), node.input):
        known = labels.get(name)
        if known is not None and len(known) == len(term):
            for letter, label in zip(term, known):
                found.setdefault(letter, label)
    if not all(letter in found for letter in output):
        return None
    return [tuple(found[letter] for letter in output)]


def _resized(label: Labels, source: Sequence[Dim], out: Sequence[Dim]) -> Labels:
    """Slice, Pad, Split: an axis that changes size keeps its origin (a crop of rows is rows)."""
    return tuple(axis if s == d else fresh(origin_of(axis) or "", d) for axis, s, d in zip(label, source, out))


def _reduced(node: onnx.NodeProto, label: Labels, values: Mapping[str, object]) -> list[Labels | None] | None:
    given = len(node.input) > 1 and bool(node.input[1])
    if given and node.input[1] not in values:
        return None  # axes computed in the graph
    axes_value = values.get(node.input[1]) if given else _attr(node, "axes")
    if axes_value is None:
        axes = list(range(len(label)))
    else:
        axes = [int(a) % len(label) for a in list(axes_value)]  # type: ignore[call-overload]
    keep = _attr(node, "keepdims", 1)
    return [tuple(() if a in axes and keep else axis for a, axis in enumerate(label) if keep or a not in axes)]


def _concatenated(node: onnx.NodeProto, labels: Mapping[str, Labels], infos: Mapping[str, TensorInfo]) -> list[Labels | None] | None:
    out = _shape(infos, node.output[0])
    axis = int(_attr(node, "axis", 0)) % len(out)  # type: ignore[arg-type]
    parts = [labels.get(i) for i in node.input]
    known = [p for p in parts if p is not None]
    if not known:
        return None
    result = []
    for a in range(len(out)):
        if a == axis:
            origins = {origin_of(p[a]) for p in known}
            whole = len(known) == len(parts) and len(origins) == 1
            result.append(fresh((origins.pop() or "") if whole else "", out[a]))
        else:
            result.append(merged([p[a] for p in known], out[a]))
    return [tuple(result)]


def _matmul(node: onnx.NodeProto, labels: Mapping[str, Labels], infos: Mapping[str, TensorInfo],
            constants: set[str]) -> list[Labels | None] | None:
    a_name, b_name = node.input[0], node.input[1]
    a, b = labels.get(a_name), labels.get(b_name)
    a_shape, b_shape, out = _shape(infos, a_name), _shape(infos, b_name), _shape(infos, node.output[0])
    if len(a_shape) < 2 or len(b_shape) < 2 or (a is None and a_name not in constants) or (
            b is None and b_name not in constants):
        return None
    rank = len(out)
    batch = []
    for axis in range(rank - 2):
        at = []
        for label, shape in ((a, a_shape), (b, b_shape)):
            position = axis - rank + len(shape)
            if label is not None and position >= 0 and shape[position] != 1:
                at.append(label[position])
        batch.append(merged(at, out[axis]))
    rows = a[-2] if a is not None else fresh("", out[-2])
    columns = b[-1] if b is not None else fresh("", out[-1])
    return [(*batch, rows, columns)]
