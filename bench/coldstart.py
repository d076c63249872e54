"""Cold start of a SavedModel, measured in a fresh process: load + first call, RSS, peak.

`python -m bench.coldstart MODEL_DIR FEEDS.npz [--api v1|v2]` prints one JSON line:
load_s (the loader), first_call_s, load_first_call_s, rss_mb after the first call and
peak_mb (the process's high-water mark, imports included: the same for every model).
TensorFlow and fuseflow are imported before the clock starts, as a server would have.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(model_dir: str, feeds_path: str, api: str) -> dict:
    import numpy as np

    import fuseflow  # registers the native op, as a server would
    from fuseflow.tf_compat import tf

    feeds = dict(np.load(feeds_path))
    tf.constant(0.0).numpy()  # TF's runtime up before the clock starts
    base_mb = _status_mb("VmRSS")
    start = time.perf_counter()
    if api == "v2":
        loaded = tf.saved_model.load(model_dir)
        fn = loaded.signatures["serving_default"]
        loaded_at = time.perf_counter()
        out = {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in feeds.items()}).items()}
    else:
        graph = tf.Graph()
        sess = tf.compat.v1.Session(graph=graph)
        with graph.as_default():
            meta = tf.compat.v1.saved_model.load(sess, ["serve"], model_dir)
        sig = meta.signature_def["serving_default"]
        loaded_at = time.perf_counter()
        out = sess.run({k: v.name for k, v in sig.outputs.items()},
                       {sig.inputs[k].name: v for k, v in feeds.items()})
    end = time.perf_counter()
    assert all(np.all(np.isfinite(v)) for v in out.values() if v.dtype.kind == "f")
    xla = fuseflow.runtime_stats()["xla"]  # cache_loads: executables not built here
    return {"load_s": loaded_at - start, "first_call_s": end - loaded_at,
            "load_first_call_s": end - start, "base_mb": base_mb,
            "rss_mb": _status_mb("VmRSS"), "peak_mb": _status_mb("VmHWM"),
            "xla_compilations": xla["compilations"], "xla_cache_loads": xla["cache_loads"]}


def measure(model_dir, feeds: dict, tmp: Path, api: str = "v2", env=None) -> dict:
    """Cold start of model_dir in a new process (see the module docstring)."""
    import numpy as np

    feeds_path = Path(tmp) / "coldstart_feeds.npz"
    np.savez(feeds_path, **feeds)
    proc = subprocess.run([sys.executable, "-m", "bench.coldstart", str(model_dir),
                           str(feeds_path), "--api", api], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                                            **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"cold start failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model_dir")
    p.add_argument("feeds")
    p.add_argument("--api", choices=("v1", "v2"), default="v2")
    args = p.parse_args(argv)
    print(json.dumps(_child(args.model_dir, args.feeds, args.api)))


if __name__ == "__main__":
    main()


def openvino_alone_s(model_dir, batch: int, compiler_args=()) -> float:
    """Seconds OpenVINO alone takes to convert and compile the model's frozen graph at
    `batch`, with the properties fuseflow would use: what compile() is measured against.
    Freezing and inlining (fuseflow's loader and Grappler pass) are not timed."""
    import openvino as ov

    from fuseflow.backends import openvino as backend
    from fuseflow.load import load_saved_model
    from fuseflow.optimize import optimize_graph
    from fuseflow.options import parse_compiler_args

    model = load_saved_model(str(model_dir), None, None)
    graph_def = optimize_graph(model.graph_def, model.fetch_nodes)
    inputs = {s.tensor_name: [batch, *s.shape[1:]] for s in model.inputs}
    outputs = [s.tensor_name for s in model.outputs]
    props = dict(p.split("=", 1)
                 for p in backend.properties(parse_compiler_args(list(compiler_args))))
    start = time.perf_counter()
    converted = ov.convert_model(graph_def, input=inputs, output=outputs)
    ov.Core().compile_model(converted, "CPU", props)
    return time.perf_counter() - start
