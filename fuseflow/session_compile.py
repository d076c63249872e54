"""The TF1 session entry points: a live session's graph goes through the same pipeline.

tensorflow-neuron compiled a session's graph in place
(`graph_util.inference_graph_from_session`, `saved_model.simple_save`).
fuseflow saves the session as a SavedModel in a temp dir, compiles that with
`saved_model.compile`, and hands back the compiled graph or directory: one
pipeline, whatever the entry point.
"""

from __future__ import annotations

import os
import tempfile

from fuseflow import errors
from fuseflow.logs import tf_quiet
from fuseflow.tf_compat import tf


def _tensor(graph, value, what: str):
    """A tensor of `graph` from a tensor or a tensor name."""
    name = value.name if hasattr(value, "name") and not isinstance(value, str) else value
    if not isinstance(name, str):
        raise errors.OptionError(f"{what} must hold tensors or tensor names, got {value!r}")
    try:
        return graph.get_tensor_by_name(name if ":" in name else f"{name}:0")
    except (KeyError, ValueError) as e:
        raise errors.OptionError(f"{what}: {e}; pass tensors of the session's graph") from None


def save_session(session, export_dir: str, inputs: dict, outputs: dict,
                 legacy_init_op=None) -> None:
    """The session's graph and variables as a SavedModel with one serving_default signature."""
    if session is None:
        raise errors.OptionError("no session: pass sess= or call this inside `with sess:`")
    graph = session.graph
    if not outputs:
        raise errors.OptionError("outputs is empty: name at least one output tensor")
    ins = {k: _tensor(graph, v, "inputs") for k, v in inputs.items()}
    outs = {k: _tensor(graph, v, "outputs") for k, v in outputs.items()}
    with graph.as_default():
        signature = tf.compat.v1.saved_model.predict_signature_def(ins, outs)
        builder = tf.compat.v1.saved_model.Builder(export_dir)
        builder.add_meta_graph_and_variables(
            session, ["serve"], signature_def_map={"serving_default": signature},
            main_op=legacy_init_op, strip_default_attrs=True)
        builder.save()


def inference_graph_from_session(
        sess=None, input_tensors=None, output_tensors=None, signature_def=None,
        shape_feed_dict=None, feed_dict=None, dynamic_batch_size=False, protected_op_names=None,
        supported_op_types=None, no_fuse_ops=None, force_fuse_ops=None,
        minimum_segment_size=None, grappler=False, max_num_compilers=None, compiler_args=None,
        compiler_workdir=None, compiler_timeout=None, compiler_recovery=True,
        compiler_verbose=None):
    """The session's graph, compiled, as a new tf.Graph with the same tensor names.

    The reference's keywords map onto compile(): shape_feed_dict/feed_dict ->
    model_shape_feed_dict/model_feed_dict (keys: tensors or names);
    max_num_compilers -> --workers; compiler_timeout -> --timeout;
    compiler_recovery=False -> --must-compile; compiler_verbose -> --verbose;
    dynamic_batch_size=True -> --dynamic-batch-size; supported_op_types keeps
    every other op type in TensorFlow. grappler (fuseflow always runs Grappler)
    and protected_op_names (fuseflow never removes signature tensors or init
    ops) need nothing.
    """
    from fuseflow.saved_model import compile as compile_model

    sess = sess or tf.compat.v1.get_default_session()
    if sess is None:
        raise errors.OptionError("no session: pass sess= or call this inside `with sess:`")
    graph = sess.graph
    if signature_def is not None:
        input_tensors = [t.name for t in signature_def.inputs.values()]
        output_tensors = [t.name for t in signature_def.outputs.values()]
    if output_tensors is None:
        raise errors.OptionError("output_tensors is required: the tensors the graph computes")
    ins = [_tensor(graph, t, "input_tensors") for t in (input_tensors or [])]
    outs = [_tensor(graph, t, "output_tensors") for t in output_tensors]

    def by_name(mapping, what):
        return None if mapping is None else {
            _tensor(graph, k, what).name: v for k, v in mapping.items()}

    with tf_quiet(), tempfile.TemporaryDirectory(prefix="fuseflow-session-") as tmp:
        saved, compiled = os.path.join(tmp, "model"), os.path.join(tmp, "compiled")
        save_session(sess, saved, {f"input_{k}": t for k, t in enumerate(ins)},
                     {f"output_{k}": t for k, t in enumerate(outs)})
        compile_model(saved, compiled, model_shape_feed_dict=by_name(shape_feed_dict,
                                                                     "shape_feed_dict"),
                      model_feed_dict=by_name(feed_dict, "feed_dict"),
                      minimum_segment_size=minimum_segment_size, no_fuse_ops=no_fuse_ops,
                      force_fuse_ops=force_fuse_ops, compiler_args=compiler_args,
                      compiler_workdir=compiler_workdir, supported_op_types=supported_op_types,
                      dynamic_batch_size=dynamic_batch_size, compiler_timeout=compiler_timeout,
                      compiler_recovery=compiler_recovery, compiler_verbose=compiler_verbose,
                      max_num_compilers=max_num_compilers)
        return compiled_graph(compiled)


def compiled_graph(model_dir: str):
    """A compiled SavedModel's graph as a tf.Graph (the FuseflowOp must be registered)."""
    from fuseflow.assets import inline_assets
    from fuseflow.load import read_saved_model_proto

    graph_def = read_saved_model_proto(model_dir).meta_graphs[0].graph_def
    inline_assets(graph_def, model_dir)  # the graph outlives model_dir
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    return graph
