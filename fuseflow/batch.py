"""Which tensors carry the batch in dim 0: decides which segments may be split.

A model compiled at batch k runs at batch B by splitting into chunks of k
only if every op between the segment's inputs and outputs treats samples
independently. Starting from the signature inputs, a tensor is marked
"batch" when the op producing it is per-sample given its arguments (with
the exact conditions checked on constant axes, paddings, perms and shapes);
anything unproven is not, and such segments fall back to TF for other
batch sizes instead of giving wrong answers.

A batch tensor records how many consecutive rows of dim 0 each sample owns:
Dense layers on 3-D inputs reshape [k, s, d] to [k*s, d] and back, which is
per-sample all along. Only tensors with one row per sample may be a
segment's split ports.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from fuseflow import errors
from fuseflow.assets import add_assets_op
from fuseflow.backends.base import relative_error
from fuseflow.graph_util import is_control, node_name, output_index
from fuseflow.shapes import TensorInfo
from fuseflow.tf_compat import lift_constants, plain_session_config, tf

_UNARY = frozenset({
    "Relu", "Relu6", "Elu", "Selu", "LeakyRelu", "Sigmoid", "Tanh", "Softplus", "Softsign",
    "Exp", "Log", "Log1p", "Neg", "Abs", "Sqrt", "Rsqrt", "Square", "Reciprocal", "Erf",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Cast", "Identity", "Snapshot",
    "StopGradient", "Conv2D", "Conv3D", "DepthwiseConv2dNative", "MaxPool", "AvgPool",
    "MaxPool3D", "AvgPool3D", "FusedBatchNorm", "FusedBatchNormV3", "LRN", "Gelu",
    "IsNan", "IsFinite", "LogicalNot", "ClipByValue", "BiasAdd", "Erfc", "Erfinv", "Expm1",
    "Tan", "Atan", "Asin", "Acos", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Rint",
    "Inv", "Invert", "Lgamma", "Digamma", "BesselI0e", "BesselI1e", "AsString",
    "StringToNumber", "ResizeBilinear", "ResizeNearestNeighbor", "ResizeBicubic",
    "ResizeArea", "DepthToSpace", "SpaceToDepth", "Bucketize", "ZerosLike", "OnesLike",
})
# Transposed convolutions: (output sizes, filter, per-sample input); the sizes are a
# constant whose dim 0 is the compiled batch once shapes are folded.
_BACKPROP_INPUT = frozenset({"Conv2DBackpropInput", "Conv3DBackpropInputV2"})
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
    rows: dict[str, int]  # batch tensors -> rows of dim 0 per sample
    dependent: set[str]  # tensors computed from the inputs at all

    def splittable(self, tensor: str) -> bool:
        """dim 0 of tensor is exactly the batch."""
        return self.rows.get(tensor) == 1


class _Graph:
    def __init__(self, graph_def, infos: dict[str, TensorInfo], batch_size: int):
        self.consts = {n.name: n for n in graph_def.node if n.op == "Const"}
        self.infos = infos
        self.batch_size = batch_size

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
    rows = {t: 1 for t in input_tensors
            if infos.get(t) and infos[t].shape and infos[t].shape[0] == batch_size}
    dependent = set(input_tensors)
    graph = _Graph(graph_def, infos, batch_size)
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
        rows.update(_batch_outputs(node, data_in, outs, graph, rows, dependent))
    return BatchInfo(rows, dependent)


def _axis_ok(value, rank: int | None) -> bool:
    """Constant axes that never include axis 0."""
    if value is None or rank is None:
        return False
    axes = np.atleast_1d(value).astype(int)
    return axes.size > 0 and all(a % rank != 0 for a in axes) if rank else False


def _batch_outputs(node, ins, outs, g: _Graph, rows: dict[str, int], dep: set[str]
                   ) -> dict[str, int]:
    """The outputs of node that carry the batch, with their rows per sample."""
    op, first = node.op, ins[0] if ins else None
    if not outs:
        return {}
    if op == "IdentityN":
        return {o: rows[t] for t, o in zip(ins, outs) if t in rows}
    if op in ("ConcatV2", "Pack"):  # a broadcast constant may come first (a class token)
        first = next((t for t in ins if t in rows), first)
    if first not in rows:
        if op in _BACKPROP_INPUT:
            return _backprop_input_rows(ins, outs[0], g, rows, dep)
        if op == "GatherV2" and len(ins) == 3 and ins[1] in rows and ins[0] not in dep \
                and g.const(ins[2]) is not None and int(g.const(ins[2])) == 0 \
                and node.attr["batch_dims"].i == 0:
            return {outs[0]: rows[ins[1]]}
        if op in _ELEMENTWISE:
            m = _elementwise_rows(ins, outs[0], g, rows, dep)
            return {outs[0]: m} if m else {}
        return {}
    m = rows[first]
    rank = g.rank(first)
    rest_free = all(t not in dep for t in ins[1:])
    ok = False
    if op in _UNARY:
        ok = rest_free
    elif op in _ELEMENTWISE:
        m = _elementwise_rows(ins, outs[0], g, rows, dep)
        ok = bool(m)
    elif op == "MatMul":
        ok = rest_free and not node.attr["transpose_a"].b
    elif op in ("BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"):
        other = ins[1]
        ok = (rows.get(other) == m and g.rank(other) == rank) or (
            other not in dep and (g.rank(other) or 3) <= 2)
    elif op in _LAST_AXIS:
        ok = (rank or 0) >= 2
    elif op in _REDUCTIONS:
        ok = rest_free and _axis_ok(g.const(ins[1]), rank)
    elif op == "Reshape":
        m = _reshape_rows(g.shape(first), g.shape(outs[0]), m, g.batch_size)
        ok = bool(m)
    elif op == "OneHot":  # the new axis is never 0 while the indices keep theirs
        ok = rest_free and node.attr["axis"].i != 0
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
        if value in rows and _axis_ok(g.const(axis), g.rank(value)):
            return {o: rows[value] for o in outs}
        return {}
    elif op == "Unpack":
        return {o: m for o in outs} if rank and node.attr["axis"].i % rank != 0 else {}
    elif op in ("ConcatV2", "Pack"):
        values = ins[:-1] if op == "ConcatV2" else ins
        axis = g.const(ins[-1]) if op == "ConcatV2" else node.attr["axis"].i
        ok = (any(rows.get(t) == m for t in values) and _axis_ok(axis, g.rank(outs[0]))
              and all(rows.get(t) == m or (m == 1 and _same_row_per_sample(t, g, dep))
                      for t in values))
    elif op == "StridedSlice":
        ok = _strided_slice_ok(node, ins, g)
    elif op == "Slice":
        begin, size = g.const(ins[1]), g.const(ins[2])
        ok = begin is not None and size is not None and int(begin[0]) == 0 \
            and int(size[0]) == -1
    elif op == "Einsum":
        ok = _einsum_ok(node.attr["equation"].s.decode(), ins, rows, dep, m)
    elif op == "Tile":
        multiples = g.const(ins[1])
        ok = multiples is not None and int(multiples[0]) == 1
    elif op == "BroadcastTo":  # as Tile: only when dim 0 is left as it is
        shape, src = g.const(ins[1]), g.shape(first)
        ok = (shape is not None and src is not None and rest_free
              and np.atleast_1d(shape).size == len(src) and int(shape[0]) == src[0])
    return {outs[0]: m} if ok else {}


def _same_row_per_sample(tensor: str, g: _Graph, dep: set[str]) -> bool:
    """A constant of the compiled batch's rows, all equal: what Grappler folds a broadcast
    to the batch into (a ViT's class token, zeros_like(x[:, :1]) + token, is one row
    at batch 1). Run in chunks of the compiled batch, every chunk gets the same rows it
    would have computed, so a concatenation with it stays per-sample."""
    value = None if tensor in dep else g.const(tensor)
    return (value is not None and value.ndim >= 1 and value.shape[0] == g.batch_size
            and bool(np.all(value == value[:1])))


def free_batch_shapes(graph_def, info: BatchInfo) -> int:
    """In a segment graph for a backend that compiles per input shape (XLA, which runs a
    segment whole, not in chunks), let the per-sample ops whose shape constants Grappler
    folded at the compiled batch read their batch at run time instead. At batch k the
    values are the same; at other sizes the segment no longer fails. Returns how many
    ops were changed.

    - Reshape: its target shape ([k * rows, ...]) gets -1 in dim 0, in a constant of
      its own (a BERT-like encoder's Dense layers reshape [k, s, d] to [k*s, d]).
    - Transposed convolutions: their output size [k, ...] takes dim 0 from their input
      (XLA resolves the shape at compile time; a U-Net's decoder)."""
    from fuseflow.loops import batch_dim, const_node, dims_with_batch

    consts = {n.name: n for n in graph_def.node if n.op == "Const"}
    targets = [n for n in graph_def.node if f"{n.name}:0" in info.rows and (
        (n.op == "Reshape" and len(n.input) >= 2) or (
            n.op in _BACKPROP_INPUT and len(n.input) == 3))]
    changed = 0
    for node in targets:  # listed first: nodes are added to graph_def below
        k = 1 if node.op == "Reshape" else 0  # the shape input
        shape_node = consts.get(node_name(node.input[k]))
        shape = None if shape_node is None else tf.make_ndarray(shape_node.attr["value"].tensor)
        if shape is None or shape.ndim != 1 or shape.size == 0:
            continue
        name = f"{node.name}/fuseflow_free_batch"
        if node.op == "Reshape":
            if np.any(shape < 0):
                continue
            const_node(graph_def, name, np.concatenate([[-1], shape[1:]]).astype(shape.dtype))
        else:
            batch = batch_dim(graph_def, node.input[2], node.attr["T"].type, name,
                              shape_node.attr["dtype"].type)
            name = dims_with_batch(graph_def, batch, shape[1:], f"{name}/dims")
        node.input[k] = name
        changed += 1
    return changed


def _backprop_input_rows(ins, out, g: _Graph, rows, dep) -> dict[str, int]:
    """A transposed convolution is per-sample when only its input carries the batch, one
    row per sample, and its output sizes are the constant [k, ...] of the compiled batch."""
    if len(ins) != 3 or rows.get(ins[2]) != 1 or any(t in dep for t in ins[:2]):
        return {}
    sizes = g.const(ins[0])
    if sizes is None or np.atleast_1d(sizes).size < 1 or int(sizes[0]) != g.batch_size:
        return {}
    return {out: 1}


def _reshape_rows(src, dst, m: int, k: int) -> int:
    """Rows per sample after a reshape that keeps each sample's elements together, or 0."""
    if not src or not dst or None in src or None in dst or src[0] != k * m:
        return 0
    per_sample = math.prod(src) // k
    row = math.prod(dst[1:])
    if row == 0 or per_sample % row or dst[0] != k * (per_sample // row):
        return 0
    return per_sample // row


def _elementwise_rows(ins, out, g: _Graph, rows, dep) -> int:
    """Broadcasting ops: batch operands alike at full rank, the others without a batch
    dim. Returns the rows per sample, or 0."""
    out_rank = g.rank(out)
    if not out_rank:
        return 0
    ms = {rows[t] for t in ins if t in rows}
    if len(ms) != 1:
        return 0
    for t in ins:
        if t in rows:
            if g.rank(t) != out_rank:
                return 0
        elif t in dep:
            return 0
        else:
            shape = g.shape(t)
            if shape is None or (len(shape) == out_rank and shape[0] != 1):
                return 0
    return ms.pop()


def _einsum_ok(equation: str, ins, rows, dep, m: int) -> bool:
    """'abc,cd->abd': every batch operand and the output start with the same letter,
    which no other operand uses (so samples never mix)."""
    if "..." in equation or "->" not in equation:
        return False
    lhs, out = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != len(ins) or not out:
        return False
    letter = out[0]
    for term, t in zip(terms, ins):
        if t in rows:
            if rows[t] != m or not term or term[0] != letter or term.count(letter) != 1:
                return False
        elif t in dep or letter in term:
            return False
    return True


def _strided_slice_ok(node, ins, g: _Graph) -> bool:
    """x[:, ...]: the whole of axis 0, stride 1, no new or ellipsis axes."""
    strides = g.const(ins[3])
    attr = node.attr
    return (strides is not None and int(np.atleast_1d(strides)[0]) == 1
            and attr["begin_mask"].i & 1 and attr["end_mask"].i & 1
            and not attr["shrink_axis_mask"].i & 1 and attr["new_axis_mask"].i == 0
            and attr["ellipsis_mask"].i == 0)


class OtherBatchCheck:
    """Does the compiled graph give the original's answers at another batch size?

    Folding tf.shape(x) at the compiled batch bakes it into constants that
    only splittable compiled segments survive; running both graphs at another
    batch on random inputs tells, whatever the backend or the model. That batch
    is 2 (3 at k=2): a compiled segment runs it as one padded chunk, and the
    original runs few rows (k+1 took two chunks, and the original at k+1: 0.6 s of
    ResNet50's compile at batch 8); never 1, where a squeeze() drops the batch axis
    that the compiled batch kept. The
    original's answers depend on nothing compiling does: start() runs it in a
    thread while the segments compile (the compilers are other processes,
    this one only waits for them; ResNet50's frozen graph takes 5-8 s to
    import and run). result() runs the compiled graph and compares.

    use_samples (tensor name -> the user's samples on axis 0, the calibration data
    of a reduced-precision compile) replaces the random inputs where they hold
    enough rows: int8 is right only inside its calibrated ranges, and a BERT-like
    encoder fed token ids of zeros was fixed to its batch for an int8 error the
    user's data never shows.
    """

    def __init__(self, model, serving: dict, compiled: dict):
        self.model = model
        self.fetches = [s.tensor_name for s in model.outputs]
        self._shapes = (serving, compiled)
        self.feeds, self.batch = _other_batch_feeds(model, serving, compiled)
        self._original: Future | None = None

    def use_samples(self, samples: dict[str, np.ndarray]) -> None:
        """Check on these samples instead of random inputs (before start())."""
        if self._original is None:
            self.feeds, self.batch = _other_batch_feeds(self.model, *self._shapes, samples)

    def start(self) -> None:
        """Run the original at the other batch now, in a thread (at most once)."""
        if self.feeds is None or self._original is not None:
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="fuseflow-other-batch")
        self._original = pool.submit(_run_or_error, self.model.graph_def,
                                     self.model.init_nodes, self.feeds, self.fetches)
        pool.shutdown(wait=False)  # the thread ends with its one job

    def result(self, final_graph_def, files: list, tolerance: float,
               serving: dict) -> str | None:
        """None when the compiled graph (its fused ops' payloads moved to `files`, as the
        saved model will have them: assets.move_to_assets) gives the original's answers,
        else why not (for the warning: "fails: ..." or "answers differ ...")."""
        from fuseflow.shapes import apply_input_shapes

        if self.feeds is None:
            return None  # no meaningful random strings (tf.Example); trust the analysis
        self.start()
        final = apply_input_shapes(final_graph_def, self.model, serving)
        compiled_out, failure = _run_or_error(final, self.model.init_nodes, self.feeds,
                                              self.fetches, files)
        original, _ = self._original.result()
        batch = self.batch
        if original is None:
            return None  # the original can't run on random inputs: nothing to compare
        if compiled_out is None:
            return f"at batch {batch} it fails: {failure}"
        for spec, a, b in zip(self.model.outputs, original, compiled_out):
            if a.dtype.kind not in "fciub":
                continue
            if a.shape != b.shape:
                return f"at batch {batch} output {spec.key} has shape {b.shape}, not {a.shape}"
            if relative_error(a, b) > tolerance:
                return (f"at batch {batch} output {spec.key} differs from the original's by "
                        f"{relative_error(a, b):.2g} (relative)")
        return None


def _other_batch_feeds(model, serving: dict, compiled: dict,
                       samples: dict[str, np.ndarray] | None = None
                       ) -> tuple[dict | None, object]:
    """(feeds at batch 2 (k+1 at k < 3) where serving leaves the batch free, that batch):
    the given samples where they hold enough rows, else random; (None, ...) when an
    input is a string with no samples."""
    rng = np.random.default_rng(0)
    feeds, batch = {}, "?"
    for spec in model.inputs:
        shape = compiled[spec.key]
        if serving[spec.key][:1] == (None,):
            shape = (2 if shape[0] > 2 else shape[0] + 1, *shape[1:])
            batch = shape[0]
        given = (samples or {}).get(spec.tensor_name)
        if given is not None and len(given) >= shape[0] and given.shape[1:] == shape[1:]:
            feeds[spec.tensor_name] = given[:shape[0]]
        elif spec.dtype == tf.string:
            return None, batch
        elif spec.dtype.is_floating:
            feeds[spec.tensor_name] = rng.normal(0, 1, shape).astype(spec.dtype.as_numpy_dtype)
        else:
            feeds[spec.tensor_name] = np.zeros(shape, spec.dtype.as_numpy_dtype)
    return feeds, batch


def _run_or_error(graph_def, init_nodes, feeds, fetches, files=()):
    """(run_graph's values, None), or (None, the first line of why it did not run)."""
    try:
        return _run(graph_def, init_nodes, feeds, fetches, files), None
    except Exception as e:  # noqa: BLE001 - any failure means "does not run at this batch"
        return None, f"{type(e).__name__}: {errors.reason(e)}"[:400]


def run_graph(graph_def, init_nodes, feeds, fetches, files=()):
    """fetches' values with graph_def run on feeds (its init nodes first), or None when it
    does not run."""
    return _run_or_error(graph_def, init_nodes, feeds, fetches, files)[0]


def _run(graph_def, init_nodes, feeds, fetches, files=()):
    return run_feeds(graph_def, init_nodes, [feeds], fetches, files)[0]


def run_feeds(graph_def, init_nodes, feed_list: list[dict], fetches, files=()) -> list:
    """fetches' values for each feed dict, in one session (its init nodes first): the
    graph as given, without Grappler (fuseflow optimized it already), its big constants
    fed, since TF would copy them about ten times."""
    graph_def, constants = lift_constants(graph_def)
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    init = [graph.get_operation_by_name(n) for n in init_nodes]
    if files:
        init.append(add_assets_op(graph, list(files))[0])
    with tf.compat.v1.Session(graph=graph, config=plain_session_config()) as sess:
        if init:
            sess.run(init, constants)
        return [sess.run(fetches, {**constants, **feeds}) for feeds in feed_list]
