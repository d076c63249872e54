"""Capability is exact: ops whose operands must be constants (axis, perm, shape,
paddings, begin/end/strides, size, depth, split dim) are placed on the backend.

The backend is asked about the graph as it will be compiled: constants, and
chains that compute them, are copied into the probe as extract.py copies them
into segments. Each model computes its constant operand through Identity or
arithmetic on constants (as exported models do) and is compiled with
OpenVINO; the op must end up inside the one segment, the compiled model must
answer like the original in a fresh process, and OpenVINO (not the segment's
TF fallback) must have run it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_outputs_close, run_fresh, run_saved_model, save_tf1, saved_graph, tf

import fuseflow
from fuseflow.backends.openvino import OpenVinoBackend
from fuseflow.backends.xla import XlaBackend
from fuseflow.graph_util import STAND_IN_BYTES
from fuseflow.options import parse_compiler_args
from fuseflow.reasons import Reason
from fuseflow.shapes import TensorInfo

tf1 = tf.compat.v1
SHAPE = (2, 4, 6, 3)
FALLBACK = "runs its segment with TensorFlow"


def _const(value, dtype=tf.int32):
    """A constant operand as models carry it: through Identity and arithmetic."""
    base = tf.identity(tf.constant(value, dtype) * 2, name="twice")
    return tf.identity(base // 2 + tf.zeros_like(base), name="operand")


def _concat(x):
    return tf.concat([x, tf.nn.relu(x)], axis=_const(3))


def _pack(x):
    return tf.stack([x, tf.nn.relu(x)], axis=1) * _const(2, tf.float32)


def _reshape(x):
    return tf.reshape(tf.nn.relu(x), _const([2, 72]))


def _transpose(x):
    return tf.transpose(tf.nn.relu(x), _const([0, 3, 1, 2]))


def _pad(x):
    return tf.pad(tf.nn.relu(x), _const([[0, 0], [1, 1], [2, 0], [0, 0]]))


def _slice(x):
    return tf.slice(tf.nn.relu(x), _const([0, 1, 1, 0]), _const([2, 2, 3, 3]))


def _strided_slice(x):
    return tf.strided_slice(tf.nn.relu(x), _const([0, 1, 0, 0]), _const([2, 3, 6, 3]),
                            _const([1, 1, 2, 1]))


def _reductions(x):
    y = tf.nn.relu(x)
    return (tf.reduce_sum(y, axis=_const([1, 2])) + tf.reduce_mean(y, axis=_const([1, 2]))
            + tf.reduce_max(y, axis=_const([1, 2])))


def _gather(x):
    return tf.gather(tf.nn.relu(x), _const([2, 0, 1]), axis=_const(3))


def _tile(x):
    return tf.tile(tf.nn.relu(x), _const([1, 2, 1, 1]))


def _resize(x):
    y = tf.nn.relu(x)
    return tf.concat([tf1.image.resize_bilinear(y, _const([8, 12])),
                      tf1.image.resize_nearest_neighbor(y, _const([8, 12]))], axis=3)


def _one_hot(x):
    ids = tf.cast(tf.nn.relu(x[..., 0]) * 2.0, tf.int32) % 5
    return tf.one_hot(ids, _const(5)) * 3.0


def _split(x):
    a, b, c = tf.split(tf.nn.relu(x), 3, axis=_const(3))
    d, e = tf.split(x * 2.0, _const([1, 2]), axis=_const(3))
    return a * b + c + d + tf.reduce_sum(e, axis=3, keepdims=True)


# builder -> the op types that must be inside the segment
FAMILIES = {
    "concat": (_concat, {"ConcatV2"}),
    "pack": (_pack, {"Pack"}),
    "reshape": (_reshape, {"Reshape"}),
    "transpose": (_transpose, {"Transpose"}),
    "pad": (_pad, {"Pad"}),
    "slice": (_slice, {"Slice"}),
    "strided_slice": (_strided_slice, {"StridedSlice"}),
    "reductions": (_reductions, {"Sum", "Mean", "Max"}),
    "gather": (_gather, {"GatherV2"}),
    "tile": (_tile, {"Tile"}),
    "resize": (_resize, {"ResizeBilinear", "ResizeNearestNeighbor"}),
    "one_hot": (_one_hot, {"OneHot"}),
    "split": (_split, {"Split", "SplitV"}),
}


def _compile(tmp_path, src, **kwargs) -> tuple[dict, dict]:
    out = tmp_path / "c"
    result = fuseflow.saved_model.compile(str(src), str(out), backend="openvino", **kwargs)
    report = json.loads((out / "assets.extra" / "fuseflow_report.json").read_text())
    return result, report


def _assert_on_openvino(tmp_path, src, feeds, ops, api="v2"):
    result, report = _compile(tmp_path, src)
    assert result["num_segments"] == 1, report["not_compiled"]
    [segment] = report["segments"]
    assert ops <= set(segment["op_types"]), (ops, segment["op_types"], report["not_compiled"])
    left = {r["op_type"]: r["reason"] for r in report["not_compiled"]}
    assert not ops & set(left), left
    top_level = {n.op for n in saved_graph(tmp_path / "c").node}
    assert "FuseflowOp" in top_level and not ops & top_level
    want = run_saved_model(src, feeds)
    got, log = run_fresh(tmp_path / "c", feeds, tmp_path, with_log=True, api=api)
    assert FALLBACK not in log
    assert_outputs_close(want, got)
    return result


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_constant_operand_families_run_on_openvino(tmp_path, rng, family):
    build, ops = FAMILIES[family]

    def graph():
        x = tf1.placeholder(tf.float32, SHAPE, name="x")
        return {"x": x}, {"y": build(x)}

    save_tf1(tmp_path / "m", graph)
    feeds = {"x": rng.standard_normal(SHAPE).astype(np.float32)}
    result = _assert_on_openvino(tmp_path, tmp_path / "m", feeds, ops)
    assert result["OnNeuronRatio"] == 1.0


def test_keras_dense_blocks_compile_into_one_segment(tmp_path, rng):
    """DenseNet-style blocks: every layer's output concatenated to its input (the
    model that left 59 segments when the concat axis reached OpenVINO as a variable)."""
    inputs = tf.keras.Input((16, 16, 8))
    x = inputs
    for block in range(2):
        for _ in range(3):
            y = tf.keras.layers.BatchNormalization()(x)
            y = tf.keras.layers.Conv2D(4, 3, padding="same", activation="relu")(y)
            x = tf.keras.layers.Concatenate()([x, y])
        if block == 0:
            x = tf.keras.layers.AveragePooling2D(2)(tf.keras.layers.Conv2D(8, 1)(x))
    outputs = tf.keras.layers.Dense(3, activation="softmax")(
        tf.keras.layers.GlobalAveragePooling2D()(x))
    model = tf.keras.Model(inputs, outputs)
    model.export(str(tmp_path / "m"), verbose=False)
    key = model.inputs[0].name
    feeds = {key: rng.standard_normal((1, 16, 16, 8)).astype(np.float32)}
    result = _assert_on_openvino(tmp_path, tmp_path / "m", feeds, {"ConcatV2"})
    assert result["OnNeuronRatio"] == 1.0


def _infos(graph) -> dict[str, TensorInfo]:
    return {t.name: TensorInfo(t.dtype, tuple(t.shape.as_list()))
            for op in graph.get_operations() for t in op.outputs}


@pytest.mark.parametrize("backend", [OpenVinoBackend, XlaBackend])
def test_an_operand_computed_at_run_time_is_named(backend):
    """ReverseV2's axis read from an input: its output shape is known, but no backend
    can compile it; the reason says so, and constant-axis nodes are still taken."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [2, 3], name="x")
        axis = tf1.placeholder(tf.int32, [1], name="axis")
        tf.reverse(tf.nn.relu(x), axis * 1, name="runtime")
        tf.reverse(tf.nn.relu(x), _const([1]), name="constant")
    support = backend().support(graph.as_graph_def(), _infos(graph),
                                parse_compiler_args(None, None, backend.name))
    assert support["runtime"] is Reason.RUNTIME_OPERAND
    assert support["constant"] is None
    assert support["mul"] is None  # the int arithmetic itself is fine


