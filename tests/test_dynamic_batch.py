"""Compiled at batch 3, run at many batch sizes from 8 threads at once, in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
