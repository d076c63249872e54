"""Loops and conditionals compile whole: Keras RNNs, tf.cond, tf.while_loop, TF1 loops.

Every model is compiled on both backends, loaded in a fresh process and
compared with the original. The loop or conditional must sit inside a fused
node (no control-flow op left in the compiled graph outside one), and the
backend must really have run it: for OpenVINO the native op's counters show
only compiled runs; for XLA the call node carries _XlaMustCompile and TF logs
that it compiled a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO, assert_outputs_close, run_saved_model, save_tf1, saved_graph, tf
from test_compile_core import compile_model, fused_nodes

from fuseflow.reasons import Reason

CONTROL_FLOW_OPS = frozenset({
    "While", "StatelessWhile", "If", "StatelessIf", "Case", "StatelessCase", "Enter", "Exit",
    "Merge", "Switch", "NextIteration", "LoopCond", "TensorListReserve", "TensorListStack",
    "TensorListFromTensor"})

_RUN = textwrap.dedent("""
    import json, sys
    import numpy as np
    import fuseflow
    import fuseflow.native
    import tensorflow as tf

    args = json.loads(sys.argv[1])
    fn = tf.saved_model.load(args["model"]).signatures["serving_default"]
    feeds = np.load(args["feeds"])
    outputs = {}
    for k in range(args["calls"]):
        out = fn(**{name: tf.constant(feeds[f"{k}/{name}"]) for name in args["names"]})
        outputs.update({f"{k}/{name}": v.numpy() for name, v in out.items()})
    np.savez(args["out"], **outputs)
    stats = fuseflow.native.load_op_library().fuseflow_op_stats()
    print(json.dumps({"openvino_runs": int(stats.openvino_runs),
                      "native_runs": int(stats.native_runs),
                      "recompiles": int(stats.recompiles)}))
""")


def run_compiled(model_dir, calls: list[dict], tmp_path):
    """Run the compiled model on each feed dict in a fresh process: (outputs per call,
    native-op counters, stderr)."""
    names = sorted(calls[0])
    np.savez(tmp_path / "feeds.npz", **{f"{k}/{n}": v for k, feeds in enumerate(calls)
                                       for n, v in feeds.items()})
    args = {"model": str(model_dir), "feeds": str(tmp_path / "feeds.npz"), "names": names,
            "calls": len(calls), "out": str(tmp_path / "out.npz")}
    proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(tmp_path / "out.npz") as data:
        flat = dict(data)
    outputs = [{key.split("/", 1)[1]: v for key, v in flat.items() if key.startswith(f"{k}/")}
               for k in range(len(calls))]
    return outputs, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def check_compiled(backend, src, out, calls: list[dict], tmp_path, expected=None):
    """Loops inside fused nodes, answers equal the original's, and the backend ran."""
    graph = saved_graph(out)
    fused = fused_nodes(graph)
    assert fused
    left = sorted({n.op for n in graph.node} & CONTROL_FLOW_OPS)
    assert not left, f"control flow left outside fused nodes: {left}"
    if backend == "xla":
        assert all(n.attr["_XlaMustCompile"].b for n in fused)
    expected = expected or [run_saved_model(src, feeds) for feeds in calls]
    got, stats, log = run_compiled(out, calls, tmp_path)
    for want, have in zip(expected, got):
        assert_outputs_close(want, have, rtol=1e-4, atol=1e-4)
    if backend == "openvino":
        assert stats == {"openvino_runs": len(calls) * len(fused), "native_runs": 0,
                         "recompiles": 0}, stats
    else:
        assert "Compiled cluster using XLA" in log


def _lstm(vocab=50, seq=12):
    ids = tf.keras.Input((seq,), dtype="int32", name="ids")
    x = tf.keras.layers.Embedding(vocab, 8)(ids)
    return ids, tf.keras.layers.LSTM(16)(x)


def _gru(vocab=50, seq=12):
    ids = tf.keras.Input((seq,), dtype="int32", name="ids")
    x = tf.keras.layers.Embedding(vocab, 8)(ids)
    return ids, tf.keras.layers.GRU(16)(x)


def _bidirectional(vocab=50, seq=12):
    ids = tf.keras.Input((seq,), dtype="int32", name="ids")
    x = tf.keras.layers.Embedding(vocab, 8)(ids)
    return ids, tf.keras.layers.Bidirectional(tf.keras.layers.LSTM(8))(x)


def _stacked(vocab=50, seq=12):
    ids = tf.keras.Input((seq,), dtype="int32", name="ids")
    x = tf.keras.layers.Embedding(vocab, 8)(ids)
    x = tf.keras.layers.LSTM(16, return_sequences=True)(x)
    return ids, tf.keras.layers.LSTM(12)(x)