def test_probe_and_segment_carry_the_same_constant_chains():
    """An operand computed from constants by ops outside the segment (here a chain
    Grappler did not fold) is copied into the segment, and into the probe the backend
    is asked about, as the same nodes: never a Placeholder."""
    from fuseflow.backends.base import probe_graph
    from fuseflow.extract import extract_segment
    from fuseflow.partition import Segment

    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [2, 3], name="x")
        axis = tf.identity(tf.constant(1, name="one") + tf.constant(0, name="zero"), name="axis")
        tf.reduce_sum(tf.nn.relu(x, name="relu"), axis, name="sum")
    graph_def, infos = graph.as_graph_def(), _infos(graph)
    segment = extract_segment(graph_def, Segment("s", ["relu", "sum"], 2), infos, {},
                              {"sum:0"}, None)
    inside = tf.compat.v1.GraphDef.FromString(segment.graph_def_bytes)
    probe = probe_graph(graph_def, {"relu", "sum"}, infos)
    for built in (inside, probe):
        ops = {n.name: n.op for n in built.node}
        assert {k: ops.get(k) for k in ("one", "zero", "add", "axis")} == {
            "one": "Const", "zero": "Const", "add": "AddV2", "axis": "Identity"}
        assert sorted(ops.values()).count("Placeholder") == 1  # x only
    assert [p.name for p in segment.inputs] == ["fuseflow_input_0"]


