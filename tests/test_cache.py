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


def _model(seed: int = 0):
    """Two segments; a weight over graph_util.STAND_IN_BYTES, which the key hashes apart
    from the rest of the graph."""
    def build():
        rng = np.random.default_rng(seed)
        x = tf.compat.v1.placeholder(tf.float32, [None, 16], name="x")
        w = tf.constant(rng.normal(size=(16, 16)).astype(np.float32))
        wide = tf.constant(rng.normal(size=(16, 1200)).astype(np.float32) / 40)  # 77 KB
        a = tf.nn.relu(tf.matmul(tf.matmul(x, wide), tf.transpose(wide)) + 1.0, name="a")
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


def test_changed_weights_compile_again(tmp_path, rng):
    """Only the weights differ: the key must see them (they are hashed apart)."""
    feeds = {"x": rng.random((2, 16), np.float32)}
    for seed in (0, 1):
        src = save_tf1(tmp_path / f"m{seed}", _model(seed))
        compile_model("openvino", src, tmp_path / f"c{seed}")
        assert _cached(tmp_path / f"c{seed}") == [False, False], seed
        assert_outputs_close(run_saved_model(src, feeds),
                             run_saved_model(tmp_path / f"c{seed}", feeds))
    assert len(_entries()) == 4


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


TIMED = ["--profile", "--must-compile"]  # conftest's FUSEFLOW_CC_FLAGS turn profiling off


def _timing_entries() -> list[Path]:
    return sorted(Path(os.environ["FUSEFLOW_CACHE_DIR"]).rglob("*.timing"))


def test_recompile_reuses_the_whole_model_timing(tmp_path, rng, caplog):
    """Two segments: the whole model is timed in a fresh process after export. An
    unchanged recompile takes placement's timings and that one from the cache."""
    src = save_tf1(tmp_path / "m", _model())
    compile_model("openvino", src, tmp_path / "c1", compiler_args=TIMED)
    first = _report(tmp_path / "c1")
    assert first["placement"]["source"] == "measured" and len(first["segments"]) == 2
    assert first["model_timing"]["compiled_ms"] > 0 and "source" not in first["model_timing"]
    assert len(_timing_entries()) == 2  # placement's, the whole model's
    caplog.clear()
    with caplog.at_level("INFO", logger="fuseflow"):
        compile_model("openvino", src, tmp_path / "c2", compiler_args=TIMED)
    second = _report(tmp_path / "c2")
    assert second["placement"]["source"] == "cache" and _cached(tmp_path / "c2") == [True, True]
    assert second["model_timing"] == {**first["model_timing"], "source": "cache"}
    assert "timed by an earlier compile of the same model" in caplog.text
    assert "timed here" not in caplog.text
    feeds = {"x": rng.random((1, 16), np.float32)}
    assert_outputs_close(run_fresh(tmp_path / "c1", feeds, tmp_path, backend="openvino"),
                         run_fresh(tmp_path / "c2", feeds, tmp_path, backend="openvino"),
                         rtol=1e-6, atol=1e-7)


def test_damaged_timing_entry_is_timed_again(tmp_path, caplog):
    src = save_tf1(tmp_path / "m", _model())
    compile_model("openvino", src, tmp_path / "c1", compiler_args=TIMED)
    placement_entry, model_entry = sorted(  # placement's holds candidates' "timings"
        _timing_entries(), key=lambda p: '"timings"' not in p.read_text())
    assert '"model_timing"' in model_entry.read_text()
    data = placement_entry.read_text()
    placement_entry.write_text(data.replace('"latency_ms": ', '"latency_ms": 1', 1))
    model_entry.write_bytes(model_entry.read_bytes()[:30])  # truncated mid-JSON
    caplog.clear()
    with caplog.at_level("DEBUG", logger="fuseflow"):
        compile_model("openvino", src, tmp_path / "c2", compiler_args=TIMED)
    report = _report(tmp_path / "c2")
    assert report["placement"]["source"] == "measured"
    assert "source" not in report["model_timing"]
    assert caplog.text.count("ignoring damaged timing entry") == 2
    compile_model("openvino", src, tmp_path / "c3", compiler_args=TIMED)  # rewritten
    assert _report(tmp_path / "c3")["placement"]["source"] == "cache"
    assert _report(tmp_path / "c3")["model_timing"]["source"] == "cache"
    assert not list(Path(os.environ["FUSEFLOW_CACHE_DIR"]).rglob(".tmp-*"))
    # --no-cache reads none of it.
    compile_model("openvino", src, tmp_path / "c4", compiler_args=[*TIMED, "--no-cache"])
    assert _report(tmp_path / "c4")["placement"]["source"] == "measured"


