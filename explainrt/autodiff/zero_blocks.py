"""Gradients that are zero outside a block: compute on the block, pad once at the end.

A transformer classifier reads one token (``x[:, 0]``, the CLS token): the gradient of that
Gather is zero for every other token, a zero-padded block (see the Gather rule). Every operator
the reverse pass then applies row by row (LayerNorm's backward, the MLP's matrix products, GELU,
residual sums) would spend its time on zeros: for ViT-B/16 the last block's MLP backward on 197
tokens where 1 is non-zero. This pass rewrites the gradient graph so that such operators run on
the block and the zero padding moves past them, to the first consumer that needs the full tensor.

It is exact: an operator is moved past only where zero in gives zero out (products, quotients
with the padded tensor as numerator, sums of tensors padded alike, reductions and matrix products
that do not mix the padded axes). It runs after ``append_gradients`` and changes no value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from explainrt.autodiff.gradients import GradientBuilder

_END = int(np.iinfo(np.int64).max)


@dataclass(frozen=True)
class Block:
    """A tensor equal to ``inner`` padded with zeros: ``begins``/``ends`` per axis, ``sizes`` its full static size
    on every padded axis (None elsewhere). Axes count the gradient's leading seed axis."""

    inner: str
    begins: tuple[int, ...]
    ends: tuple[int, ...]
    sizes: tuple[int | None, ...]

    @property
    def rank(self) -> int:
        return len(self.begins)

    @property
    def padded_axes(self) -> list[int]:
        return [a for a in range(self.rank) if self.begins[a] or self.ends[a]]

    def same_padding(self, other: Block) -> bool:
        return (self.begins, self.ends, self.sizes) == (other.begins, other.ends, other.sizes)


def compute_on_blocks(b: GradientBuilder, seed: str) -> None:
    """Rewrite the gradient nodes after zero-padding Pads (the Gather rule's) to run on the block."""
    nodes = list(b.graph.node)
    if not any(_is_zero_pad(b, n) for n in nodes):
        return
    seeded = _seeded(nodes, seed)
    blocks: dict[str, Block] = {}
    del b.graph.node[:]
    for node in nodes:
        if _is_zero_pad(b, node) and node.input[0] in seeded:
            block = _block_of_pad(b, node)
            if block is not None:
                blocks[node.output[0]] = block
        elif node.name.startswith("explainrt/grad") and any(i in blocks for i in node.input):
            b.scope = f"{node.name}/block"
            tiles = _tiling(node, blocks)
            if tiles is not None:
                axis, inners = tiles
                b.graph.node.append(onnx.helper.make_node("Concat", inners, [node.output[0]], axis=axis,
                                                          name=b.fresh(f"{node.name}/concat")))
                continue
            lifted = _lift(b, node, blocks, seeded)
            if lifted is not None:
                b.graph.node.append(onnx.helper.make_node(
                    "Pad", [lifted.inner, b.ints([*lifted.begins, *lifted.ends])], [node.output[0]],
                    name=b.fresh(f"{node.name}/pad")))
                blocks[node.output[0]] = lifted
                continue
        b.graph.node.append(node)


def _tiling(node: onnx.NodeProto, blocks: dict[str, Block]) -> tuple[int, list[str]] | None:
    """A sum of blocks that tile one axis (q, k, v = qkv[0], qkv[1], qkv[2] summed back): their concatenation."""
    if node.op_type not in ("Sum", "Add") or not all(i in blocks for i in node.input) or len(node.input) < 2:
        return None
    parts = sorted((blocks[i] for i in node.input), key=lambda block: block.begins)
    axes = {tuple(p.padded_axes) for p in parts}
    if len(axes) != 1 or len(next(iter(axes))) != 1 or len({p.sizes for p in parts}) != 1:
        return None
    axis = next(iter(axes))[0]
    size = parts[0].sizes[axis]
    covered = 0
    for part in parts:
        if part.begins[axis] != covered:
            return None
        covered = size - part.ends[axis]  # type: ignore[operator]
    return (axis, [p.inner for p in parts]) if covered == size else None


def _is_zero_pad(b: GradientBuilder, node: onnx.NodeProto) -> bool:
    if node.op_type != "Pad" or not node.name.startswith("explainrt/grad") or len(node.input) > 3:
        return False
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
    value = b.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
    return mode == b"constant" and value is not None and not np.any(value)


def _block_of_pad(b: GradientBuilder, node: onnx.NodeProto) -> Block | None:
    pads = b.constant_value(node.input[1])
    info = b.infos.get(node.output[0])
    if pads is None or np.any(pads < 0) or info is None or info.shape is None:
        return None
    rank = len(pads) // 2
    shape = (None, *info.shape)  # a gradient's info is the per-seed (forward) shape
    if len(shape) != rank:
        return None
    begins, ends = tuple(int(p) for p in pads[:rank]), tuple(int(p) for p in pads[rank:])
    sizes = tuple(shape[a] if (begins[a] or ends[a]) and isinstance(shape[a], int) else None for a in range(rank))
    if any((begins[a] or ends[a]) and sizes[a] is None for a in range(rank)):
        return None
    return Block(node.input[0], begins, ends, sizes)