def _weighted_segment(values):
    """A segment over two weights above the stand-in size: w (appended as its bytes) and
    v (placed on a device, so copied in)."""
    from fuseflow.extract import extract_segment
    from fuseflow.partition import Segment

    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [2, values.shape[0]], name="x")
        w = tf.constant(values, name="w")
        with tf.device("/cpu:0"):
            v = tf.constant(values + 1, name="v")
        tf.add(tf.matmul(x, w, name="a"), tf.matmul(x, v, name="b"), name="y")
    graph_def = graph.as_graph_def()
    return graph_def, extract_segment(graph_def, Segment("s", ["a", "b", "y"], 3),
                                      _infos(graph), {}, {"y:0"}, None)


def _weights(rows: int = STAND_IN_BYTES // 16 + 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)


def test_weights_go_into_a_segment_byte_for_byte():
    """A weight over the stand-in size goes in as its serialized bytes, appended to the
    segment's; one with a device goes in as a copy, the device cleared. Both parse back
    into one GraphDef that computes what the model does, and split_weights finds the
    appended one where it lies."""
    from fuseflow.graph_util import split_weights

    values = _weights()
    graph_def, segment = _weighted_segment(values)
    inside = {n.name: n for n in tf.compat.v1.GraphDef.FromString(segment.graph_def_bytes).node}
    original = {n.name: n for n in graph_def.node}
    # The model's own serialization of the weight (a parsed copy may order its attr map
    # otherwise, so it is not the one compared).
    assert inside["w"] == original["w"] and original["w"].SerializeToString() in (
        segment.graph_def_bytes)
    assert not inside["v"].device and inside["v"].attr == original["v"].attr
    assert sorted(inside) == ["a", "b", "fuseflow_input_0", "v", "w", "y"]
    light, appended = split_weights(segment)
    assert [bytes(a) for a in appended] == [original["w"].SerializeToString()]
    assert sorted(n.name for n in light.node) == ["a", "b", "fuseflow_input_0", "v", "y"]
    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        tf.graph_util.import_graph_def(tf.compat.v1.GraphDef.FromString(
            segment.graph_def_bytes), name="")
        feed = np.ones((2, values.shape[0]), np.float32)
        np.testing.assert_allclose(sess.run("y:0", {"fuseflow_input_0:0": feed}),
                                   feed @ values + feed @ (values + 1), rtol=1e-5)


def test_the_cache_key_reads_appended_weights():
    """The key hashes the weights extract appended by their content: one value changed
    changes it; the same model cut again (another bytes object) keeps it."""
    from fuseflow.cache import CompileCache

    options = parse_compiler_args([])
    cache = CompileCache(None)
    values = _weights()
    key = cache.key("openvino", _weighted_segment(values)[1], options)
    assert cache.key("openvino", _weighted_segment(values.copy())[1], options) == key
    changed = values.copy()
    changed[-1, -1] += 1.0
    assert cache.key("openvino", _weighted_segment(changed)[1], options) != key


def test_a_fallback_file_holds_the_function_with_its_weights():
    """The fallback function is built without the appended weights and its file gets
    them as they lie in the segment (never parsed into it): the file parses into the
    very function built with them, node for node."""
    from tensorflow.core.framework import function_pb2

    from fuseflow.assets import _library_chunks
    from fuseflow.rewrite import add_segment_function

    _, segment = _weighted_segment(_weights())
    whole, light, apart = (function_pb2.FunctionDefLibrary() for _ in range(3))
    add_segment_function(whole, segment, "f")
    left_out: list = []
    add_segment_function(light, segment, "f", apart=left_out)
    assert len(left_out) == 1 and "w" not in {n.name for n in light.function[0].node_def}
    apart.ParseFromString(b"".join(_library_chunks(light.function, {"f": left_out})))

    def nodes(function):
        return sorted((n.name, n.SerializeToString(deterministic=True))
                      for n in function.node_def)

    [expected], [got] = whole.function, apart.function
    assert nodes(got) == nodes(expected) and got.signature == expected.signature
    assert dict(got.ret) == dict(expected.ret)


def test_the_frontend_probe_is_kept_in_the_compile_cache(tmp_path, monkeypatch):
    """A recompile asks the compile cache, not a frontend process, what OpenVINO takes:
    the second support() runs with the probe made to fail, and answers the same."""
    from fuseflow.backends import openvino

    monkeypatch.setenv("FUSEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [2, 3], name="x")
        axis = tf1.placeholder(tf.int32, [1], name="axis")
        tf.reverse(tf.nn.relu(x), axis * 1, name="runtime")
    options = parse_compiler_args(None, None, "openvino")
    first = OpenVinoBackend().support(graph.as_graph_def(), _infos(graph), options)
    assert first["runtime"] is Reason.RUNTIME_OPERAND

    def no_frontend(*args):
        raise AssertionError("the frontend was asked again")

    monkeypatch.setattr(openvino, "_run_probe", no_frontend)
    assert OpenVinoBackend().support(graph.as_graph_def(), _infos(graph), options) == first
