"""The native FuseflowOp with real TensorFlow and real OpenVINO.

Each test converts a small segment GraphDef with openvino.convert_model, compiles and
exports it, puts a FuseflowOp running the blob into a tf.Graph (the segment's
tf.function in its library) and compares its answers with plain TF. The op's
process-wide counters (FuseflowOpStats) tell which path ran: OpenVINO or TF.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import openvino as ov
import pytest
from conftest import assert_ran, ran_in_process

from fuseflow import native
from fuseflow.errors import NativeOpError
from fuseflow.native import build, library_path, load_op_library
from fuseflow.tf_compat import tf

PROPERTIES = {
    "INFERENCE_PRECISION_HINT": "f32",
    "EXECUTION_MODE_HINT": "ACCURACY",
    "INFERENCE_NUM_THREADS": "2",
    "ENABLE_CPU_PINNING": "NO",
}
COMPILED_BATCH = 3


@dataclass
class Segment:
    """A segment as the compiler would emit it: blob, TF function and op attributes."""

    concrete: Any  # tf ConcreteFunction: the native segment
    blob: bytes
    attrs: dict  # FuseflowOp attributes other than executable / native_segment
    feed_dtypes: list  # op input dtypes
    feed_ranks: list  # op input ranks


def _export(segment_graph: tf.Graph, inputs: list[str], outputs: list[str]) -> bytes:
    model = ov.convert_model(segment_graph.as_graph_def(), input=inputs, output=outputs)
    compiled = ov.Core().compile_model(model, "CPU", PROPERTIES)
    return compiled.export_model().getvalue()


def _segment(body, specs, compiled_shapes, batch_axis, outputs) -> Segment:
    """specs: (name, dtype, tf function shape); outputs: (name, shape, batch axis)."""
    concrete = tf.function(body).get_concrete_function(
        *[tf.TensorSpec(shape, dtype) for _, dtype, shape in specs])
    graph = tf.Graph()
    with graph.as_default():
        placeholders = [tf.compat.v1.placeholder(dtype, shape, name=name)
                        for (name, dtype, _), shape in zip(specs, compiled_shapes)]
        results = body(*placeholders)
        # Named Identity outputs: OpenVINO can't output a tensor that is consumed inside.
        for (name, _, _), result in zip(outputs, results):
            tf.identity(result, name=name)
    input_names = [f"{name}:0" for name, _, _ in specs]
    output_names = [f"{name}:0" for name, _, _ in outputs]
    attrs = dict(
        input_names=input_names,
        output_names=output_names,
        input_shapes=compiled_shapes,
        output_shapes=[shape for _, shape, _ in outputs],
        input_batch_axis=batch_axis,
        output_batch_axis=[axis for _, _, axis in outputs],
        properties=[f"{k}={v}" for k, v in PROPERTIES.items()],
        Tout=[result.dtype for result in results],
    )
    return Segment(concrete, _export(graph, input_names, output_names), attrs,
                   [dtype for _, dtype, _ in specs], [len(s) for s in compiled_shapes])


@pytest.fixture(scope="module")
def float_segment():
    """x[?,8] -> MatMul -> Relu -> Add b[16]; outputs y[?,16] and sum(2y)[?]."""
    weights = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)

    def body(x, b):
        y = tf.nn.relu(tf.matmul(x, weights)) + b
        return y, tf.reduce_sum(y * 2.0, axis=1)

    return _segment(
        body,
        specs=[("x", tf.float32, [None, 8]), ("b", tf.float32, [None])],
        compiled_shapes=[[COMPILED_BATCH, 8], [16]],
        batch_axis=[0, -1],
        outputs=[("y", [COMPILED_BATCH, 16], 0), ("s", [COMPILED_BATCH], 0)],
    )


@pytest.fixture(scope="module")
def lib():
    return load_op_library()


class Runner:
    """A tf.Graph holding FuseflowOp nodes, run through a v1 Session."""

    def __init__(self, lib, segment: Segment, executable: bytes | None = None, copies=1,
                 **overrides):
        self.segment = segment
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.feeds = [tf.compat.v1.placeholder(dtype, [None] * rank)
                          for dtype, rank in zip(segment.feed_dtypes, segment.feed_ranks)]
            self.outputs = [
                lib.fuseflow_op(
                    self.feeds, backend="openvino",
                    executable=segment.blob if executable is None else executable,
                    native_segment=segment.concrete, **{**segment.attrs, **overrides})
                for _ in range(copies)
            ]
            self.stats = lib.fuseflow_op_stats()
        self.session = tf.compat.v1.Session(graph=self.graph)

    def run(self, *arrays, copy=0):
        return self.session.run(self.outputs[copy], dict(zip(self.feeds, arrays)))

    def counters(self):
        return self.session.run(self.stats)._asdict()

    def close(self):
        self.session.close()


def _delta(before, after):
    return {k: int(after[k] - before[k]) for k in before}


def _reference(segment: Segment, *arrays):
    return [t.numpy() for t in segment.concrete(*[tf.constant(a) for a in arrays])]


def _assert_equal_to_tf(segment, arrays, results):
    expected = _reference(segment, *arrays)
    assert len(results) == len(expected)
    for got, want in zip(results, expected):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _float_inputs(rng, batch, bias_size=16):
    return (rng.standard_normal((batch, 8)).astype(np.float32),
            rng.standard_normal(bias_size).astype(np.float32))


def test_build_is_cached_and_library_loads(lib):
    path = build.build()
    stamp = build.STAMP.read_text()
    mtime = path.stat().st_mtime_ns
    assert build.build() == path == library_path()
    assert path.stat().st_mtime_ns == mtime and build.STAMP.read_text() == stamp
    assert load_op_library() is lib
    assert callable(lib.fuseflow_op) and callable(lib.fuseflow_op_stats)


def test_exact_shape_runs_openvino(lib, float_segment):
    runner = Runner(lib, float_segment)
    # The shape function leaves the batch dimension open.
    assert [o.shape.as_list() for o in runner.outputs[0]] == [[None, 16], [None]]
    arrays = _float_inputs(np.random.default_rng(1), COMPILED_BATCH)
    before = runner.counters()
    results = runner.run(*arrays)
    runner.run(*arrays)
    delta = _delta(before, runner.counters())
    _assert_equal_to_tf(float_segment, arrays, results)
    assert delta["openvino_runs"] == 2 and delta["native_runs"] == 0
    assert delta["imports"] <= 1 and delta["recompiles"] == 0
    runner.close()


def test_op_instances_share_one_import(lib, float_segment):
    runner = Runner(lib, float_segment, copies=2)
    arrays = _float_inputs(np.random.default_rng(2), COMPILED_BATCH)
    before = runner.counters()
    results = [runner.run(*arrays, copy=c) for c in range(2)]
    delta = _delta(before, runner.counters())
    for result in results:
        _assert_equal_to_tf(float_segment, arrays, result)
    assert delta["openvino_runs"] == 2 and delta["imports"] <= 1
    runner.close()


def test_dynamic_batch_from_threads(lib, float_segment):
    batches = [1, 2, 3, 5, 11, 64, 1023, 0]
    rng = np.random.default_rng(3)
    cases = [_float_inputs(rng, batch) for _ in range(2) for batch in batches]
    expected = [_reference(float_segment, *arrays) for arrays in cases]
    runner = Runner(lib, float_segment)
    before = runner.counters()
    failures, results = [], {}

    def worker(thread_id):
        order = list(range(len(cases)))
        random.Random(thread_id).shuffle(order)
        try:
            for i in order:
                results[thread_id, i] = runner.run(*cases[i])
        except Exception as e:  # reported below, in the main thread
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    for (_, i), got in results.items():
        for g, want in zip(got, expected[i]):
            assert g.shape == want.shape
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)
    delta = _delta(before, runner.counters())
    assert delta["openvino_runs"] == 8 * len(cases) and delta["native_runs"] == 0
    runner.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["openvino", "tensorflow"])
def test_runs_inside_tf_function(lib, float_segment, compiled):
    executable = float_segment.blob if compiled else b""

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32),
                                  tf.TensorSpec([None], tf.float32)])
    def call(x, b):
        return lib.fuseflow_op([x, b], backend="openvino", executable=executable,
                               native_segment=float_segment.concrete, **float_segment.attrs)

    before = lib.fuseflow_op_stats()
    for batch in (COMPILED_BATCH, 7):
        arrays = _float_inputs(np.random.default_rng(11), batch)
        _assert_equal_to_tf(float_segment, arrays, [t.numpy() for t in call(*arrays)])
    after = lib.fuseflow_op_stats()
    runs = "openvino_runs" if compiled else "native_runs"
    assert int(getattr(after, runs) - getattr(before, runs)) == 2


def _corrupt_version(blob: bytes) -> bytes:
    at = blob.index(b"ov=")
    return blob[:at] + b"ov=1999.9.9" + blob[at + len(b"ov=1999.9.9"):]


def _flip_header(blob: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in blob[:16]) + blob[16:]


@pytest.mark.parametrize("corrupt", [_corrupt_version, _flip_header])
def test_corrupted_executable_is_recompiled(lib, float_segment, corrupt):
    runner = Runner(lib, float_segment, executable=corrupt(float_segment.blob))
    rng = np.random.default_rng(4)
    before = runner.counters()
    with ran_in_process() as ran:
        for batch in (COMPILED_BATCH, 7):
            arrays = _float_inputs(rng, batch)
            _assert_equal_to_tf(float_segment, arrays, runner.run(*arrays))
    delta = _delta(before, runner.counters())
    assert delta["recompiles"] == 1 and delta["imports"] == 0
    assert delta["openvino_runs"] == 2 and delta["native_runs"] == 0
    (op,) = ran.stats["ops"].values()
    assert (op["recompiled"], op["compiled"], op["fallback"]) == (2, 0, 0), op
    assert op["recompile_reason"], op
    runner.close()


def test_empty_executable_runs_tensorflow(lib, float_segment):
    runner = Runner(lib, float_segment, executable=b"")
    rng = np.random.default_rng(5)
    before = runner.counters()
    with ran_in_process() as ran:
        for batch in (COMPILED_BATCH, 10):
            arrays = _float_inputs(rng, batch)
            _assert_equal_to_tf(float_segment, arrays, runner.run(*arrays))
    delta = _delta(before, runner.counters())
    assert delta == {"openvino_runs": 0, "native_runs": 2, "imports": 0, "recompiles": 0}
    assert_ran(ran.stats, "openvino", [runner.outputs[0][0].op.name], path="fallback",
               reason="not_compiled")
    (op,) = ran.stats["ops"].values()
    assert op["fallback_reasons"]["not_compiled"]["calls"] == 2, op
    runner.close()


def test_non_batchable_shape_runs_tensorflow(lib, float_segment):
    runner = Runner(lib, float_segment)
    rng = np.random.default_rng(6)
    before = runner.counters()
    # b has batch axis -1: a [1] bias (broadcast by TF) can't run compiled for [16].
    arrays = _float_inputs(rng, 4, bias_size=1)
    with ran_in_process() as ran:
        _assert_equal_to_tf(float_segment, arrays, runner.run(*arrays))
        # The op keeps using OpenVINO for shapes it can run.
        arrays = _float_inputs(rng, 4)
        _assert_equal_to_tf(float_segment, arrays, runner.run(*arrays))
    delta = _delta(before, runner.counters())
    assert delta["native_runs"] == 1 and delta["openvino_runs"] == 1
    (op,) = ran.stats["ops"].values()
    assert (op["compiled"], op["fallback"]) == (1, 1), op
    assert "fit neither" in op["fallback_reasons"]["shape"]["message"], op
    runner.close()


def test_fixed_batch_axis_mismatch_runs_tensorflow(lib, float_segment):
    runner = Runner(lib, float_segment, input_batch_axis=[-1, -1])
    assert [o.shape.as_list() for o in runner.outputs[0]] == [[None, 16], [None]]
    rng = np.random.default_rng(7)
    before = runner.counters()
    for batch in (5, COMPILED_BATCH):
        arrays = _float_inputs(rng, batch)
        _assert_equal_to_tf(float_segment, arrays, runner.run(*arrays))
    delta = _delta(before, runner.counters())
    assert delta["native_runs"] == 1 and delta["openvino_runs"] == 1
    runner.close()


def test_unconvertible_segment_with_bad_blob_runs_tensorflow(lib):
    # The blob can't be imported and OpenVINO's TF frontend has no BesselI0e to recompile.
    weights = np.ones((4, 4), np.float32)
    concrete = tf.function(
        lambda x: (tf.math.special.bessel_i0e(tf.matmul(x, weights)),)
    ).get_concrete_function(tf.TensorSpec([None, 4], tf.float32))
    attrs = dict(
        input_names=["x:0"], output_names=["y:0"], input_shapes=[[2, 4]],
        output_shapes=[[2, 4]], input_batch_axis=[0], output_batch_axis=[0],
        properties=[f"{k}={v}" for k, v in PROPERTIES.items()], Tout=[tf.float32],
    )
    segment = Segment(concrete, b"not an OpenVINO blob", attrs, [tf.float32], [2])
    runner = Runner(lib, segment)
    arrays = (np.random.default_rng(8).standard_normal((2, 4)).astype(np.float32),)
    before = runner.counters()
    with ran_in_process() as ran:
        _assert_equal_to_tf(segment, arrays, runner.run(*arrays))
    delta = _delta(before, runner.counters())
    assert delta == {"openvino_runs": 0, "native_runs": 1, "imports": 0, "recompiles": 0}
    (op,) = ran.stats["ops"].values()
    assert "recompiling failed" in op["fallback_reasons"]["load_failed"]["message"], op
    runner.close()


def test_integer_and_bool_tensors(lib):
    def body(x, offset):
        z = x * 3 + tf.cast(offset, tf.int32)
        return z, z > 5

    segment = _segment(
        body,
        specs=[("x", tf.int32, [None, 5]), ("offset", tf.int64, [])],
        compiled_shapes=[[4, 5], []],
        batch_axis=[0, -1],
        outputs=[("z", [4, 5], 0), ("p", [4, 5], 0)],
    )
    runner = Runner(lib, segment)
    rng = np.random.default_rng(9)
    before = runner.counters()
    for batch in (4, 1, 10):
        arrays = (rng.integers(-5, 5, (batch, 5)).astype(np.int32), np.int64(2))
        _assert_equal_to_tf(segment, arrays, runner.run(*arrays))
    delta = _delta(before, runner.counters())
    assert delta["openvino_runs"] == 3 and delta["native_runs"] == 0
    runner.close()


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.int64, tf.uint8, tf.int8])
def test_dtypes(lib, dtype):
    segment = _segment(
        lambda x: (x + x,),
        specs=[("x", dtype, [None, 6])],
        compiled_shapes=[[2, 6]],
        batch_axis=[0],
        outputs=[("y", [2, 6], 0)],
    )
    runner = Runner(lib, segment)
    before = runner.counters()
    for batch in (2, 5):
        values = np.arange(batch * 6).reshape(batch, 6) % 50
        arrays = (tf.constant(values, dtype=dtype).numpy(),)
        _assert_equal_to_tf(segment, arrays, runner.run(*arrays))
    delta = _delta(before, runner.counters())
    assert delta["openvino_runs"] == 2 and delta["native_runs"] == 0
    runner.close()


def test_cpp_saved_model_loader(lib, float_segment, tmp_path):
    """TF's C++ loader (as TF Serving) with the op library dlopen-ed: compiled,
    recompiled and TF-fallback nodes all answer like TF."""
    from cpp_runner import run_saved_model_cpp

    executables = {"compiled": float_segment.blob,
                   "recompiled": _corrupt_version(float_segment.blob), "native": b""}
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
        b = tf.compat.v1.placeholder(tf.float32, [16], name="b")
        outputs = {}
        for key, executable in executables.items():
            y, s = lib.fuseflow_op([x, b], backend="openvino", executable=executable,
                                   native_segment=float_segment.concrete, name=key,
                                   **float_segment.attrs)
            outputs[f"{key}_y"], outputs[f"{key}_s"] = y, s
        signature = tf.compat.v1.saved_model.predict_signature_def({"x": x, "b": b}, outputs)
        builder = tf.compat.v1.saved_model.Builder(str(tmp_path / "model"))
        builder.add_meta_graph_and_variables(session, ["serve"],
                                             signature_def_map={"serving_default": signature})
        builder.save()
    arrays = _float_inputs(np.random.default_rng(12), 5)
    got, stats = run_saved_model_cpp(tmp_path / "model", {"x": arrays[0], "b": arrays[1]},
                                     op_libs=[library_path()], with_stats=True)
    assert_ran(stats, "openvino", list(executables),
               path={"compiled": "compiled", "recompiled": "recompiled", "native": "fallback"},
               reason="not_compiled")
    want_y, want_s = _reference(float_segment, *arrays)
    for key in executables:
        np.testing.assert_allclose(got[f"{key}_y"], want_y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[f"{key}_s"], want_s, rtol=1e-5, atol=1e-5)


def test_bad_attributes_fail_loudly(lib, float_segment):
    runner = Runner(lib, float_segment, input_names=["x:0"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="one entry per input"):
        runner.run(*_float_inputs(np.random.default_rng(10), COMPILED_BATCH))
    runner.close()


def test_build_failure_raises_native_op_error(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(build, "NATIVE_DIR", tmp_path)
    monkeypatch.setattr(build, "SOURCES", ("broken.cc",))
    monkeypatch.setattr(build, "HEADERS", ())
    monkeypatch.setattr(build, "LIBRARY", tmp_path / "_fuseflow_op.so")
    monkeypatch.setattr(build, "STAMP", tmp_path / "_fuseflow_op.stamp")
    monkeypatch.setattr(build, "LOCK", tmp_path / "_fuseflow_op.lock")
    monkeypatch.setattr(native, "_module", None)  # forget the loaded library
    with pytest.raises(NativeOpError, match="broken.cc"):
        native.load_op_library()
    # No library, stamp or temp file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_fuseflow_op.lock", "broken.cc"]
