"""Stage 3: inline functions, fold constants, drop dead ops (Grappler).

Grappler runs only optimizers whose output every backend still reads as
plain TF ops: no layout changes and no remapper (its _Fused* ops have no
XLA kernel and are opaque to a partitioner).

Functional control flow (While/If/Case and their Stateless forms) stays
functional: Grappler's function optimizer inlines ordinary calls but would
also lower every loop and conditional to TF1 Enter/Merge/Switch/Exit, which
no backend takes as a unit. It leaves a node alone whose
`_lower_using_switch_merge` attr is false, so that attr is set on every
control-flow node, in the graph and in every function body. It stays set in
segments: TF's session-time Grappler would otherwise lower the loops inside a
fused node's fallback function, which the native op recompiles from. A loop
left in TF gets its own value back (restore_lowering), so TF runs it as fast
as before.
"""

from __future__ import annotations

import math

from fuseflow import errors
from fuseflow.graph_util import constant_nodes, without_weights
from fuseflow.tf_compat import tf

_OPTIMIZERS = ("function", "common_subgraph_elimination", "constfold", "arithmetic",
               "dependency", "pruning", "debug_stripper")


def optimize_graph(graph_def, keep_nodes: list[str]):
    """Grappler on the graph with its weights left out; with them only where needed.

    Every Grappler pass copies the whole GraphDef, weights included: ResNet50's
    100 MB cost 2.1 s in Grappler, most of it page faults (600k) on copies. Large
    Consts go in as Placeholders of their dtype and shape (stand-ins), which
    Grappler optimizes around in 0.2 s; they are put back afterwards. What this
    gives up is folding math into the weights themselves: Conv2D(x, W) * scale
    stays a Mul, which OpenVINO folds at compile time (as TF does at load time
    for ops left to it). Where the weights alone feed a computation (the
    Reshape of Keras' EinsumDense kernel, a masked kernel), Grappler runs again
    with them, as it always did, so that such a computation is still a constant
    (BERT-like: 0.9 s, 0.3 s more than before).
    """
    light, weights = without_weights(graph_def)
    light = _optimize(light, keep_nodes)
    if weights and (constant_nodes(light, also=set(weights)) - constant_nodes(light)
                    - set(weights)):
        return _optimize(graph_def, keep_nodes)
    return _weights_in(light, weights)


def _drop_dangling_colocation(graph_def) -> None:
    """Colocation with nodes that are gone, dropped. A weight comes back with its own
    attrs, `_class` included: Keras' position embedding over tf.range, frozen to a Const,
    is colocated (`loc:@`) with the inlined call's input that read it, which Grappler
    pruned. Grappler fixes such references on the nodes it sees, not on a stand-in; left
    as they are, the graph does not import."""
    names = {node.name for node in graph_def.node}
    for node in graph_def.node:
        if "_class" not in node.attr:
            continue
        refs = list(node.attr["_class"].list.s)
        kept = [r for r in refs if not r.startswith(b"loc:@") or r[5:].decode() in names]
        if len(kept) == len(refs):
            continue
        if kept:
            del node.attr["_class"].list.s[:]
            node.attr["_class"].list.s.extend(kept)
        else:
            del node.attr["_class"]


def _weights_in(light, weights: dict):
    """The stand-ins Grappler kept, made their Consts again (their inputs as Grappler
    left them, their colocation without the nodes it pruned)."""
    for node in light.node:
        if node.op == "Placeholder" and node.name in weights:
            node.op = "Const"
            node.attr.clear()
            for key, value in weights[node.name].attr.items():
                node.attr[key].CopyFrom(value)
    _drop_dangling_colocation(light)
    return light


def _optimize(graph_def, keep_nodes: list[str]):
    """Grappler, then fold shapes the fixed inputs made static, then Grappler again.

    Grappler treats Placeholders as feeds of any shape, so it never folds
    Shape(x) of an input-dependent x; with the input shapes now fixed those
    are constants, and folding them removes whole shape-computing subgraphs.
    """
    graph_def = keep_functional_control_flow(graph_def)
    _allow_inlining(graph_def)
    graph_def = _grappler(graph_def, keep_nodes)
    _strip_output_shapes(graph_def)
    if _materialize_shapes(graph_def, set(keep_nodes)):
        graph_def = _grappler(graph_def, keep_nodes)
        _strip_output_shapes(graph_def)
    _tiles_back_to_broadcasts(graph_def)
    return graph_def


