"""Stage 1: SavedModel -> one frozen GraphDef, its signature, tags and init op.

TF1 (Builder) and TF2 (tf.saved_model.save / Keras export) models are both
read through TF's v1 loader into one graph: TF2 function calls and resource
variables come out as StatefulPartitionedCall nodes that freezing turns into
constants, and the optimize stage inlines them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from fuseflow import errors
from fuseflow.graph_util import count_ops, is_control, node_name, subgraph
from fuseflow.tf_compat import plain_session_config, tf

log = logging.getLogger("fuseflow")

_TABLE_INIT_OPS = frozenset({
    "InitializeTable", "InitializeTableV2", "InitializeTableFromTextFile",
    "InitializeTableFromTextFileV2", "LookupTableImport", "LookupTableImportV2",
    "InitializeTableFromDataset",
})
_CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
_INIT_COLLECTIONS = ("saved_model_main_op", "legacy_init_op", "table_initializer")


@dataclass(frozen=True)
class TensorSpec:
    """One signature input or output: its key, graph tensor name, dtype and shape."""

    key: str
    tensor_name: str
    dtype: tf.DType
    shape: tuple[int | None, ...] | None  # None: unknown rank


@dataclass
class LoadedModel:
    """A SavedModel frozen into one graph, with what is needed to save it again."""

    model_dir: str
    tags: list[str]
    signature_key: str
    method_name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    graph_def: tf.compat.v1.GraphDef
    init_nodes: list[str] = field(default_factory=list)  # table initializers to keep
    assets: dict[str, str] = field(default_factory=dict)  # asset tensor name -> file path
    num_ops: int = 0  # ops in the TF session before anything was done
    # Variables left unfrozen to keep the GraphDef under protobuf's 2 GB: node -> value.
    variables: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def fetch_nodes(self) -> list[str]:
        """Nodes every graph rewrite must keep alive."""
        return sorted({node_name(t.tensor_name) for t in self.inputs + self.outputs}
                      | set(self.init_nodes))


def model_path(model_dir) -> str:
    """model_dir as a str, or OptionError (os.fspath would raise a bare TypeError)."""
    if not isinstance(model_dir, (str, os.PathLike)) or not os.fspath(model_dir):
        raise errors.OptionError(
            f"model_dir must be the path of a SavedModel directory, got {model_dir!r}")
    return os.fspath(model_dir)


def read_saved_model_proto(model_dir: str):
    """Parse saved_model.pb, turning every way it can be wrong into ModelLoadError."""
    from tensorflow.core.protobuf import saved_model_pb2

    if not os.path.exists(model_dir):
        raise errors.ModelLoadError(
            f"model_dir {model_dir!r} does not exist: pass the directory of a SavedModel "
            "(the folder that holds saved_model.pb)")
    if not os.path.isdir(model_dir):
        raise errors.ModelLoadError(
            f"model_dir {model_dir!r} is a file, not a directory: pass the SavedModel's folder")
    pb = os.path.join(model_dir, "saved_model.pb")
    if os.path.isdir(pb):
        raise errors.ModelLoadError(f"{pb} is a directory, not a file: re-export the model")
    if not os.path.isfile(pb):
        if os.path.isfile(os.path.join(model_dir, "saved_model.pbtxt")):
            raise errors.ModelLoadError(
                f"{model_dir!r} holds saved_model.pbtxt (text format), which fuseflow does "
                "not read: re-save the model in binary form (tf.saved_model.save)")
        raise errors.ModelLoadError(
            f"{model_dir!r} has no saved_model.pb, so it is not a SavedModel directory"
            f"{_what_is_there(model_dir)}")
    if os.path.getsize(pb) == 0:
        raise errors.ModelLoadError(f"{pb} is empty (0 bytes): the export did not finish; "
                                    "re-export the model")
    proto = saved_model_pb2.SavedModel()
    try:
        with open(pb, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning, ...
        raise errors.ModelLoadError(
            f"{pb} is corrupt or truncated ({type(e).__name__}: {e}): re-export the model"
        ) from None
    if not proto.meta_graphs:
        raise errors.ModelLoadError(f"{pb} holds no MetaGraphDef: re-export the model")
    return proto


def _what_is_there(model_dir: str) -> str:
    """A hint for the usual mistake: a TF Serving base dir (model/1/saved_model.pb)."""
    entries = sorted(os.listdir(model_dir))
    if not entries:
        return ": the folder is empty; pass the folder that holds saved_model.pb"
    nested = [e for e in entries if os.path.isfile(os.path.join(model_dir, e, "saved_model.pb"))]
    if nested:
        return (f"; its subfolder {nested[-1]!r} is one: pass "
                f"{os.path.join(model_dir, nested[-1])!r}")
    return f" (it holds {entries[:5]}): pass the folder that holds saved_model.pb"


def select_meta_graph(proto, tags) -> tuple[list[str], object]:
    """The reference's rule: {serve} if present, else the first tag set (warn if several)."""
    available = [list(mg.meta_info_def.tags) for mg in proto.meta_graphs]
    if tags is None:
        for mg, t in zip(proto.meta_graphs, available):
            if set(t) == {"serve"}:
                return t, mg
        if len(available) > 1:
            log.warning("tags not given and no tag set is exactly {'serve'}: using the first "
                        "one, %s, of %s", available[0], available)
        return available[0], proto.meta_graphs[0]
    if isinstance(tags, str):
        tags = [t.strip() for t in tags.split(",") if t.strip()]
    try:
        wanted = set(tags)
    except TypeError:
        raise errors.OptionError(
            f"tags must be an iterable of strings or a comma-separated string, got {tags!r}"
        ) from None
    if not all(isinstance(t, str) for t in wanted):
        raise errors.OptionError(
            f"tags must be strings, got {', '.join(sorted(map(repr, wanted)))}")
    for mg, t in zip(proto.meta_graphs, available):
        if set(t) == wanted:
            return t, mg
    raise errors.TagError(
        f"no MetaGraphDef with tags {sorted(wanted)}; the model has tag sets {available}: "
        "pass one of them as tags=")


