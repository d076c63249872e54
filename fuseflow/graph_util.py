"""Small GraphDef helpers shared by the pipeline stages, and the reference's
`graph_util.inference_graph_from_session` (as TF's own graph_util mixes both)."""

from __future__ import annotations

from collections.abc import Collection, Iterable


def node_name(tensor_or_input: str) -> str:
    """'^a', 'a:1', 'a' -> 'a'."""
    return tensor_or_input.lstrip("^").split(":")[0]


def output_index(tensor_or_input: str) -> int:
    """'a:1' -> 1, 'a' -> 0."""
    parts = tensor_or_input.split(":")
    return int(parts[1]) if len(parts) > 1 else 0


def is_control(input_name: str) -> bool:
    return input_name.startswith("^")


def tensor_name(tensor_or_input: str) -> str:
    """Canonical 'node:index' form."""
    return f"{node_name(tensor_or_input)}:{output_index(tensor_or_input)}"


def called_functions(attr_values: Iterable) -> list[str]:
    """Names of functions referenced by a node's (or FunctionDef node's) attrs."""
    names = []
    for value in attr_values:
        if value.HasField("func"):
            names.append(value.func.name)
        elif value.HasField("list"):
            names += [f.name for f in value.list.func]
    return names


def reachable_functions(graph_def, nodes) -> list[str]:
    """Names of the library functions nodes call, and those they call in turn."""
    functions = {f.signature.name: f for f in graph_def.library.function}
    seen, order = set(), []
    stack = [f for n in nodes for f in called_functions(n.attr.values())]
    while stack:
        name = stack.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        order.append(name)
        for n in functions[name].node_def:
            stack += called_functions(n.attr.values())
    return order


def copy_called_functions(graph_def, nodes, out) -> None:
    """Copy into out.library the functions nodes call, and those they call in turn."""
    functions = {f.signature.name: f for f in graph_def.library.function}
    have = {f.signature.name for f in out.library.function}
    for name in reachable_functions(graph_def, nodes):
        if name not in have:
            out.library.function.add().CopyFrom(functions[name])


def subgraph(graph_def, keep: Iterable[str]):
    """The nodes keep needs (inputs and control inputs, transitively) in their order,
    with the functions they call: TF's extract_sub_graph, which spent 0.1 s of
    ResNet50's load parsing input names, and copied every function of the library."""
    nodes = {n.name: n for n in graph_def.node}
    needed, stack = set(), [k for k in keep if k in nodes]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        stack += [node_name(i) for i in nodes[name].input]
    out = graph_def.__class__()
    out.versions.CopyFrom(graph_def.versions)
    out.node.extend(n for n in graph_def.node if n.name in needed)
    copy_called_functions(graph_def, out.node, out)
    functions = {f.signature.name for f in out.library.function}
    out.library.gradient.extend(g for g in graph_def.library.gradient
                                if g.function_name in functions
                                and g.gradient_func in functions)
    return out


def body_nodes(graph_def, node) -> list:
    """Every NodeDef in the functions node calls, recursively (a loop's cond and body)."""
    functions = {f.signature.name: f for f in graph_def.library.function}
    return [n for name in reachable_functions(graph_def, [node])
            for n in functions[name].node_def]


def split_weights(segment) -> tuple[object, list[memoryview]]:
    """(the segment's GraphDef without the weights extract appended, those weights as
    serialized NodeDefs): the stages that rebuild the segment keep them as bytes and
    parse only the rest (ResNet50: 100 KB of its 100 MB)."""
    from fuseflow.tf_compat import tf

    data, start = segment.graph_def_bytes, segment.weights_at
    if start < 0:
        return tf.compat.v1.GraphDef.FromString(data), []
    view, weights, pos = memoryview(data), [], start
    while pos < len(data):
        if data[pos] != 0x0A:  # GraphDef.node = 1, length-delimited
            raise ValueError(f"segment {segment.name}: no node field at byte {pos}")
        length, shift, pos = 0, 0, pos + 1
        while True:
            byte = data[pos]
            length |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                break
        weights.append(view[pos:pos + length])
        pos += length
    return tf.compat.v1.GraphDef.FromString(view[:start]), weights


def field_header(number: int, length: int) -> bytes:
    """The bytes protobuf writes before a bytes or message field of `length` bytes. A
    message serialized, or a field so written, joins others by concatenation (repeated
    fields append): big parts are encoded once, never copied into a message first."""
    header = bytearray()
    for value in (number << 3 | 2, length):  # the tag (wire type 2), then the length
        while value > 0x7F:
            header.append(value & 0x7F | 0x80)
            value >>= 7
        header.append(value)
    return bytes(header)


# Nodes that hold or pass data but compute nothing; never counted as ops.
NON_COMPUTE_OPS = frozenset({"Const", "Placeholder", "PlaceholderWithDefault", "NoOp", "_Arg",
                             "_Retval", "VarHandleOp", "VariableV2"})


def count_ops(graph_def, only: Collection[str] | None = None) -> int:
    """Computing ops as a user thinks of them, with calls, loops and conditionals counted
    by their bodies; only: count just these nodes."""
    functions = {f.signature.name: f for f in graph_def.library.function}
    memo: dict[str, int] = {}

    def body_count(name: str) -> int:
        if name not in memo:
            memo[name] = 0  # guards against recursion
            fdef = functions[name]
            memo[name] = sum((n.op not in NON_COMPUTE_OPS) + sum(
                body_count(f) for f in called_functions(n.attr.values()) if f in functions)
                for n in fdef.node_def)
        return memo[name]

    total = 0
    for node in graph_def.node:
        if only is not None and node.name not in only:
            continue
        calls = [f for f in called_functions(node.attr.values()) if f in functions]
        total += sum(body_count(f) for f in calls) if calls else node.op not in NON_COMPUTE_OPS
    return total


