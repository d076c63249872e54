"""Import TensorFlow once, quietly, for every fuseflow module."""

import contextlib
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # keep warnings: the fused op reports fallbacks


@contextlib.contextmanager
def _stderr_hidden():
    """TF's C++ runtime logs everything to fd 2 until absl is initialized, whatever the level
    (oneDNN notices in every process): hide that unless TF_CPP_MIN_LOG_LEVEL=0."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


with _stderr_hidden():
    import tensorflow as tf  # noqa: E402



def plain_session_config():
    """A session config that runs the graph as given, without Grappler: for values
    (restoring, references, checks), where its rewrites only cost time (ResNet50's
    frozen graph: 9 s to a first answer with Grappler, 3-5 s without)."""
    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    return config


# Constants worth feeding rather than importing (below this, a copy costs nothing).
_LIFT_BYTES = 1 << 16
_LIFT_DTYPES = frozenset(t.as_datatype_enum for t in (
    tf.float16, tf.float32, tf.float64, tf.int8, tf.int16, tf.int32, tf.int64, tf.uint8,
    tf.uint16, tf.bool))


def lift_constants(graph_def, min_bytes: int = _LIFT_BYTES):
    """(graph_def with its big constants as Placeholders, their values by tensor name), to
    run a frozen graph: feed the values with the inputs.

    Between import_graph_def and a session's first answer TF copies every constant about
    ten times (GraphDef, Graph, the session's copies and partitions, the kernel's tensor;
    ResNet50's frozen graph: ~2 GB of fresh memory, seconds of page faults); a fed value
    is read once. Only constants without inputs are lifted (one with a control input
    may sit in a TF1 loop frame, where a Placeholder can't), never those in functions;
    Grappler is off in these sessions, so nothing folds differently. The answers agree
    to rounding, not bit for bit: TF may take another convolution path for a fed filter
    (ResNet50: outputs 1.8e-7 apart), far inside every check's tolerance."""
    out = tf.compat.v1.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    values = {}
    for node in graph_def.node:
        content = b""
        if node.op == "Const" and not node.input:
            tensor = node.attr["value"].tensor
            if tensor.dtype in _LIFT_DTYPES:
                content = tensor.tensor_content
        if len(content) < min_bytes:
            out.node.add().CopyFrom(node)
            continue
        dtype = tf.dtypes.as_dtype(tensor.dtype)
        shape = tf.TensorShape(tensor.tensor_shape)
        values[f"{node.name}:0"] = np.frombuffer(content, dtype.as_numpy_dtype).reshape(
            shape.as_list())
        placeholder = out.node.add(name=node.name, op="Placeholder", device=node.device)
        placeholder.attr["dtype"].type = tensor.dtype
        placeholder.attr["shape"].shape.CopyFrom(shape.as_proto())
        for key, value in node.attr.items():
            if key.startswith("_"):  # colocation and the like
                placeholder.attr[key].CopyFrom(value)
    return out, values


__all__ = ["tf", "plain_session_config", "lift_constants"]