_GRAPPLER_TILE = "ReplaceMulWithBroadcastByTile_Tile"  # arithmetic_optimizer.cc's name


def _tiles_back_to_broadcasts(graph_def) -> None:
    """Grappler's arithmetic optimizer turns `x * ones` (a broadcast) into Tile(x).
    OpenVINO's transpose sinking mis-shapes such a Tile before a Mul (ConvNeXt's
    LayerNorm: f32[1,1,5376,7] where [1,7,7,768] is meant), so the whole model failed
    to convert. BroadcastTo says the same where every tiled dim is 1, and converts."""
    tiles = [n for n in graph_def.node if n.op == "Tile" and _GRAPPLER_TILE in n.name]
    if not tiles:
        return
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    consts = {n.name: n for n in graph_def.node if n.op == "Const"}
    for node in tiles:
        op = graph.get_operation_by_name(node.name)
        source, out = op.inputs[0].shape, op.outputs[0].shape
        multiples = consts.get(node.input[1].split(":")[0])
        if multiples is None or not (source.is_fully_defined() and out.is_fully_defined()):
            continue
        times = tf.make_ndarray(multiples.attr["value"].tensor).tolist()
        if any(m != 1 and d != 1 for m, d in zip(times, source.as_list())):
            continue  # a real tile: copies of more than one element
        shape = graph_def.node.add(name=f"{node.name}/broadcast_shape", op="Const")
        shape.attr["dtype"].type = tf.int32.as_datatype_enum
        shape.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(out.as_list(), tf.int32))
        node.op = "BroadcastTo"
        node.input[1] = shape.name
        node.attr.pop("Tmultiples", None)
        node.attr["Tidx"].type = tf.int32.as_datatype_enum


_JIT_ATTRS = ("_noinline", "_XlaMustCompile", "_XlaCompile")


def _allow_inlining(graph_def) -> None:
    """Let Grappler inline functions the model marked for jit compilation.

    Keras 3 wraps some layers (e.g. ConvNeXt's depthwise conv) in a
    `jit_compile=True` function, which TF saves as a `_noinline` call with
    `_XlaMustCompile`. Left as a call, it is opaque to the partitioner and
    splits the model; the backend compiles its ops anyway, and where they stay
    in TF they compute the same without the jit.
    """
    for function in graph_def.library.function:
        for name in _JIT_ATTRS:
            function.attr.pop(name, None)
    for nodes in [graph_def.node] + [f.node_def for f in graph_def.library.function]:
        for node in nodes:
            for name in _JIT_ATTRS:
                node.attr.pop(name, None)


FUNCTIONAL_CONTROL_FLOW = frozenset({"While", "StatelessWhile", "If", "StatelessIf", "Case",
                                     "StatelessCase"})
_LOWER_ATTR = "_lower_using_switch_merge"
ORIGINAL_LOWER_ATTR = "_fuseflow_lower_using_switch_merge"


def keep_functional_control_flow(graph_def):
    """A copy in which no loop or conditional will be lowered to TF1 control flow."""
    out = graph_def.__class__()
    out.CopyFrom(graph_def)
    for nodes in [out.node] + [f.node_def for f in out.library.function]:
        for node in nodes:  # function bodies too: inlining brings TF2 loops to the top
            if node.op in FUNCTIONAL_CONTROL_FLOW:
                if _LOWER_ATTR in node.attr and ORIGINAL_LOWER_ATTR not in node.attr:
                    node.attr[ORIGINAL_LOWER_ATTR].b = node.attr[_LOWER_ATTR].b
                node.attr[_LOWER_ATTR].b = False
    return out


def restore_lowering(nodes) -> None:
    """Give loops and conditionals that stay in TF their original lowering attr back."""
    for node in nodes:
        if ORIGINAL_LOWER_ATTR in node.attr:
            node.attr[_LOWER_ATTR].b = node.attr.pop(ORIGINAL_LOWER_ATTR).b


