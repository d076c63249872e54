"""Static shapes of loop and conditional outputs, from their bodies.

TF's shape functions don't look into functions: a While's outputs get its
`output_shapes` attr (traced with a free batch dim), an If's likewise, and a
TensorListStack after a loop has an unknown length. Once the input shapes are
fixed, each is derived here and written back into the graph as attrs
(a wrong one would show in the compile-time check of every segment against TF;
TensorListStack checks its num_elements at run time):

- While: loop variable k keeps shape s if the body, given s for every
  variable (and the TensorLists' element shapes), returns shape s for k. A
  variable whose shape the body does not preserve is relaxed to what both
  agree on and the body is inferred again, until nothing changes.
- If/Case: an output's shape is what every branch, given the inputs' shapes,
  agrees on.
- TensorListStack: `num_elements` is the list's length where it is fixed: the
  list comes from TensorListReserve with a constant size or TensorListFromTensor
  of a known shape, through loops whose body only sets items.

Loops feed loops (stacked RNNs), so the graph is inferred again after every
round that changed something.
"""

from __future__ import annotations

import logging

import numpy as np

from fuseflow.graph_util import node_name, output_index
from fuseflow.tf_compat import tf

log = logging.getLogger("fuseflow")

_WHILE = frozenset({"While", "StatelessWhile"})
_COND = frozenset({"If", "StatelessIf", "Case", "StatelessCase"})
_LENGTH_KEEPING = frozenset({"Identity", "TensorListSetItem"})  # list in -> same length out
_MAX_ROUNDS = 20


def refine_loop_shapes(graph_def):
    """A copy of graph_def whose loop/cond output_shapes and TensorListStack lengths are
    as specific as the bodies prove; graph_def itself when there is nothing to refine."""
    if not any(n.op in _WHILE | _COND | {"TensorListStack"} for n in graph_def.node):
        return graph_def
    out = graph_def.__class__()
    out.CopyFrom(graph_def)
    refined = False
    functions = {f.signature.name: f for f in out.library.function}
    for _ in range(_MAX_ROUNDS):
        graph = tf.Graph()
        with graph.as_default():
            tf.graph_util.import_graph_def(out, name="")
        changed = False
        nodes = {n.name: n for n in out.node}
        for node in list(out.node):
            if node.op in _WHILE | _COND:
                changed |= _refine_outputs(node, graph, out, functions)
            elif node.op == "TensorListFromTensor":
                changed |= _refine_element_shape(node, 1, graph.get_operation_by_name(
                    node.name).inputs[0].shape[1:], graph, out)
            elif node.op == "TensorListStack":
                length, shape = _list_info(node.input[0], nodes, graph, functions, out)
                if length is not None and node.attr["num_elements"].i < 0:
                    node.attr["num_elements"].i = length
                    changed = True
                changed |= _refine_element_shape(node, 1, shape, graph, out)
        refined |= changed
        if not changed:
            break
    return out if refined else graph_def


def _refine_outputs(node, graph, graph_def, functions) -> bool:
    op = graph.get_operation_by_name(node.name)
    inputs = list(op.inputs)
    if node.op in _WHILE:
        shapes = _while_shapes(node, inputs, graph_def, functions)
    else:
        shapes = _cond_shapes(node, inputs[1:], graph_def, functions)
    if shapes is None:
        return False
    current = [tf.TensorShape(s) for s in node.attr["output_shapes"].list.shape] \
        or [t.shape for t in op.outputs]
    if len(current) != len(shapes):
        return False
    refined = [new if now.is_compatible_with(new) and _more_specific(new, now) else now
               for now, new in zip(current, shapes)]
    if all(_same(a, b) for a, b in zip(refined, current)):
        return False
    del node.attr["output_shapes"].list.shape[:]
    node.attr["output_shapes"].list.shape.extend(s.as_proto() for s in refined)
    return True


