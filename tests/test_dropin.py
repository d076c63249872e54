"""The tensorflow-neuron API surface beyond compile(): each item in a real round trip.

Every model is built here, compiled or traced, saved, loaded in a fresh
process that imports fuseflow, and compared with the original; the compiled
graph is checked to hold a FuseflowOp, so the backend really ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    REPO,
    assert_outputs_close,
    fused_blob,
    op_types,
    run_fresh,
    save_tf1,
    saved_graph,
)

import fuseflow
from fuseflow import errors
from fuseflow.options import IGNORED_FLAGS, parse_compiler_args


@pytest.fixture(autouse=True)
def _openvino(monkeypatch):
    """These tests prove the OpenVINO path (the default on CPU) also where a GPU would
    make XLA the default (placed by kind, as conftest's); the env var reaches the fresh
    processes too."""
    monkeypatch.setenv("FUSEFLOW_CC_FLAGS", "--backend openvino --no-profile")


def _dense_tf1(rng):
    """x[?, 8] -> relu(x @ w + b) -> y[?, 4], weights in variables."""
    x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
    w = tf.compat.v1.Variable(rng.standard_normal((8, 4)).astype(np.float32), name="w")
    y = tf.nn.relu(tf.matmul(x, w) + 0.5, name="y")
    return x, y


def _keras_model():
    inp = tf.keras.Input((8,))
    h = tf.keras.layers.Dense(16, activation="relu")(inp)
    out = tf.keras.layers.Dense(4)(h)
    return tf.keras.Model(inp, out)


def _run_script(code: str, cwd: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


# --- 1. log lines -----------------------------------------------------------------------

_PLAIN_COMPILE = """
    import tensorflow as tf
    {setup}
    import fuseflow as tfn

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def f(self, x):
            return {{"y": tf.nn.relu(tf.matmul(x, tf.ones([4, 3])) + 1.0)}}

    m = M()
    tf.saved_model.save(m, "m", signatures=m.f)
    root = logging.getLogger()
    before = (root.level, list(root.handlers), logging.getLogger("fuseflow").level)
    tfn.saved_model.compile("m", "mc", compiler_args=["--static-weights"])
    after = (root.level, list(root.handlers), logging.getLogger("fuseflow").level)
    assert before == after, (before, after)
"""


@pytest.mark.parametrize("setup", ["import logging",
                                   "import logging; logging.basicConfig(level=logging.WARNING)"])
def test_count_lines_show_without_logging_setup(tmp_path, setup):
    """A script that never configured logging (or asked for WARNING) sees the reference's
    lines, one warning for the flag, no TF deprecation noise; its logging is left as it was."""
    proc = _run_script(_PLAIN_COMPILE.format(setup=setup), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    for line in ("Number of operations in TensorFlow session: ",
                 "Number of operations after fuseflow optimizations: ",
                 "Number of operations placed on openvino: ",
                 "Successfully converted m to mc"):
        assert line in err, err
    assert err.count("--static-weights") == 1, err
    assert "deprecated" not in err, err


def test_count_lines_respect_a_quiet_fuseflow_logger(tmp_path):
    """A user who silenced the fuseflow logger on purpose is obeyed."""
    setup = "import logging; logging.getLogger('fuseflow').setLevel(logging.ERROR)"
    proc = _run_script(_PLAIN_COMPILE.format(setup=setup), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Number of operations" not in proc.stderr
    assert "Successfully converted" not in proc.stderr


# --- 2. neuron-cc flags -----------------------------------------------------------------

def _flag_args(flag: str) -> list[str]:
    nargs = IGNORED_FLAGS[flag]
    return [flag] if nargs in (0, "?") else [flag, "1"]


def test_every_hardware_only_flag_is_accepted_with_one_warning(caplog):
    args = [a for flag in IGNORED_FLAGS for a in _flag_args(flag)]
    args += ["--enable-replication", "True", "--model-type=transformer",
             "--extract-weights", "inf1.xlarge"]
    with caplog.at_level("WARNING", logger="fuseflow"):
        options = parse_compiler_args(args, environ={})
    assert set(options.ignored_flags) == set(IGNORED_FLAGS)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and all(flag in warnings[0] for flag in IGNORED_FLAGS)


@pytest.mark.parametrize("args, field, value", [
    (["--num-neuroncores", "3"], "cores", 3),
    (["--neuroncore-pipeline-cores", "2"], "cores", 2),
    (["--verbose=INFO"], "verbose", 1),
    (["--verbose", "DEBUG"], "verbose", 2),
    (["--verbose", "WARN"], "verbose", 0),
    (["--verbose=35"], "verbose", 35),
    (["--dynamic-batch-size"], "dynamic_batch", True),
    (["--no-dynamic-batch"], "dynamic_batch", False),
    (["--fp32-cast", "matmult-bf16"], "fp32_cast", "matmult-bf16"),
    (["--workdir", "w"], "workdir", "w"),
    (["--must-compile"], "must_compile", True),
])
def test_meaningful_flags_are_mapped(args, field, value):
    assert getattr(parse_compiler_args(args, environ={}), field) == value


@pytest.mark.parametrize("args", [["--bogus"], ["--verbose=LOUD"], ["--sb-size", "1"],
                                  ["--dynamic-batch-size", "--no-dynamic-batch"]])
def test_unknown_flags_stay_errors(args):
    with pytest.raises(errors.CompilerArgsError):
        parse_compiler_args(args, environ={})


# --- 3. the rest of the TF1 API ---------------------------------------------------------

def test_simple_save_round_trip(tmp_path, rng):
    feeds = {"x": rng.standard_normal((3, 8)).astype(np.float32)}
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        x, y = _dense_tf1(rng)
        sess.run(tf.compat.v1.global_variables_initializer())
        expected = {"y": sess.run(y, {x: feeds["x"]})}
        result = fuseflow.saved_model.simple_save(sess, str(tmp_path / "m"), {"x": x}, {"y": y})
    assert result["OnNeuronRatio"] == 1.0
    assert "FuseflowOp" in op_types(saved_graph(tmp_path / "m"))
    assert_outputs_close(expected, run_fresh(tmp_path / "m", feeds, tmp_path, api="v1"))
    with pytest.raises(errors.OutputDirError):
        with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
            fuseflow.saved_model.simple_save(sess, str(tmp_path / "m"), {"x": x}, {"y": y})


def test_inference_graph_from_session_round_trip(tmp_path, rng):
    value = rng.standard_normal((2, 8)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        x, y = _dense_tf1(rng)
        sess.run(tf.compat.v1.global_variables_initializer())
        expected = sess.run(y, {x: value})
        compiled = fuseflow.graph_util.inference_graph_from_session(
            sess, input_tensors=[x], output_tensors=[y], shape_feed_dict={x: [2, 8]},
            compiler_recovery=False, max_num_compilers=1)
    assert isinstance(compiled, tf.Graph)
    assert "FuseflowOp" in [op.type for op in compiled.get_operations()]
    pb = tmp_path / "graph.pb"
    pb.write_bytes(compiled.as_graph_def().SerializeToString())
    np.save(tmp_path / "x.npy", value)
    proc = _run_script(f"""
        import numpy as np, tensorflow as tf, fuseflow
        g = tf.Graph()
        with g.as_default():
            gd = tf.compat.v1.GraphDef.FromString(open({str(pb)!r}, "rb").read())
            tf.graph_util.import_graph_def(gd, name="")
        with tf.compat.v1.Session(graph=g) as sess:
            np.save("y.npy", sess.run({y.name!r}, {{{x.name!r}: np.load("x.npy")}}))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def compiled_dense(tmp_path_factory):
    """A TF1 dense model and its compiled version (module-scoped: compiled once)."""
    tmp = tmp_path_factory.mktemp("dense")
    rng = np.random.default_rng(1)
    save_tf1(tmp / "m", lambda: (lambda xy: ({"x": xy[0]}, {"y": xy[1]}))(_dense_tf1(rng)))
    fuseflow.saved_model.compile(tmp / "m", tmp / "c", backend="openvino")
    return tmp


def test_profile_times_ops_and_names_segments(compiled_dense, tmp_path):
    timeline = tmp_path / "timeline.json"
    result = fuseflow.saved_model.profile(str(compiled_dense / "c"), timeline_json=str(timeline),
                                          batch_size=4, num_warmup_runs=2)
    assert [s["backend"] for s in result.segments] == ["openvino"]
    assert result.segments[0]["ops"] >= 2 and result.segments[0]["micros"] > 0
    assert any(o.segment and o.op == "FuseflowOp" for o in result.ops)
    events = json.loads(timeline.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("segment fuseflow_segment_0 [openvino]")
               for e in events)


def test_core_binding_is_stored_reported_and_loads(compiled_dense, tmp_path, rng):
    import shutil

    model = tmp_path / "bound"
    shutil.copytree(compiled_dense / "c", model)
    assert fuseflow.saved_model.inspect_core_binding(str(model)) == {"fuseflow_segment_0": -1}
    fuseflow.saved_model.set_core_binding(str(model), [3])
    assert fuseflow.saved_model.inspect_core_binding(str(model)) == {"fuseflow_segment_0": 3}
    node = next(n for n in saved_graph(model).node if n.op == "FuseflowOp")
    assert node.attr["_fuseflow_core_group"].i == 3
    feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    assert_outputs_close(run_fresh(compiled_dense / "m", feeds, tmp_path),
                         run_fresh(model, feeds, tmp_path))


# --- 4. the TF2 API ---------------------------------------------------------------------

_FRESH_CALL = """
    import numpy as np, tensorflow as tf, fuseflow
    loaded = tf.saved_model.load("traced")
    np.save("out.npy", loaded(tf.constant(np.load("x.npy"))).numpy())
    sig = loaded.signatures["serving_default"](input_0=tf.constant(np.load("x.npy")))
    np.save("sig.npy", sig["output_0"].numpy())
"""


def _fresh_call(tmp_path: Path, x: np.ndarray, env=None) -> np.ndarray:
    np.save(tmp_path / "x.npy", x)
    proc = _run_script(_FRESH_CALL, tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.load(tmp_path / "sig.npy"))
    return np.load(tmp_path / "out.npy")


def _fused_nodes(traced):
    return [n for n in traced._compiled.graph_def.node if n.op == "FuseflowOp"]


@pytest.mark.parametrize("save", ["tf.saved_model.save", "model.save"])
def test_trace_keras_round_trip(tmp_path, save):
    model = _keras_model()
    x = tf.random.uniform([1, 8])
    traced = fuseflow.trace(model, x)
    assert traced.on_neuron_ratio == 1.0
    assert len(_fused_nodes(traced)) == 1
    np.testing.assert_allclose(traced(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)
    if save == "model.save":
        traced.save(str(tmp_path / "traced"))
    else:
        tf.saved_model.save(traced, str(tmp_path / "traced"))
    other = np.random.default_rng(0).random((5, 8)).astype(np.float32)  # another batch
    np.testing.assert_allclose(_fresh_call(tmp_path, other), model(other).numpy(),
                               rtol=1e-4, atol=1e-5)


def test_trace_tf_function_with_tuple_inputs_and_dict_outputs(tmp_path):
    w = tf.Variable(np.random.default_rng(2).standard_normal((6, 3)).astype(np.float32))

    @tf.function
    def func(a, b):
        return {"sum": tf.nn.relu(tf.matmul(a + b, w)), "diff": tf.tanh(a - b)}

    a, b = tf.random.uniform([2, 6]), tf.random.uniform([2, 6])
    traced = fuseflow.trace(func, (a, b))
    got, want = traced(a, b), func(a, b)
    assert sorted(got) == ["diff", "sum"]
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-4, atol=1e-5)
    assert _fused_nodes(traced)


def test_trace_subgraph_builder_function_forces_nodes_off(tmp_path):
    model = _keras_model()
    x = tf.random.uniform([1, 8])
    traced = fuseflow.trace(model, x, subgraph_builder_function=lambda node: node.op != "Relu")
    kept = [n.op for n in traced._compiled.graph_def.node]
    assert "Relu" in kept  # stayed in TensorFlow
    assert traced.on_neuron_ratio < 1.0
    np.testing.assert_allclose(traced(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_trace_reads_neuron_cc_flags(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NEURON_CC_FLAGS", "--dynamic-batch-size --static-weights --verbose=INFO")
    model = _keras_model()
    with caplog.at_level("WARNING", logger="fuseflow"):
        traced = fuseflow.trace(model, tf.random.uniform([2, 8]))
    assert any("--static-weights" in r.getMessage() for r in caplog.records)
    x = tf.random.uniform([7, 8])  # a batch it was not traced at
    np.testing.assert_allclose(traced(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("NEURON_CC_FLAGS", "--no-such-flag")
    with pytest.raises(errors.CompilerArgsError):
        fuseflow.trace(model, tf.random.uniform([2, 8]))


def test_analyze_model_reports_support_and_reasons():
    @tf.function
    def func(x):
        return tf.math.special.bessel_i0e(tf.nn.relu(tf.matmul(x, tf.ones([4, 4]))))

    info = fuseflow.analyze_model(func, tf.random.uniform([1, 4]))
    for key in ("percent_supported", "supported_count", "total_count", "supported_operators",
                "unsupported_operators", "operators", "operator_count"):
        assert key in info
    assert "BesselI0e" in info["unsupported_operators"]
    assert "MatMul" in info["supported_operators"]
    assert info["unsupported_reasons"]["BesselI0e"] == ["not supported by the backend"]
    assert info["total_count"] == sum(info["operator_count"].values())
    assert 0 < info["percent_supported"] < 100


def _streams(node) -> list[bytes]:
    return [p for p in node.attr["properties"].list.s if p.startswith(b"NUM_STREAMS=")]


def test_auto_multicore_traced_serves_concurrent_calls(tmp_path):
    model = _keras_model()
    x = tf.random.uniform([1, 8])
    multi = fuseflow.auto_multicore(fuseflow.trace(model, x), x, num_cores=2)
    node = _fused_nodes(multi)[0]
    assert _streams(node) == [b"NUM_STREAMS=2"] and node.attr["max_infer_requests"].i == 2
    inputs = [np.random.default_rng(k).random((1 + k % 3, 8)).astype(np.float32)
              for k in range(12)]
    results: dict[int, np.ndarray] = {}

    def call(k):
        results[k] = multi(tf.constant(inputs[k])).numpy()

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, value in enumerate(inputs):
        np.testing.assert_allclose(results[k], model(value).numpy(), rtol=1e-4, atol=1e-5)
    multi.save(str(tmp_path / "traced"))
    np.testing.assert_allclose(_fresh_call(tmp_path, inputs[1]), model(inputs[1]).numpy(),
                               rtol=1e-4, atol=1e-5)


def test_auto_multicore_cli_on_a_compiled_dir(compiled_dense, tmp_path, rng):
    import openvino as ov

    out = tmp_path / "multi"
    proc = subprocess.run([sys.executable, "-m", "fuseflow.cli", "auto-multicore",
                           str(compiled_dense / "c"), "--num-cores", "2", "--new-model-dir",
                           str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    node = next(n for n in saved_graph(out).node if n.op == "FuseflowOp")
    assert _streams(node) == [b"NUM_STREAMS=2"] and node.attr["max_infer_requests"].i == 2
    # OpenVINO itself takes these properties and makes 2 streams of the blob (it caps
    # streams at the CPU count, 2 on the smallest machines that run this).
    props = dict(p.decode().split("=", 1) for p in node.attr["properties"].list.s)
    compiled = ov.Core().import_model(fused_blob(out, node).read_bytes(), "CPU", props)
    assert compiled.get_property("NUM_STREAMS") == 2
    feeds = {"x": rng.standard_normal((4, 8)).astype(np.float32)}
    assert_outputs_close(run_fresh(compiled_dense / "c", feeds, tmp_path),
                         run_fresh(out, feeds, tmp_path))
    with pytest.raises(errors.OptionError):
        fuseflow.auto_multicore(str(compiled_dense / "c"), None, 0, new_model_dir=tmp_path / "z")


def test_compile_takes_the_reference_keywords(compiled_dense, tmp_path, rng):
    """tensorflow-neuron's positional order and its graph-pass keywords."""
    out = tmp_path / "c"
    result = fuseflow.saved_model.compile(
        str(compiled_dense / "m"), str(out), 1, None, None, None, None, True, None,
        dynamic_batch_size=True, compiler_recovery=False, compiler_timeout=600,
        max_num_compilers=1, compiler_verbose="INFO", supported_op_types=["MatMul", "AddV2"])
    assert 0 < result["OnNeuronRatio"] < 1
    kept = op_types(saved_graph(out))
    assert "FuseflowOp" in kept and "Relu" in kept
    feeds = {"x": rng.standard_normal((3, 8)).astype(np.float32)}
    assert_outputs_close(run_fresh(compiled_dense / "m", feeds, tmp_path),
                         run_fresh(out, feeds, tmp_path))