# TF1 control flow: a value inside a frame is not a graph constant even if its inputs are.
_FRAME_OPS = frozenset({"Enter", "Exit", "Switch", "Merge", "NextIteration", "LoopCond",
                        "RefEnter", "RefExit", "RefSwitch", "RefMerge", "RefNextIteration"})


def constant_nodes(graph_def, also: Collection[str] = ()) -> set[str]:
    """Nodes whose every output is a graph constant: Consts, and the stateless chains
    computed from Consts alone that Grappler left unfolded (e.g. results over its size
    limit). Backends need such operands (axis, perm, shape...) as constants in a segment.
    also: other nodes to take as constants (optimize.py's stand-ins for weights)."""
    from tensorflow.python.framework import op_def_registry

    nodes = {n.name: n for n in graph_def.node}
    memo: dict[str, bool] = {}

    def constant(name: str) -> bool:
        stack = [name]
        while stack:  # iterative: chains can be deep
            top = stack[-1]
            if top in memo:
                stack.pop()
                continue
            node = nodes[top]
            if node.op == "Const" or top in also:
                memo[top] = True
                stack.pop()
                continue
            op_def = op_def_registry.get(node.op)
            if (op_def is None or op_def.is_stateful or node.op in _FRAME_OPS
                    or node.op in NON_COMPUTE_OPS or not node.input
                    or any(is_control(i) for i in node.input)
                    or called_functions(node.attr.values())):
                memo[top] = False
                stack.pop()
                continue
            pending = [node_name(i) for i in node.input if node_name(i) not in memo]
            if pending:
                stack += pending
                continue
            memo[top] = all(memo[node_name(i)] for i in node.input)
            stack.pop()
        return memo[name]

    return {n.name for n in graph_def.node if constant(n.name)}


def constant_chain(nodes: dict, name: str, skip: tuple[set[str], ...] = ()) -> list[str]:
    """The nodes that compute constant node `name`, inputs first, leaving out those in
    any set of `skip` (nodes already in the graph being built)."""
    order, seen, stack = [], set(), [(name, False)]
    while stack:
        current, expanded = stack.pop()
        if any(current in s for s in skip) or (current in seen and not expanded):
            continue
        if expanded:
            order.append(current)
            continue
        seen.add(current)
        stack.append((current, True))
        if nodes[current].op != "Const":
            stack += [(node_name(i), False) for i in nodes[current].input]
    return order


def copy_constant(node):
    """A constant node as it goes into a segment: no device, no control inputs."""
    from fuseflow.tf_compat import tf

    copy = tf.compat.v1.NodeDef()
    copy.CopyFrom(node)
    copy.ClearField("device")
    if node.op == "Const":
        copy.ClearField("input")  # control inputs of consts are not needed
    return copy


# Consts larger than this are weights: the stages that only need the graph's structure
# and shapes get stand-ins. Small ones stay: Grappler folds them (a BatchNorm's scale
# from gamma and the variance), and a dtype, axis or shape operand is always small.
STAND_IN_BYTES = 64 << 10


def is_weight(node) -> bool:
    """A Const over STAND_IN_BYTES with no input: a weight, as the stages treat it."""
    return (node.op == "Const" and not node.input
            and node.attr["value"].tensor.ByteSize() > STAND_IN_BYTES)


def without_weights(graph_def) -> tuple[object, dict]:
    """A copy with each large Const replaced by a Placeholder of its dtype and shape (a
    stand-in); and {name: the Const's NodeDef}. Copying ResNet50's graph this way takes
    15 ms; each copy of its 100 MB of weights costs page faults by the hundred thousand.

    Control inputs on those Consts are dropped (a constant orders nothing). Grappler
    drops them itself from a Const, but not from a Placeholder: an inlined call's
    input_control_node would otherwise keep them all and pass them on to every
    constant it folds, tying segments together through control edges.
    """
    weights = {node.name: node for node in graph_def.node if is_weight(node)}
    light = graph_def.__class__()
    light.versions.CopyFrom(graph_def.versions)
    light.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        if node.name not in weights:
            copy = light.node.add()
            copy.CopyFrom(node)
            if any(i.startswith("^") and i[1:] in weights for i in node.input):
                kept = [i for i in node.input if not (i.startswith("^") and i[1:] in weights)]
                del copy.input[:]
                copy.input.extend(kept)
            continue
        value = node.attr["value"].tensor
        stand_in = light.node.add(name=node.name, op="Placeholder", device=node.device)
        stand_in.attr["dtype"].type = value.dtype
        stand_in.attr["shape"].shape.CopyFrom(value.tensor_shape)
    return light, weights


def __getattr__(name: str):
    """The reference's public graph_util.inference_graph_from_session (it compiles a live
    session's graph), imported when first asked for: it needs TensorFlow, and a
    compiler process imports this module without it."""
    if name == "inference_graph_from_session":
        from fuseflow.session_compile import inference_graph_from_session

        return inference_graph_from_session
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