def select_signature(meta_graph, key: str | None) -> str:
    """The reference's rule: serving_default, else the first key (warn)."""
    sigs = [k for k in meta_graph.signature_def if not k.startswith("__")]
    if key is None:
        if "serving_default" in sigs:
            return "serving_default"
        if not sigs:
            raise errors.SignatureError(
                "the selected MetaGraphDef has no signature: export the model with a "
                "signature (signatures= in tf.saved_model.save, or signature_def_map)")
        log.warning("signature_def_key not given and there is no 'serving_default': using "
                    "%r of %s", sigs[0], sorted(sigs))
        return sigs[0]
    if not isinstance(key, str):
        raise errors.OptionError(f"signature_def_key must be a string, got {key!r}")
    if key not in sigs:
        raise errors.SignatureError(
            f"signature {key!r} not found; the model has {sorted(sigs)}: pass one of them "
            "as signature_def_key=")
    return key


def _specs(tensor_infos) -> list[TensorSpec]:
    specs = []
    for key in sorted(tensor_infos):
        info = tensor_infos[key]
        if not info.name:
            raise errors.SignatureError(
                f"signature tensor {key!r} is not a dense tensor (composite/sparse tensors "
                "are not supported): export a signature with dense inputs and outputs")
        shape = None
        if not info.tensor_shape.unknown_rank:
            shape = tuple(d.size if d.size >= 0 else None for d in info.tensor_shape.dim)
        specs.append(TensorSpec(key, info.name, tf.dtypes.as_dtype(info.dtype), shape))
    return specs


def _init_targets(graph_def, meta_graph) -> list[str]:
    """Table initializers reachable from the model's init ops.

    Variable initializers in a TF1 main_op would assign to frozen constants,
    so only table initializers (and TF2 init functions, which hold nothing
    else) are kept.
    """
    roots = []
    for name in _INIT_COLLECTIONS:
        if name in meta_graph.collection_def:
            roots += [node_name(n) for n in meta_graph.collection_def[name].node_list.value]
    init_sig = meta_graph.signature_def.get("__saved_model_init_op")
    if init_sig is not None:
        roots += [node_name(t.name) for t in init_sig.outputs.values()]
    nodes = {n.name: n for n in graph_def.node}
    targets, seen, stack = [], set(), [r for r in roots if r in nodes]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = nodes[name]
        if node.op in _TABLE_INIT_OPS or node.op in _CALL_OPS:
            targets.append(name)
            continue
        stack += [node_name(i) for i in node.input if node_name(i) in nodes]
    return sorted(targets)


