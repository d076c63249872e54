"""saved_model.set_core_binding / inspect_core_binding: which core group each fused op uses.

On Inferentia the index names a NeuronCore group. Here it names a CPU core
group: group i is the i-th block of S consecutive cores, cores [i*S, (i+1)*S),
S being the segment's thread count (`--neuroncore-pipeline-cores`; all the
machine's cores when unset, so that only group 0 exists). -1 means no binding.

The index is stored, as in the reference, on each fused node of
saved_model.pb (attr `_fuseflow_core_group`; a leading underscore so any
TensorFlow loads the model whatever the op's definition). The native op does
not pin its threads to the group yet: today the binding is recorded and
reported, so tools and a later runtime can honour it.
"""

from __future__ import annotations

import logging
import os

from fuseflow import errors
from fuseflow.logs import shown_info

CORE_GROUP_ATTR = "_fuseflow_core_group"
log = logging.getLogger("fuseflow")


def _is_fused(node) -> bool:
    """inspect_model.is_fused without inserting an empty attr (map access would)."""
    return node.op == "FuseflowOp" or (
        node.op in ("PartitionedCall", "StatefulPartitionedCall")
        and "_XlaMustCompile" in node.attr and node.attr["_XlaMustCompile"].b)


def _fused_nodes(proto) -> list:
    return [n for mg in proto.meta_graphs for n in mg.graph_def.node if _is_fused(n)]


def set_core_binding(model_dir, index_list) -> None:
    """Bind the k-th fused op of saved_model.pb (graph order) to core group index_list[k].

    Modifies model_dir in place, as the reference does. Extra indices are
    ignored and fused ops beyond the list keep their binding (zip semantics).
    """
    from fuseflow.load import model_path, read_saved_model_proto

    model_dir = model_path(model_dir)
    try:
        indices = [int(i) for i in index_list]
    except (TypeError, ValueError):
        raise errors.OptionError(
            f"index_list must be a list of integers (core group indices, -1 for none), got "
            f"{index_list!r}") from None
    proto = read_saved_model_proto(model_dir)
    nodes = _fused_nodes(proto)
    if not nodes:
        raise errors.OptionError(f"{model_dir!r} holds no fused op: compile it with fuseflow "
                                 "first")
    for node, index in zip(nodes, indices):
        node.attr[CORE_GROUP_ATTR].i = index
        groups = _group_count(node)
        if index >= groups:
            log.warning("%s: core group %d does not exist on this machine (%d group(s) of "
                        "the segment's threads); kept, for the machine that serves it",
                        node.name, index, groups)
    path = os.path.join(model_dir, "saved_model.pb")
    tmp = path + ".fuseflow-tmp"
    with open(tmp, "wb") as f:
        f.write(proto.SerializeToString())
    os.replace(tmp, path)


def _group_count(node) -> int:
    """How many groups of the segment's thread count this machine's cores make."""
    cores = os.cpu_count() or 1
    threads = cores
    for prop in node.attr["properties"].list.s if node.op == "FuseflowOp" else ():
        key, _, value = prop.decode().partition("=")
        if key == "INFERENCE_NUM_THREADS" and value.isdigit() and int(value) > 0:
            threads = int(value)
    return max(1, cores // threads)


def core_bindings(model_dir) -> dict[str, int]:
    """{fused node name: core group index, -1 when unbound}, in graph order."""
    from fuseflow.load import model_path, read_saved_model_proto

    proto = read_saved_model_proto(model_path(model_dir))
    return {n.name: n.attr[CORE_GROUP_ATTR].i if CORE_GROUP_ATTR in n.attr else -1
            for n in _fused_nodes(proto)}


def inspect_core_binding(model_dir) -> dict[str, int]:
    """Log, as the reference does, one line per fused op; also return the bindings."""
    bindings = core_bindings(model_dir)
    with shown_info():
        for name, index in bindings.items():
            if index < 0:
                log.info("subgraph %s does not bind to a core group", name)
            else:
                log.info("subgraph %s binds to core group index %d", name, index)
    return bindings
