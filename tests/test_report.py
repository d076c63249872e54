"""The conversion report and inspect: every reason on a graph made to hit it, advice, tables."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from conftest import save_tf1, tf

import fuseflow
from fuseflow.inspect_model import format_inspect, inspect_model, logical_graph
from fuseflow.load import read_saved_model_proto

NO_COMPILE = 10**6  # minimum_segment_size that keeps every segment in TF: no compiler runs


def _x(shape=(1, 8)):
    return tf.compat.v1.placeholder(tf.float32, list(shape), name="x")


def _unsupported():
    x = _x()
    hist = tf.histogram_fixed_width(tf.nn.relu(x), [0.0, 3.0], nbins=5, name="hist")
    return {"x": x}, {"y": tf.tanh(tf.cast(hist, tf.float32))}


def _dtype():
    x = _x()
    total = tf.cumsum(tf.cast(x * 4.0, tf.int8), axis=1, name="csum")  # XLA: int32/64 only
    return {"x": x}, {"y": tf.tanh(tf.cast(total, tf.float32))}


def _runtime_operand():
    x = _x()
    axis = tf.compat.v1.placeholder(tf.int32, [1], name="axis")
    return {"x": x, "axis": axis}, {"y": tf.tanh(tf.reverse(tf.nn.relu(x), axis) * 2.0)}


def _unknown_shape():
    x = _x()
    picked = tf.boolean_mask(x, x > 0.3)  # as many values as pass: unknown statically
    y = tf.tanh(tf.nn.relu(picked) * 3.0 + 1.0)
    return {"x": x}, {"y": tf.reduce_sum(tf.sigmoid(y) * 2.0 - y)}


def _string():
    x = _x()
    text = tf.strings.as_string(tf.nn.relu(x * 2.0 + 1.0), name="text")
    return {"x": x}, {"y": tf.tanh(tf.strings.to_number(text) * 3.0) + 1.0}


def _control_input():
    x = _x()
    noise = tf.random.uniform([1, 8], name="noise")  # stateful: Grappler keeps the edge
    with tf.control_dependencies([noise]):
        pinned = tf.sigmoid(x, name="pinned")
    return {"x": x}, {"y": pinned + 1.0}


def _control_flow():
    x = _x()
    _, out = tf.compat.v1.while_loop(lambda i, v: i < 3, lambda i, v: (i + 1, tf.tanh(v)),
                                     [tf.constant(0), x])
    return {"x": x}, {"y": out * 2.0}


def _named_tanh():
    x = _x()
    return {"x": x}, {"y": tf.tanh(tf.nn.relu(x) * 2.0, name="keep_me") + 1.0}


def _input_in_the_middle():
    x = _x()
    mid = tf.nn.relu(x, name="pre") + 1.0
    return {"m": mid}, {"y": tf.sigmoid(mid * 2.0)}


def _depthwise():
    x = _x((1, 8, 8, 3))
    w = tf.constant(np.ones((3, 3, 3, 1), np.float32))
    return {"x": x}, {"y": tf.nn.relu(tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME"))}


# builder, compile() keywords, op type expected in the report, reason code
CASES = {
    "unsupported": (_unsupported, {}, "HistogramFixedWidth", "UNSUPPORTED_OP"),
    "dtype": (_dtype, {}, "Cumsum", "DTYPE"),
    "unknown_shape": (_unknown_shape, {}, "Relu", "UNKNOWN_SHAPE"),
    "runtime_operand": (_runtime_operand, {}, "ReverseV2", "RUNTIME_OPERAND"),
    "string": (_string, {}, "AsString", "STRING"),
    "control_input": (_control_input, {}, "Sigmoid", "CONTROL_INPUT"),
    "control_flow": (_control_flow, {}, "Tanh", "CONTROL_FLOW"),
    "no_fuse_ops": (_named_tanh, {"no_fuse_ops": ["keep_me"]}, "Tanh", "NO_FUSE_OPS"),
    "upstream": (_input_in_the_middle, {}, "Relu", "UPSTREAM_OF_INPUT"),
    "small_segment": (_named_tanh, {}, "Tanh", "SMALL_SEGMENT"),
    "slow": (_depthwise, {}, "DepthwiseConv2dNative", "SLOW_ON_BACKEND"),
}


def _compile(tmp_path, build, **kwargs):
    src, out = tmp_path / "m", tmp_path / "c"
    if build is _control_flow:
        tf.compat.v1.disable_control_flow_v2()
    try:
        save_tf1(src, build)
    finally:
        tf.compat.v1.enable_control_flow_v2()
    kwargs.setdefault("backend", "xla")
    result = fuseflow.saved_model.compile(str(src), str(out), **kwargs)
    report = json.loads((out / "assets.extra" / "fuseflow_report.json").read_text())
    return result, report


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_reason_is_reported(tmp_path, case):
    build, kwargs, op_type, code = CASES[case]
    _, report = _compile(tmp_path, build, minimum_segment_size=NO_COMPILE, **kwargs)
    rows = [r for r in report["not_compiled"] if r["op_type"] == op_type and r["code"] == code]
    assert rows, report["not_compiled"]
    row = rows[0]
    assert row["count"] >= 1 and row["nodes"]
    assert row["reason"] == fuseflow.reasons.Reason[code].value
    if case == "no_fuse_ops":
        assert row["nodes"] == ["keep_me"]


def test_compile_failure_keeps_the_compilers_first_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEFLOW_INJECT_FAULT", "error:fuseflow_segment_0")
    result, report = _compile(tmp_path, _named_tanh)
    assert result["num_segments_failed"] == 1
    [segment] = report["segments"]
    assert not segment["compiled"] and "injected compiler error" in segment["error"]
    failed = [r for r in report["not_compiled"] if r["code"] == "COMPILE_FAILED"]
    assert {r["op_type"] for r in failed} == {"Relu", "Mul", "Tanh", "AddV2"}
    assert all("injected compiler error" in r["detail"] for r in failed)


def _conv_model():
    x = _x((2, 8, 8, 3))
    w = tf.constant(np.random.default_rng(0).normal(size=(3, 3, 3, 4)).astype(np.float32))
    y = tf.nn.relu(tf.nn.conv2d(x, w, 1, "SAME"))
    return {"x": x}, {"y": tf.nn.relu(tf.nn.conv2d(y, tf.ones([1, 1, 4, 4]), 1, "SAME"))}


@pytest.fixture(scope="module")
def compiled_conv(tmp_path_factory):
    """One real compile shared by the tests that read a successful report."""
    root = tmp_path_factory.mktemp("conv")
    result, report = _compile(root, _conv_model, batch_size=2)
    return result, report, root / "c"


def test_segment_report_has_shapes_counts_size_and_time(compiled_conv):
    result, report, _ = compiled_conv
    [segment] = report["segments"]
    assert segment["compiled"] and segment["backend"] == "xla"
    assert segment["op_types"] == {"Relu": 2, "Conv2D": 2}
    assert segment["node_count"] == 4 == result["num_ops_on_backend"]
    assert segment["inputs"] == [{"name": "fuseflow_input_0", "dtype": "float32",
                                  "shape": [2, 8, 8, 3], "batch_axis": 0}]
    assert [o["shape"] for o in segment["outputs"]] == [[2, 8, 8, 4]]
    assert segment["artifact_bytes"] > 0 and segment["compile_seconds"] > 0
    assert report["runtime"]["backend"] == "xla" and report["advice"] == []
    assert {k: report[k] for k in result} == result


def test_report_tables_are_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fuseflow")
    _compile(tmp_path, _string, minimum_segment_size=NO_COMPILE)
    text = caplog.text
    assert "op type in TF" in text and "AsString" in text and "operates on strings" in text


def test_low_ratio_names_the_unknown_shape_that_costs_most(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fuseflow")
    result, report = _compile(tmp_path, _unknown_shape)
    assert result["OnNeuronRatio"] < 0.3
    [source] = report["unknown_shapes"][:1]
    assert source["tensor"] == "boolean_mask/Where:0" and source["shape"] == [None, 1]
    assert source["ops"] >= 6
    advice = "\n".join(report["advice"])
    assert "unknown shape" in advice and "model_feed_dict" in advice
    assert "boolean_mask/Where:0 int64[?,1]" in advice
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("model_feed_dict" in w for w in warnings)


def test_following_the_advice_fixes_the_ratio(tmp_path):
    feeds = {"x": np.linspace(-1, 1, 8, dtype=np.float32)[None]}
    result, report = _compile(tmp_path, _unknown_shape, model_feed_dict=feeds)
    assert result["OnNeuronRatio"] > 0.5 and report["advice"] == []
    assert not [r for r in report["not_compiled"] if r["code"] == "UNKNOWN_SHAPE"]


def test_inspect_shows_what_the_report_says(compiled_conv, tmp_path):
    _, report, compiled_dir = compiled_conv
    model_dir = tmp_path / "c"
    shutil.copytree(compiled_dir, model_dir)
    info = inspect_model(model_dir)
    assert info["report_found"] and info["segments"] == report["segments"]
    assert info["runtime"]["backend"] == "xla"
    assert info["inputs"][0]["shape"] == [2, 8, 8, 3]
    text = format_inspect(info)
    assert "fuseflow_segment_0" in text and "Conv2D(2)" in text and "load needs" in text

    shutil.rmtree(model_dir / "assets.extra")  # the graph alone tells the same segments
    bare = inspect_model(model_dir)
    assert not bare["report_found"]
    [segment] = bare["segments"]
    assert segment["op_types"] == {"Conv2D": 2, "Relu": 2} and segment["node_count"] == 4
    assert segment["inputs"][0]["dtype"] == "float32"
    assert bare["OnNeuronRatio"] == report["OnNeuronRatio"]


def test_inspect_opens_segments_into_the_original_graph(tmp_path):
    _compile(tmp_path, _string)
    graph = read_saved_model_proto(str(tmp_path / "c")).meta_graphs[0].graph_def
    nodes = {n.name: n for n in logical_graph(graph, tmp_path / "c")}
    assert nodes["text"].segment is None and nodes["Relu"].segment == "fuseflow_segment_0"
    assert "Relu" in nodes["text"].inputs  # TF op reads the segment's node, not an IdentityN
    consumer = next(n for n in nodes.values() if "StringToNumber" in n.inputs)
    assert consumer.segment == "fuseflow_segment_1"


def test_inspect_of_an_uncompiled_model(tmp_path):
    save_tf1(tmp_path / "m", _named_tanh)
    info = inspect_model(tmp_path / "m")
    assert info["segments"] == [] and "not a model compiled by fuseflow" in format_inspect(info)
