"""Which tensors carry the batch in dim 0: decides which segments may be split.

A model compiled at batch k runs at batch B by splitting into chunks of k
only if every op between the segment's inputs and outputs treats samples
independently. Starting from the signature inputs, a tensor is marked
"batch" when the op producing it is per-sample given its arguments (with
the exact conditions checked on constant axes, paddings, perms and shapes);
anything unproven is not, and such segments fall back to TF for other
batch sizes instead of giving wrong answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fuseflow.graph_util import is_control, node_name, output_index
from fuseflow.shapes import TensorInfo
from fuseflow.tf_compat import tf

_UNARY = frozenset({
    "Relu", "Relu6", "Elu", "Selu", "LeakyRelu", "Sigmoid", "Tanh", "Softplus", "Softsign",
    "Exp", "Log", "Log1p", "Neg", "Abs", "Sqrt", "Rsqrt", "Square", "Reciprocal", "Erf",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Cast", "Identity", "Snapshot",
    "StopGradient", "Conv2D", "Conv3D", "DepthwiseConv2dNative", "MaxPool", "AvgPool",
    "MaxPool3D", "AvgPool3D", "FusedBatchNorm", "FusedBatchNormV3", "LRN", "Gelu",
    "IsNan", "IsFinite", "LogicalNot", "Relu6Grad", "ClipByValue", "BiasAdd",
})
_ELEMENTWISE = frozenset({
    "Add", "AddV2", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "Maximum", "Minimum", "Pow",
    "SquaredDifference", "FloorDiv", "FloorMod", "Greater", "GreaterEqual", "Less",
    "LessEqual", "Equal", "NotEqual", "LogicalAnd", "LogicalOr", "Select", "SelectV2",
})
_REDUCTIONS = frozenset({"Mean", "Sum", "Max", "Min", "Prod", "All", "Any", "ArgMax",
                         "ArgMin"})
_LAST_AXIS = frozenset({"Softmax", "LogSoftmax"})


@dataclass(frozen=True)
class BatchInfo:
    batch: set[str]  # tensors whose dim 0 is the batch
    dependent: set[str]  # tensors computed from the inputs at all


class _Graph:
    def __init__(self, graph_def, infos: dict[str, TensorInfo]):
        self.consts = {n.name: n for n in graph_def.node if n.op == "Const"}
        self.infos = infos

    def const(self, tensor: str):
        node = self.consts.get(node_name(tensor))
        return None if node is None else tf.make_ndarray(node.attr["value"].tensor)

    def rank(self, tensor: str) -> int | None:
        info = self.infos.get(tensor)
        return None if info is None or info.shape is None else len(info.shape)

    def shape(self, tensor: str):
        info = self.infos.get(tensor)
        return None if info is None else info.shape


def batch_tensors(graph_def, order: list[int], infos: dict[str, TensorInfo],
                  input_tensors: list[str], batch_size: int) -> BatchInfo:
    """Propagate 'dim 0 is the batch' from the signature inputs through per-sample ops."""
    batch = {t for t in input_tensors
             if infos.get(t) and infos[t].shape and infos[t].shape[0] == batch_size}
    dependent = set(input_tensors)
    graph = _Graph(graph_def, infos)
    nodes = graph_def.node
    for i in order:
        node = nodes[i]
        data_in = [f"{node_name(x)}:{output_index(x)}" for x in node.input if not is_control(x)]
        if not any(t in dependent for t in data_in):
            continue
        outs = []
        while f"{node.name}:{len(outs)}" in infos:
            outs.append(f"{node.name}:{len(outs)}")
        dependent.update(outs)
        batch.update(_batch_outputs(node, data_in, outs, graph, batch, dependent))
    return BatchInfo(batch, dependent)


def _axis_ok(value, rank: int | None) -> bool:
    """Constant axes that never include axis 0."""
    if value is None or rank is None:
        return False
    axes = np.atleast_1d(value).astype(int)
    return axes.size > 0 and all(a % rank != 0 for a in axes) if rank else False


def _batch_outputs(node, ins, outs, g: _Graph, batch: set[str], dep: set[str]) -> list[str]:
    """The outputs of node that carry the batch, given which inputs do."""
    op, first = node.op, ins[0] if ins else None
    rest_free = all(t not in dep for t in ins[1:])
    if not outs or first not in batch:
        if op == "GatherV2" and len(ins) == 3 and ins[1] in batch and ins[0] not in dep \
                and g.const(ins[2]) is not None and int(g.const(ins[2])) == 0 \
                and node.attr["batch_dims"].i == 0:
            return outs[:1]
        if op in _ELEMENTWISE:
            return outs[:1] if _elementwise_ok(ins, outs[0], g, batch, dep) else []
        return []
    rank = g.rank(first)
    ok = False
    if op in _UNARY:
        ok = rest_free
    elif op in _ELEMENTWISE:
        ok = _elementwise_ok(ins, outs[0], g, batch, dep)
    elif op == "MatMul":
        ok = rest_free and not node.attr["transpose_a"].b
    elif op in ("BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"):
        other = ins[1]
        ok = (other in batch and g.rank(other) == rank) or (
            other not in dep and (g.rank(other) or 3) <= 2)
    elif op in _LAST_AXIS:
        ok = (rank or 0) >= 2
    elif op in _REDUCTIONS:
        ok = rest_free and _axis_ok(g.const(ins[1]), rank)
    elif op == "Reshape":
        src, dst = g.shape(first), g.shape(outs[0])
        ok = (src is not None and dst is not None and len(src) > 0 and len(dst) > 0
              and None not in src and None not in dst and src[0] == dst[0]
              and math.prod(src[1:]) == math.prod(dst[1:]))
    elif op == "Transpose":
        perm = g.const(ins[1])
        ok = perm is not None and int(np.atleast_1d(perm)[0]) == 0
    elif op == "ExpandDims":
        axis = g.const(ins[1])
        ok = axis is not None and int(axis) % ((rank or 0) + 1) != 0
    elif op == "Squeeze":
        dims = list(node.attr["squeeze_dims"].list.i)
        ok = bool(dims) and rank is not None and all(d % rank != 0 for d in dims)
    elif op in ("Pad", "PadV2", "MirrorPad"):
        pads = g.const(ins[1])
        ok = pads is not None and not np.any(pads[0]) and all(t not in dep for t in ins[1:])
    elif op in ("Split", "SplitV"):
        value, axis = (ins[1], ins[0]) if op == "Split" else (ins[0], ins[2])
        if value in batch and _axis_ok(g.const(axis), g.rank(value)):
            return outs
        return []
    elif op == "Unpack":
        return outs if rank and node.attr["axis"].i % rank != 0 else []
    elif op in ("ConcatV2", "Pack"):
        values = ins[:-1] if op == "ConcatV2" else ins
        out_rank = g.rank(outs[0])
        axis = g.const(ins[-1]) if op == "ConcatV2" else node.attr["axis"].i
        ok = all(t in batch for t in values) and _axis_ok(axis, out_rank)
    elif op == "StridedSlice":
        ok = _strided_slice_ok(node, ins, g)
    elif op == "Slice":
        begin, size = g.const(ins[1]), g.const(ins[2])
        ok = begin is not None and size is not None and int(begin[0]) == 0 \
            and int(size[0]) == -1
    elif op == "Tile":
        multiples = g.const(ins[1])
        ok = multiples is not None and int(multiples[0]) == 1
    return outs[:1] if ok else []


def _elementwise_ok(ins, out, g: _Graph, batch, dep) -> bool:
    """Broadcasting ops: batch operands at full rank, the others without a batch dim."""
    out_rank = g.rank(out)
    if not out_rank:
        return False
    for t in ins:
        if t in batch:
            if g.rank(t) != out_rank:
                return False
        elif t in dep:
            return False
        else:
            shape = g.shape(t)
            if shape is None or (len(shape) == out_rank and shape[0] != 1):
                return False
    return any(t in batch for t in ins)


def _strided_slice_ok(node, ins, g: _Graph) -> bool:
    """x[:, ...]: the whole of axis 0, stride 1, no new or ellipsis axes."""
    strides = g.const(ins[3])
    attr = node.attr
    return (strides is not None and int(np.atleast_1d(strides)[0]) == 1
            and attr["begin_mask"].i & 1 and attr["end_mask"].i & 1
            and not attr["shrink_axis_mask"].i & 1 and attr["new_axis_mask"].i == 0
            and attr["ellipsis_mask"].i == 0)
