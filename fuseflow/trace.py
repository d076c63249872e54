"""The TF2 API of tensorflow-neuron: trace and analyze_model, over the same pipeline.

`trace(func, example_inputs)` saves the Keras model or tf.function as a
SavedModel in a temp dir, compiles it with `saved_model.compile` (flags from
FUSEFLOW_CC_FLAGS / NEURON_CC_FLAGS, as for compile) and returns a
`TracedModel`: a tf.Module that is called like the original, has
`on_neuron_ratio`, and is saved with `tf.saved_model.save(model, path)` or
`model.save(path)`. It reloads with `tf.saved_model.load(path)` in any
process that imported fuseflow (Keras 3 reloads only its own .keras format,
so the reference's `tf.keras.models.load_model(path)` cannot apply).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from fuseflow import errors
from fuseflow.logs import tf_quiet
from fuseflow.tf_compat import tf


@dataclass
class _Compiled:
    """What the callable needs: the compiled graph and how the caller's values map onto it."""

    graph_def: object
    input_names: list[str]  # graph tensor of each flattened input
    output_names: list[str]  # graph tensor of each flattened output
    output_structure: object  # the original output, for tf.nest.pack_sequence_as


class TracedModel(tf.Module):
    """A compiled model, callable like the traced function (inference only)."""

    def __init__(self, compiled: _Compiled, input_specs: list, on_neuron_ratio: float):
        super().__init__(name="fuseflow_traced")
        self._compiled = _unique_functions(compiled)
        self._on_neuron_ratio = tf.Variable(float(on_neuron_ratio), trainable=False,
                                            name="on_neuron_ratio")
        self._input_specs = tuple(input_specs)
        self.__call__.get_concrete_function(*self._input_specs)  # what saving keeps
        # The serving_default signature that tf.saved_model.save picks by itself:
        # flat inputs input_0.., outputs output_0.., as the traced SavedModel had.
        flat = [tf.TensorSpec(s.shape, s.dtype, name=f"input_{k}")
                for k, s in enumerate(tf.nest.flatten(self._input_specs))]
        self.serve = tf.function(self._serve, input_signature=flat)

    @property
    def on_neuron_ratio(self) -> float:
        """The fraction of the ops that run on the backend (the reference's definition)."""
        return float(self._on_neuron_ratio.numpy())

    @tf.function
    def __call__(self, *args):
        flat = tf.nest.flatten(args)
        c = self._compiled
        if len(flat) != len(c.input_names):
            raise errors.OptionError(f"the traced model takes {len(c.input_names)} input "
                                     f"tensor(s), got {len(flat)}")
        outputs = tf.graph_util.import_graph_def(
            c.graph_def, input_map=dict(zip(c.input_names, flat)),
            return_elements=c.output_names, name="fuseflow")
        return tf.nest.pack_sequence_as(c.output_structure, outputs)

    def _serve(self, *flat):
        outputs = tf.nest.flatten(self.__call__(*tf.nest.pack_sequence_as(
            self._input_specs, list(flat))))
        return {f"output_{k}": t for k, t in enumerate(outputs)}

    def save(self, path, *args, **kwargs) -> None:
        """Keras' model.save spelling: writes a SavedModel directory."""
        if str(path).endswith((".keras", ".h5")):
            raise errors.OptionError(
                f"{str(path)!r}: a traced model is saved as a SavedModel directory, not a "
                "Keras file; pass a directory path and reload it with tf.saved_model.load")
        with tf_quiet():
            tf.saved_model.save(self, os.fspath(path))


def _unique_functions(compiled: _Compiled) -> _Compiled:
    """The graph with its library functions renamed after its content.

    Calling the model imports its graph into TF's one process-wide function
    library, where two traced models' `fuseflow_segment_0_native` would clash.
    """
    import hashlib

    graph_def = type(compiled.graph_def)()
    graph_def.CopyFrom(compiled.graph_def)
    suffix = hashlib.sha1(graph_def.SerializeToString()).hexdigest()[:12]
    renamed = {f.signature.name: f"{f.signature.name}_{suffix}" for f in graph_def.library.function}

    def rename(attrs) -> None:
        for value in attrs.values():
            if value.HasField("func") and value.func.name in renamed:
                value.func.name = renamed[value.func.name]
            elif value.HasField("list"):
                for f in value.list.func:
                    f.name = renamed.get(f.name, f.name)

    for node in graph_def.node:
        rename(node.attr)
    for function in graph_def.library.function:
        function.signature.name = renamed[function.signature.name]
        for node in function.node_def:
            rename(node.attr)
            if node.op in renamed:
                node.op = renamed[node.op]
    for node in graph_def.node:
        if node.op in renamed:
            node.op = renamed[node.op]
    return _Compiled(graph_def, compiled.input_names, compiled.output_names,
                     compiled.output_structure)


