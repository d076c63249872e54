"""Compiled at batch 3, run at many batch sizes from 8 threads at once, in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
from conftest import REPO, save_tf1, tf
from test_compile_core import compile_model

_CHECK = textwrap.dedent("""
    import sys, threading
    import numpy as np
    import fuseflow
    import tensorflow as tf
    original = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    compiled = tf.saved_model.load(sys.argv[2]).signatures["serving_default"]
    batches = [int(b) for b in sys.argv[3].split(",")]
    calls = int(sys.argv[4])
    errors = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        for k in range(calls):
            b = batches[(seed + k) % len(batches)]
            x = tf.constant(rng.random((b, 8, 8, 3), np.float32))
            want, got = original(x=x)["y"].numpy(), compiled(x=x)["y"].numpy()
            if want.shape != got.shape or not np.allclose(want, got, rtol=1e-4, atol=1e-5):
                errors.append((b, want.shape, got.shape, float(np.max(np.abs(want - got)))))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    print("mismatches", errors[:5])
    sys.exit(1 if errors else 0)
""")


def _cnn():
    x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
    w = tf.compat.v1.get_variable("w", [3, 3, 3, 4])
    y = tf.nn.relu(tf.nn.conv2d(x, w, 1, "SAME"))
    y = tf.reduce_mean(y, axis=[1, 2]) * 2.0 + 1.0
    return {"x": x}, {"y": tf.sigmoid(y, name="y")}


def test_batch_3_runs_at_any_batch_from_threads(backend, tmp_path):
    src = save_tf1(tmp_path / "m", _cnn)
    result = compile_model(backend, src, tmp_path / "c", batch_size=3)
    assert result["num_segments"] == 1
    batches = "1,2,3,5,11,64,1023" if backend == "openvino" else "1,2,3,5,11"
    proc = subprocess.run([sys.executable, "-c", _CHECK, str(src), str(tmp_path / "c"),
                           batches, "7"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def _run_batches(original_dir, compiled_dir, key: str, make_input, batches) -> None:
    original = tf.saved_model.load(str(original_dir)).signatures["serving_default"]
    compiled = tf.saved_model.load(str(compiled_dir)).signatures["serving_default"]
    for b in batches:
        x = tf.constant(make_input(b))
        want, got = original(**{key: x}), compiled(**{key: x})
        for k in want:
            np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-4, atol=1e-4,
                                       err_msg=f"batch {b}")


def test_transformer_splits_per_sample(tmp_path):
    """Dense on 3-D inputs reshapes [k, s, d] -> [k*s, d] and back: still per-sample."""
    from test_compile_tf2 import _keras_transformer

    model = _keras_transformer()
    model.export(str(tmp_path / "m"), verbose=False)
    compile_model("openvino", tmp_path / "m", tmp_path / "c", batch_size=2)
    report = json.loads((tmp_path / "c" / "assets.extra" / "fuseflow_report.json").read_text())
    assert [p["batch_axis"] for p in report["segments"][0]["inputs"]] == [0]
    rng = np.random.default_rng(0)
    _run_batches(tmp_path / "m", tmp_path / "c", model.inputs[0].name,
                 lambda b: rng.integers(0, 50, (b, 16)).astype(np.int32), [1, 2, 3, 5])


def test_batch_statistics_are_never_split(tmp_path):
    """x - mean(x over the batch) mixes samples: other batch sizes must run unsplit."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6], name="x")
        return {"x": x}, {"y": tf.tanh(x - tf.reduce_mean(x, axis=0)) * 2.0}

    src = save_tf1(tmp_path / "m", build)
    compile_model("openvino", src, tmp_path / "c", batch_size=3)
    report = json.loads((tmp_path / "c" / "assets.extra" / "fuseflow_report.json").read_text())
    assert all(p["batch_axis"] == -1 for s in report["segments"] for p in s["inputs"])
    rng = np.random.default_rng(0)
    _run_batches(src, tmp_path / "c", "x", lambda b: rng.random((b, 6), np.float32),
                 [1, 3, 5, 8])