def test_int8_entry_is_keyed_by_its_calibration_samples(tmp_path, rng):
    """An int8 blob is decided by its calibration samples as much as by its graph: the
    same samples take it from the cache, other samples (another scale) compile again and
    give other quantization ranges, never the first samples' blob."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        w = tf.constant(np.random.default_rng(0).normal(size=(3, 3, 3, 8)).astype(np.float32))
        y = tf.nn.relu(tf.nn.conv2d(x, w, 1, "SAME"))
        return {"x": x}, {"y": tf.reduce_mean(y, axis=[1, 2], name="y")}

    src = save_tf1(tmp_path / "m", build)
    samples = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    args = ["--quantize", "int8", "--no-profile", "--accuracy-tolerance", "mean=inf,top1=1"]
    for name, data in (("a", samples), ("again", samples.copy()), ("other", samples * 50)):
        compile_model("openvino", src, tmp_path / name, compiler_args=args,
                      calibration_data={"x": data})
    assert _cached(tmp_path / "a") == [False]
    assert _cached(tmp_path / "again") == [True]
    assert _cached(tmp_path / "other") == [False]

    def blob(name: str) -> bytes:
        (path,) = (tmp_path / name / "assets").glob("*.ovblob")
        return path.read_bytes()
    assert blob("again") == blob("a") and blob("other") != blob("a")


def test_recompile_in_the_same_process_hits_the_cache(tmp_path, rng):
    """A TF2 model (a Keras LSTM and a dense head) compiled twice in the process that
    built it, as a notebook does, then once in a fresh process. TF numbers the functions
    of a frozen graph per process (`..._while_body_frozen_1147`, then `_2113`), lists
    them in the order that process made them, and the nodes' debug info names the
    function they were frozen from: none of it may reach a cache key, or a recompile
    misses every segment and times placement again."""
    import keras

    ids = keras.Input((12,), dtype="int32", name="ids")
    x = keras.layers.Embedding(50, 16)(ids)
    x = keras.layers.LSTM(16)(x)
    model = keras.Model(ids, keras.layers.Dense(3)(x))
    model.export(str(tmp_path / "m"), verbose=False)
    for out in ("c1", "c2"):
        compile_model("auto", tmp_path / "m", tmp_path / out, compiler_args=TIMED)
    proc = subprocess.run(
        [sys.executable, "-m", "fuseflow.cli", "compile", str(tmp_path / "m"),
         str(tmp_path / "c3"), f"--compiler-args={' '.join(TIMED)}"], cwd=REPO,
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = _report(tmp_path / "c1")
    assert first["placement"]["source"] == "measured" and first["num_segments"] >= 1
    assert "xla" in first["ops_per_backend"]  # the loop: its body and cond are functions
    for again in ("c2", "c3"):
        assert _cached(tmp_path / again) == [True] * first["num_segments"], again
        assert _report(tmp_path / again)["placement"]["source"] == "cache", again
    feeds = {"ids": rng.integers(0, 50, (2, 12)).astype(np.int32)}
    assert_outputs_close(run_saved_model(tmp_path / "m", feeds),
                         run_saved_model(tmp_path / "c3", feeds), rtol=1e-5, atol=1e-6)