def _asset_files(meta_graph, model_dir: str) -> dict[str, str]:
    from tensorflow.core.protobuf import meta_graph_pb2

    assets = {}
    for any_value in meta_graph.collection_def.get(
            "saved_model_assets", meta_graph_pb2.CollectionDef()).any_list.value:
        asset = meta_graph_pb2.AssetFileDef()
        any_value.Unpack(asset)
        assets[asset.tensor_info.name] = os.path.join(model_dir, "assets", asset.filename)
    for asset in meta_graph.asset_file_def:
        assets[asset.tensor_info.name] = os.path.join(model_dir, "assets", asset.filename)
    return assets


def load_saved_model(model_dir: str, tags=None, signature_def_key: str | None = None
                     ) -> LoadedModel:
    """Load, select tags and signature, and freeze variables into constants."""
    model_dir = os.fspath(model_dir)
    proto = read_saved_model_proto(model_dir)
    tag_list, meta_graph = select_meta_graph(proto, tags)
    key = select_signature(meta_graph, signature_def_key)
    sig = meta_graph.signature_def[key]
    inputs, outputs = _specs(sig.inputs), _specs(sig.outputs)
    if not outputs:
        raise errors.SignatureError(
            f"signature {key!r} has no outputs, so there is nothing to compile: export the "
            "signature with its outputs, or pick another with signature_def_key=")

    pb = os.path.join(model_dir, "saved_model.pb")
    check_graph_def(meta_graph.graph_def, pb)
    _check_signature_tensors(meta_graph.graph_def, key, inputs + outputs)

    # Inputs too: an input no output reads must still exist to be fed.
    io_nodes = sorted({node_name(t.tensor_name) for t in inputs + outputs})
    loaded = _freeze_from_checkpoint(model_dir, meta_graph, io_nodes)
    if loaded is None:
        loaded = _freeze_in_session(model_dir, tag_list, key, sig, meta_graph, io_nodes)
    used, frozen, values, init_nodes = loaded
    unfrozen = set(values)
    if unfrozen:
        log.info("kept %d large variables (%.0f MB) out of the graph: %s", len(unfrozen),
                 sum(v.nbytes for v in values.values()) / 2**20, sorted(unfrozen)[:5])
    return LoadedModel(
        model_dir=model_dir, tags=tag_list, signature_key=key, method_name=sig.method_name,
        inputs=inputs, outputs=outputs, graph_def=frozen, init_nodes=init_nodes,
        # ops as the user wrote them: inlining adds an Identity per argument and result
        assets=_asset_files(meta_graph, model_dir), num_ops=count_ops(used),
        variables=values)


def _freeze_in_session(model_dir: str, tags: list[str], key: str, sig, meta_graph,
                       io_nodes: list[str]) -> tuple:
    """TF's v1 loader into a session, then TF's converter: (the graph the signature
    uses, frozen, {variable left unfrozen: value}, table initializers to keep)."""
    from tensorflow.python.framework import convert_to_constants

    from fuseflow.optimize import inline_calls

    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph,
                                                  config=plain_session_config()) as sess:
        variables_path = _load_into_session(sess, model_dir, tags)
        _restore_unbound_variables(sess, graph, model_dir, tags, key, sig, meta_graph,
                                   variables_path)
        full = graph.as_graph_def()
        init_nodes = _init_targets(full, meta_graph)
        keep = sorted(set(io_nodes) | set(init_nodes))
        # Only variables the signature reads count: a TF2 model may hold unused copies.
        used = subgraph(full, keep)
        unfrozen = _too_large_to_freeze(used)
        # A TF2 signature's call is inlined first. TF's converter walks every function's
        # nodes and, for each that reads a function argument, lists all the function's
        # arguments again: quadratic in the captured variables (ResNet50's 320: 0.7 s of
        # its 1.1 s freezing). On the inlined graph it reads the variables directly.
        calls = any(n.op in _CALL_OPS for n in used.node)
        try:
            frozen = convert_to_constants.convert_variables_to_constants_from_session_graph(
                sess, inline_calls(used, keep) if calls else full, keep,
                variable_names_denylist=sorted(unfrozen))
            values = _variable_values(sess, graph, unfrozen)
        except Exception as e:
            raise errors.ModelLoadError(
                f"could not freeze the variables of {model_dir!r}: {errors.reason(e)}. Check "
                "that every variable the signature uses is saved in variables/") from None
    return used, frozen, values, init_nodes


