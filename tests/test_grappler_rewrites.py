"""Grappler rewrites that a backend mishandles are undone before partitioning.

Grappler's arithmetic optimizer turns `x * ones` (a broadcast) into Tile(x). Keras'
LayerNormalization makes that pattern, and OpenVINO's transpose sinking mis-shapes the
Tile before the next Mul: ConvNeXt failed to convert whole, at any input size, and
stayed 100% in TF. optimize.py turns such Tiles back into BroadcastTo.
"""

from __future__ import annotations

import json

import numpy as np
from conftest import (
    assert_outputs_close,
    assert_ran,
    fused_segments,
    run_fresh,
    run_saved_model,
    save_tf1,
    tf,
)

import fuseflow
from fuseflow.graph_util import STAND_IN_BYTES
from fuseflow.load import load_saved_model
from fuseflow.optimize import optimize_graph
from fuseflow.shapes import apply_input_shapes, resolve_input_shapes

CHANNELS = 16


def _layer_norm_after_conv():
    x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
    w = tf.constant(np.random.default_rng(0).normal(size=(1, 1, 3, CHANNELS)), tf.float32)
    c = tf.nn.conv2d(x, w, 1, "SAME")
    mean = tf.reduce_mean(c, axis=-1, keepdims=True)
    inv = tf.math.rsqrt(tf.reduce_mean(tf.square(c - mean), axis=-1, keepdims=True) + 1e-6)
    scale = inv * tf.ones([1, 1, 1, CHANNELS])  # the broadcast Grappler makes a Tile of
    y = tf.nn.relu(c * scale + (-mean) * scale)
    return {"x": x}, {"y": tf.identity(y, name="y")}


def test_grappler_tile_becomes_broadcast_to(tmp_path):
    src = save_tf1(tmp_path / "m", _layer_norm_after_conv)
    model = load_saved_model(str(src))
    inputs = resolve_input_shapes(model, 1, None, None)
    graph = optimize_graph(apply_input_shapes(model.graph_def, model, inputs.shapes),
                           model.fetch_nodes)
    rewritten = [n for n in graph.node if n.name.endswith("ReplaceMulWithBroadcastByTile_Tile")
                 or "ReplaceMulWithBroadcastByTile_Tile_" in n.name and n.op != "Const"]
    assert rewritten, "Grappler no longer makes this Tile: the test tests nothing"
    assert {n.op for n in rewritten} == {"BroadcastTo"}
    assert "Tile" not in {n.op for n in graph.node}


def test_layer_norm_compiles_whole_and_runs_at_any_batch(tmp_path):
    src = save_tf1(tmp_path / "m", _layer_norm_after_conv)
    result = fuseflow.saved_model.compile(str(src), str(tmp_path / "c"),
                                          compiler_args=["--backend", "openvino"])
    assert result["OnNeuronRatio"] == 1.0 and result["num_segments"] == 1
    assert result["dynamic_batch"], "BroadcastTo must keep the batch splittable"
    report = json.loads((tmp_path / "c" / "assets.extra" / "fuseflow_report.json").read_text())
    assert "BroadcastTo" in report["segments"][0]["op_types"]
    for batch in (1, 3):
        feeds = {"x": np.random.default_rng(batch).normal(size=(batch, 8, 8, 3))
                 .astype(np.float32)}
        actual, stats = run_fresh(tmp_path / "c", feeds, tmp_path, with_stats=True)
        assert_outputs_close(run_saved_model(src, feeds), actual, rtol=1e-4, atol=1e-5)
        assert_ran(stats, "openvino", fused_segments(tmp_path / "c"))


# Weights stay out of Grappler: every pass copies the GraphDef, and ResNet50's 100 MB
# of weights made Grappler 2.1 s of its compile (0.26 s without them).

