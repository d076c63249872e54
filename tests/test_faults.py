"""A backend compiler that crashes, hangs or fails: the segment stays in TF, all still works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    assert_outputs_close,
    assert_ran,
    fused_blob,
    op_types,
    run_fresh,
    run_saved_model,
    saved_graph,
    tf,
)
from test_compile_core import compile_model


def _two_segment_model():
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6], name="x")
        a = tf.nn.relu(x * 2.0 + 1.0, name="a")
        s = tf.strings.to_number(tf.strings.as_string(a))  # splits the graph in two
        return {"x": x}, {"y": tf.tanh(s * 0.5 - 1.0, name="y")}
    return build


@pytest.mark.parametrize("fault", ["crash", "hang", "error"])
def test_fault_in_one_segment_falls_back(backend, tmp_path, monkeypatch, fault, rng):
    from conftest import save_tf1

    src = save_tf1(tmp_path / "m", _two_segment_model())
    monkeypatch.setenv("FUSEFLOW_INJECT_FAULT", f"{fault}:fuseflow_segment_1")
    result = compile_model(backend, src, tmp_path / "c", compiler_args=["--timeout", "8"])
    assert result["num_segments"] == 1 and result["num_segments_failed"] == 1
    report = json.loads((tmp_path / "c" / "assets.extra" / "fuseflow_report.json").read_text())
    failed = [s for s in report["segments"] if not s["compiled"]]
    assert [s["name"] for s in failed] == ["fuseflow_segment_1"]
    expected_reason = {"crash": "died", "hang": "timed out", "error": "injected"}[fault]
    assert expected_reason in failed[0]["error"]
    assert any(r["op_type"] == "Tanh" and r["code"] == "COMPILE_FAILED"
               and expected_reason in r["detail"] for r in report["not_compiled"])
    assert "Tanh" in op_types(saved_graph(tmp_path / "c"))
    feeds = {"x": rng.random((1, 6), np.float32)}
    assert_outputs_close(run_saved_model(src, feeds),
                         run_fresh(tmp_path / "c", feeds, tmp_path, backend=backend))


def test_garbage_from_the_compiler_is_caught(tmp_path, monkeypatch, rng):
    """The artifact is checked against TF before it goes into the model."""
    from conftest import save_tf1

    src = save_tf1(tmp_path / "m", _two_segment_model())
    monkeypatch.setenv("FUSEFLOW_INJECT_FAULT", "garbage:fuseflow_segment_0")
    result = compile_model("openvino", src, tmp_path / "c")
    assert result["num_segments"] == 1 and result["num_segments_failed"] == 1
    report = json.loads((tmp_path / "c" / "assets.extra" / "fuseflow_report.json").read_text())
    assert not report["segments"][0]["compiled"]
    feeds = {"x": rng.random((1, 6), np.float32)}
    assert_outputs_close(run_saved_model(src, feeds),
                         run_fresh(tmp_path / "c", feeds, tmp_path, backend="openvino"))


def test_corrupted_executable_still_runs_with_one_warning(tmp_path, rng):
    from conftest import save_tf1

    from fuseflow.load import read_saved_model_proto

    src = save_tf1(tmp_path / "m", _two_segment_model())
    compile_model("openvino", src, tmp_path / "c")
    proto = read_saved_model_proto(str(tmp_path / "c"))
    fused = [n for n in proto.meta_graphs[0].graph_def.node if n.op == "FuseflowOp"]
    assert len(fused) == 2
    path = fused_blob(tmp_path / "c", fused[0])
    blob = bytearray(path.read_bytes())
    middle = len(blob) // 2
    blob[middle:middle + 64] = bytes(64)  # weights, not the header OpenVINO checks
    path.write_bytes(bytes(blob))
    feeds = {"x": rng.random((3, 6), np.float32)}
    out, log, stats = run_fresh(tmp_path / "c", feeds, tmp_path, with_log=True,
                                with_stats=True)
    assert_outputs_close(run_saved_model(src, feeds), out)
    assert log.count("corrupted") == 1, log[-3000:]
    # the damaged segment was recompiled from its embedded graph, the other imported
    assert_ran(stats, "openvino", [fused[0].name, fused[1].name],
               path={fused[0].name: "recompiled", fused[1].name: "compiled"})
    assert "corrupted" in stats["ops"][fused[0].name]["recompile_reason"]


def test_openvino_compiles_in_a_process_without_tensorflow(tmp_path, rng):
    """The compiler process never loads TF for an OpenVINO job (its import cost 3 s of
    the two cores the compile shares), and the artifact is still checked against TF
    (by this process)."""
    from conftest import save_tf1

    from fuseflow import compile as compile_stage

    src = save_tf1(tmp_path / "m", _two_segment_model())
    compile_stage._POOL.close()  # no worker an earlier test started (for XLA, say)
    compile_model("openvino", src, tmp_path / "c", compiler_args=["--no-profile"],
                  compiler_workdir=str(tmp_path / "work"))
    workers = [w for w in compile_stage._POOL._idle if w.reusable()]
    assert workers
    for w in workers:
        maps = Path(f"/proc/{w.process.pid}/maps").read_text()
        assert "libopenvino" in maps and "libtensorflow_framework" not in maps
    logs = list((tmp_path / "work").rglob("compile.log"))
    assert logs and all("verified against TF on random inputs" in p.read_text()
                        for p in logs)
