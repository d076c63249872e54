"""Compiled at one batch size, run at many, in a fresh process: right answers, and the
path each batch size took (split into compiled chunks, or the intended TF fallback)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, assert_ran, fused_segments, save_tf1, saved_graph, tf
from test_compile_core import compile_model

# One call per batch size alone (its run stats recorded), then `threads` threads calling
# `calls` times each with batch sizes cycling through the list.
_CHECK = textwrap.dedent("""
    import json, sys, threading
    import numpy as np
    import fuseflow
    from fuseflow.runtime import runtime_stats, since
    import tensorflow as tf
    args = json.loads(sys.argv[1])
    original = tf.saved_model.load(args["original"]).signatures["serving_default"]
    compiled = tf.saved_model.load(args["compiled"]).signatures["serving_default"]
    batches, key, shape = args["batches"], args["key"], args["shape"]
    errors, per_batch = [], {}

    def make(rng, b):
        if args["ints"]:
            return tf.constant(rng.integers(0, 50, (b, *shape)).astype(np.int32))
        return tf.constant(rng.random((b, *shape), np.float32))

    def check(b, x):
        want, got = original(**{key: x}), compiled(**{key: x})
        for k in want:
            w, g = want[k].numpy(), got[k].numpy()
            if w.shape != g.shape or not np.allclose(w, g, rtol=1e-4, atol=1e-4):
                diff = float(np.max(np.abs(w - g))) if w.shape == g.shape else None
                errors.append((b, k, w.shape, g.shape, diff))

    rng = np.random.default_rng(0)
    for b in batches:
        x = make(rng, b)
        before = runtime_stats()
        check(b, x)
        per_batch[b] = since(before)

    def worker(seed):
        rng = np.random.default_rng(seed)
        for k in range(args["calls"]):
            b = batches[(seed + k) % len(batches)]
            check(b, make(rng, b))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(args["threads"])]
    for t in threads: t.start()
    for t in threads: t.join()
    print(json.dumps({"mismatches": errors[:5], "per_batch": per_batch}))
""")


def _run_batches(original_dir, compiled_dir, key: str, shape, batches, ints=False,
                 threads=0, calls=0) -> dict[int, dict]:
    """Runs both models at each batch size in a fresh process; returns each batch's
    runtime stats, the compiled model's call alone (its original runs no fused op)."""
    args = {"original": str(original_dir), "compiled": str(compiled_dir), "key": key,
            "shape": list(shape), "batches": list(batches), "ints": ints,
            "threads": threads, "calls": calls}
    proc = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["mismatches"], result["mismatches"]
    return {int(b): stats for b, stats in result["per_batch"].items()}


def _cnn():
    x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
    w = tf.compat.v1.get_variable("w", [3, 3, 3, 4])
    y = tf.nn.relu(tf.nn.conv2d(x, w, 1, "SAME"))
    y = tf.reduce_mean(y, axis=[1, 2]) * 2.0 + 1.0
    return {"x": x}, {"y": tf.sigmoid(y, name="y")}


def test_batch_3_runs_at_any_batch_from_threads(backend, tmp_path):
    src = save_tf1(tmp_path / "m", _cnn)
    result = compile_model(backend, src, tmp_path / "c", batch_size=3)
    assert result["num_segments"] == 1
    batches = [1, 2, 3, 5, 11, 64, 1023] if backend == "openvino" else [1, 2, 3, 5, 11]
    per_batch = _run_batches(src, tmp_path / "c", "x", (8, 8, 3), batches, threads=8,
                             calls=7)
    segments = fused_segments(tmp_path / "c")
    for b in batches:  # every batch size ran compiled (OpenVINO: in chunks of 3)
        assert_ran(per_batch[b], backend, segments)


