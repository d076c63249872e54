"""TF's reference runs (the artifact check in the compiler worker, the other-batch check,
placement's feeds) feed a frozen graph's big constants instead of importing them
(tf_compat.lift_constants): the same answers, without TF's many copies of the weights."""

from __future__ import annotations

import numpy as np
from conftest import tf

from fuseflow.backends.base import Port, SegmentGraph
from fuseflow.batch import run_graph
from fuseflow.compile import reference_outputs
from fuseflow.tf_compat import lift_constants, plain_session_config


def _graph(rng):
    """x -> tanh(x @ w + b) + table[0] -> a TF1 while loop whose body adds a big constant:
    w (128 KB) and table (80 KB) are lifted; b is too small; the body's constant sits in
    the loop's frame (a control input from it) and must stay a constant."""
    w = rng.normal(size=(128, 256)).astype(np.float32)
    table = rng.integers(0, 9, (80, 256)).astype(np.int32)
    inner = rng.normal(size=(128, 256)).astype(np.float32)
    graph = tf.Graph()
    tf.compat.v1.disable_control_flow_v2()
    try:
        with graph.as_default():
            x = tf.compat.v1.placeholder(tf.float32, [None, 128], name="x")
            h = tf.tanh(tf.matmul(x, tf.constant(w, name="w"))
                        + tf.constant(np.ones(256, np.float32), name="b"))
            h = h + tf.cast(tf.constant(table, name="table")[0], tf.float32)

            def body(i, v):
                return i + 1, tf.tanh(v + tf.reduce_mean(tf.constant(inner, name="inner")))

            _, y = tf.compat.v1.while_loop(lambda i, v: i < 3, body, (0, h))
            tf.identity(y, name="y")
    finally:
        tf.compat.v1.enable_control_flow_v2()
    return graph.as_graph_def(), w


def _as_imported(graph_def, feeds, fetches):
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph, config=plain_session_config()) as sess:
        return sess.run(fetches, feeds)


def test_big_constants_are_fed_with_the_same_answers(rng):
    graph_def, w = _graph(rng)
    lifted, values = lift_constants(graph_def)
    assert set(values) == {"w:0", "table:0"}, sorted(values)
    np.testing.assert_array_equal(values["w:0"], w)
    ops = {n.name: n.op for n in lifted.node}
    assert ops["w"] == ops["table"] == "Placeholder"
    assert ops["b"] == "Const"
    inner = [n for n in lifted.node if n.name.endswith("inner")]
    assert inner and all(n.op == "Const" and n.input for n in inner), inner  # in its frame
    assert "Enter" in ops.values()

    feeds = {"x:0": rng.normal(size=(3, 128)).astype(np.float32)}
    expected = _as_imported(graph_def, feeds, ["y:0"])
    got = run_graph(graph_def, [], feeds, ["y:0"])
    assert got is not None
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6, atol=1e-6)
    # Fetching a lifted constant gives its value.
    np.testing.assert_array_equal(run_graph(graph_def, [], feeds, ["w:0"])[0], w)


def test_the_artifact_checks_reference_feeds_the_segments_constants(rng):
    """The worker's TF answers for a segment (a GraphDef whose weights are constants)."""
    w = rng.normal(size=(256, 128)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2, 256], name="fuseflow_input_0")
        tf.nn.relu(tf.matmul(x, tf.constant(w, name="w")), name="out")
    graph_def = graph.as_graph_def()
    assert set(lift_constants(graph_def)[1]) == {"w:0"}
    segment = SegmentGraph(
        "s", graph_def.SerializeToString(),
        (Port("fuseflow_input_0", tf.float32.as_datatype_enum, (2, 256), 0),),
        (Port("out:0", tf.float32.as_datatype_enum, (2, 128), 0),), ("MatMul", "Relu"), 2)
    x = rng.normal(size=(2, 256)).astype(np.float32)
    got = reference_outputs(segment, [x])
    np.testing.assert_allclose(got[0], np.maximum(x @ w, 0), rtol=1e-5, atol=1e-5)
