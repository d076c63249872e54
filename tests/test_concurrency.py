"""One loaded compiled model served from 8 threads: right answers, flat memory.

A small CNN is compiled at batch 4; a fresh process loads the original and the
compiled model once, computes the expected outputs of fixed inputs (every batch
size, 8 variants each) with the original, then 8 threads call the compiled
model 500 times each with batch sizes cycling through 1, 3, 4, 7, 16. Every
answer must equal the original's, and the resident memory after the calls
must stay within a bound of the memory after a 200-call warm-up.

With --neuroncore-pipeline-cores, the same serving runs at the compiled batch
and OpenVINO must report the streams the cores allow, with calls in flight on
several infer requests at once (no lock in fuseflow serializes them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, assert_ran, fused_segments, save_tf1, tf
from test_compile_core import compile_model

THREADS, CALLS, WARMUP = 8, 500, 200
BATCHES = (1, 3, 4, 7, 16)
MAX_RSS_GROWTH_MB = 20  # observed: under 1 MB

_SERVE = textwrap.dedent("""
    import gc, json, sys, threading, time
    import numpy as np
    import fuseflow
    from fuseflow.runtime import since
    import tensorflow as tf

    def rss_mb():
        gc.collect()
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    args = json.loads(sys.argv[1])
    threads, calls, warmup, batches = (args["threads"], args["calls"], args["warmup"],
                                       args["batches"])
    original = tf.saved_model.load(args["original"]).signatures["serving_default"]
    compiled = tf.saved_model.load(args["compiled"]).signatures["serving_default"]
    rng = np.random.default_rng(0)
    # (batch, variant) -> (input, expected): a thread answered another's call shows up.
    cases = {}
    for b in batches:
        for v in range(threads):
            x = tf.constant(rng.uniform(-1, 1, (b, 8, 8, 3)).astype(np.float32))
            cases[b, v] = (x, original(x=x)["y"].numpy())
    mismatches, done = [], [0] * threads

    def serve(t, n):
        for k in range(n):
            b = batches[(t + k) % len(batches)]
            x, want = cases[b, (t + k) % threads]
            got = compiled(x=x)["y"].numpy()
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
                diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else None
                mismatches.append({"thread": t, "call": k, "batch": b,
                                   "shape": list(got.shape), "max_diff": diff})
            done[t] += 1

    def run_threads(per_thread):
        pool = [threading.Thread(target=serve, args=(t, per_thread)) for t in range(threads)]
        start = time.perf_counter()
        for p in pool:
            p.start()
        for p in pool:
            p.join()
        return time.perf_counter() - start

    rss_loaded, runs_loaded = rss_mb(), fuseflow.runtime_stats()
    warmup_s = run_threads(warmup // threads)
    rss_warm, runs_warm = rss_mb(), fuseflow.runtime_stats()
    serve_s = run_threads(calls)
    rss_end, runs_end = rss_mb(), fuseflow.runtime_stats()
    print(json.dumps({"rss_loaded_mb": rss_loaded, "rss_warm_mb": rss_warm,
                      "rss_end_mb": rss_end, "warmup_s": warmup_s, "serve_s": serve_s,
                      "calls": sum(done), "mismatches": mismatches[:10],
                      "runs": since(runs_loaded, runs_end),
                      "serve_runs": since(runs_warm, runs_end),
                      "mismatch_count": len(mismatches)}))
""")


def _cnn():
    x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
    w = tf.compat.v1.get_variable("w", [3, 3, 3, 8])
    y = tf.nn.relu(tf.nn.conv2d(x, w, 1, "SAME"))
    y = tf.reduce_mean(y, axis=[1, 2])
    dense = tf.compat.v1.get_variable("dense", [8, 5])
    bias = tf.compat.v1.get_variable("bias", [5], initializer=tf.compat.v1.ones_initializer())
    return {"x": x}, {"y": tf.nn.bias_add(tf.matmul(y, dense), bias, name="y")}


def test_eight_threads_mixed_batches_same_answers_flat_memory(backend, tmp_path):
    src = save_tf1(tmp_path / "m", _cnn)
    result = compile_model(backend, src, tmp_path / "c", batch_size=4)
    assert result["num_segments"] == 1 and result["OnNeuronRatio"] == 1.0
    args = {"original": str(src), "compiled": str(tmp_path / "c"), "threads": THREADS,
            "calls": CALLS, "warmup": WARMUP, "batches": list(BATCHES)}
    proc = subprocess.run([sys.executable, "-c", _SERVE, json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = stats["rss_end_mb"] - stats["rss_warm_mb"]
    print(f"\n{backend}: {stats['calls']} calls; RSS loaded {stats['rss_loaded_mb']:.1f} MB, "
          f"after warm-up {stats['rss_warm_mb']:.1f} MB, at the end "
          f"{stats['rss_end_mb']:.1f} MB (growth {growth:+.1f} MB); warm-up "
          f"{stats['warmup_s']:.1f} s, {THREADS}x{CALLS} calls {stats['serve_s']:.1f} s")
    assert stats["calls"] == WARMUP // THREADS * THREADS + THREADS * CALLS
    assert stats["mismatch_count"] == 0, stats["mismatches"]
    assert growth < MAX_RSS_GROWTH_MB, stats
    # every call ran the compiled segment, none fell back to TF; XLA compiled the cluster
    assert_ran(stats["runs"], backend, fused_segments(tmp_path / "c"))
    if backend == "openvino":
        (op,) = stats["serve_runs"]["ops"].values()
        assert op["compiled"] == THREADS * CALLS and op["fallback"] == 0, stats["serve_runs"]
    else:
        assert stats["serve_runs"]["xla"]["launches"] >= THREADS * CALLS, stats["serve_runs"]


def _serve(src, compiled, threads, calls, warmup, batches) -> dict:
    args = {"original": str(src), "compiled": str(compiled), "threads": threads,
            "calls": calls, "warmup": warmup, "batches": list(batches)}
    proc = subprocess.run([sys.executable, "-c", _SERVE, json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("pipeline_cores", [None, 1])
def test_pipeline_cores_become_streams_threads_same_answers(pipeline_cores, tmp_path):
    src = save_tf1(tmp_path / "m", _cnn)
    args = None if pipeline_cores is None else ["--neuroncore-pipeline-cores",
                                                str(pipeline_cores)]
    result = compile_model("openvino", src, tmp_path / "c", batch_size=1, compiler_args=args)
    assert result["num_segments"] == 1 and result["OnNeuronRatio"] == 1.0
    stats = _serve(src, tmp_path / "c", threads=8, calls=100, warmup=16, batches=[1])
    assert stats["mismatch_count"] == 0, stats["mismatches"]
    assert_ran(stats["runs"], "openvino", fused_segments(tmp_path / "c"))
    (op,) = stats["serve_runs"]["ops"].values()
    assert op["compiled"] == 8 * 100 and op["fallback"] == 0, op
    cores = len(os.sched_getaffinity(0))
    # T threads per call leave cores for cores // T streams; by default one stream on all
    want = cores // pipeline_cores if pipeline_cores and 2 * pipeline_cores <= cores else 1
    assert op["streams"] == want, op
    # every call is at the compiled batch (one request each): several at once means
    # several calls were in OpenVINO together
    assert op["infer_requests"] >= 2, op