def test_transformer_splits_per_sample(tmp_path):
    """Dense on 3-D inputs reshapes [k, s, d] -> [k*s, d] and back: still per-sample."""
    from test_compile_tf2 import _keras_transformer

    model = _keras_transformer()
    model.export(str(tmp_path / "m"), verbose=False)
    compile_model("openvino", tmp_path / "m", tmp_path / "c", batch_size=2)
    report = json.loads((tmp_path / "c" / "assets.extra" / "fuseflow_report.json").read_text())
    assert len(report["segments"]) == 1
    assert [p["batch_axis"] for p in report["segments"][0]["inputs"]] == [0]
    batches = [1, 2, 3, 5]
    per_batch = _run_batches(tmp_path / "m", tmp_path / "c", model.inputs[0].name, (16,),
                             batches, ints=True)
    segments = fused_segments(tmp_path / "c")
    for b in batches:
        assert_ran(per_batch[b], "openvino", segments)


def test_transformer_on_xla_keeps_a_free_batch(tmp_path):
    """XLA runs a segment whole, not in chunks: its per-sample reshapes ([k, s, d] ->
    [k*s, d] and back, folded at k) infer their batch instead, so other batch sizes run
    compiled rather than fixing the model to its batch."""
    from test_compile_tf2 import _keras_transformer

    model = _keras_transformer()
    model.export(str(tmp_path / "m"), verbose=False)
    result = compile_model("xla", tmp_path / "m", tmp_path / "c", batch_size=1)
    assert result["dynamic_batch"] is True and result["num_segments"] == 1, result
    graph = tf.compat.v1.GraphDef()
    for function in saved_graph(tmp_path / "c").library.function:
        graph.node.extend(function.node_def)
    freed = [n for n in graph.node if n.name.endswith("/fuseflow_free_batch")]
    assert freed and all(tf.make_ndarray(n.attr["value"].tensor)[0] == -1 for n in freed)
    batches = [1, 2, 5]
    per_batch = _run_batches(tmp_path / "m", tmp_path / "c", model.inputs[0].name, (16,),
                             batches, ints=True)
    segments = fused_segments(tmp_path / "c")
    for b in batches:
        assert_ran(per_batch[b], "xla", segments)