def _example_args(example_inputs) -> tuple:
    """A tuple is the positional arguments; anything else is the one argument."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten(args)]
    except (TypeError, ValueError) as e:
        raise errors.OptionError(
            f"example_inputs must be a tensor or a tuple/list/dict of tensors: {e}") from None
    if not flat:
        raise errors.OptionError("example_inputs holds no tensor")
    return tf.nest.pack_sequence_as(args, flat)


def _specs(args, free_batch: bool) -> list:
    specs = []
    for k, t in enumerate(tf.nest.flatten(args)):
        shape = list(t.shape)
        if free_batch and shape:
            shape[0] = None
        specs.append(tf.TensorSpec(shape, t.dtype, name=f"input_{k}"))
    return specs


@contextlib.contextmanager
def _saved(func, args) -> Iterator[tuple[str, object, list]]:
    """func saved as a SavedModel: (its dir, the output structure, the input specs used)."""
    if not callable(func):
        raise errors.OptionError(f"func must be a Keras model or a tf.function, got {func!r}")
    structure = func(*args)

    def serving(*flat):
        out = func(*tf.nest.pack_sequence_as(args, list(flat)))
        return {f"output_{k}": t for k, t in enumerate(tf.nest.flatten(out))}

    concrete, specs = None, None
    for free_batch in (True, False):  # a free batch dim, unless the function needs its own
        specs = _specs(args, free_batch)
        try:
            concrete = tf.function(serving).get_concrete_function(*specs)
            break
        except Exception:  # noqa: BLE001 (any tracing failure: retry with fixed shapes)
            if not free_batch:
                raise
    holder = tf.Module()
    holder.captured = list(concrete.variables)
    if isinstance(func, tf.Module):
        holder.model = func
    with tempfile.TemporaryDirectory(prefix="fuseflow-trace-") as tmp:
        path = os.path.join(tmp, "model")
        with tf_quiet():
            tf.saved_model.save(holder, path, signatures={"serving_default": concrete})
        yield path, structure, specs


def _shape_feed(args) -> dict[str, list[int]]:
    return {f"input_{k}": list(t.shape) for k, t in enumerate(tf.nest.flatten(args))}


def trace(func, example_inputs, subgraph_builder_function=None) -> TracedModel:
    """Compile a Keras model or tf.function for inputs like example_inputs.

    subgraph_builder_function(node_def) -> bool, when given, forces each node
    of the optimized graph onto the backend (True) or keeps it in TensorFlow
    (False). The batch dim stays free where the compiled model allows it.
    """
    from fuseflow.assets import inline_assets
    from fuseflow.load import read_saved_model_proto
    from fuseflow.saved_model import compile as compile_model

    args = _example_args(example_inputs)
    with _saved(func, args) as (path, structure, specs):
        compiled_dir = path + "_compiled"
        result = compile_model(path, compiled_dir, model_shape_feed_dict=_shape_feed(args),
                               subgraph_builder_function=subgraph_builder_function)
        meta_graph = read_saved_model_proto(compiled_dir).meta_graphs[0]
        inline_assets(meta_graph.graph_def, compiled_dir)  # compiled_dir is temporary
    signature = meta_graph.signature_def["serving_default"]
    count = len(signature.outputs)
    compiled = _Compiled(
        graph_def=meta_graph.graph_def,
        input_names=[signature.inputs[f"input_{k}"].name for k in range(len(specs))],
        output_names=[signature.outputs[f"output_{k}"].name for k in range(count)],
        output_structure=structure)
    free = [tf.TensorSpec(tf.TensorShape(signature.inputs[s.name].tensor_shape), s.dtype,
                          name=s.name) for s in specs]
    return TracedModel(compiled, _unflatten_specs(args, free), result["OnNeuronRatio"])


def _unflatten_specs(args, flat_specs: list) -> list:
    return list(tf.nest.pack_sequence_as(args, flat_specs))


# Why an op is not supported, as analyze_model reports it (capability, not placement).
_UNSUPPORTED = ("UNSUPPORTED_OP", "DTYPE", "STRING", "UNKNOWN_SHAPE", "CONTROL_INPUT",
                "CONTROL_FLOW")


def analyze_model(func, example_inputs) -> dict:
    """Which ops of func the backend supports, without compiling anything.

    The reference's keys (percent_supported, supported_count, total_count,
    supported_operators, unsupported_operators, operators, operator_count),
    plus unsupported_reasons: {op type: [why]}.
    """
    from fuseflow.graph_util import NON_COMPUTE_OPS
    from fuseflow.options import parse_compiler_args
    from fuseflow.partition import PASS_THROUGH_OPS
    from fuseflow.reasons import Reason
    from fuseflow.saved_model import _plan

    args = _example_args(example_inputs)
    with _saved(func, args) as (path, _, _), tf_quiet():
        plan = _plan(path, 1, _shape_feed(args), None, None, None, None, None, None, None,
                     parse_compiler_args())
    unsupported_reasons = {Reason[r] for r in _UNSUPPORTED}
    ops: Counter = Counter()
    bad: Counter = Counter()
    reasons: dict[str, set[str]] = {}
    for node in plan.graph_def.node:
        if node.op in NON_COMPUTE_OPS or node.op in PASS_THROUGH_OPS:
            continue
        ops[node.op] += 1
        reason = plan.partition.excluded.get(node.name)
        if reason in unsupported_reasons:
            bad[node.op] += 1
            reasons.setdefault(node.op, set()).add(reason.value)
    total = sum(ops.values())
    supported = total - sum(bad.values())
    return {
        "percent_supported": 100.0 * supported / total if total else 0.0,
        "supported_count": supported,
        "total_count": total,
        "supported_operators": sorted(op for op in ops if bad[op] < ops[op]),
        "unsupported_operators": sorted(bad),
        "operators": sorted(ops),
        "operator_count": dict(ops),
        "unsupported_reasons": {op: sorted(r) for op, r in sorted(reasons.items())},
        "backend": plan.backend_name,
    }