def _conv_bn(table: bool = False):
    """Conv + BatchNorm-like scale on a 147 KB kernel; table: a 128 KB table used
    both directly and through a Reshape of it alone (as Keras' EinsumDense reshapes
    its kernel), a computation on weights alone."""
    rng = np.random.default_rng(1)
    x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 64], name="x")
    kernel = tf.Variable(rng.normal(size=(3, 3, 64, 64)).astype(np.float32))
    gamma = tf.Variable(rng.uniform(0.5, 1.5, 64).astype(np.float32))
    variance = tf.Variable(rng.uniform(0.5, 1.5, 64).astype(np.float32))
    y = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME") * (gamma * tf.math.rsqrt(variance + 1e-3)))
    if table:
        weights = tf.Variable(rng.normal(size=(64, 512)).astype(np.float32))
        pooled = tf.reduce_mean(y, axis=[1, 2])
        y = tf.matmul(tf.matmul(pooled, weights), tf.reshape(weights, [512, 64]))
    return {"x": x}, {"y": tf.identity(y, name="y")}


def _optimized_with_grappler_inputs(tmp_path, build, monkeypatch):
    from fuseflow import optimize

    seen = []
    real = optimize._grappler

    def recording(graph_def, *args, **kwargs):
        seen.append(graph_def.ByteSize())
        return real(graph_def, *args, **kwargs)

    monkeypatch.setattr(optimize, "_grappler", recording)
    src = save_tf1(tmp_path / "m", build)
    model = load_saved_model(str(src))
    inputs = resolve_input_shapes(model, 2, None, None)
    frozen = apply_input_shapes(model.graph_def, model, inputs.shapes)
    return frozen, optimize_graph(frozen, model.fetch_nodes), seen, model


def _run(graph_def, x):
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        return sess.run("y:0", {"x:0": x})


def test_weights_go_to_grappler_as_stand_ins_and_come_back(tmp_path, monkeypatch):
    frozen, optimized, seen, _ = _optimized_with_grappler_inputs(
        tmp_path, _conv_bn, monkeypatch)
    assert seen and max(seen) < STAND_IN_BYTES, f"Grappler was handed the weights: {seen} bytes"
    kernels = [n for n in optimized.node if n.op == "Const"
               and n.attr["value"].tensor.ByteSize() > STAND_IN_BYTES]
    assert len(kernels) == 1 and not kernels[0].input
    original = [n for n in frozen.node if n.op == "Const"
                and n.attr["value"].tensor.ByteSize() > STAND_IN_BYTES]
    assert kernels[0].attr["value"] == original[0].attr["value"]
    assert [n.name for n in optimized.node if n.op == "Placeholder"] == ["x"]
    assert not any(i.startswith("^") for n in optimized.node for i in n.input)
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(optimized, x), _run(frozen, x), rtol=1e-5, atol=1e-5)


def test_a_computation_on_weights_alone_is_still_folded(tmp_path, monkeypatch):
    frozen, optimized, seen, _ = _optimized_with_grappler_inputs(
        tmp_path, lambda: _conv_bn(table=True), monkeypatch)
    assert max(seen) > 128 << 10, "the weights-only Reshape was optimized without values"
    assert "Reshape" not in {n.op for n in optimized.node}
    assert "Rsqrt" not in {n.op for n in optimized.node}
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(optimized, x), _run(frozen, x), rtol=1e-4, atol=1e-3)


def test_position_embeddings_of_a_constant_range_compile_and_match(tmp_path, rng):
    """Keras' position embedding of tf.range(seq) is a Gather on weights alone (a 128 KB
    table here), folded in Grappler's second pass. A second pass over the light graph once
    left a constant colocated with a node the first pass had pruned: the export failed."""
    import keras

    seq, dim = 128, 256
    ids = keras.Input((seq,), dtype="int32", name="input_ids")
    pos = keras.layers.Embedding(seq, dim)(tf.range(seq)[tf.newaxis])
    x = keras.layers.Embedding(500, dim)(ids) + pos
    model = keras.Model(ids, keras.layers.Dense(8)(keras.layers.LayerNormalization()(x)))
    model.export(str(tmp_path / "m"), verbose=False)
    result = fuseflow.saved_model.compile(str(tmp_path / "m"), str(tmp_path / "c"),
                                          compiler_args=["--no-profile"], backend="openvino")
    assert result["num_segments"] >= 1, result
    feeds = {"input_ids": rng.integers(0, 500, (1, seq)).astype(np.int32)}
    got, log = run_fresh(tmp_path / "c", feeds, tmp_path, with_log=True)
    assert "runs its segment with TensorFlow" not in log
    assert_outputs_close(run_saved_model(tmp_path / "m", feeds), got, rtol=1e-4, atol=1e-4)
