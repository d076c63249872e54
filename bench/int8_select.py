"""A short side-by-side run for --quantize int8's per-segment int8-or-bf16 choice.

For each model and batch: TF, `--fp32-cast all` (bf16), `--quantize int8 --no-profile`
(every segment int8, untimed) and `--quantize int8` (timed: each segment int8 or bf16,
fuseflow/precision.py), compiled here (seconds shown), then timed each in a fresh
process (median of --runs calls after warm-up), in --rounds rounds of alternating
order, the median of the rounds kept: several OpenVINO models in one process on two
cores disturbed each other (two identical bf16 models timed 13.0 and 16.6 ms in
turns). Prints one markdown table and, per int8 compile, which precision each
segment kept and why.

    flock /work/notes/timing.lock python -m bench.int8_select --models EfficientNetB0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import fuseflow
from bench.models import MODELS, export
from bench.run import _tf_call
from fuseflow.export import REPORT_DIR

GUARD_OFF = ("--accuracy-tolerance", "mean=inf,top1=1")  # as bench.run: time int8 itself
VARIANTS = {
    "bf16": ("--no-profile", "--fp32-cast", "all"),
    "int8 untimed": ("--no-profile", "--quantize", "int8", *GUARD_OFF),
    "int8 timed (new)": ("--quantize", "int8", *GUARD_OFF),
}


def bench(name: str, batch: int, tmp: Path, args) -> list[str]:
    model = MODELS[name]
    src, key = export(model, tmp)
    calibration = model.feed(args.calibration_samples, np.random.default_rng(1))
    feeds = {key: model.feed(batch, np.random.default_rng(0))}
    calls = {"TF": src}
    compile_s, notes = {}, []
    for label, flags in VARIANTS.items():
        out = tmp / f"{label.replace(' ', '_')}-b{batch}"
        extra = {"calibration_data": {key: calibration}} if "--quantize" in flags else {}
        start = time.perf_counter()
        fuseflow.saved_model.compile(str(src), str(out), batch_size=batch,
                                     backend="openvino", compiler_args=list(flags), **extra)
        compile_s[label] = time.perf_counter() - start
        report = json.loads((out / REPORT_DIR / "fuseflow_report.json").read_text())
        stages = report.get("timings") or {}
        for seg in (report.get("accuracy") or {}).get("segments", []):
            if "selection" in seg:
                notes.append(f"{name} b{batch} {seg['name']}: {seg['selection']['kept']} "
                             f"kept ({seg['selection']['reason']}); int8-or-bf16 stage "
                             f"{stages.get('int8 or bf16', 0):.1f} s, whole-model timing "
                             f"{stages.get('model timing', 0):.1f} s of the compile")
        calls[label] = out
        print(f"[{name} b{batch}] {label}: compiled in {compile_s[label]:.1f} s",
              file=sys.stderr, flush=True)
    np.savez(tmp / "feeds.npz", **feeds)
    rounds: dict[str, list[float]] = {label: [] for label in calls}
    for r in range(args.rounds):
        for label in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            rounds[label].append(_time_fresh(calls[label], tmp / "feeds.npz", args.runs))
    ms = {k: float(np.median(v)) for k, v in rounds.items()}
    rows = [f"| {name} | {batch} | {label} | {ms[label]:.2f} | {ms['TF'] / ms[label]:.2f}x "
            f"| {ms['bf16'] / ms[label]:.2f}x | "
            + (f"{compile_s[label]:.1f}" if label in compile_s else "—")
            + " | " + ", ".join(f"{v:.2f}" for v in rounds[label]) + " |" for label in calls]
    return rows + [f"<!-- {n} -->" for n in notes]


def _time_fresh(model_dir: Path, feeds: Path, runs: int) -> float:
    """Median ms per call of the model, loaded alone in a new process."""
    code = ("import sys, json, time, numpy as np; import fuseflow; from pathlib import Path; "
            "from bench.int8_select import _median_ms; "
            "print(json.dumps(_median_ms(Path(sys.argv[1]), Path(sys.argv[2]), "
            "int(sys.argv[3]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(model_dir), str(feeds), str(runs)],
                          capture_output=True, text=True, timeout=600, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def _median_ms(model_dir: Path, feeds: Path, runs: int) -> float:
    with np.load(feeds) as data:
        call = _tf_call(model_dir, dict(data))
    for _ in range(5):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="EfficientNetB0,MobileNetV2,ResNet50,BERT-like")
    p.add_argument("--batches", default="1")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calibration-samples", type=int, default=64)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    print("| model | batch | variant | median ms | vs TF | vs bf16 | compile s | rounds ms |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            with tempfile.TemporaryDirectory(prefix="fuseflow-int8sel-") as tmp:
                os.environ["FUSEFLOW_CACHE_DIR"] = str(Path(tmp) / "cache")  # first compiles
                for line in bench(name, batch, Path(tmp), args):
                    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
