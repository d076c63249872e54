"""--quantize int8 keeps a segment at int8 only where it runs faster than at bf16
(fuseflow/precision.py): both are compiled, timed as they run, and the report says
which was kept, why, and both timings.

A tie between int8 and bf16 would go either way with the machine's load, so the
test of the bf16 path makes the int8 candidate 5 ms slower while it is timed
(FUSEFLOW_INJECT_FAULT=slow@openvino/int8): it loses on any machine. Without
the fault the test checks that the choice follows the reported timings.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import run_fresh, run_saved_model, save_tf1, saved_graph, tf
from test_int8 import _int8_kernels

import fuseflow
from fuseflow.accuracy import options_at
from fuseflow.backends import openvino
from fuseflow.inspect_model import format_inspect, inspect_model
from fuseflow.options import parse_compiler_args
from fuseflow.precision import INT8_MARGIN, decide

BATCH = 4
INT8 = ["--quantize", "int8"]


def _conv_model(path):
    rng = np.random.default_rng(3)
    k1 = rng.normal(0, 0.3, (3, 3, 3, 16)).astype(np.float32)
    k2 = rng.normal(0, 0.1, (3, 3, 16, 16)).astype(np.float32)
    w = rng.normal(0, 0.3, (16, 4)).astype(np.float32)

    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 16, 16, 3], name="x")
        h = tf.nn.relu(tf.nn.conv2d(x, k1, 1, "SAME") + 0.1)
        h = tf.nn.relu(tf.nn.conv2d(h, k2, 1, "SAME"))
        return {"x": x}, {"y": tf.matmul(tf.reduce_mean(h, [1, 2]), w, name="y")}

    return save_tf1(path, build)


def _samples(n=32):
    return np.random.default_rng(4).normal(0, 1, (n, 16, 16, 3)).astype(np.float32)


def _hint(model_dir) -> dict[str, str]:
    """Per fused node: the INFERENCE_PRECISION_HINT it runs its blob with."""
    hints = {}
    for node in saved_graph(model_dir).node:
        if node.op == "FuseflowOp":
            props = dict(p.decode().split("=", 1) for p in node.attr["properties"].list.s)
            hints[node.name] = props["INFERENCE_PRECISION_HINT"]
    return hints


def _bf16_hint() -> str:
    """What the bf16 step of the ladder runs at on this CPU (f32 where it has no bf16)."""
    return openvino.precision(options_at(parse_compiler_args(INT8, None, None), "bf16"))


def _compile(tmp_path, *extra):
    """Compiled with --profile: conftest's FUSEFLOW_CC_FLAGS turn profiling off."""
    _conv_model(tmp_path / "m")
    work = tmp_path / "work"
    result = fuseflow.saved_model.compile(
        tmp_path / "m", tmp_path / "c", batch_size=BATCH,
        calibration_data={"x": _samples()}, compiler_args=INT8 + (list(extra) or ["--profile"]),
        compiler_workdir=work)
    acc = result["accuracy"]
    assert result["num_segments"] == 1 and acc["fits"], result
    [seg] = acc["segments"]
    # the int8 candidate was really quantized (its compile is in the segment's directory)
    log = (work / seg["name"] / "compile.log").read_text()
    assert re.search(r"[1-9]\d* FakeQuantize op", log), log
    assert seg["quantized_ops"] == (None if seg["precision"] == "bf16" else
                                    int(re.search(r"(\d+) FakeQuantize op", log).group(1)))
    return result, seg


def _runs_like_the_original(tmp_path, tolerance):
    x = _samples()[:BATCH]
    want = run_saved_model(tmp_path / "m", {"x": x})["y"]
    got = run_fresh(tmp_path / "c", {"x": x}, tmp_path, backend="openvino")["y"]
    assert np.mean(np.abs(got - want)) / np.mean(np.abs(want)) < tolerance