def _seeded(nodes: Sequence[onnx.NodeProto], seed: str) -> set[str]:
    """Tensors that depend on the seed (gradients: their infos omit the seed axis)."""
    seeded = {seed}
    for node in nodes:
        if any(i in seeded for i in node.input):
            seeded.update(node.output)
    return seeded


def _lift(b: GradientBuilder, node: onnx.NodeProto, blocks: dict[str, Block], seeded: set[str]) -> Block | None:
    """``node`` computed on the block of its padded input(s), or None where that would not be exact."""
    op, inputs = node.op_type, list(node.input)
    padded = [blocks.get(i) for i in inputs]
    first = next(p for p in padded if p is not None)
    if op in ("Add", "Sub", "Sum") or (op == "Mul" and all(padded)):
        if not all(p is not None and p.same_padding(first) for p in padded):
            return None
        return _with_inner(first, b.op(op, [p.inner for p in padded]))  # type: ignore[union-attr]
    if op in ("Mul", "Div") and len(inputs) == 2:
        index = 0 if padded[0] is not None else 1  # the padded operand (a Div only as the numerator)
        if op == "Div" and (index != 0 or padded[1] is not None):
            return None
        other = _sliced(b, inputs[1 - index], first, seeded)
        if other is None:
            return None
        return _with_inner(first, b.op(op, [first.inner, other] if index == 0 else [other, first.inner]))
    if op in ("Neg", "Cast", "Identity") and padded[0] is not None:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        return _with_inner(first, b.op(op, [first.inner], **attrs))
    if op == "Transpose" and padded[0] is not None:
        perm = next(list(a.ints) for a in node.attribute if a.name == "perm")
        return Block(b.op("Transpose", [first.inner], perm=perm), tuple(first.begins[p] for p in perm),
                     tuple(first.ends[p] for p in perm), tuple(first.sizes[p] for p in perm))
    if op in ("ReduceSum", "ReduceMean") and padded[0] is not None:
        return _reduced(b, node, first)
    if op == "MatMul" and padded[0] is not None and padded[1] is None:
        return _matmul(b, node, first, seeded)
    return None


def _with_inner(block: Block, inner: str) -> Block:
    return replace(block, inner=inner)


def _actual_rank(b: GradientBuilder, name: str, seeded: set[str]) -> int | None:
    info = b.infos.get(name)
    if info is None or info.rank is None:
        return None
    return info.rank + (name in seeded)


def _sliced(b: GradientBuilder, name: str, block: Block, seeded: set[str]) -> str | None:
    """``name`` cut to ``block`` on the padded axes it does not broadcast along; None if that is unknowable."""
    rank = _actual_rank(b, name, seeded)
    if rank is None or rank > block.rank:
        return None
    shape = b.infos[name].shape
    offset = block.rank - rank
    dims = (None, *shape) if name in seeded else tuple(shape)  # type: ignore[misc]
    axes, starts, stops = [], [], []
    for axis in block.padded_axes:
        own = axis - offset
        if own < 0 or dims[own] == 1:
            continue  # broadcast along this axis: the same values for every row of the block
        if dims[own] != block.sizes[axis]:
            return None
        axes.append(own)
        starts.append(block.begins[axis])
        stops.append(-block.ends[axis] if block.ends[axis] else _END)
    if not axes:
        return name
    return b.op("Slice", [name, b.ints(starts), b.ints(stops), b.ints(axes)])


def _reduced(b: GradientBuilder, node: onnx.NodeProto, block: Block) -> Block | None:
    """A ReduceSum/ReduceMean over axes the block does not pad: the same reduction of the block."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    axes_value = b.constant_value(node.input[1]) if len(node.input) > 1 and node.input[1] else attrs.get("axes")
    if axes_value is None or attrs.get("noop_with_empty_axes", 0):
        return None
    axes = sorted({int(a) % block.rank for a in np.asarray(axes_value).reshape(-1)})
    if not axes or set(axes) & set(block.padded_axes):
        return None
    inner = b.op(node.op_type, [block.inner, *node.input[1:]], **attrs)
    if attrs.get("keepdims", 1):
        return _with_inner(block, inner)
    kept = [a for a in range(block.rank) if a not in axes]
    return Block(inner, tuple(block.begins[a] for a in kept), tuple(block.ends[a] for a in kept),
                 tuple(block.sizes[a] for a in kept))


def _matmul(b: GradientBuilder, node: onnx.NodeProto, block: Block, seeded: set[str]) -> Block | None:
    """``block @ W`` with W a matrix: rows stay rows, so the padding (off the contracted axis) carries over."""
    weights = node.input[1]
    if _actual_rank(b, weights, seeded) != 2 or block.rank < 2 or (block.rank - 1) in block.padded_axes:
        return None
    return _with_inner(block, b.op("MatMul", [block.inner, weights]))
