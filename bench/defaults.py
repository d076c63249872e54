"""Never slower, at the defaults, on every zoo family: `make bench-defaults`.

The zoo (tests/zoo) compiles each family with a forced backend and placement by op
kind, so it proves coverage and answers, not speed. A user compiles with the defaults:
`--backend auto` with timed placement, where a segment that is not faster than the TF
ops it replaces stays in TF. This builds every zoo model from code, compiles it exactly
so, then times original and compiled side by side in one process (median after warm-up,
taking turns) and prints one row per model: where its ops went, what placement kept in
TF as slower, and the speed-up. Compiles and timings hold TIMING_LOCK (flock) when given,
so that no other timing on the machine overlaps them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.lock import locked
from bench.run import _cpu_name, _tf_call, measure

ZOO_DIR = Path(__file__).resolve().parents[1] / "tests" / "zoo"


@dataclass
class Row:
    model: str
    family: str
    backends: dict[str, int] = field(default_factory=dict)  # backend -> ops on it
    ratio: float = 0.0
    segments: int = 0
    slower_kept: int = 0  # ops placement kept in TF as slower than TF
    compile_s: float = 0.0
    original_ms: float = math.nan
    compiled_ms: float = math.nan
    error: str = ""

    @property
    def speed_up(self) -> float:
        return self.original_ms / self.compiled_ms


def _zoo():
    sys.path.insert(0, str(ZOO_DIR))
    from families import ZOO

    return ZOO


def bench_one(model, folder: Path, args) -> Row:
    import fuseflow

    row = Row(model.name, model.family)
    original, compiled = folder / "original", folder / "compiled"
    feeds = model.build(original)
    with locked(args.lock):
        start = time.perf_counter()
        try:  # its log and count lines go to stderr: stdout is the table
            with contextlib.redirect_stdout(sys.stderr):
                result = fuseflow.saved_model.compile(str(original), str(compiled),
                                                      batch_size=model.batch_size)
        except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the end
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            return row
        row.compile_s = time.perf_counter() - start
    report = json.loads((compiled / "assets.extra" / "fuseflow_report.json").read_text())
    row.backends = dict(result["ops_per_backend"])
    row.ratio, row.segments = result["OnNeuronRatio"], result["num_segments"]
    row.slower_kept = sum(r["code"] == "SLOWER_THAN_TF" for r in report["not_compiled"])
    calls = {"original": _tf_call(original, feeds), "compiled": _tf_call(compiled, feeds)}
    with locked(args.lock):
        samples = measure(calls, runs=args.runs, seconds=args.seconds, warmup=5)
    row.original_ms = 1000 * statistics.median(samples["original"])
    row.compiled_ms = 1000 * statistics.median(samples["compiled"])
    return row


def table_line(r: Row) -> str:
    if r.error:
        return f"| {r.model} | {r.family} | compile failed: {r.error} |||||||"
    ops = ", ".join(f"{b} {n}" for b, n in sorted(r.backends.items()) if n) or "TF only"
    return (f"| {r.model} | {r.family} | {ops} | {r.ratio:.3f} | {r.segments} | "
            f"{r.slower_kept} | {r.compile_s:.1f} | {r.original_ms:.2f} | "
            f"{r.compiled_ms:.2f} | {r.speed_up:.2f}x |")


def print_table(rows: list[Row], env: dict) -> None:
    print(f"\nDefaults (`--backend auto`, timed placement) on {env['cpu']}, "
          f"{env['cores']} cores; batch as the zoo builds it; median ms, same run.\n")
    print("| model | family | ops on | OnNeuronRatio | segments | kept in TF as slower "
          "| compile s | original ms | compiled ms | speed-up |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(table_line(r))
    ups = [r.speed_up for r in rows if not r.error]
    if ups:
        print(f"\n- {sum(u >= 0.97 for u in ups)}/{len(ups)} at least as fast as the original "
              f"(within 3%); slowest {min(ups):.2f}x; geomean "
              f"{math.exp(statistics.fmean(math.log(u) for u in ups)):.2f}x")


def main(argv=None) -> int:
    zoo = _zoo()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="comma-separated zoo names (default all)")
    parser.add_argument("--runs", type=int, default=60, help="most timed calls per variant")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="time budget per variant's timed calls")
    parser.add_argument("--lock", default=os.environ.get("TIMING_LOCK"),
                        help="hold this file (flock) around each compile and timing")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()] or list(zoo)
    unknown = [n for n in names if n not in zoo]
    if unknown:
        parser.error(f"unknown zoo model(s) {unknown}; choose from {', '.join(zoo)}")
    # The user's defaults: nothing from the test suite's environment.
    os.environ.pop("FUSEFLOW_CC_FLAGS", None)
    os.environ.pop("NEURON_CC_FLAGS", None)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    env = {"cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0))}
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix="fuseflow-defaults-") as tmp:
            os.environ["FUSEFLOW_CACHE_DIR"] = str(Path(tmp) / "cache")  # a first compile
            print(f"[{name}] compiling with the defaults and timing", file=sys.stderr,
                  flush=True)
            rows.append(bench_one(zoo[name], Path(tmp), args))
        print(table_line(rows[-1]), file=sys.stderr, flush=True)  # a long run shows progress
    print_table(rows, env)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env,
                                         "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