def _refine_element_shape(node, index: int, shape: tf.TensorShape, graph, graph_def) -> bool:
    """Give node a fully known element_shape where it has a less specific one."""
    if not shape.is_fully_defined():
        return False
    current = _shape_value(graph.get_operation_by_name(node.name).inputs[index])
    if not current.is_compatible_with(shape) or _same(current, shape):
        return False
    _set_shape_input(node, index, shape, graph_def)
    return True


def _more_specific(a: tf.TensorShape, b: tf.TensorShape) -> bool:
    if a.rank is None:
        return False
    if b.rank is None:
        return True
    return all(y is None or x == y for x, y in zip(a.as_list(), b.as_list())) and a != b


def _while_shapes(node, inputs, graph_def, functions):
    body = functions.get(node.attr["body"].func.name)
    if body is None:
        return None
    shapes = [t.shape for t in inputs]
    for _ in range(len(shapes) + 1):
        returned = _body_shapes(body, inputs, shapes, graph_def)
        if returned is None or len(returned) != len(shapes):
            return None
        relaxed = [s.most_specific_compatible_shape(r) for s, r in zip(shapes, returned)]
        if all(_same(a, b) for a, b in zip(relaxed, shapes)):
            return shapes
        shapes = relaxed
    return None


def _cond_shapes(node, inputs, graph_def, functions):
    names = [node.attr[b].func.name for b in ("then_branch", "else_branch") if b in node.attr]
    names += [f.name for f in node.attr["branches"].list.func] if "branches" in node.attr else []
    merged = None
    for name in names:
        if name not in functions:
            return None
        returned = _body_shapes(functions[name], inputs, [t.shape for t in inputs], graph_def)
        if returned is None:
            return None
        merged = returned if merged is None else [
            a.most_specific_compatible_shape(b) for a, b in zip(merged, returned)]
    return merged


def _same(a: tf.TensorShape, b: tf.TensorShape) -> bool:
    if a.rank is None or b.rank is None:
        return a.rank == b.rank
    return a.as_list() == b.as_list()


def _body_graph(fdef, outer_inputs, shapes, graph_def):
    """The function imported under "body/" with its arguments fed by placeholders of the
    given shapes (and the handle data, i.e. element shapes, of TensorList arguments),
    so TF's own shape inference runs through it: (graph, feeds, flat names) or None."""
    from tensorflow.python.framework import function_def_to_graph
    from tensorflow.python.ops import handle_data_util

    library = tf.compat.v1.GraphDef()
    library.versions.CopyFrom(graph_def.versions)  # producer 0 reads shape [] as unknown
    library.library.CopyFrom(graph_def.library)
    graph = tf.Graph()
    try:
        with graph.as_default():
            tf.graph_util.import_graph_def(library, name="")
            body_def, flat = function_def_to_graph.function_def_to_graph_def(fdef)
            for n in body_def.node:
                n.attr.pop("_output_shapes", None)
            feeds = {}
            for arg, outer, shape in zip(fdef.signature.input_arg, outer_inputs, shapes):
                ph = tf.compat.v1.placeholder(outer.dtype, shape)
                if outer.dtype in (tf.variant, tf.resource):
                    data = handle_data_util.get_resource_handle_data(outer)
                    if data.is_set:
                        handle_data_util.set_handle_data(ph, data)
                feeds[f"{arg.name}:0"] = ph
            tf.graph_util.import_graph_def(body_def, input_map=feeds, name="body")
    except Exception as e:  # a body TF can't rebuild alone: keep the traced shapes
        log.debug("no shapes from function %s: %s", fdef.signature.name, e)
        return None
    return graph, feeds, flat


def _body_tensor(body, ref: str):
    """A body tensor by its FunctionDef name ('node:output:0', or an argument)."""
    graph, feeds, flat = body
    if f"{ref}:0" in feeds:
        return feeds[f"{ref}:0"]
    name = flat.get(ref, ref)
    return graph.get_tensor_by_name(f"body/{name if ':' in name else name + ':0'}")


