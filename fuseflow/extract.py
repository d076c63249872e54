"""Cut a proposed segment out of the graph as a GraphDef that stands alone.

Constants a segment reads are copied into it, with the chains of ops that
compute them from Consts alone (never passed in as inputs: backends drop
constant-only ports, fold constants best themselves, and need operands such
as a concat axis or a reshape shape to be constants).
Every node of the segment that is read from outside keeps its name in the
main graph through an IdentityN, so no consumer needs rewiring.
"""

from __future__ import annotations

from fuseflow.backends.base import Port, SegmentGraph
from fuseflow.batch import BatchInfo, free_batch_shapes
from fuseflow.graph_util import (
    constant_chain,
    constant_nodes,
    copy_called_functions,
    copy_constant,
    count_ops,
    field_header,
    is_control,
    is_weight,
    node_name,
    output_index,
)
from fuseflow.loops import batch_sized_loop_states
from fuseflow.optimize import ORIGINAL_LOWER_ATTR
from fuseflow.partition import Segment
from fuseflow.shapes import TensorInfo
from fuseflow.tf_compat import tf

INPUT_PREFIX = "fuseflow_input_"

def extract_segment(graph_def, segment: Segment, infos: dict[str, TensorInfo],
                    consumers: dict[str, set[str]], fetch_tensors: set[str],
                    batch_info: BatchInfo | None, constants: set[str] | None = None,
                    per_shape: bool = False) -> SegmentGraph:
    """A standalone GraphDef for the segment, with its ports at their compiled shapes.

    constants: graph_util.constant_nodes(graph_def), computed here when not given.
    per_shape: the backend compiles again for each input shape (Backend.compiles_per_shape);
    with a free batch (batch_info), the loops' zero states folded at the compiled batch
    are then computed from a batch input again (loops.batch_sized_loop_states), and
    per-sample reshapes and transposed convolutions take their batch from their
    input (batch.free_batch_shapes)."""
    nodes = {n.name: n for n in graph_def.node}
    if constants is None:
        constants = constant_nodes(graph_def)
    members = set(segment.nodes)
    out = tf.compat.v1.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    placeholders: dict[str, str] = {}  # outside tensor -> placeholder name
    copied_consts: set[str] = set()
    body = []
    # Weights (with no device to clear) as they are serialized in the model's graph,
    # appended to the segment's bytes (protobuf joins repeated fields): copied into a
    # NodeDef, into the GraphDef and serialized, ResNet50's 100 MB went through three
    # copies.
    as_bytes = not (per_shape and batch_info is not None)  # those rewrite the graph below
    weights: list[bytes] = []
    for name in segment.nodes:
        node = tf.compat.v1.NodeDef()
        node.CopyFrom(nodes[name])
        node.ClearField("device")
        node.attr.pop(ORIGINAL_LOWER_ATTR, None)
        del node.input[:]
        for inp in nodes[name].input:
            src = node_name(inp)
            if src in members:
                node.input.append(inp)
            elif src in constants:
                for c in constant_chain(nodes, src, (members, copied_consts)):
                    copied_consts.add(c)
                    if as_bytes and is_weight(nodes[c]) and not nodes[c].device:
                        weights.append(nodes[c].SerializeToString())
                        continue
                    const = copy_constant(nodes[c])
                    if nodes[c].op == "Const":
                        # Control inputs only place a constant inside a TF1 loop frame.
                        const.input.extend(i for i in nodes[c].input
                                           if is_control(i) and node_name(i) in members)
                    body.append(const)
                node.input.append(inp)
            else:
                t = f"{src}:{output_index(inp)}"
                if t not in placeholders:
                    placeholders[t] = f"{INPUT_PREFIX}{len(placeholders)}"
                node.input.append(placeholders[t])
        body.append(node)
    inputs = []
    for t, ph_name in placeholders.items():
        info = infos[t]
        ph = out.node.add(name=ph_name, op="Placeholder")
        ph.attr["dtype"].type = info.dtype.as_datatype_enum
        ph.attr["shape"].shape.CopyFrom(tf.TensorShape(info.shape).as_proto())
        inputs.append(Port(ph_name, info.dtype.as_datatype_enum, tuple(info.shape),
                           _axis(t, batch_info)))
    out.node.extend(body)
    if per_shape and batch_info is not None:
        batch_input = next(((t, ph) for t, ph in placeholders.items()
                            if batch_info.splittable(t)), None)
        if batch_input is not None:  # the segment's own graph: rewritten in place
            batch_sized_loop_states(out, f"{batch_input[1]}:0",
                                    infos[batch_input[0]].shape[0])
            free_batch_shapes(out, batch_info)
    outputs = []
    for name in segment.nodes:
        used = consumers.get(name, set())
        if not used and not any(node_name(t) == name for t in fetch_tensors):
            continue
        last = max([output_index(t) for t in used if not is_control(t)]
                   + [output_index(t) for t in fetch_tensors if node_name(t) == name] + [0])
        for k in range(last + 1):
            t = f"{name}:{k}"
            info = infos[t]
            outputs.append(Port(t, info.dtype.as_datatype_enum, tuple(info.shape),
                                _axis(t, batch_info)))
    copy_called_functions(graph_def, body, out)
    inputs_t, outputs_t = tuple(inputs), tuple(outputs)
    splittable = all(p.batch_axis == 0 for p in outputs_t) and all(
        p.batch_axis == 0 or t not in batch_info.dependent
        for p, t in zip(inputs_t, placeholders)) if batch_info else False
    if not splittable:
        outputs_t = tuple(Port(p.name, p.dtype, p.shape, -1) for p in outputs_t)
        inputs_t = tuple(Port(p.name, p.dtype, p.shape, -1) for p in inputs_t)
    light = out.SerializeToString()
    return SegmentGraph(
        name=segment.name, graph_def_bytes=b"".join(
            [light, *(part for w in weights  # GraphDef.node = 1
                      for part in (field_header(1, len(w)), w))]),
        weights_at=len(light) if weights else -1,
        inputs=inputs_t,
        outputs=outputs_t, op_types=tuple(sorted({nodes[n].op for n in segment.nodes})),
        node_count=count_ops(graph_def, members),
        node_names=tuple(segment.nodes), input_sources=tuple(placeholders))


def _axis(tensor: str, batch_info: BatchInfo | None) -> int:
    if batch_info is None:
        return -1
    if batch_info.splittable(tensor):
        return 0
    return -1


def consumers_outside(graph_def, members_of: dict[str, str]) -> dict[str, set[str]]:
    """For each segment node, the inputs ('x:1', '^x') by which nodes outside read it."""
    result: dict[str, set[str]] = {}
    for node in graph_def.node:
        own = members_of.get(node.name)
        for inp in node.input:
            if node.op == "Const" and is_control(inp):
                continue  # it only places the constant in a TF1 frame; segments copy it
            src = node_name(inp)
            seg = members_of.get(src)
            if seg is not None and seg != own:
                ref = inp if is_control(inp) else f"{src}:{output_index(inp)}"
                result.setdefault(src, set()).add(ref)
    return result
