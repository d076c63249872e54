"""TF2 SavedModels whose v1 restore leaves the signature's variables unbound.

A Keras 3 model held by a tf.Module saves each weight twice in the graph: the restore
op writes one set of handles, the signature reads another, and only TF2's object-based
loader binds them. Found by the zoo's detector (tf.Module around a Keras backbone).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_outputs_close, run_fresh, run_saved_model

import fuseflow


class _Wrapper(tf.Module):
    def __init__(self):
        super().__init__()
        tf.keras.utils.set_random_seed(0)
        x = tf.keras.Input((8,))
        h = tf.keras.layers.Dense(16, activation="relu")(x)
        self.net = tf.keras.Model(x, tf.keras.layers.Dense(4)(h))

    @tf.function
    def __call__(self, x):
        return {"y": tf.nn.softmax(self.net(x))}


def _save(path):
    module = _Wrapper()
    fn = module.__call__.get_concrete_function(tf.TensorSpec([None, 8], tf.float32, "x"))
    tf.saved_model.save(module, str(path), signatures={"serving_default": fn})
    return path


@pytest.mark.parametrize("freeze_limit_mb", [None, "0.0001"])
def test_module_around_keras_model(tmp_path, rng, monkeypatch, freeze_limit_mb):
    """Frozen, or (with a tiny freeze budget) kept as variables: either way the values
    are the trained ones, and unused duplicate handles are not read."""
    if freeze_limit_mb:
        monkeypatch.setenv("FUSEFLOW_FREEZE_LIMIT_MB", freeze_limit_mb)
    src = _save(tmp_path / "model")
    feeds = {"x": rng.standard_normal((1, 8)).astype(np.float32)}
    want = run_saved_model(src, feeds)
    result = fuseflow.saved_model.compile(str(src), str(tmp_path / "out"),
                                          compiler_args=["--backend", "openvino"])
    assert result["num_segments"] == 1
    assert_outputs_close(want, run_fresh(tmp_path / "out", feeds, tmp_path))


def test_unbound_values_come_from_the_checkpoint_without_tf2s_loader(tmp_path, rng,
                                                                    monkeypatch):
    """Through a session (as a model the checkpoint path does not follow loads), the
    values are read from the checkpoint through the object graph: TF2's loader (the
    fallback) is never asked, and the frozen graph computes the trained model."""
    from fuseflow import load

    src = _save(tmp_path / "model")
    feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32)}

    def refuse(*args):
        raise AssertionError("TF2's loader was used")

    monkeypatch.setattr(load, "_freeze_from_checkpoint", lambda *args: None)
    monkeypatch.setattr(load, "_captured_from_tf2_loader", refuse)
    model = load.load_saved_model(str(src))
    assert not model.variables
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(model.graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        got = sess.run(model.outputs[0].tensor_name, {model.inputs[0].tensor_name: feeds["x"]})
    assert_outputs_close(run_saved_model(src, feeds), {"y": got})


class _JitInside(tf.Module):
    """A layer computed by a jit_compile function, as Keras 3's depthwise conv is."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.w = tf.Variable(rng.standard_normal((3, 3, 4, 1)).astype(np.float32))
        self.v = tf.Variable(rng.standard_normal((4, 2)).astype(np.float32))

    @tf.function(jit_compile=True)
    def depthwise(self, x):
        return tf.nn.depthwise_conv2d(x, self.w, [1, 1, 1, 1], "SAME")

    @tf.function
    def __call__(self, x):
        h = tf.nn.relu(self.depthwise(tf.nn.relu(x)))
        return {"y": tf.matmul(tf.reduce_mean(h, axis=[1, 2]), self.v)}


def test_jit_compiled_inner_function_is_inlined(tmp_path, rng):
    """Before, the _noinline call stayed in TF and split the model in two."""
    module = _JitInside()
    fn = module.__call__.get_concrete_function(
        tf.TensorSpec([None, 8, 8, 4], tf.float32, "x"))
    tf.saved_model.save(module, str(tmp_path / "model"), signatures={"serving_default": fn})
    feeds = {"x": rng.standard_normal((1, 8, 8, 4)).astype(np.float32)}
    want = run_saved_model(tmp_path / "model", feeds)
    result = fuseflow.saved_model.compile(str(tmp_path / "model"), str(tmp_path / "out"),
                                          compiler_args=["--backend", "openvino"])
    assert result["num_segments"] == 1 and result["OnNeuronRatio"] == 1.0, result
    assert_outputs_close(want, run_fresh(tmp_path / "out", feeds, tmp_path))