def _freeze_from_checkpoint(model_dir: str, meta_graph, keep: list[str]) -> tuple | None:
    """What _freeze_in_session gives, for a TF2 SavedModel, without a session: the
    variables the signature's calls capture are read from the checkpoint through the
    object graph (as TF2's loader binds them) and made constants in the inlined graph.
    TF's loader restored every variable (ResNet50's Keras 3 export holds three handles
    per weight), imported the meta graph twice and checked each handle: 1.9 s of
    ResNet50's loading, this 0.6 s. None where the model is not one this follows (TF1
    variables, table initializers, a handle the object graph does not name, anything
    failing): the session path then loads it, and names what is wrong."""
    from fuseflow.optimize import inline_calls

    graph_def = meta_graph.graph_def
    if not meta_graph.object_graph_def.nodes or _init_targets(graph_def, meta_graph):
        return None
    used = subgraph(graph_def, keep)
    handles = {n.name: n for n in used.node if n.op in _VARIABLE_OPS}
    if any(n.op != "VarHandleOp" for n in handles.values()):
        return None
    calls = [n for n in used.node if n.op in _CALL_OPS]
    try:
        reader = tf.train.load_checkpoint(_variables_path(model_dir))
        keys = _object_graph_keys(reader, meta_graph, [
            (n.attr["f"].func.name, [node_name(i) for i in n.input if not is_control(i)])
            for n in calls], set(handles))
        if keys is None or keys.keys() != handles.keys():
            return None
        values = {}
        for name, node in handles.items():
            value = reader.get_tensor(keys[name])
            if (tf.dtypes.as_dtype(node.attr["dtype"].type).as_numpy_dtype != value.dtype
                    or not tf.TensorShape(node.attr["shape"].shape).is_compatible_with(
                        value.shape)):
                return None
            values[name] = value
        unfrozen = _too_large_to_freeze(used)
        inlined = subgraph(inline_calls(used, keep), keep) if calls else used
        frozen = _with_constants(inlined, {n: v for n, v in values.items()
                                           if n not in unfrozen}, handles)
    except Exception as e:  # noqa: BLE001 - the session path loads it, or says why not
        log.debug("loading %s through a session (%s: %s)", model_dir, type(e).__name__, e)
        return None
    return used, frozen, {n: values[n] for n in unfrozen}, []


def _variables_path(model_dir: str) -> str:
    from tensorflow.python.saved_model import path_helpers

    return path_helpers.get_variables_path(model_dir)


def _with_constants(graph_def, values: dict[str, np.ndarray], handles: dict):
    """graph_def with each named variable handle a constant of its value: TF's converter
    (what convert_variables_to_constants_from_session_graph runs), given the values."""
    from tensorflow.python.framework import convert_to_constants as converter

    data = converter._ConverterData(graph_def)
    for name, value in values.items():
        data.tensor_data[name] = converter._TensorData(
            numpy=value, dtype=handles[name].attr["dtype"].type, index=None)
    frozen, _ = converter._replace_variables_by_constants(data)
    return frozen


_VARIABLE_OPS = frozenset({"VarHandleOp", "VariableV2"})


def freeze_limit_bytes() -> int:
    """How many bytes of variables may become constants (FUSEFLOW_FREEZE_LIMIT_MB).

    Weights are stored about twice in a compiled model (the native subgraph and the
    compiled artifact), and a GraphDef must stay under protobuf's 2 GB.
    """
    return int(float(os.environ.get("FUSEFLOW_FREEZE_LIMIT_MB", "512")) * 2**20)


