"""Branches of the reverse pass that run only when their cotangent can be non-zero.

A detector's box objective seeds the gradient at the predictions whose box overlaps the given one, and on
a multi-scale head (YOLO's P3/P4/P5) those often lie on one scale: the reverse pass through the others
(their class branches and, from P4 and P5, the neck back to the target layer) multiplies zeros. This pass
wraps each such branch in an ONNX ``If`` that runs it when one of its sources may be non-zero and
otherwise yields zeros of the same shape: exact (but where the forward pass holds inf or NaN, which a
skipped branch would have multiplied into NaN), and the runtime skips the branch's convolutions.

A *source* is a gradient tensor with a run-time flag (a scalar bool: False means it is all zero); a
branch is the set of reverse-pass nodes that depend on the same sources (and the nodes only it reads). It
runs on the finished model (after map heads and pruning), with the record ``append_gradients`` keeps of
what each gradient tensor is the gradient of, from which the zeros take their shape.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from explainrt.autodiff.builder import node_reads, sort_topologically


@dataclass(frozen=True)
class ZeroBranches:
    """What ``run_when_nonzero`` needs from the builder of the reverse pass."""

    sources: dict[str, str]  # gradient tensor -> scalar bool tensor: False when the gradient is all zero
    gradient_of: dict[str, tuple[str, bool]]  # gradient tensor -> (forward tensor, merged to [K*N, ...])
    elem_types: dict[str, int]  # floating forward tensor -> its (and its gradient's) element type
    nodes: frozenset[str]  # the reverse pass's node names (what a branch may hold)
    seeds: str  # 1-D int64 [K]: the seed axis's length


def run_when_nonzero(model: onnx.ModelProto, plan: ZeroBranches) -> dict[str, frozenset[str]]:
    """Wrap each branch of ``model``'s reverse pass that depends on ``plan.sources`` in an ``If`` on their
    flags (changed in place); each ``If`` node's name -> the sources its branch depends on (empty: none
    wrapped). A branch whose outputs' shapes the record does not give, or that a node outside the reverse
    pass feeds after reading a source, is left as it is."""
    graph = model.graph
    nodes = list(graph.node)
    depends: dict[str, frozenset[str]] = {source: frozenset([source]) for source in plan.sources}
    node_sources: list[frozenset[str]] = []
    for node in nodes:
        found = frozenset().union(*(depends.get(i, frozenset()) for i in node.input if i))
        node_sources.append(found)
        for output in node.output:
            if output not in plan.sources:
                depends[output] = found
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node_reads(node):
            readers.setdefault(name, []).append(index)
    graph_outputs = {o.name for o in graph.output}
    branch_of: dict[int, frozenset[str]] = {}
    for index in reversed(range(len(nodes))):  # readers first
        node = nodes[index]
        if node.name not in plan.nodes:
            continue
        if node_sources[index]:
            branch_of[index] = node_sources[index]
            continue
        # what only one branch reads (a SiLU's sigmoid of its forward input) runs in it, skipped with it
        read_by = {branch_of.get(r) for o in node.output for r in readers.get(o, [])}
        if len(read_by) == 1 and None not in read_by and not graph_outputs.intersection(node.output) \
                and not {*plan.sources, plan.seeds} & set(node.output):  # the else branches read the seed count
            branch_of[index] = read_by.pop()  # type: ignore[assignment]
    branches: dict[frozenset[str], list[int]] = {}
    for index in sorted(branch_of):
        branches.setdefault(branch_of[index], []).append(index)
    inside = set(branch_of)
    outside_after_source = {i for i, found in enumerate(node_sources) if found and i not in inside}
    if any(reader in inside for i in outside_after_source for o in nodes[i].output for reader in readers.get(o, [])):
        return {}  # a node outside the reverse pass between two branch nodes: no order would hold
    replaced: dict[int, onnx.NodeProto] = {}  # a wrapped branch's first node -> its If
    wrapped: dict[str, frozenset[str]] = {}
    dropped: set[int] = set()
    flag_nodes: list[onnx.NodeProto] = []
    for number, (found, members) in enumerate(sorted(branches.items(), key=lambda item: item[1][0])):
        member_set = set(members)
        leaving = [o for i in members for o in nodes[i].output
                   if o and (o in graph_outputs or any(r not in member_set for r in readers.get(o, [])))]
        if not leaving or any(plan.gradient_of.get(o, ("", False))[0] not in plan.elem_types for o in leaving):
            continue  # a value whose shape and type the record does not give leaves the branch
        prefix = f"explainrt/zero_branches/{number}"
        flags = [plan.sources[source] for source in sorted(found)]
        condition = flags[0]
        for position, flag in enumerate(flags[1:]):
            either = f"{prefix}/any.{position}"
            flag_nodes.append(helper.make_node("Or", [condition, flag], [either], name=either))
            condition = either
        replaced[members[0]] = _if_node(prefix, condition, [nodes[i] for i in members], leaving, plan)
        wrapped[replaced[members[0]].name] = found
        dropped |= member_set
    if not replaced:
        return {}
    kept = [replaced.get(i, node) for i, node in enumerate(nodes) if i in replaced or i not in dropped]
    del graph.node[:]
    graph.node.extend(sort_topologically([*flag_nodes, *kept]))
    return wrapped


def nest_in_sole_readers(model: onnx.ModelProto, names: Collection[str]) -> int:
    """Move each ``If`` of ``names`` whose outputs only the then branch of another of them reads into that branch
    (changed in place), so that when the reader takes its else branch the inner one is not run either (the zeros of
    a P4 class branch that only the neck's branch reads are then not made when no box matched P4 or P5). Returns
    how many moved."""
    graph = model.graph
    moved = 0
    while True:
        nodes = [node for node in graph.node if node.op_type == "If" and node.name in names]
        outputs = {o.name for o in graph.output}
        for inner in nodes:
            leaving = set(inner.output)
            readers = [node for node in graph.node if node is not inner and leaving & node_reads(node)]
            if outputs & leaving or len(readers) != 1 or readers[0] not in nodes:
                continue
            branches = {a.name: a.g for a in readers[0].attribute if a.type == onnx.AttributeProto.GRAPH}
            if leaving & {name for node in branches["else_branch"].node for name in node_reads(node)}:
                continue
            nested = onnx.NodeProto()
            nested.CopyFrom(inner)
            branches["then_branch"].node.insert(0, nested)  # it reads only the enclosing scope's tensors
            graph.node.remove(inner)
            moved += 1
            break
        else:
            return moved


def _if_node(prefix: str, condition: str, members: list[onnx.NodeProto], leaving: list[str],
             plan: ZeroBranches) -> onnx.NodeProto:
    """``If(condition)``: then the branch's nodes (their outputs that leave it renamed inside), else zeros."""
    renamed = {name: f"{name}/then" for name in leaving}
    then_nodes = []
    for node in members:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.output[:] = [renamed.get(o, o) for o in node.output]
        copy.input[:] = [renamed.get(i, i) for i in node.input]
        then_nodes.append(copy)
    types = {name: plan.elem_types[plan.gradient_of[name][0]] for name in leaving}
    then_branch = helper.make_graph(then_nodes, f"{prefix}/then", [],
                                    [helper.make_tensor_value_info(renamed[n], types[n], None) for n in leaving])
    else_nodes: list[onnx.NodeProto] = []
    else_outputs = []
    for index, name in enumerate(leaving):
        forward, merged = plan.gradient_of[name]
        at = f"{prefix}/else/{index}"
        else_nodes += [
            helper.make_node("Shape", [forward], [f"{at}/shape"], name=f"{at}/Shape"),
            helper.make_node("Concat", [plan.seeds, f"{at}/shape"], [f"{at}/grad_shape"], name=f"{at}/Concat", axis=0),
            helper.make_node("ConstantOfShape", [f"{at}/grad_shape"], [f"{at}/zeros"], name=f"{at}/ConstantOfShape",
                             value=helper.make_tensor("zero", types[name], [1], [0])),
        ]
        out = f"{at}/zeros"
        if merged:  # [K, N, ...] -> [K*N, ...], as ``merge_seeds``
            else_nodes += [
                _ints(f"{at}/one", [1]), _ints(f"{at}/end", [int(np.iinfo(np.int64).max)]), _ints(f"{at}/minus_one", [-1]),
                helper.make_node("Slice", [f"{at}/shape", f"{at}/one", f"{at}/end"], [f"{at}/rest"], name=f"{at}/Slice"),
                helper.make_node("Concat", [f"{at}/minus_one", f"{at}/rest"], [f"{at}/merged_shape"],
                                 name=f"{at}/Concat.1", axis=0),
                helper.make_node("Reshape", [out, f"{at}/merged_shape"], [f"{at}/merged"], name=f"{at}/Reshape"),
            ]
            out = f"{at}/merged"
        else_outputs.append(helper.make_tensor_value_info(out, types[name], None))
    else_branch = helper.make_graph(else_nodes, f"{prefix}/else", [], else_outputs)
    return helper.make_node("If", [condition], leaving, name=f"{prefix}/If", then_branch=then_branch,
                            else_branch=else_branch)


def _ints(name: str, values: list[int]) -> onnx.NodeProto:
    """A Constant node holding int64 ``values`` as ``name`` (an else branch's own: it has no initializers)."""
    return helper.make_node("Constant", [], [name], name=f"{name}/Constant",
                            value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