def test_int8_slower_than_bf16_keeps_bf16_with_both_timings(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FUSEFLOW_INJECT_FAULT", "slow@openvino/int8")
    with caplog.at_level("INFO", logger="fuseflow"):
        result, seg = _compile(tmp_path)
    choice = seg["selection"]
    assert seg["precision"] == "bf16" and seg["demoted_from"] == [], seg
    assert choice["kept"] == "bf16", choice
    # the injected 5 ms is in the int8 figure only
    assert choice["int8_ms"] >= 5.0 and choice["bf16_ms"] < choice["int8_ms"], choice
    assert choice["reason"] == (f"int8 slower than bf16: {choice['int8_ms']:.3g} ms vs "
                                f"{choice['bf16_ms']:.3g} ms per call"), choice
    assert result["accuracy"]["demoted"] == []
    # the model ships the bf16 compile: no int8 kernel, the bf16 step's hint
    assert list(_int8_kernels(tmp_path / "c").values()) == [0]
    assert list(_hint(tmp_path / "c").values()) == [_bf16_hint()]
    logged = [r.getMessage() for r in caplog.records if "kept (" in r.getMessage()]
    assert logged == [f"segment {seg['name']}: bf16 kept ({choice['reason']})"], logged
    info = inspect_model(tmp_path / "c")
    assert info["accuracy"]["segments"] == [seg]
    assert f"bf16 kept by timing: {choice['reason']}" in format_inspect(info)
    monkeypatch.delenv("FUSEFLOW_INJECT_FAULT")
    _runs_like_the_original(tmp_path, 0.05)


def test_int8_choice_follows_its_timings(tmp_path):
    _, seg = _compile(tmp_path)
    choice = seg["selection"]
    assert choice["int8_ms"] > 0 and choice["bf16_ms"] > 0 and choice["tf_ms"] > 0, choice
    assert choice == {**decide(choice["int8_ms"], choice["bf16_ms"]).to_json(),
                      "tf_ms": choice["tf_ms"]}
    assert seg["precision"] == choice["kept"], seg
    # the segment is the whole model and its TF ops were timed with it: no timing process
    # of the whole model, the figures are the kept precision's against TF's
    assert inspect_model(tmp_path / "c")["model_timing"] == {
        "original_ms": choice["tf_ms"], "compiled_ms": choice[f"{choice['kept']}_ms"],
        "speedup": round(choice["tf_ms"] / choice[f"{choice['kept']}_ms"], 3),
        "source": "int8 or bf16"}
    kernels = list(_int8_kernels(tmp_path / "c").values())
    assert (kernels[0] > 0) == (choice["kept"] == "int8"), (kernels, choice)
    # int8 runs what NNCF leaves in floating point at bf16 too, where the CPU has it
    assert list(_hint(tmp_path / "c").values()) == [_bf16_hint()]
    _runs_like_the_original(tmp_path, 0.05)


def test_no_profile_keeps_int8_untimed(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEFLOW_INJECT_FAULT", "slow@openvino/int8")
    _, seg = _compile(tmp_path, "--no-profile")
    assert seg["precision"] == "int8" and "selection" not in seg, seg
    assert list(_int8_kernels(tmp_path / "c").values())[0] > 0


@pytest.mark.parametrize("int8_ms, bf16_ms, kept, starts", [
    (1.0, 2.0, "int8", "int8 faster than bf16: 1 ms vs 2 ms"),
    (2.0, 1.0, "bf16", "int8 slower than bf16: 2 ms vs 1 ms"),
    (1.0 - INT8_MARGIN / 2, 1.0, "bf16", "int8 not faster than bf16 by 3%"),
    (1.0, 1.0, "bf16", "int8 not faster than bf16 by 3%"),
])
def test_int8_must_win_by_the_margin(int8_ms, bf16_ms, kept, starts):
    choice = decide(int8_ms, bf16_ms)
    assert choice.kept == kept and choice.reason.startswith(starts), choice


def test_recompile_reuses_the_int8_or_bf16_timings(tmp_path, monkeypatch, caplog):
    """int8 is made 5 ms slower for the first compile only: timed again, the second would
    see int8 without it. It keeps the first's figures and choice, from the cache."""
    monkeypatch.setenv("FUSEFLOW_INJECT_FAULT", "slow@openvino/int8")
    _, first = _compile(tmp_path)
    assert first["selection"]["kept"] == "bf16" and first["selection"]["int8_ms"] >= 5.0
    assert "source" not in first["selection"]
    monkeypatch.delenv("FUSEFLOW_INJECT_FAULT")
    caplog.clear()
    with caplog.at_level("INFO", logger="fuseflow"):
        fuseflow.saved_model.compile(
            tmp_path / "m", tmp_path / "c2", batch_size=BATCH,
            calibration_data={"x": _samples()}, compiler_args=INT8 + ["--profile"])
    [seg] = inspect_model(tmp_path / "c2")["accuracy"]["segments"]
    assert seg["selection"] == {**first["selection"], "source": "cache"}, seg
    assert seg["precision"] == "bf16"
    assert "1 segment(s)' timings from the compile cache" in caplog.text
    assert list(_hint(tmp_path / "c2").values()) == [_bf16_hint()]