def _body_shapes(fdef, outer_inputs, shapes, graph_def):
    """The shapes a function returns given its arguments' shapes, or None."""
    body = _body_graph(fdef, outer_inputs, shapes, graph_def)
    if body is None:
        return None
    try:
        return [_body_tensor(body, fdef.ret[out.name]).shape
                for out in fdef.signature.output_arg]
    except (KeyError, ValueError):
        return None


def _list_info(tensor: str, nodes, graph, functions, graph_def, depth: int = 0
               ) -> tuple[int | None, tf.TensorShape]:
    """(length, element shape) of a TensorList tensor, as far as they are fixed."""
    unknown = (None, tf.TensorShape(None))
    node = nodes.get(node_name(tensor))
    if node is None or depth > 50:
        return unknown
    op = graph.get_operation_by_name(node.name)
    if node.op == "Identity":
        return _list_info(node.input[0], nodes, graph, functions, graph_def, depth + 1)
    if node.op == "TensorListReserve":
        size, shape = tf.get_static_value(op.inputs[1]), _shape_value(op.inputs[0])
        return (int(size) if size is not None and int(size) >= 0 else None), shape
    if node.op == "TensorListFromTensor":
        shape = op.inputs[0].shape
        return (shape[0] if shape.rank else None), (shape[1:] if shape.rank else shape)
    if node.op not in _WHILE:
        return unknown
    k = output_index(tensor)
    fdef = functions.get(node.attr["body"].func.name)
    items = _set_items(fdef, k) if fdef is not None else None
    if items is None:
        return unknown
    length, shape = _list_info(node.input[k], nodes, graph, functions, graph_def, depth + 1)
    if items:
        body = _body_graph(fdef, list(op.inputs), [t.shape for t in op.inputs], graph_def)
        if body is None:
            return length, tf.TensorShape(None)
        try:
            for ref in items:
                shape = shape.merge_with(_body_tensor(body, ref).shape)
        except (KeyError, ValueError):
            return length, tf.TensorShape(None)
    return length, shape


def _shape_value(tensor) -> tf.TensorShape:
    value = tf.get_static_value(tensor)
    if value is None:
        return tf.TensorShape(None)
    if value.ndim == 0:  # -1: unknown rank
        return tf.TensorShape(None)
    return tf.TensorShape([d if d >= 0 else None for d in value.tolist()])


def _set_items(fdef, k: int) -> list[str] | None:
    """The items a loop body sets into list variable k, if the list keeps its length
    (argument k comes back with items only set), else None."""
    arg = fdef.signature.input_arg[k].name
    source = fdef.ret[fdef.signature.output_arg[k].name]
    body = {n.name: n for n in fdef.node_def}
    items = []
    for _ in range(len(body) + 1):
        if source == arg:
            return items
        node = body.get(source.split(":")[0])
        if node is None or node.op not in _LENGTH_KEEPING or (
                node.op == "TensorListSetItem"
                and node.attr["resize_if_index_out_of_bounds"].b):
            return None
        if node.op == "TensorListSetItem":
            items.append(node.input[2])
        source = node.input[0]
    return None


def _set_shape_input(node, index: int, shape: tf.TensorShape, graph_def) -> None:
    """Point node's element_shape input at a new constant holding shape."""
    const = const_node(graph_def, f"{node.name}/fuseflow_element_shape",
                   np.array(shape.as_list(), np.int32))
    node.input[index] = const.name
    if "shape_type" in node.attr:
        node.attr["shape_type"].type = tf.int32.as_datatype_enum