# GRU and the stacked LSTM also run in the zoo (make zoo); make test keeps two.
@pytest.mark.parametrize("body", [
    pytest.param(_lstm, id="lstm"), pytest.param(_gru, id="gru", marks=pytest.mark.slow),
    pytest.param(_bidirectional, id="bidirectional"),
    pytest.param(_stacked, id="stacked_lstm", marks=pytest.mark.slow)])
def test_keras_rnn_compiles_whole(backend, tmp_path, rng, body):
    tf.keras.utils.set_random_seed(0)
    ids, x = body()
    model = tf.keras.Model(ids, tf.keras.layers.Dense(3)(x))
    src = tmp_path / "m"
    model.export(str(src))
    result = compile_model(backend, src, tmp_path / "c", batch_size=2)
    assert result["num_segments"] == 1, result
    assert result["OnNeuronRatio"] >= 0.97, result
    calls = [{"ids": rng.integers(0, 50, (2, 12)).astype(np.int32)} for _ in range(3)]
    check_compiled(backend, src, tmp_path / "c", calls, tmp_path)


class CondModule(tf.Module):
    def __init__(self, rng):
        self.w = tf.Variable(rng.normal(size=(4, 4)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def __call__(self, x):
        y = tf.matmul(x, self.w)
        y = tf.cond(tf.reduce_sum(x) > 0, lambda: tf.nn.relu(y) * 2.0,
                    lambda: tf.tanh(y) - tf.matmul(y, self.w))
        return {"y": y + 1.0}


def test_tf_module_cond_both_branches(backend, tmp_path, rng):
    module = CondModule(rng)
    src = tmp_path / "m"
    tf.saved_model.save(module, str(src), signatures=module.__call__)
    ops = {n.op for f in saved_graph(src).library.function for n in f.node_def}
    assert "StatelessIf" in ops or "If" in ops
    result = compile_model(backend, src, tmp_path / "c", batch_size=3)
    assert result["num_segments"] == 1 and result["OnNeuronRatio"] == 1.0, result
    positive = np.abs(rng.normal(size=(3, 4))).astype(np.float32)
    check_compiled(backend, src, tmp_path / "c", [{"x": positive}, {"x": -positive}], tmp_path)


def _corrupt_executables(model_dir) -> int:
    """Make every FuseflowOp's blob unimportable (an OpenVINO version that doesn't exist)."""
    from conftest import fused_blob

    from fuseflow.load import read_saved_model_proto

    proto = read_saved_model_proto(str(model_dir))
    count = 0
    for node in proto.meta_graphs[0].graph_def.node:
        if node.op == "FuseflowOp":
            path = fused_blob(model_dir, node)
            blob = path.read_bytes()
            at = blob.index(b"ov=")
            path.write_bytes(blob[:at] + b"ov=1999.9.9" + blob[at + 11:])
            count += 1
    return count


@pytest.mark.parametrize("kind", ["cond", "lstm"])
def test_loop_segment_recompiles_from_its_native_function(tmp_path, rng, kind):
    """An unimportable blob is recompiled from the embedded TF function, which must still
    hold the functional If/While and its bodies (not TF1 Switch/Merge)."""
    src = tmp_path / "m"
    if kind == "cond":
        module = CondModule(rng)
        tf.saved_model.save(module, str(src), signatures=module.__call__)
        calls = [{"x": np.abs(rng.normal(size=(3, 4))).astype(np.float32)}]
        calls.append({"x": -calls[0]["x"]})
    else:
        tf.keras.utils.set_random_seed(0)
        ids, x = _lstm()
        tf.keras.Model(ids, tf.keras.layers.Dense(3)(x)).export(str(src))
        calls = [{"ids": rng.integers(0, 50, (3, 12)).astype(np.int32)} for _ in range(2)]
    out = tmp_path / "c"
    result = compile_model("openvino", src, out, batch_size=3)
    assert result["num_segments"] == 1, result
    assert _corrupt_executables(out) == 1
    got, stats, log = run_compiled(out, calls, tmp_path)
    for feeds, have in zip(calls, got):
        assert_outputs_close(run_saved_model(src, feeds), have, rtol=1e-4, atol=1e-4)
    assert stats == {"openvino_runs": len(calls), "native_runs": 0, "recompiles": 1}, log[-3000:]


def test_while_loop_with_data_dependent_trip_count(backend, tmp_path, rng):
    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32, name="x")])
        def __call__(self, x):
            steps = tf.cast(tf.reduce_max(tf.abs(x)) * 3.0, tf.int32)
            _, y = tf.while_loop(lambda i, y: i < steps,
                                 lambda i, y: (i + 1, tf.sin(y) * 0.9 + 0.1 * x), (0, x))
            return {"y": y * 2.0}

    module = Module()
    src = tmp_path / "m"
    tf.saved_model.save(module, str(src), signatures=module.__call__)
    result = compile_model(backend, src, tmp_path / "c", batch_size=2)
    assert result["num_segments"] == 1 and result["OnNeuronRatio"] == 1.0, result
    calls = [{"x": (rng.random((2, 5)) * scale).astype(np.float32)} for scale in (0.3, 1, 4)]
    check_compiled(backend, src, tmp_path / "c", calls, tmp_path)


