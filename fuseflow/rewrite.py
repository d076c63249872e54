"""Stage 6: graph + compiled segments -> graph with one fused node per segment.

The fused node reads the segment's outside inputs; every segment node that
was read from outside becomes an IdentityN of the same name over the fused
node's outputs, so consumers, signature tensor names and control edges all
keep working unchanged. The segment's original subgraph goes into the
function library: it is the XLA call's body, and the native op's fallback.
"""

from __future__ import annotations

import dataclasses

from fuseflow.assets import FUSED_OP, Payloads, move_to_assets
from fuseflow.backends import get_backend
from fuseflow.backends.base import SegmentGraph
from fuseflow.compile import CompiledSegment
from fuseflow.graph_util import constant_nodes, is_weight, node_name, split_weights
from fuseflow.optimize import restore_lowering
from fuseflow.options import CompilerOptions
from fuseflow.tf_compat import tf

# Constant values at least this big bypass the TF graph a segment's function is built in.
_BIG_CONSTANT = 1 << 16


def add_segment_function(library, segment: SegmentGraph, function_name: str,
                         weights: bool = True, apart: list | None = None):
    """The segment's GraphDef as a FunctionDef (Placeholders become arguments), added to
    library (a FunctionDefLibrary); returns it.

    Going through a TF graph, a constant's value was copied five times (parsed, imported,
    read back per node, copied into the library; ResNet50: 100 MB each): big values are
    cut out before and set once, into the library's copy of the function. weights=False
    leaves them out (zeros, if it ever ran): for a fallback that must never run.
    apart: a list that takes the weights extract appended, as the serialized NodeDefs
    the function is missing (assets.move_to_assets writes them into the function's file
    as they are: never parsed, copied nor serialized again)."""
    graph_def, appended = split_weights(segment)
    contents = {}
    for node in graph_def.node:
        if node.op == "Const":
            tensor = node.attr["value"].tensor
            content = tensor.tensor_content
            if len(content) >= _BIG_CONSTANT:
                contents[node.name] = content
                tensor.ClearField("tensor_content")
    full = {}
    for data in appended:  # a stand-in of its dtype and shape is all the import needs
        weight = tf.compat.v1.NodeDef.FromString(data)
        full[weight.name] = (weight, data)
        stand_in = graph_def.node.add(name=weight.name, op=weight.op)
        stand_in.attr["dtype"].CopyFrom(weight.attr["dtype"])
        value = weight.attr["value"].tensor
        stand_in.attr["value"].tensor.dtype = value.dtype
        stand_in.attr["value"].tensor.tensor_shape.CopyFrom(value.tensor_shape)
    function = library.function.add()
    function.CopyFrom(_as_function(graph_def, segment, function_name))
    if not weights:
        return function
    if apart is not None:
        for k in reversed([k for k, n in enumerate(function.node_def) if n.name in full]):
            del function.node_def[k]
        apart.extend(data for _, data in full.values())
    for node in function.node_def:
        if node.name in full:
            node.CopyFrom(full[node.name][0])
        elif node.op == "Const" and node.name in contents:
            node.attr["value"].tensor.tensor_content = contents[node.name]
    return function


def _as_function(graph_def, segment: SegmentGraph, function_name: str):
    """graph_def (the segment's) as a FunctionDef named function_name."""
    from tensorflow.python.framework import graph_to_function_def

    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    inputs = [graph.get_tensor_by_name(f"{p.name}:0") for p in segment.inputs]
    placeholders = {p.name for p in segment.inputs}
    operations = [op for op in graph.get_operations() if op.name not in placeholders]
    outputs = [graph.get_tensor_by_name(p.name) for p in segment.outputs]
    out_names = [f"output_{k}" for k in range(len(outputs))]
    fdef = graph_to_function_def.graph_to_function_def(graph, operations, inputs, outputs,
                                                       out_names)
    fdef.signature.name = function_name
    return fdef


def rewrite_into_assets(graph_def, compiled: list[CompiledSegment], options: CompilerOptions,
                        keep_nodes: set[str], folder) -> tuple[object, list]:
    """(the rewritten graph as a saved model holds it, the asset files in folder now
    holding its fused ops' blobs and fallbacks: assets.move_to_assets). Each blob and
    fallback weight is written as it is, never copied into the graph and out again."""
    payloads = Payloads()
    out = rewrite_graph(graph_def, compiled, options, keep_nodes, payloads)
    return move_to_assets(out, folder, copy=False, payloads=payloads)


