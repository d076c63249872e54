"""The compile cache: an unchanged segment is not compiled again; options, damage and
--no-cache make it compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, assert_outputs_close, run_fresh, run_saved_model, save_tf1, tf
from test_compile_core import compile_model

from fuseflow import errors


def _model():
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 16], name="x")
        w = tf.constant(np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32))
        a = tf.nn.relu(tf.matmul(x, w) + 1.0, name="a")
        s = tf.strings.to_number(tf.strings.as_string(a))  # two segments
        return {"x": x}, {"y": tf.tanh(tf.matmul(s, w) * 0.5, name="y")}
    return build


def _report(model_dir: Path) -> dict:
    return json.loads((model_dir / "assets.extra" / "fuseflow_report.json").read_text())


def _entries() -> list[Path]:
    return sorted(Path(os.environ["FUSEFLOW_CACHE_DIR"]).rglob("*.entry"))


def _cached(model_dir: Path) -> list[bool]:
    return [s["cached"] for s in _report(model_dir)["segments"]]


def test_unchanged_model_is_taken_from_the_cache(tmp_path, rng):
    src = save_tf1(tmp_path / "m", _model())
    first = compile_model("openvino", src, tmp_path / "c1")
    assert first["num_segments"] == 2 and _cached(tmp_path / "c1") == [False, False]
    assert len(_entries()) == 2
    # Again in a new process (keys must not depend on one), with a compiler that would
    # fail every segment: the compile succeeding proves it never ran.
    proc = subprocess.run(
        [sys.executable, "-m", "fuseflow.cli", "compile", str(src), str(tmp_path / "c2"),
         "--backend", "openvino", "--compiler-args=--verbose"], cwd=REPO, capture_output=True,
        text=True, timeout=600, env={**os.environ, "FUSEFLOW_INJECT_FAULT": "error"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _report(tmp_path / "c2")
    assert report["OnNeuronRatio"] == first["OnNeuronRatio"]
    assert _cached(tmp_path / "c2") == [True, True]
    assert all(not s["timings"] for s in report["segments"])
    assert set(report["timings"]) >= {"loading", "grappler", "probe", "workers", "export"}
    assert "2 segment(s) from the compile cache" in proc.stderr
    feeds = {"x": rng.random((2, 16), np.float32)}
    assert_outputs_close(run_saved_model(src, feeds),
                         run_fresh(tmp_path / "c2", feeds, tmp_path, backend="openvino"))


def test_changed_options_and_no_cache_compile_again(tmp_path, monkeypatch):
    src = save_tf1(tmp_path / "m", _model())
    compile_model("openvino", src, tmp_path / "c1")
    monkeypatch.setenv("FUSEFLOW_INJECT_FAULT", "error")
    # Other options that reach the backend: other artifacts, so the compiler runs (and
    # fails here, on purpose).
    result = compile_model("openvino", src, tmp_path / "c2",
                           compiler_args=["--neuroncore-pipeline-cores", "1"])
    assert result["num_segments_failed"] == 2 and _cached(tmp_path / "c2") == [False, False]
    # Options that only change how compiling runs keep the entries.
    result = compile_model("openvino", src, tmp_path / "c3", compiler_args=["--timeout", "900"])
    assert result["num_segments_failed"] == 0 and _cached(tmp_path / "c3") == [True, True]
    result = compile_model("openvino", src, tmp_path / "c4", compiler_args=["--no-cache"])
    assert result["num_segments_failed"] == 2
    with pytest.raises(errors.SegmentCompileError):
        compile_model("openvino", src, tmp_path / "c5",
                      compiler_args=["--no-cache", "--must-compile"])


def test_damaged_entry_is_ignored_and_replaced(tmp_path, rng, caplog):
    src = save_tf1(tmp_path / "m", _model())
    compile_model("openvino", src, tmp_path / "c1")
    entries = _entries()
    for path in entries:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # in the blob: only the checksum can tell
        path.write_bytes(bytes(data))
    entries[1].write_bytes(entries[1].read_bytes()[:40])  # truncated mid-header
    result = compile_model("openvino", src, tmp_path / "c2")
    assert result["num_segments_failed"] == 0 and _cached(tmp_path / "c2") == [False, False]
    assert caplog.text.count("ignoring damaged entry") == 2
    feeds = {"x": rng.random((1, 16), np.float32)}
    assert_outputs_close(run_saved_model(src, feeds),
                         run_fresh(tmp_path / "c2", feeds, tmp_path, backend="openvino"))
    compile_model("openvino", src, tmp_path / "c3")  # the compile rewrote good entries
    assert _cached(tmp_path / "c3") == [True, True]
    assert not list(Path(os.environ["FUSEFLOW_CACHE_DIR"]).rglob(".tmp-*"))
