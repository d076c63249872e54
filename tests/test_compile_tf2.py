"""TF2 SavedModels (tf.saved_model.save, Keras export) and graph-structure cases."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    assert_outputs_close,
    assert_ran,
    fused_segments,
    op_types,
    run_fresh,
    run_saved_model,
    saved_graph,
    tf,
)
from test_compile_core import compile_model, fused_nodes

import fuseflow


def _keras_cnn():
    inp = tf.keras.Input((16, 16, 3), name="image")
    x = tf.keras.layers.Conv2D(8, 3, padding="same")(inp)
    x = tf.keras.layers.BatchNormalization()(x)
    x = tf.keras.layers.ReLU()(x)
    x = tf.keras.layers.MaxPooling2D()(x)
    x = tf.keras.layers.Conv2D(16, 3, activation="relu")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inp, tf.keras.layers.Dense(10, activation="softmax")(x))


def _keras_transformer(seq=16, vocab=50, dim=32, heads=4):
    ids = tf.keras.Input((seq,), dtype="int32", name="ids")
    x = tf.keras.layers.Embedding(vocab, dim)(ids)
    att = tf.keras.layers.MultiHeadAttention(heads, dim // heads)(x, x)
    x = tf.keras.layers.LayerNormalization()(x + att)
    ff = tf.keras.layers.Dense(dim)(tf.keras.layers.Dense(dim * 2, activation="gelu")(x))
    x = tf.keras.layers.LayerNormalization()(x + ff)
    return tf.keras.Model(ids, tf.keras.layers.Dense(3)(x[:, 0]))


@pytest.mark.parametrize("builder", [_keras_cnn, _keras_transformer], ids=["cnn", "transformer"])
def test_keras_export(backend, tmp_path, builder, rng):
    tf.keras.utils.set_random_seed(0)
    model = builder()
    for w in model.weights:  # non-trivial BN statistics and biases
        w.assign(rng.normal(0, 0.3, w.shape).astype(w.dtype))
    src = tmp_path / "m"
    model.export(str(src))
    name = model.inputs[0].name
    if builder is _keras_cnn:
        feeds = {name: rng.random((2, 16, 16, 3), np.float32)}
    else:
        feeds = {name: rng.integers(0, 50, (2, 16)).astype(np.int32)}
    result = compile_model(backend, src, tmp_path / "c", batch_size=2)
    assert result["num_segments"] == 1, result
    assert result["OnNeuronRatio"] > 0.9
    assert len(fused_nodes(saved_graph(tmp_path / "c"))) == 1
    assert_outputs_close(run_saved_model(src, feeds),
                         run_fresh(tmp_path / "c", feeds, tmp_path, backend=backend), atol=1e-4)


def test_tf_module_with_resource_variables(backend, tmp_path, rng):
    class Module(tf.Module):
        def __init__(self):
            self.w = tf.Variable(rng.random((4, 3), np.float32))
            self.b = tf.Variable(rng.random((3,), np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def __call__(self, x):
            return {"y": tf.nn.relu(tf.matmul(x, self.w) + self.b) * 2.0}

    module = Module()
    tf.saved_model.save(module, str(tmp_path / "m"), signatures=module.__call__)
    feeds = {"x": rng.random((1, 4), np.float32)}
    result = compile_model(backend, tmp_path / "m", tmp_path / "c")
    assert result["num_segments"] == 1 and result["OnNeuronRatio"] == 1.0
    assert_outputs_close(run_saved_model(tmp_path / "m", feeds),
                         run_fresh(tmp_path / "c", feeds, tmp_path, backend=backend))


def _save_module(path, fn, spec):
    module = tf.Module()
    module.f = tf.function(fn, input_signature=[spec])
    tf.saved_model.save(module, str(path), signatures=module.f)


def test_unsupported_op_in_the_middle_gives_two_segments(backend, tmp_path, rng):
    def fn(x):
        a = tf.nn.relu(x * 2.0 - 0.5) + 1.0
        hist = tf.histogram_fixed_width(a, [0.0, 3.0], nbins=5)  # no backend takes it
        h = tf.cast(hist, tf.float32)
        return {"y": tf.tanh(h * 0.1 + 1.0) * 3.0 - tf.reduce_sum(a)}

    _save_module(tmp_path / "m", fn, tf.TensorSpec([1, 8], tf.float32))
    feeds = {"x": rng.random((1, 8), np.float32)}
    result = compile_model(backend, tmp_path / "m", tmp_path / "c")
    assert result["num_segments"] == 2, result
    assert "HistogramFixedWidth" in op_types(saved_graph(tmp_path / "c"))
    assert_outputs_close(run_saved_model(tmp_path / "m", feeds),
                         run_fresh(tmp_path / "c", feeds, tmp_path, backend=backend))


def test_naive_merge_would_make_a_cycle(backend, tmp_path, rng):
    """a -> hist (TF) -> c and a -> c: a and c must not share a segment."""
    def fn(x):
        a = tf.nn.relu(x * 2.0)
        hist = tf.cast(tf.histogram_fixed_width(a, [0.0, 2.0], nbins=8), tf.float32)
        c = tf.sigmoid(a * 3.0 + hist)
        return {"y": c}

    _save_module(tmp_path / "m", fn, tf.TensorSpec([8], tf.float32))
    feeds = {"x": rng.random((8,), np.float32)}
    result = compile_model(backend, tmp_path / "m", tmp_path / "c", minimum_segment_size=1)
    assert result["num_segments"] == 2, result
    assert_outputs_close(run_saved_model(tmp_path / "m", feeds),
                         run_fresh(tmp_path / "c", feeds, tmp_path, backend=backend))


def test_compiled_model_runs_in_cpp_loader(backend, tmp_path, rng):
    from cpp_runner import run_saved_model_cpp

    model = _keras_cnn()
    model.export(str(tmp_path / "m"))
    compile_model(backend, tmp_path / "m", tmp_path / "c")
    name = model.inputs[0].name
    feeds = {name: rng.random((1, 16, 16, 3), np.float32)}
    outputs, stats = run_saved_model_cpp(tmp_path / "c", feeds,
                                         op_libs=[fuseflow.native.library_path()],
                                         with_stats=True)
    assert_outputs_close(run_saved_model(tmp_path / "m", feeds), outputs, atol=1e-4)
    assert_ran(stats, backend, fused_segments(tmp_path / "c"))
