"""Where one served request's time goes: each hop of `fuseflow serve`, one request at a time.

For the bench-serve model (original and compiled, each in its own server so they never
share the cores), N requests are sent one after another on a keep-alive connection; each
answer's x-request-id is looked up in Ray Serve's own request logs, which every hop writes
with its latency (the proxy, the gateway when there is one, the model replica's handle
call). The model call and the JSON work inside the replica are timed the same way in this
process, without Ray. Sequential requests under the timing lock: the numbers are hop
costs, not throughput.

    python -m bench.serve_profile [--requests 100] [--lock FILE] [--replicas 1]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.lock import locked
from bench.serve import _models
from bench.serve_process import ServeProcess, fuseflow_command

# `INFO <date> <time> <component> <id> <request id> -- <what> <status> 12.3ms`
_LINE = re.compile(r"^\w+ \S+ \S+ (?P<who>\S+) \S+ (?P<rid>[0-9a-f-]{36}) -- (?P<what>.*) "
                   r"(?P<ms>[\d.]+)ms$")


def _median(values) -> float:
    return float(np.median(values)) if len(values) else float("nan")


def in_process(root: Path, name: str, raw: bytes, n: int) -> dict[str, float]:
    """Median ms of the replica's own steps for one request, without Ray or HTTP."""
    from fuseflow.serve import rest
    from fuseflow.serve.versions import load_version, warm_up

    scratch = Path(tempfile.mkdtemp(prefix="profile-"))
    version = load_version(root / name, 1, os.cpu_count(), scratch)
    warm_up(version)
    signature = version.signature(None)
    steps: dict[str, list[float]] = {"json decode + to numpy": [], "model call": [],
                                     "to JSON": []}
    for _ in range(n):
        t0 = time.perf_counter()
        feeds, rows = rest.predict_inputs(json.loads(raw), signature.inputs)
        t1 = time.perf_counter()
        outputs = version.run(signature, feeds)
        t2 = time.perf_counter()
        json.dumps(rest.predict_response(outputs, rows))
        t3 = time.perf_counter()
        for key, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2)):
            steps[key].append(dt * 1e3)
    shutil.rmtree(scratch, ignore_errors=True)
    return {k: _median(v) for k, v in steps.items()}


def _hop_logs(ray_tmp: Path) -> dict[str, dict[str, float]]:
    """{hop: {request id: ms}} from the serve logs of every Ray session under ray_tmp."""
    hops: dict[str, dict[str, float]] = {}
    for path in ray_tmp.glob("ray/session_*/logs/serve/*.log"):
        for line in path.read_text(errors="replace").splitlines():
            match = _LINE.match(line)
            if not match:
                continue
            who = match["who"]
            hop = ("proxy" if who == "proxy" else "gateway" if who.endswith("gateway")
                   else "model replica (handle / HTTP)")
            hops.setdefault(hop, {})[match["rid"]] = float(match["ms"])
    return hops


def served(root: Path, name: str, raw: bytes, n: int, replicas: int, lock: str | None,
           extra: list[str]) -> dict[str, float]:
    """Median ms per hop of n sequential requests to a server of this one model."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rp-", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    command = fuseflow_command() + ["serve", "--model", f"{name}={root / name}",
                                    "--replicas", str(replicas), "--max-batch-size", "1", "-q",
                                    *extra]
    client, ids = [], []
    path = f"/v1/models/{name}:predict"
    try:
        with ServeProcess(command, env=env) as server:
            conn = None

            def one() -> tuple[float, str]:
                t0 = time.perf_counter()
                conn.request("POST", path, raw, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                assert response.status == 200, response.status
                return (time.perf_counter() - t0) * 1e3, response.getheader("x-request-id")

            with locked(lock):  # a connection kept idle while waiting would be closed
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
                for _ in range(10):  # warm up
                    one()
                for _ in range(n):
                    dt, rid = one()
                    client.append(dt)
                    ids.append(rid)
            conn.close()
        time.sleep(1)  # the logs are flushed as the server stops
        hops = _hop_logs(ray_tmp)
        result = {"client (round trip)": _median(client)}
        for hop, by_id in sorted(hops.items(), key=lambda kv: kv[0] != "proxy"):
            result[hop] = _median([by_id[r] for r in ids if r in by_id])
        return result
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--lock", help="flock this file around each timed part")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="an extra `fuseflow serve` argument (repeatable)")
    parser.add_argument("--models", help="keep the models here and reuse them next time")
    args = parser.parse_args(argv)
    root = Path(args.models or tempfile.mkdtemp(prefix="bench-profile-"))
    try:
        if not (root / "body.json").is_file():
            body, _ = _models(root, args.lock)
            (root / "body.json").write_text(json.dumps(body))
        raw = (root / "body.json").read_bytes()
        for name in ("original", "compiled"):
            with locked(args.lock):
                steps = in_process(root, name, raw, args.requests)
            hops = served(root, name, raw, args.requests, args.replicas, args.lock,
                          args.serve_arg)
            print(f"\n{name}: median ms of {args.requests} sequential requests")
            for key, ms in {**hops, **{f"  in process: {k}": v for k, v in steps.items()}
                            }.items():
                print(f"  {key:<40} {ms:8.2f}")
    finally:
        if not args.models:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