def _too_large_to_freeze(graph_def) -> set[str]:
    """The largest variables, beyond what may be frozen; they stay variables."""
    sizes = []
    for node in graph_def.node:
        if node.op in _VARIABLE_OPS:
            shape = tf.TensorShape(node.attr["shape"].shape)
            if shape.is_fully_defined():
                dtype = tf.dtypes.as_dtype(node.attr["dtype"].type)
                sizes.append((shape.num_elements() * dtype.size, node.name))
    budget, unfrozen = freeze_limit_bytes(), set()
    for size, name in sorted(sizes):
        if size <= budget:
            budget -= size
        else:
            unfrozen.add(name)
            budget = -1  # everything larger stays a variable too
    return unfrozen


def _variable_values(sess, graph, names: set[str]) -> dict[str, np.ndarray]:
    reads = {}
    for name in sorted(names):
        op = graph.get_operation_by_name(name)
        reads[name] = (tf.raw_ops.ReadVariableOp(resource=op.outputs[0],
                                                 dtype=op.get_attr("dtype"))
                       if op.type == "VarHandleOp" else op.outputs[0])
    return sess.run(reads) if reads else {}


_MERGE_OPS = frozenset({"Merge", "RefMerge"})
_NEXT_ITERATION_OPS = frozenset({"NextIteration", "RefNextIteration"})


def check_graph_def(graph_def, where: str) -> None:
    """Name the node behind each structural defect, before TF's importer reports it
    vaguely ("4 nodes in a cycle") or as a generic load failure.

    Checks duplicate names, unknown op types, inputs from missing nodes and
    cycles (a TF1 while loop's NextIteration -> Merge back edge is not one).
    """
    from tensorflow.python.framework import op_def_registry

    nodes: dict[str, object] = {}
    duplicates = set()
    for node in graph_def.node:
        if node.name in nodes:
            duplicates.add(node.name)
        nodes[node.name] = node
    if duplicates:
        raise errors.GraphError(
            f"the graph in {where} has several nodes named {sorted(duplicates)[:5]}: node "
            "names must be unique; re-export the model (or rename the duplicates)")
    functions = {f.signature.name for f in graph_def.library.function}
    unknown = {}
    for node in graph_def.node:
        if node.op not in functions and op_def_registry.get(node.op) is None:
            unknown.setdefault(node.op, node.name)
    if unknown:
        listed = ", ".join(f"{op} (node {name!r})" for op, name in sorted(unknown.items())[:5])
        raise errors.GraphError(
            f"the graph in {where} uses op types that TensorFlow {tf.__version__} does not "
            f"know: {listed}. Load the library that registers them (tf.load_op_library) "
            "before compiling, or re-export the model with this TensorFlow version")
    for node in graph_def.node:
        for source in node.input:
            if node_name(source) not in nodes:
                raise errors.GraphError(
                    f"the graph in {where} is incomplete: node {node.name!r} takes input "
                    f"{source!r}, but there is no node {node_name(source)!r}; re-export the "
                    "model")
    cycle = _find_cycle(nodes)
    if cycle:
        shown = cycle if len(cycle) <= 10 else [*cycle[:9], "...", cycle[-1]]
        raise errors.GraphError(
            f"the graph in {where} has a cycle: {' -> '.join(shown)}. A TensorFlow graph "
            "must be acyclic (loops only through while-loop NextIteration ops); re-export "
            "the model")


