"""make zoo's table: coverage, error and batch-1 speed-up of every zoo model.

`tests/zoo/test_zoo.py` run with FUSEFLOW_ZOO_OUT=DIR keeps, per model and backend, the
original and compiled SavedModels, the feeds and a record (ratio, segments, ops left in
TF, max error). This times original and compiled side by side in one process (median
after warm-up, variants taking turns), writes DIR/zoo.json and puts the table into
README.md between the zoo-table markers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from bench.run import _cpu_name, _tf_call, measure

START, END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def _records(folder: Path) -> list[tuple[Path, dict]]:
    found = []
    for record in sorted(folder.glob("*/*/record.json")):
        found.append((record.parent, json.loads(record.read_text())))
    return found


def speed_up(case: Path, runs: int, seconds: float) -> tuple[float, float]:
    """(original ms, compiled ms) at the recorded batch, median of many calls."""
    with np.load(case / "feeds.npz") as data:
        feeds = dict(data)
    calls = {"original": _tf_call(case / "original", feeds),
             "compiled": _tf_call(case / "compiled", feeds)}
    samples = measure(calls, runs=runs, seconds=seconds, warmup=5)
    return tuple(1000 * statistics.median(samples[k]) for k in ("original", "compiled"))


def _left(left: dict[str, str]) -> str:
    if not left:
        return "—"
    return ", ".join(f"{op} ({code.lower().replace('_', ' ')})" for op, code in left.items())


def render(rows: list[dict], cpu: str) -> str:
    timed = any(r.get("speed_up") for r in rows)
    speed = ("speed-up = original / compiled latency at batch 1 (median, same run)" if timed
             else "speed-up not measured in this run (`make zoo` measures it)")
    lines = [f"Measured by `make zoo` on {cpu}; {speed}.", "",
             "| model | family | backend | OnNeuronRatio | segments | left in TF (why) "
             "| max error | speed-up b1 |", "|---|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        cell = f"{r['speed_up']:.2f}x" if r.get("speed_up") else "—"
        lines.append(f"| {r['model']} | {r['family']} | {r['backend']} | {r['ratio']:.3f} | "
                     f"{r['segments']} | {_left(r['left_in_tf'])} | {r['max_error']:.1e} | "
                     f"{cell} |")
    return "\n".join(lines)


def write_readme(table: str, readme: Path = README) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path, help="FUSEFLOW_ZOO_OUT of the zoo test run")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per variant")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--no-timing", action="store_true",
                        help="coverage and error only (e.g. while the CPU is busy)")
    args = parser.parse_args(argv)
    rows = []
    for case, record in _records(args.folder):
        try:
            if args.no_timing:
                raise RuntimeError("not timed (--no-timing)")
            original_ms, compiled_ms = speed_up(case, args.runs, args.seconds)
            record.update(original_ms=original_ms, compiled_ms=compiled_ms,
                          speed_up=original_ms / compiled_ms)
        except Exception as e:  # a model that does not run still gets its row
            record["speed_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(record)
        print(f"{record['model']:>20} {record['backend']:>8} ratio {record['ratio']:.3f} "
              f"segments {record['segments']} speed-up "
              f"{record.get('speed_up', float('nan')):.2f}x", flush=True)
    table = render(rows, _cpu_name())
    (args.folder / "zoo.json").write_text(json.dumps(rows, indent=2))
    print(table)
    if not args.no_readme:
        write_readme(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
