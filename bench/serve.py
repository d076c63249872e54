"""make bench-serve: `fuseflow serve` under load from wrk, original vs compiled model.

One BERT-like encoder (small JSON requests, real compute) is exported and compiled once.
For 1 and 2 replicas, each version gets a server of its own (so the two never share the
cores); wrk then drives it at fixed concurrency levels for a fixed time and reports
p50/p99 latency and throughput.
Server-side batching is off (--max-batch-size 1) so that the two models do the same work
per request. Each wrk run can hold a lock file (--lock) so timings never overlap other
timings on a shared machine. Every request's answer is checked once against TF first.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.lock import locked
from bench.serve_process import ServeProcess, fuseflow_command

# A level-2 long string: the JSON body holds "]]" (nested arrays), which ends a [[...]].
_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%s]==]
"""


@dataclass
class Row:
    replicas: int
    model: str
    concurrency: int
    p50_ms: float
    p99_ms: float
    rps: float
    errors: int


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def parse_wrk(output: str) -> tuple[float, float, float, int]:
    """(p50 ms, p99 ms, requests/s, non-2xx + socket errors) from `wrk --latency`."""
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     output)
    errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return p50, p99, rps, errors


def _models(root: Path, lock: str | None) -> tuple[dict, np.ndarray]:
    """original/1 and compiled/1 under root; returns the request body and TF's answer.

    The compile holds the lock: it times segments against TF to place them, and on a
    busy CPU it would keep everything in TF (then "compiled" is the original again)."""
    import fuseflow
    from bench.models import bert_like
    from fuseflow.tf_compat import tf

    tf.keras.utils.set_random_seed(0)
    model = bert_like(seq=128, layers=2)
    model.export(str(root / "original/1"), verbose=False)
    for _ in range(3):  # others' work on a shared CPU can still tip the timing to TF
        shutil.rmtree(root / "compiled", ignore_errors=True)
        with locked(lock):
            result = fuseflow.saved_model.compile(str(root / "original/1"),
                                                  str(root / "compiled/1"), batch_size=1)
        if result["OnNeuronRatio"] >= 0.5:
            break
    else:
        raise RuntimeError(f"bench-serve: only {result['OnNeuronRatio']:.0%} of the model "
                           "was compiled, 3 times (the CPU was busy while segments were timed?)")
    ids = np.random.default_rng(0).integers(0, 8000, (1, 128)).astype(np.int32)
    loaded = tf.saved_model.load(str(root / "original/1")).signatures["serving_default"]
    (key,) = loaded.structured_input_signature[1]
    want = next(iter(loaded(**{key: tf.constant(ids)}).values())).numpy()
    return {"instances": ids.tolist()}, want


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run")
    parser.add_argument("--lock", help="flock this file around each wrk run")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    # a timeout's SIGTERM still stops the server below (the `with` block's exit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wrk = shutil.which("wrk")
    if wrk is None:
        print("bench-serve: wrk not found (apt-get install wrk)", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    rows: list[Row] = []
    try:
        body, want = _models(root, args.lock)
        script = root / "post.lua"
        script.write_text(_LUA % json.dumps(body))
        for replicas in map(int, args.replicas.split(",")):
            for name in ("original", "compiled"):
                # one model per server: the two never share the cores or Ray's processes
                command = fuseflow_command() + [
                    "serve", "--model", f"{name}={root / name}", "--replicas", str(replicas),
                    "--max-batch-size", "1", "-q"]
                with ServeProcess(command) as server:
                    path = f"/v1/models/{name}:predict"
                    status, answer = server.post(path, body)
                    assert status == 200, answer
                    np.testing.assert_allclose(answer["predictions"], want, rtol=1e-3,
                                               atol=1e-4)
                    url = f"http://127.0.0.1:{server.port}{path}"
                    subprocess.run([wrk, "-t1", "-c2", "-d2s", "-s", str(script), url],
                                   capture_output=True, check=True)  # warm-up
                    for conc in map(int, args.concurrency.split(",")):
                        with locked(args.lock):
                            out = subprocess.run(
                                [wrk, f"-t{min(conc, 2)}", f"-c{conc}", f"-d{args.seconds}s",
                                 "--latency", "--timeout", "30s", "-s", str(script), url],
                                capture_output=True, text=True, check=True).stdout
                        rows.append(Row(replicas, name, conc, *parse_wrk(out)))
                        print(rows[-1], file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| replicas | model | concurrency | p50 ms | p99 ms | req/s | errors |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.replicas} | {r.model} | {r.concurrency} | {r.p50_ms:.1f} | "
              f"{r.p99_ms:.1f} | {r.rps:.1f} | {r.errors} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
