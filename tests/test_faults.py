"""A backend compiler that crashes, hangs or fails: the segment stays in TF, all still works."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_outputs_close, op_types, run_fresh, run_saved_model, saved_graph, tf
from test_compile_core import compile_model


def _two_segment_model():
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6], name="x")
        a = tf.nn.relu(x * 2.0 + 1.0, name="a")
        s = tf.strings.to_number(tf.strings.as_string(a))  # splits the graph in two
        return {"x": x}, {"y": tf.tanh(s * 0.5 - 1.0, name="y")}
    return build


@pytest.mark.parametrize("fault", ["crash", "hang", "error"])
def test_fault_in_one_segment_falls_back(tmp_path, monkeypatch, fault, rng):
    from conftest import save_tf1

    src = save_tf1(tmp_path / "m", _two_segment_model())
    monkeypatch.setenv("FUSEFLOW_INJECT_FAULT", f"{fault}:fuseflow_segment_1")
    result = compile_model(src, tmp_path / "c", compiler_args=["--timeout", "20"])
    assert result["num_segments"] == 1 and result["num_segments_failed"] == 1
    report = json.loads((tmp_path / "c" / "assets.extra" / "fuseflow_report.json").read_text())
    failed = [s for s in report["segments"] if not s["compiled"]]
    assert [s["name"] for s in failed] == ["fuseflow_segment_1"]
    expected_reason = {"crash": "died", "hang": "timed out", "error": "injected"}[fault]
    assert expected_reason in failed[0]["error"]
    assert any(expected_reason in r for r in report["not_compiled"]["Tanh"])
    assert "Tanh" in op_types(saved_graph(tmp_path / "c"))
    feeds = {"x": rng.random((1, 6), np.float32)}
    assert_outputs_close(run_saved_model(src, feeds), run_fresh(tmp_path / "c", feeds, tmp_path))