def _find_cycle(nodes: dict) -> list[str]:
    """One cycle as [a, b, ..., a] in data-flow order, or [] (Kahn's algorithm, O(N+E))."""
    inputs = {}
    for name, node in nodes.items():
        sources = [node_name(i) for i in node.input]
        if node.op in _MERGE_OPS:
            sources = [s for s in sources if nodes[s].op not in _NEXT_ITERATION_OPS]
        inputs[name] = sources
    pending = {name: len(sources) for name, sources in inputs.items()}
    consumers: dict[str, list[str]] = {}
    for name, sources in inputs.items():
        for source in sources:
            consumers.setdefault(source, []).append(name)
    ready = [name for name, count in pending.items() if count == 0]
    while ready:
        for consumer in consumers.get(ready.pop(), ()):
            pending[consumer] -= 1
            if pending[consumer] == 0:
                ready.append(consumer)
    left = {name for name, count in pending.items() if count}
    if not left:
        return []
    # Every node left has an input left, so walking upstream must come back round.
    path: list[str] = []
    seen: dict[str, int] = {}
    name = min(left)
    while name not in seen:
        seen[name] = len(path)
        path.append(name)
        name = next(s for s in inputs[name] if s in left)
    cycle = path[seen[name]:][::-1]
    return [*cycle, cycle[0]]


def _check_signature_tensors(graph_def, key: str, specs: list[TensorSpec]) -> None:
    present = {n.name for n in graph_def.node}
    for spec in specs:
        if node_name(spec.tensor_name) not in present:
            raise errors.SignatureError(
                f"signature {key!r} maps {spec.key!r} to tensor {spec.tensor_name!r}, but the "
                f"graph has no node {node_name(spec.tensor_name)!r}: the signature does not "
                "match the graph; re-export the model")


def _restore_unbound_variables(sess, graph, model_dir: str, tags: list[str], key: str,
                               sig, meta_graph, variables_path: str) -> None:
    """Give values to variables that the v1 restore left uninitialized.

    A Keras 3 model held by a tf.Module saves its weights through object-graph keys
    whose restore op writes other handles than the ones the signature reads; only
    TF2's object-based loader binds the two. The values of the signature function's
    captured variables are matched by position to the inputs of the call node that
    computes the signature's outputs; they are read from the checkpoint as that loader
    would bind them, else (an object graph this does not follow) taken from the loader.
    """
    calls = {node_name(t.name) for t in sig.outputs.values()}
    nodes = [graph.get_operation_by_name(n) for n in sorted(calls)]
    # Only the handles the signature reads: a Keras 3 export holds three per weight
    # (960 on ResNet50), and an op to check each cost 0.3 s of 0.5.
    handles = _handles_read(nodes)
    if not handles:
        return
    flags = sess.run([tf.raw_ops.VarIsInitializedOp(resource=op.outputs[0]) for op in handles])
    missing = {op.name for op, ok in zip(handles, flags) if not ok}
    if not missing:
        return
    values = _captured_from_checkpoint(variables_path, meta_graph, nodes, missing)
    if values is None:
        values = _captured_from_tf2_loader(model_dir, tags, key, nodes, missing)
    assigns, feeds = [], {}
    for name, array in values.items():  # fed, not embedded: no weights copied into the graph
        variable = graph.get_operation_by_name(name)
        value = tf.compat.v1.placeholder(variable.get_attr("dtype"), np.shape(array))
        assigns.append(tf.raw_ops.AssignVariableOp(resource=variable.outputs[0], value=value))
        feeds[value] = array
    if assigns:
        sess.run(assigns, feeds)


def _handles_read(ops) -> list:
    """The VarHandleOps that ops read, directly or through their inputs."""
    stack, seen, handles = list(ops), set(), []
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        if op.type == "VarHandleOp":
            handles.append(op)
        stack += [t.op for t in op.inputs] + list(op.control_inputs)
    return handles


def _captured_from_checkpoint(variables_path: str, meta_graph, nodes, missing: set[str]
                              ) -> dict[str, np.ndarray] | None:
    """Values for the missing variables the call nodes capture, read from the checkpoint
    through the SavedModel's object graph (what TF2's loader does, without loading and
    tracing every function: seconds on a ResNet50). None when any is not found."""
    try:
        reader = tf.train.load_checkpoint(variables_path)
    except Exception:  # no checkpoint to read: the loader decides
        return None
    calls = [(n.get_attr("f").name, [t.op.name for t in n.inputs])
             for n in nodes if n.type in _CALL_OPS]
    keys = _object_graph_keys(reader, meta_graph, calls, missing)
    if keys is None:
        return None
    return {name: reader.get_tensor(key) for name, key in keys.items()}