def _strip_output_shapes(graph_def) -> None:
    """Inlined function bodies keep _output_shapes from their traced call sites, which
    contradict the shapes now fixed; TF recomputes shapes anyway."""
    for node in graph_def.node:
        node.attr.pop("_output_shapes", None)
    for function in graph_def.library.function:
        for node in function.node_def:
            node.attr.pop("_output_shapes", None)


def _materialize_shapes(graph_def, keep: set[str]) -> bool:
    """Replace Shape/Size/Rank of statically known tensors with constants, in place."""
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    changed = False
    for node in graph_def.node:
        if node.op not in ("Shape", "Size", "Rank") or node.name in keep:
            continue
        source = graph.get_operation_by_name(node.name).inputs[0]
        if not source.shape.is_fully_defined():
            continue
        dims = source.shape.as_list()
        value = {"Shape": dims, "Size": math.prod(dims), "Rank": len(dims)}[node.op]
        dtype = tf.dtypes.as_dtype(node.attr["out_type"].type) if node.op != "Rank" else tf.int32
        tensor = tf.make_tensor_proto(value, dtype=dtype)
        node.op = "Const"
        del node.input[:]
        node.attr.clear()
        node.attr["dtype"].type = dtype.as_datatype_enum
        node.attr["value"].tensor.CopyFrom(tensor)
        changed = True
    return changed


def inline_calls(graph_def, keep_nodes: list[str]):
    """The graph with its function calls inlined and nothing else changed, loops and
    conditionals kept functional: what freezing reads fastest (see load.py)."""
    graph_def = keep_functional_control_flow(graph_def)
    _allow_inlining(graph_def)
    graph_def = _grappler(graph_def, keep_nodes, ("function",))
    _strip_output_shapes(graph_def)  # a resource's shape, until freezing makes it a value
    return graph_def


def _grappler(graph_def, keep_nodes: list[str], optimizers=_OPTIMIZERS):
    from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, rewriter_config_pb2
    from tensorflow.python.grappler import tf_optimizer

    graph = tf.Graph()
    with graph.as_default():
        try:  # checks the graph; Grappler itself would skip what it cannot read
            tf.graph_util.import_graph_def(graph_def, name="")
        except Exception as e:
            raise errors.GraphError(
                f"the model's frozen graph does not import into TensorFlow: {errors.reason(e)}"
            ) from None
    # The GraphDef itself, not the imported graph's: exporting it again (as_graph_def,
    # export_meta_graph) copied ResNet50's 100 MB of weights twice more, for nothing
    # Grappler reads (it needs the nodes, the library and the fetch collection).
    meta = meta_graph_pb2.MetaGraphDef()
    meta.graph_def.CopyFrom(graph_def)
    for node in meta.graph_def.node:
        node.device = ""
    fetch = meta_graph_pb2.CollectionDef()
    fetch.node_list.value.extend(keep_nodes)
    meta.collection_def["train_op"].CopyFrom(fetch)
    config = config_pb2.ConfigProto()
    rewrite = config.graph_options.rewrite_options
    rewrite.optimizers.extend(optimizers)
    rewrite.meta_optimizer_iterations = rewriter_config_pb2.RewriterConfig.TWO
    rewrite.min_graph_nodes = -1
    rewrite.fail_on_optimizer_errors = False
    optimized = tf_optimizer.OptimizeGraph(config, meta)
    _drop_unused_functions(optimized)
    return optimized


def _drop_unused_functions(graph_def) -> None:
    """Inlining leaves the old bodies in the library; keep only reachable ones."""
    from fuseflow.graph_util import reachable_functions

    functions = {f.signature.name: f for f in graph_def.library.function}
    reachable = set(reachable_functions(graph_def, graph_def.node))
    kept = [functions[n] for n in functions if n in reachable]
    gradients = [g for g in graph_def.library.gradient if g.function_name in reachable]
    del graph_def.library.function[:]
    graph_def.library.function.extend(kept)
    del graph_def.library.gradient[:]
    graph_def.library.gradient.extend(gradients)