def _tf1_loop():
    x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
    w = tf.compat.v1.get_variable("w", [4, 4])
    steps = tf.cast(tf.reduce_max(tf.abs(x)) * 3.0, tf.int32)
    _, y = tf.compat.v1.while_loop(lambda i, y: i < steps,
                                   lambda i, y: (i + 1, tf.tanh(tf.matmul(y, w)) + x), (0, x))
    return {"x": x}, {"y": tf.identity(y * 2.0, name="y")}


def test_tf1_while_loop(backend, tmp_path, rng):
    """OpenVINO converts a TF1 loop whole once its shapes are measured (from
    model_feed_dict, or from a run on synthesized inputs without it); XLA has no kernels
    for Enter/Merge/Switch/Exit, and the report says so truthfully."""
    tf.compat.v1.disable_control_flow_v2()
    try:
        src = save_tf1(tmp_path / "m", _tf1_loop)
    finally:
        tf.compat.v1.enable_control_flow_v2()
    assert "Enter" in {n.op for n in saved_graph(src).node}
    calls = [{"x": (rng.random((2, 4)) * scale).astype(np.float32)} for scale in (0.5, 2)]
    out = tmp_path / "c"
    result = compile_model(backend, src, out, model_feed_dict=calls[0])
    report = json.loads((out / "assets.extra" / "fuseflow_report.json").read_text())
    if backend == "openvino":
        assert result["num_segments"] == 1 and result["OnNeuronRatio"] == 1.0, report
        check_compiled(backend, src, out, calls, tmp_path)
        return
    loop_ops = {r["op_type"] for r in report["not_compiled"]
                if r["code"] == Reason.CONTROL_FLOW.name}
    assert {"Enter", "Merge", "Switch", "Exit", "MatMul", "Tanh"} <= loop_ops, report
    assert any("OpenVINO converts" in line for line in report["advice"]), report["advice"]
    measured = compile_model("openvino", src, tmp_path / "c2", batch_size=2)  # no feeds
    assert measured["num_segments"] == 1 and measured["OnNeuronRatio"] == 1.0, measured
    check_compiled("openvino", src, tmp_path / "c2", calls, tmp_path)


def test_loop_whose_body_the_backend_refuses_stays_whole_in_tf(backend, tmp_path, rng):
    """A loop body op neither backend compiles (a string op) keeps the whole loop in TF,
    with the body reason; the ops around it still compile."""
    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def __call__(self, x):
            y = tf.nn.relu(tf.matmul(x, tf.ones([3, 3]))) + 1.0

            def body(i, v):
                text = tf.strings.as_string(v)  # no backend takes strings
                return i + 1, tf.strings.to_number(text) * 0.5
            _, y = tf.while_loop(lambda i, v: i < 3, body, (0, y))
            return {"y": tf.sigmoid(y * 2.0) + tf.tanh(y)}

    module = Module()
    src = tmp_path / "m"
    tf.saved_model.save(module, str(src), signatures=module.__call__)
    out = tmp_path / "c"
    compile_model(backend, src, out, batch_size=2)
    report = json.loads((out / "assets.extra" / "fuseflow_report.json").read_text())
    rows = [r for r in report["not_compiled"] if r["op_type"] in ("While", "StatelessWhile")]
    assert [r["code"] for r in rows] == [Reason.BODY_UNSUPPORTED.name], report["not_compiled"]
    assert report["num_segments"] == 2, report
    [loop] = [n for n in saved_graph(out).node if n.op in ("While", "StatelessWhile")]
    assert loop.attr["_lower_using_switch_merge"].b  # TF runs it lowered, as before
    assert "_fuseflow_lower_using_switch_merge" not in loop.attr
    feeds = {"x": rng.random((2, 3)).astype(np.float32)}
    got, _, _ = run_compiled(out, [feeds], tmp_path)
    assert_outputs_close(run_saved_model(src, feeds), got[0], rtol=1e-4, atol=1e-4)
