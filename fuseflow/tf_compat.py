"""Import TensorFlow once, quietly, for every fuseflow module."""

import contextlib
import os
import sys

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


__all__ = ["tf", "plain_session_config"]