def _object_graph_keys(reader, meta_graph, calls: list[tuple[str, list[str]]],
                       wanted: set[str]) -> dict[str, str] | None:
    """The checkpoint key of each wanted variable handle that the calls capture, as TF2's
    loader binds them: a call's trailing inputs are its function's bound inputs, ids of
    the SavedModel's object graph, matched to the checkpoint's own object graph by child
    names from the root. calls: (function name, input node names) per call node.
    None when a wanted captured handle is not found, or there is no object graph."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    saved = meta_graph.object_graph_def
    try:
        stored = trackable_object_graph_pb2.TrackableObjectGraph.FromString(
            reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    except Exception:  # no object-based checkpoint
        return None
    if not saved.nodes or not stored.nodes:
        return None
    # Saved object id -> checkpoint object id, following the same child names from the root.
    ids, stack = {0: 0}, [0]
    while stack:
        here = stack.pop()
        children = {c.local_name: c.node_id for c in stored.nodes[ids[here]].children}
        for child in saved.nodes[here].children:
            if child.node_id not in ids and child.local_name in children:
                ids[child.node_id] = children[child.local_name]
                stack.append(child.node_id)
    keys: dict[str, str] = {}
    for function_name, inputs in calls:
        function = saved.concrete_functions.get(function_name)
        if function is None:
            return None
        bound = list(function.bound_inputs)
        for arg, node_id in zip(inputs[len(inputs) - len(bound):], bound):
            if arg not in wanted:
                continue
            found = [a.checkpoint_key for a in stored.nodes[ids[node_id]].attributes
                     if a.name == "VARIABLE_VALUE"] if node_id in ids else []
            if len(found) != 1:
                return None
            keys[arg] = found[0]
    return keys


def _captured_from_tf2_loader(model_dir: str, tags: list[str], key: str, nodes,
                              missing: set[str]) -> dict[str, np.ndarray]:
    """Values for the missing variables the call nodes capture, from TF2's loader."""
    from tensorflow.python.eager import context

    values: dict[str, np.ndarray] = {}
    with context.eager_mode():
        try:
            loaded = tf.saved_model.load(model_dir, tags=tags)
            captured = list(loaded.signatures[key].captured_inputs)
        except Exception as e:  # nothing to add: freezing then names the variable
            log.debug("TF2's loader could not supply variable values: %s", e)
            return values
        for node in nodes:
            if node.type not in _CALL_OPS:
                continue
            args = list(node.inputs)[len(node.inputs) - len(captured):]
            for arg, value in zip(args, captured):
                if arg.op.name in missing and value.dtype == tf.resource:
                    values[arg.op.name] = tf.raw_ops.ReadVariableOp(
                        resource=value, dtype=arg.op.get_attr("dtype")).numpy()
    return values


def _load_into_session(sess, model_dir: str, tags: list[str]) -> str:
    """TF's v1 loader, one phase at a time, so each failure says which part is broken.
    Returns the variables' checkpoint path."""
    from tensorflow.python.saved_model import loader_impl

    loader = loader_impl.SavedModelLoader(model_dir)
    try:
        saver, _ = loader.load_graph(sess.graph, tags)
    except Exception as e:  # TF raises a dozen types here; all mean "graph unusable"
        raise errors.GraphError(
            f"TensorFlow {tf.__version__} cannot import the graph of {model_dir!r} (tags "
            f"{tags}): {errors.reason(e)}. Re-export the model with a compatible TensorFlow"
        ) from None
    try:
        loader.restore_variables(sess, saver)
    except Exception as e:
        raise errors.ModelLoadError(
            f"could not restore the variables of {model_dir!r} from "
            f"{loader.variables_path!r}: {errors.reason(e)}. The variables/ folder is missing "
            "or incomplete: copy the whole SavedModel folder again") from None
    try:
        loader.run_init_ops(sess, tags)
    except Exception as e:
        raise errors.ModelLoadError(
            f"the init op (main_op / table initializers) of {model_dir!r} failed: "
            f"{errors.reason(e)}. Check that its assets/ files are present") from None
    return loader.variables_path