@pytest.mark.parametrize("backend", ["openvino", "xla"])
def test_decoder_with_transposed_conv_and_resize_splits_per_sample(tmp_path, backend):
    """Conv2DTranspose folds its output size, batch included, into a constant; resizes
    take a constant size: both are per-sample, so other batch sizes run compiled, not
    fixed to the compiled batch: OpenVINO in chunks of it, XLA whole, its transposed
    convolution reading the batch from its input."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        w = tf.compat.v1.get_variable("w", [3, 3, 3, 6])
        y = tf.nn.relu(tf.nn.conv2d(x, w, 2, "SAME"))  # [b, 4, 4, 6]
        up = tf.compat.v1.get_variable("up", [3, 3, 5, 6])
        y = tf.nn.conv2d_transpose(y, up, tf.stack([tf.shape(x)[0], 8, 8, 5]), 2, "SAME")
        y = tf.image.resize(tf.nn.relu(y), (12, 12))
        y = tf.compat.v1.image.resize_nearest_neighbor(y, (16, 16))
        return {"x": x}, {"y": tf.sigmoid(y, name="y")}

    src = save_tf1(tmp_path / "m", build)
    result = compile_model(backend, src, tmp_path / "c", batch_size=1)
    assert result["dynamic_batch"] is True and result["num_segments"] == 1
    report = json.loads((tmp_path / "c" / "assets.extra" / "fuseflow_report.json").read_text())
    ops = report["segments"][0]["op_types"]
    assert {"Conv2DBackpropInput", "ResizeBilinear", "ResizeNearestNeighbor"} <= set(ops), ops
    assert [p["batch_axis"] for p in report["segments"][0]["outputs"]] == [0]
    batches = [1, 2, 5]
    per_batch = _run_batches(src, tmp_path / "c", "x", (8, 8, 3), batches)
    segments = fused_segments(tmp_path / "c")
    for b in batches:
        assert_ran(per_batch[b], backend, segments)


@pytest.mark.parametrize("broadcast", ["tile", "zeros_like"])
def test_class_token_concatenated_to_the_patches_splits_per_sample(tmp_path, broadcast):
    """A ViT's class token broadcast to the batch: tf.tile(token, [batch, 1, 1]) folds
    into one constant row at batch 1 (Keras' zeros_like(x[:, :1]) + token does too),
    TF1's zeros_like stays an op. Concatenated to the patch embeddings, either is
    per-sample (every chunk of the compiled batch gets the same row); both used to fix
    ViT-like models to their compiled batch."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4, 8], name="x")
        w = tf.compat.v1.get_variable("w", [8, 8])
        token = tf.compat.v1.get_variable("token", [1, 1, 8])
        patches = tf.einsum("bpd,de->bpe", x, w)
        cls = (tf.tile(token, tf.stack([tf.shape(x)[0], 1, 1])) if broadcast == "tile"
               else tf.zeros_like(patches[:, :1]) + token)
        y = tf.concat([cls, patches], axis=1)  # [b, 5, 8]
        y = tf.nn.softmax(tf.matmul(y, y, transpose_b=True)) @ y
        return {"x": x}, {"y": tf.identity(y[:, 0] * 2.0, name="y")}

    src = save_tf1(tmp_path / "m", build)
    result = compile_model("openvino", src, tmp_path / "c", batch_size=1)
    assert result["dynamic_batch"] is True and result["num_segments"] == 1, result
    report = json.loads((tmp_path / "c" / "assets.extra" / "fuseflow_report.json").read_text())
    ops = report["segments"][0]["op_types"]
    assert "ConcatV2" in ops and ("Tile" not in ops if broadcast == "tile" else "ZerosLike" in ops)
    assert [p["batch_axis"] for p in report["segments"][0]["inputs"]] == [0]
    batches = [1, 2, 5]
    per_batch = _run_batches(src, tmp_path / "c", "x", (4, 8), batches)
    segments = fused_segments(tmp_path / "c")
    for b in batches:
        assert_ran(per_batch[b], "openvino", segments)


def test_tabular_preprocessing_splits_per_sample(tmp_path):
    """Keras' Discretization and CategoryEncoding become Bucketize and OneHot: per-sample,
    so a tabular model with its preprocessing inside keeps a dynamic batch."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        bins = tf.raw_ops.Bucketize(input=x, boundaries=[0.25, 0.5, 0.75])
        codes = tf.reshape(tf.one_hot(bins, 4), [-1, 16])
        w = tf.compat.v1.get_variable("w", [20, 3])
        y = tf.matmul(tf.concat([x, codes], axis=1), w)
        return {"x": x}, {"y": tf.nn.softmax(y, name="y")}

    src = save_tf1(tmp_path / "m", build)
    result = compile_model("openvino", src, tmp_path / "c", batch_size=1)
    assert result["dynamic_batch"] is True and result["num_segments"] == 1
    report = json.loads((tmp_path / "c" / "assets.extra" / "fuseflow_report.json").read_text())
    assert {"Bucketize", "OneHot"} <= set(report["segments"][0]["op_types"])
    batches = [1, 3, 4]
    per_batch = _run_batches(src, tmp_path / "c", "x", (4,), batches)
    segments = fused_segments(tmp_path / "c")
    for b in batches:
        assert_ran(per_batch[b], "openvino", segments)


def test_keras_rnn_on_xla_keeps_a_free_batch(tmp_path):
    """Grappler folds a Keras RNN's zero state (tf.zeros([tf.shape(x)[0], units])) at the
    compiled batch; the XLA segment computes it from its input again, so the loop runs
    compiled at every batch size (XLA compiles once per shape) instead of the model
    being fixed to batch 1. Masking (mask_zero) adds masked states to the loop."""
    import keras

    ids = keras.Input((12,), dtype="int32", name="ids")
    x = keras.layers.Embedding(50, 16, mask_zero=True)(ids)
    x = keras.layers.LSTM(16, return_sequences=True)(x)
    x = keras.layers.GRU(8)(x)
    model = keras.Model(ids, keras.layers.Dense(3)(x))
    model.export(str(tmp_path / "m"), verbose=False)
    result = compile_model("xla", tmp_path / "m", tmp_path / "c", batch_size=1)
    assert result["dynamic_batch"] is True and result["num_segments"] == 1
    batches = [1, 2, 5]
    per_batch = _run_batches(tmp_path / "m", tmp_path / "c", "ids", (12,), batches,
                             ints=True)
    segments = fused_segments(tmp_path / "c")
    for b in batches:
        assert_ran(per_batch[b], "xla", segments)


def test_batch_statistics_are_never_split(tmp_path):
    """x - mean(x over the batch) mixes samples: other batch sizes must run unsplit,
    i.e. on the embedded TF fallback, for the shape reason."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6], name="x")
        return {"x": x}, {"y": tf.tanh(x - tf.reduce_mean(x, axis=0)) * 2.0}

    src = save_tf1(tmp_path / "m", build)
    compile_model("openvino", src, tmp_path / "c", batch_size=3)
    report = json.loads((tmp_path / "c" / "assets.extra" / "fuseflow_report.json").read_text())
    inputs = [p for s in report["segments"] for p in s["inputs"]]
    assert len(report["segments"]) == 1 and inputs
    assert all(p["batch_axis"] == -1 for p in inputs)
    batches = [1, 3, 5, 8]
    per_batch = _run_batches(src, tmp_path / "c", "x", (6,), batches)
    segments = fused_segments(tmp_path / "c")
    for b in batches:
        if b == 3:
            assert_ran(per_batch[b], "openvino", segments)
        else:
            assert_ran(per_batch[b], "openvino", segments, path="fallback", reason="shape")



def _fixed_batch_warning(src, out, caplog) -> str:
    """Compile src on OpenVINO; it must come out fixed to its batch, with one warning
    saying why (returned)."""
    with caplog.at_level("WARNING", logger="fuseflow"):
        result = compile_model("openvino", src, out)
    assert result["dynamic_batch"] is False
    (warning,) = [r.getMessage() for r in caplog.records if "another batch size" in
                  r.getMessage()]
    return warning


def test_model_using_its_own_batch_size_keeps_the_compiled_batch_and_says_why(
        tmp_path, caplog):
    """y scales by tf.shape(x)[0]: compiling at batch 1 folds it to 1, so at batch 2 the
    compiled model answers differently. The other-batch check catches it, the model
    accepts the compiled batch only, and the warning says what it saw."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6], name="x")
        n = tf.cast(tf.shape(x)[0], tf.float32)
        return {"x": x}, {"y": tf.identity(tf.tanh(x * 3.0 + 1.0) * n - 2.0, name="y")}

    warning = _fixed_batch_warning(save_tf1(tmp_path / "m", build), tmp_path / "c", caplog)
    assert "at batch 2 output y differs from the original's" in warning, warning
    assert "accepts batch 1 only" in warning
    loaded = tf.saved_model.load(str(tmp_path / "c")).signatures["serving_default"]
    assert loaded.structured_input_signature[1]["x"].shape.as_list() == [1, 6]


def test_model_failing_at_another_batch_names_the_error(tmp_path, caplog):
    """Flattening the whole batch into one vector folds the batch into the Reshape's
    shape: at batch 2 the compiled model fails, and the warning quotes TF's reason, not
    its "Graph execution error:" header."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6], name="x")
        flat = tf.reshape(x, [tf.shape(x)[0] * 6])
        return {"x": x}, {"y": tf.identity(tf.tanh(flat * 2.0 + 1.0), name="y")}

    warning = _fixed_batch_warning(save_tf1(tmp_path / "m", build), tmp_path / "c", caplog)
    assert "at batch 2 it fails: InvalidArgumentError: Input to reshape is a tensor with 12 " \
        "values" in warning, warning