def fused_node_apart(backend, segment: SegmentGraph, function_name: str, artifact,
                     options: CompilerOptions):
    """(the segment's fused node without its blob, True) where that node is a
    FuseflowOp, whose blob belongs in an asset file; else (the node as the backend makes
    it, False): another backend's node holds what it needs itself."""
    if artifact.executable:
        fused = backend.fused_node(segment, function_name,
                                   dataclasses.replace(artifact, executable=b""), options)
        if fused.op == FUSED_OP:
            return fused, True
    return backend.fused_node(segment, function_name, artifact, options), False


def rewrite_graph(graph_def, compiled: list[CompiledSegment], options: CompilerOptions,
                  keep_nodes: set[str], payloads: Payloads):
    """A new GraphDef with every successfully compiled segment fused, each by the backend
    that compiled it.

    payloads: takes each FuseflowOp's blob and the weights its fallback lacks, held out of
    the graph; it is then whole only once assets.move_to_assets has written them."""
    backends = {name: get_backend(name) for name in {c.backend for c in compiled
                                                     if c.artifact is not None}}
    out, weights = _without_weight_values(graph_def)
    taken = {n.name for n in out.node} | {f.signature.name for f in out.library.function}
    removed: set[str] = set()
    new_nodes = []
    for item in compiled:
        if item.artifact is None:
            continue
        seg = item.segment
        function_name = _unique(f"{seg.name}_native", taken)
        fused, held = fused_node_apart(backends[item.backend], seg, function_name,
                                       item.artifact, item.options or options)
        left_out = [] if held else None
        add_segment_function(out.library, seg, function_name, apart=left_out)
        fused.name = _unique(seg.name, taken)
        if held:
            payloads.hold(fused, item.artifact.executable)
            payloads.weights[function_name] = left_out
        fused.input.extend(seg.input_sources)
        new_nodes.append(fused)
        removed.update(seg.node_names)
        by_node: dict[str, list[int]] = {}
        for k, port in enumerate(seg.outputs):
            by_node.setdefault(node_name(port.name), []).append(k)
        for name, ks in by_node.items():
            ident = tf.compat.v1.NodeDef(name=name, op="IdentityN")
            ident.input.extend(f"{fused.name}:{k}" for k in ks)
            ident.attr["T"].list.type.extend(seg.outputs[k].dtype for k in ks)
            new_nodes.append(ident)
    kept = [n for n in out.node if n.name not in removed]
    restore_lowering(kept)
    replaced = {n.name for n in new_nodes}
    for node in kept:  # a constant pinned into a fused TF1 loop: unused now, pruned below
        if node.op == "Const":
            inputs = [i for i in node.input if node_name(i) not in removed - replaced]
            del node.input[:]
            node.input.extend(inputs)
    _delete_nodes(out, removed)
    out.node.extend(new_nodes)
    _prune_dead_constants(out, keep_nodes)
    for node in out.node:  # the weights still read outside the segments get their values
        if node.name in weights and node.op == "Const" and node.name not in replaced:
            node.CopyFrom(weights[node.name])
    return out


def _without_weight_values(graph_def):
    """(a copy of graph_def whose weights are Consts without their values, {name: the
    weight}): most weights move into segments and are pruned here, and copying them
    first cost ResNet50 100 MB."""
    weights = {n.name: n for n in graph_def.node if is_weight(n)}
    out = tf.compat.v1.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        copy = out.node.add()
        if node.name not in weights:
            copy.CopyFrom(node)
            continue
        copy.name, copy.op, copy.device = node.name, node.op, node.device
        for key, value in node.attr.items():
            if key != "value":
                copy.attr[key].CopyFrom(value)
        tensor = node.attr["value"].tensor
        copy.attr["value"].tensor.dtype = tensor.dtype
        copy.attr["value"].tensor.tensor_shape.CopyFrom(tensor.tensor_shape)
    return out, weights


def _delete_nodes(graph_def, names: set[str]) -> None:
    """Delete the named nodes where they are: rebuilding the list (del, extend) copied
    every node kept, the fused ones' blobs and the model's weights included."""
    for k in reversed([k for k, n in enumerate(graph_def.node) if n.name in names]):
        del graph_def.node[k]


def _unique(name: str, taken: set[str]) -> str:
    candidate, k = name, 1
    while candidate in taken:
        candidate, k = f"{name}_{k}", k + 1
    taken.add(candidate)
    return candidate


def _prune_dead_constants(graph_def, keep_nodes: set[str]) -> None:
    """Constants (and constant chains) copied into segments and no longer read elsewhere."""
    constants = constant_nodes(graph_def) - keep_nodes
    while True:
        used = {node_name(i) for n in graph_def.node for i in n.input}
        dead = {n.name for n in graph_def.node if n.name in constants and n.name not in used}
        if not dead:
            return
        _delete_nodes(graph_def, dead)