def batch_sized_loop_states(graph_def, batch_input: str, batch_size: int) -> list[str]:
    """Make graph_def's loops (in place) start the states Grappler folded at the compiled
    batch (a Keras RNN's zero state, from tf.shape(x)[0]) with dim 0 read from the
    Placeholder batch_input again; returns the constants so replaced.

    A uniform constant of shape [batch_size, ...] fed to a While is taken as such a
    state. At the compiled batch the values are the same; at other batch sizes an
    XLA loop then compiles for them instead of failing on the folded shape (the
    other-batch check of compile() still judges the result)."""
    consts = {n.name: n for n in graph_def.node if n.op == "Const"}
    folded: dict[str, np.ndarray] = {}
    for node in graph_def.node:
        if node.op not in _WHILE:
            continue
        for inp in node.input:
            const = consts.get(node_name(inp))
            if const is None or inp.startswith("^") or output_index(inp) != 0:
                continue
            value = tf.make_ndarray(const.attr["value"].tensor)
            if value.ndim and value.shape[0] == batch_size and value.size \
                    and (value == value.flat[0]).all():
                folded[const.name] = value
    if not folded:
        return []
    source = next(n for n in graph_def.node if n.name == node_name(batch_input))
    batch = batch_dim(graph_def, batch_input, source.attr["dtype"].type, "fuseflow_batch")
    fills = {}
    for name, value in folded.items():
        dims = dims_with_batch(graph_def, batch, np.array(value.shape[1:], np.int32),
                               f"{name}/fuseflow_batch_dims")
        scalar = const_node(graph_def, f"{name}/fuseflow_batch_value",
                        value.reshape(-1)[:1].reshape(()))
        fill = graph_def.node.add(name=f"{name}/fuseflow_batch_fill", op="Fill",
                                  input=[dims, scalar.name])
        fill.attr["T"].CopyFrom(consts[name].attr["dtype"])
        fill.attr["index_type"].type = tf.int32.as_datatype_enum
        fills[name] = fill.name
    for node in graph_def.node:
        if node.op in _WHILE:
            for k, inp in enumerate(node.input):
                if not inp.startswith("^") and node_name(inp) in fills:
                    node.input[k] = fills[node_name(inp)]
    log.debug("loop states given their batch dim at run time: %s", sorted(fills))
    return sorted(fills)


def batch_dim(graph_def, tensor: str, dtype: int, prefix: str, out_type: int | None = None) -> str:
    """Nodes under prefix (added to graph_def) that read [dim 0 of tensor] at run time,
    as out_type (int32 by default); returns the name of that 1-element tensor. dtype:
    tensor's DataType. XLA resolves it at compile time, for each shape it compiles."""
    out_type = out_type or tf.int32.as_datatype_enum
    shape = graph_def.node.add(name=f"{prefix}/shape", op="Shape", input=[tensor])
    shape.attr["T"].type = dtype
    shape.attr["out_type"].type = out_type
    const_node(graph_def, f"{prefix}/begin", np.array([0], np.int32))
    const_node(graph_def, f"{prefix}/size", np.array([1], np.int32))
    batch = graph_def.node.add(name=f"{prefix}/batch", op="Slice",
                               input=[shape.name, f"{prefix}/begin", f"{prefix}/size"])
    batch.attr["T"].type = out_type
    batch.attr["Index"].type = tf.int32.as_datatype_enum
    return batch.name


def dims_with_batch(graph_def, batch: str, rest: np.ndarray, name: str) -> str:
    """A ConcatV2 node named name: batch (batch_dim's), then the constant dims rest (of
    batch's integer type); returns its name."""
    const_node(graph_def, f"{name}/rest", rest)
    const_node(graph_def, f"{name}/axis", np.array(0, np.int32))
    dims = graph_def.node.add(name=name, op="ConcatV2",
                              input=[batch, f"{name}/rest", f"{name}/axis"])
    dims.attr["T"].type = tf.as_dtype(rest.dtype).as_datatype_enum
    dims.attr["N"].i = 2
    dims.attr["Tidx"].type = tf.int32.as_datatype_enum
    return dims.name


def const_node(graph_def, name: str, value: np.ndarray):
    node = graph_def.node.add(name=name, op="Const")
    node.attr["dtype"].type = tf.as_dtype(value.dtype).as_datatype_enum
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    return node
