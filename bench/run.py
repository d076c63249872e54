"""make bench: real models, original TF vs fuseflow's backends vs tf2onnx + onnxruntime.

For each model: export once; convert once with tf2onnx (its ONNX has a dynamic
batch); then for each batch size compile each fuseflow variant at that batch
(timed), load every variant once in this process, warm up, and time them one
at a time. Timing interleaves the variants in blocks of a few calls, each block
after one unrecorded call, so that background load drifting during the run
hits every variant alike; the median over a variant's calls is its latency.
The blocks come in a new random order each pass (seeded): the block right after
the TF original's ran up to 13% slower (its thread pools still busy), and with
a fixed order that cost fell on one variant every time.
Each variant calls until --runs samples or until --seconds of its calls have
been spent (at least 5 samples): slow rows (XLA's depthwise convolutions, batch
8) get fewer samples. Errors are the max abs difference from the original's
outputs on the same input.

Throughput: after the latency timing, each variant is called from 1, 2 and 4
threads at once (calls in flight), each thread calling back to back for
--throughput-seconds; the column is samples (calls x batch) per second, the
median of --throughput-rounds such windows taken in turns.

Targets (read here, not asserted in tests): geomean speed-up >= 2x at f32 and
>= 3.5x with --fp32-cast all, and ahead of onnxruntime on every row. INT8
(`--quantize int8`, calibrated on --calibration-samples random inputs, which
also feed fuseflow's accuracy guard) is set beside onnxruntime's own static
INT8 quantization of the tf2onnx model (quantize_static, same samples): INT8
geomean >= 1.3x over `--fp32-cast all` in the same run, ahead of onnxruntime
INT8 on every row, compile time under 2x that of f32 compiled the same way
(OpenVINO, profiling on: INT8 times int8 against bf16 per segment).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import math
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

import fuseflow
from bench import coldstart, onnx_baseline
from bench.models import MODELS, export, timed_signature
from fuseflow.backends import openvino as openvino_backend
from fuseflow.options import parse_compiler_args
from fuseflow.tf_compat import tf

MIN_RUNS = 5
BLOCK = 5  # consecutive timed calls of one variant before the next one's turn
DEGENERATE = 1e-6  # outputs spread less than this: the error column cannot tell much
IN_FLIGHT = (1, 2, 4)  # calls in flight for the throughput columns


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    backend: str | None = None  # a fuseflow backend; None: not compiled by fuseflow
    compiler_args: tuple[str, ...] = ()


ORIGINAL = Variant("tf", "TF original")
ONNXRUNTIME = Variant("onnxruntime", "tf2onnx + onnxruntime")
ONNXRUNTIME_INT8 = Variant("onnxruntime-int8", "tf2onnx + onnxruntime quantize_static INT8")
# The bench times INT8 itself: its guard reports the error (random weights give outputs
# that say little) but demotes nothing. Profiling stays on, as a user runs it: each
# segment keeps int8 only where it runs faster than bf16 (fuseflow/precision.py); its
# compile time includes that timing and the whole-model timing.
INT8_ARGS = ("--quantize", "int8", "--accuracy-tolerance", "mean=inf,top1=1")
VARIANTS = [
    ORIGINAL,
    Variant("auto", "fuseflow auto (timed placement, the default)", "auto"),
    Variant("ov-f32", "fuseflow OpenVINO f32", "openvino", ("--no-profile",)),
    Variant("ov-cast-all", "fuseflow OpenVINO --fp32-cast all", "openvino",
            ("--no-profile", "--fp32-cast", "all")),
    Variant("ov-int8", "fuseflow OpenVINO --quantize int8", "openvino", INT8_ARGS),
    Variant("xla", "fuseflow XLA", "xla", ("--no-profile",)),
    ONNXRUNTIME,
    ONNXRUNTIME_INT8,
]
TARGETS = {"ov-f32": 2.0, "ov-cast-all": 3.5}
INT8_OVER_CAST_ALL = 1.3  # INT8 geomean over --fp32-cast all, in the same run


@dataclass
class Row:
    model: str
    batch: int
    variant: str
    label: str
    median_ms: float | None = None
    speedup: float | None = None
    max_abs_err: float | None = None
    compile_s: float | None = None  # fuseflow compile / tf2onnx conversion
    load_first_call_s: float | None = None  # load + first call (XLA compiles here)
    # In a fresh process (bench.coldstart): load + first call, RSS after it, peak RSS.
    cold_s: float | None = None
    rss_mb: float | None = None
    peak_mb: float | None = None
    openvino_alone_s: float | None = None  # ov.convert_model + compile_model, same graph
    recompile_s: float | None = None  # compiling again: segments from the compile cache
    # INT8 rows: f32 compiled the same way (OpenVINO, profiling on, an empty cache), the
    # like-for-like base of the INT8 compile-time target.
    f32_profiled_s: float | None = None
    runs: int = 0
    p10_ms: float | None = None
    p90_ms: float | None = None
    na: str | None = None  # why there is no number
    reference_spread: float | None = None  # max - min of the original's outputs
    compile_result: dict = field(default_factory=dict)
    throughput: dict[int, float] = field(default_factory=dict)  # in flight -> samples/s


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def _tf_call(model_dir: Path, feeds: dict[str, np.ndarray]) -> Callable[[], dict]:
    signature = timed_signature(model_dir)
    tensors = {k: tf.constant(v) for k, v in feeds.items()}

    def call():
        return {k: v.numpy() for k, v in signature(**tensors).items()}

    call.keep = signature
    return call


def _onnx_call(path: Path, feeds: dict[str, np.ndarray]) -> Callable[[], dict]:
    model = onnx_baseline.OnnxRuntimeModel(path)
    named = model.feed_names(feeds)
    return lambda: model(named)


def _max_abs_err(reference: dict, outputs: dict) -> float:
    if set(reference) != set(outputs):  # different output names: match by order
        reference = dict(enumerate(reference[k] for k in sorted(reference)))
        outputs = dict(enumerate(outputs[k] for k in sorted(outputs)))
    return max(float(np.max(np.abs(reference[k].astype(np.float64)
                                   - np.asarray(outputs[k]).astype(np.float64))))
               for k in reference)


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(calls: dict[str, Callable], runs: int, seconds: float,
            warmup: int) -> dict[str, list[float]]:
    """Seconds per call for each variant; variants take turns in blocks (see the docstring)."""
    target = {}
    for key, call in calls.items():
        warm = [_timed(call) for _ in range(warmup)]
        target[key] = min(runs, max(MIN_RUNS, int(seconds / max(min(warm), 1e-6))))
    samples = {key: [] for key in calls}
    order, shuffle = list(calls), random.Random(0).shuffle
    while any(len(samples[k]) < target[k] for k in calls):
        for key in order:
            call = calls[key]
            todo = min(BLOCK, target[key] - len(samples[key]))
            if todo > 0:
                call()  # unrecorded: lets the previous variant's threads and caches settle
                samples[key] += [_timed(call) for _ in range(todo)]
        shuffle(order)  # each variant comes after each other about as often
    return samples


def throughput(call: Callable, in_flight: int, seconds: float) -> float:
    """Calls per second with `in_flight` threads each calling back to back for `seconds`."""
    counts = [0] * in_flight
    barrier = threading.Barrier(in_flight + 1)
    deadline = [0.0]

    def worker(k: int) -> None:
        call()  # this thread's first call (TF and OpenVINO set up per-thread state)
        barrier.wait()
        while time.perf_counter() < deadline[0]:
            call()
            counts[k] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(in_flight)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + 3600  # until the barrier lets the workers go
    barrier.wait()
    start = time.perf_counter()
    deadline[0] = start + seconds
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def measure_throughput(calls: dict[str, Callable], seconds: float, rounds: int = 3
                       ) -> dict[str, dict[int, float]]:
    """Calls per second for each variant and number of calls in flight: the median of
    `rounds` windows, taken in turns (every variant at 1, 2, 4 in flight, then again).
    One window each put 1 and 4 in flight minutes apart, and the machine's drift between
    them (a few %) read as a loss with calls in flight."""
    windows: dict[str, dict[int, list[float]]] = {k: {n: [] for n in IN_FLIGHT} for k in calls}
    order, shuffle = list(calls), random.Random(0).shuffle
    for _ in range(rounds):
        for key in order:
            for n in IN_FLIGHT:
                windows[key][n].append(throughput(calls[key], n, seconds))
        shuffle(order)
    return {k: {n: float(np.median(w)) for n, w in by_n.items()} for k, by_n in windows.items()}


def bench_model(name: str, batches: list[int], variants: list[Variant], args,
                tmp: Path) -> list[Row]:
    model = MODELS[name]
    start = time.perf_counter()
    src, key = export(model, tmp)
    _progress(f"[{name}] exported in {time.perf_counter() - start:.1f} s")
    onnx_path, onnx_compile_s, onnx_na = tmp / f"{name}.onnx", None, None
    if ONNXRUNTIME in variants:
        onnx_na = onnx_baseline.unavailable()
        if onnx_na is None:
            try:
                onnx_compile_s = onnx_baseline.convert(src, onnx_path)
                _progress(f"[{name}] tf2onnx: {onnx_compile_s:.1f} s")
            except Exception as e:  # noqa: BLE001 - the row says n/a with the reason
                onnx_na = _first_line(e)
    calibration = model.feed(args.calibration_samples, np.random.default_rng(1))
    onnx_int8, onnx_int8_s, onnx_int8_na = tmp / f"{name}-int8.onnx", None, onnx_na
    if ONNXRUNTIME_INT8 in variants and onnx_int8_na is None:
        try:
            if not onnx_path.exists():
                onnx_baseline.convert(src, onnx_path)
            onnx_int8_s = onnx_baseline.quantize_static_int8(onnx_path, onnx_int8, calibration)
            _progress(f"[{name}] onnxruntime quantize_static: {onnx_int8_s:.1f} s")
        except Exception as e:  # noqa: BLE001 - the row says n/a with the reason
            onnx_int8_na = _first_line(e)
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        feeds = {key: model.feed(batch, rng)}
        by_key = {v.key: Row(name, batch, v.key, v.label) for v in variants}
        calls: dict[str, Callable] = {}
        reference = spread = None
        for v in variants:
            row = by_key[v.key]
            try:
                if v.backend:
                    out = tmp / f"{v.key}-b{batch}"
                    # An empty compile cache: "compile s" is a first compile, "again s" a
                    # cached one (a shared cache would hand INT8 the cast-all's bf16 blob).
                    os.environ["FUSEFLOW_CACHE_DIR"] = str(tmp / f"cache-{v.key}-b{batch}")
                    start = time.perf_counter()
                    extra = ({"calibration_data": {key: calibration}}
                             if "--quantize" in v.compiler_args else {})
                    row.compile_result = fuseflow.saved_model.compile(
                        str(src), str(out), batch_size=batch, backend=v.backend,
                        compiler_args=list(v.compiler_args) or None, **extra)
                    row.compile_s = time.perf_counter() - start
                    _progress(f"[{name} b{batch}] {v.label}: compiled in {row.compile_s:.1f} s "
                              f"{row.compile_result}")
                    start = time.perf_counter()
                    fuseflow.saved_model.compile(
                        str(src), str(out) + "-again", batch_size=batch, backend=v.backend,
                        compiler_args=list(v.compiler_args) or None, **extra)
                    row.recompile_s = time.perf_counter() - start
                    if v.key == "ov-int8":
                        os.environ["FUSEFLOW_CACHE_DIR"] = str(tmp / f"cache-f32-b{batch}")
                        start = time.perf_counter()
                        fuseflow.saved_model.compile(
                            str(src), str(out) + "-f32-profiled", batch_size=batch,
                            backend=v.backend)
                        row.f32_profiled_s = time.perf_counter() - start
                    if v.backend == "openvino":
                        try:
                            row.openvino_alone_s = coldstart.openvino_alone_s(
                                src, batch, v.compiler_args)
                        except Exception as e:  # noqa: BLE001 - OpenVINO alone can't: n/a
                            _progress(f"[{name} b{batch}] OpenVINO alone: n/a: "
                                      f"{_first_line(e)}")
                    load = functools.partial(_tf_call, out, feeds)
                elif v is ONNXRUNTIME:
                    if onnx_na:
                        row.na = onnx_na
                        continue
                    row.compile_s = onnx_compile_s
                    load = functools.partial(_onnx_call, onnx_path, feeds)
                elif v is ONNXRUNTIME_INT8:
                    if onnx_int8_na:
                        row.na = onnx_int8_na
                        continue
                    row.compile_s = (onnx_compile_s or 0.0) + onnx_int8_s
                    load = functools.partial(_onnx_call, onnx_int8, feeds)
                else:
                    load = functools.partial(_tf_call, src, feeds)
                start = time.perf_counter()
                call = load()
                first = call()
                row.load_first_call_s = time.perf_counter() - start
                if v is ORIGINAL:
                    reference = first
                    spread = max(float(np.ptp(o)) for o in first.values())
                elif reference is None:
                    raise RuntimeError("the original model did not run")
                row.max_abs_err = _max_abs_err(reference, first)
                row.reference_spread = spread
                calls[v.key] = call
                if v is not ONNXRUNTIME:
                    cold = coldstart.measure(out if v.backend else src, feeds, tmp)
                    row.cold_s, row.rss_mb, row.peak_mb = (
                        cold["load_first_call_s"], cold["rss_mb"], cold["peak_mb"])
            except Exception as e:  # noqa: BLE001 - the row says n/a with the reason
                row.na = _first_line(e)
                _progress(f"[{name} b{batch}] {v.label}: n/a: {row.na}")
        if ORIGINAL.key not in calls:
            rows += by_key.values()
            continue
        _progress(f"[{name} b{batch}] timing {', '.join(calls)}")
        samples = measure(calls, args.runs, args.seconds, args.warmup)
        base = float(np.median(samples[ORIGINAL.key]))
        for k, times in samples.items():
            row, ms = by_key[k], 1000 * np.asarray(times)
            row.median_ms, row.runs = float(np.median(ms)), len(times)
            row.p10_ms, row.p90_ms = float(np.percentile(ms, 10)), float(np.percentile(ms, 90))
            row.speedup = 1000 * base / row.median_ms
        if args.throughput_seconds > 0:
            _progress(f"[{name} b{batch}] throughput with {IN_FLIGHT} calls in flight")
            for k, rates in measure_throughput(calls, args.throughput_seconds,
                                               args.throughput_rounds).items():
                by_key[k].throughput = {n: rate * batch for n, rate in rates.items()}
        rows += by_key.values()
        del calls
        gc.collect()
    return rows


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summary(rows: list[Row], variants: list[Variant], batches: list[int]) -> dict:
    """Per variant: geomean speed-up over all rows and per batch; rows ahead of onnxruntime."""
    ort = {(r.model, r.batch): r.median_ms for r in rows
           if r.variant == ONNXRUNTIME.key and r.median_ms}
    out = {}
    for v in variants:
        mine = [r for r in rows if r.variant == v.key and r.speedup]
        entry = {"label": v.label, "rows": len(mine),
                 "geomean": _geomean([r.speedup for r in mine]),
                 "by_batch": {b: _geomean([r.speedup for r in mine if r.batch == b])
                              for b in batches}}
        if v.backend:
            compared = [r for r in mine if (r.model, r.batch) in ort]
            entry["ahead_of_onnxruntime"] = sum(r.median_ms < ort[r.model, r.batch]
                                                for r in compared)
            entry["compared_with_onnxruntime"] = len(compared)
        out[v.key] = entry
    return out


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else format(value, spec) + suffix


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args) -> dict:
    threading = tf.config.threading
    env = {
        "cpu": _cpu_name(), "logical_cores": os.cpu_count(),
        "python": platform.python_version(), "tensorflow": tf.__version__,
        "openvino": metadata.version("openvino"), "numpy": np.__version__,
        "tf_threads": f"intra_op {threading.get_intra_op_parallelism_threads()} inter_op "
                      f"{threading.get_inter_op_parallelism_threads()} (0 = all cores)",
        "openvino_properties": {
            v.key: openvino_backend.properties(parse_compiler_args(list(v.compiler_args), None,
                                                             "openvino"))
            for v in VARIANTS if v.backend == "openvino"},
        "thread_env": {k: os.environ[k] for k in (
            "OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
            "FUSEFLOW_CC_FLAGS", "NEURON_CC_FLAGS") if k in os.environ},
        "runs": args.runs, "seconds_per_variant": args.seconds, "warmup": args.warmup,
        "throughput_seconds": args.throughput_seconds,
        "throughput_rounds": args.throughput_rounds,
    }
    reason = onnx_baseline.unavailable()
    env["onnxruntime"] = ({**onnx_baseline.versions(), "threads": onnx_baseline.thread_settings()}
                          if reason is None else f"n/a: {reason}")
    return env


def print_report(env: dict, rows: list[Row], summ: dict) -> None:
    print("## fuseflow benchmark\n")
    print(f"- machine: {env['cpu']}, {env['logical_cores']} cores; Python {env['python']}, "
          f"TensorFlow {env['tensorflow']}, OpenVINO {env['openvino']}, numpy {env['numpy']}")
    print(f"- TensorFlow threads: {env['tf_threads']}")
    for key, props in env["openvino_properties"].items():
        print(f"- OpenVINO ({key}): {', '.join(props)} (no INFERENCE_NUM_THREADS: all cores)")
    ort = env["onnxruntime"]
    print(f"- onnxruntime: {ort}" if isinstance(ort, str) else
          f"- tf2onnx {ort['tf2onnx']}, onnx {ort['onnx']}, onnxruntime {ort['onnxruntime']}: "
          f"{ort['threads']}")
    if env["thread_env"]:
        print(f"- thread settings from the environment: {env['thread_env']}")
    runs, seconds = env["runs"], env["seconds_per_variant"]
    print(f"- median of {runs} timed calls per variant, fewer (at least {min(MIN_RUNS, runs)}) "
          f"where they would take over {seconds} s; warm-up calls first: {env['warmup']}; "
          f"variants interleaved in blocks of {BLOCK}")
    print("- compile s: fuseflow compile at that batch; for onnxruntime the tf2onnx conversion "
          "(once per model, dynamic batch; child process start included). XLA compiles its "
          "clusters on the first call: see load+1st call s\n")
    if env["throughput_seconds"] > 0:
        print(f"- n in flight /s: samples per second with n threads calling at once, each "
              f"back to back for {env['throughput_seconds']} s; the median of "
              f"{env['throughput_rounds']} such windows (variants take turns)\n")
    flight = "".join(f" {n} in flight /s |" for n in IN_FLIGHT)
    print("| model | batch | variant | median ms | speed-up | max abs err | compile s "
          f"| load+1st call s | runs |{flight}")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(IN_FLIGHT))
    for r in rows:
        if r.na:
            print(f"| {r.model} | {r.batch} | {r.label} | n/a: {r.na} | | | | | |"
                  + " |" * len(IN_FLIGHT))
            continue
        rates = "".join(f" {_fmt(r.throughput.get(n), '.0f')} |" for n in IN_FLIGHT)
        flag = " †" if r.reference_spread is not None and r.reference_spread < DEGENERATE else ""
        err = ("reference" if r.variant == ORIGINAL.key else _fmt(r.max_abs_err, ".1e")) + flag
        print(f"| {r.model} | {r.batch} | {r.label} | {_fmt(r.median_ms, '.2f')} "
              f"| {_fmt(r.speedup, '.2f', 'x')} | {err} "
              f"| {_fmt(r.compile_s, '.1f')} | {_fmt(r.load_first_call_s, '.2f')} | {r.runs} |"
              + rates)
    degenerate = sorted({r.model for r in rows if r.variant == ORIGINAL.key
                         and r.reference_spread is not None and r.reference_spread < DEGENERATE})
    if degenerate:
        print(f"\n† {', '.join(degenerate)}: with random weights the original's outputs are all "
              f"equal to within {DEGENERATE:g} (a flat softmax), so a small error here proves "
              "little")
    batches = sorted({r.batch for r in rows})
    print("\n| variant | geomean speed-up | " + " | ".join(f"batch {b}" for b in batches)
          + " | faster than onnxruntime |")
    print("|---|---:|" + "---:|" * len(batches) + "---:|")
    for s in summ.values():
        ahead = (f"{s['ahead_of_onnxruntime']}/{s['compared_with_onnxruntime']} rows"
                 if "ahead_of_onnxruntime" in s else "")
        print(f"| {s['label']} | {_fmt(s['geomean'], '.2f', 'x')} | "
              + " | ".join(_fmt(s["by_batch"][b], ".2f", "x") for b in batches)
              + f" | {ahead} |")
    accuracy = [r for r in rows if r.compile_result.get("accuracy")]
    if accuracy:
        print("\nfuseflow's accuracy guard (held-out random inputs; random weights):\n")
        print("| model | batch | variant | max rel err | mean rel err | top-1 agreement "
              "| demoted |")
        print("|---|---:|---|---:|---:|---:|---|")
        for r in accuracy:
            a = r.compile_result["accuracy"]
            print(f"| {r.model} | {r.batch} | {r.label} "
                  f"| {_fmt(a.get('max_relative_error'), '.2e')} "
                  f"| {_fmt(a.get('mean_relative_error'), '.2e')} "
                  f"| {_fmt(a.get('top1_agreement'), '.3f')} | {', '.join(a['demoted']) or '-'} |")
    print()
    int8, cast = summ.get("ov-int8"), summ.get("ov-cast-all")
    if int8 and cast and int8["geomean"] and cast["geomean"]:
        ratio = int8["geomean"] / cast["geomean"]
        print(f"- target INT8 over --fp32-cast all: geomean >= {INT8_OVER_CAST_ALL}x "
              f"{'met' if ratio >= INT8_OVER_CAST_ALL else 'NOT met'} ({ratio:.2f}x)")
        ort8 = {(r.model, r.batch): r.median_ms for r in rows
                if r.variant == ONNXRUNTIME_INT8.key and r.median_ms}
        mine = [r for r in rows if r.variant == "ov-int8" and r.median_ms
                and (r.model, r.batch) in ort8]
        ahead = sum(r.median_ms < ort8[r.model, r.batch] for r in mine)
        print(f"- target INT8 ahead of onnxruntime INT8 on every row: "
              f"{'met' if mine and ahead == len(mine) else 'NOT met'} ({ahead}/{len(mine)} rows)")
    f32 = {(r.model, r.batch): r.compile_s for r in rows if r.variant == "ov-f32"
           and r.compile_s}
    int8_rows = [r for r in rows if r.variant == "ov-int8" and r.compile_s]
    alike = [r.compile_s / r.f32_profiled_s for r in int8_rows if r.f32_profiled_s]
    if alike:
        print(f"- target INT8 compile time under 2x that of f32 compiled the same way "
              f"(OpenVINO, profiling on, empty cache): "
              f"{'met' if max(alike) < 2 else 'NOT met'} ("
              + ", ".join(f"{r.model} b{r.batch} {r.compile_s:.1f} s vs "
                          f"{r.f32_profiled_s:.1f} s, {r.compile_s / r.f32_profiled_s:.2f}x"
                          for r in int8_rows if r.f32_profiled_s) + ")")
    slow = [f"{r.model} b{r.batch} {r.compile_s / f32[r.model, r.batch]:.1f}x"
            for r in int8_rows if (r.model, r.batch) in f32]
    if slow:
        print("- INT8 compile time over the f32 row's (--no-profile: no timing, so not "
              f"like for like): {', '.join(slow)}")
    for key, goal in TARGETS.items():
        s = summ.get(key)
        if s is None or s["geomean"] is None:
            continue
        ahead, compared = s["ahead_of_onnxruntime"], s["compared_with_onnxruntime"]
        speed = "met" if s["geomean"] >= goal else "NOT met"
        versus = (f"{'met' if ahead == compared else 'NOT met'} ({ahead}/{compared} rows)"
                  if compared else "unknown (no onnxruntime rows)")
        print(f"- target {s['label']}: geomean >= {goal}x {speed} ({s['geomean']:.2f}x); "
              f"ahead of onnxruntime on every row {versus}")
    for line in concurrency_lines(rows):
        print(line)


def concurrency_lines(rows: list[Row]) -> list[str]:
    """Issue 10's concurrency targets per fuseflow variant: with n calls in flight, at least
    the original's throughput, and never below its own with one in flight."""
    original = {(r.model, r.batch): r.throughput for r in rows
                if r.variant == ORIGINAL.key and r.throughput}
    lines = []
    for key in dict.fromkeys(r.variant for r in rows if r.variant not in
                             (ORIGINAL.key, ONNXRUNTIME.key)):
        mine = [r for r in rows if r.variant == key and r.throughput
                and (r.model, r.batch) in original]
        if not mine:
            continue
        cells = [(r, n) for r in mine for n in IN_FLIGHT if n > 1]
        beats = sum(r.throughput[n] >= original[r.model, r.batch][n] for r, n in cells)
        holds = sum(r.throughput[n] >= r.throughput[1] for r, n in cells)
        lines.append(f"- calls in flight, {mine[0].label}: at least the original's throughput "
                     f"{beats}/{len(cells)}, at least its own with 1 in flight "
                     f"{holds}/{len(cells)} (rows x {', '.join(map(str, IN_FLIGHT[1:]))} "
                     "in flight)")
    return lines


def print_coldstart(rows: list[Row]) -> None:
    """Cold start and compile time, each against the original (or OpenVINO alone)."""
    print("\n- cold start: a fresh process (TF and fuseflow imported first) loads the model and "
          "calls it once; RSS after that call and the process's peak, in MB, imports included. "
          "Compile s against OpenVINO alone (ov.convert_model + compile_model of the same "
          "frozen graph, same properties), and compiling again (segments from the compile "
          "cache)\n")
    print("| model | batch | variant | cold load+1st call s | vs TF | RSS MB | vs TF | peak MB "
          "| vs TF | compile s | OpenVINO alone s | ratio | again s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {(r.model, r.batch): r for r in rows if r.variant == ORIGINAL.key}

    def vs(mine, theirs):
        return _fmt(mine / theirs if mine is not None and theirs else None, ".2f", "x")

    for r in rows:
        if r.na or r.cold_s is None:
            continue
        tf_row = base.get((r.model, r.batch)) or r
        print(f"| {r.model} | {r.batch} | {r.label} | {_fmt(r.cold_s, '.2f')} "
              f"| {vs(r.cold_s, tf_row.cold_s)} | {_fmt(r.rss_mb, '.0f')} "
              f"| {vs(r.rss_mb, tf_row.rss_mb)} | {_fmt(r.peak_mb, '.0f')} "
              f"| {vs(r.peak_mb, tf_row.peak_mb)} | {_fmt(r.compile_s, '.1f')} "
              f"| {_fmt(r.openvino_alone_s, '.1f')} | {vs(r.compile_s, r.openvino_alone_s)} "
              f"| {_fmt(r.recompile_s, '.1f')} |")


def _names(text: str, choices) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in choices:
            raise SystemExit(f"unknown name {n!r}: choose from {', '.join(choices)}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--variants", default=",".join(v.key for v in VARIANTS),
                        help="comma-separated, from " + ", ".join(v.key for v in VARIANTS)
                        + f" ({ORIGINAL.key} always runs: it is the reference)")
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", 50)),
                        help="most timed calls per variant (env BENCH_RUNS; default 50)")
    parser.add_argument("--seconds", type=float,
                        default=float(os.environ.get("BENCH_SECONDS", 8)),
                        help="time budget of one variant's timed calls in a row; slow "
                        f"variants stop early, after at least {MIN_RUNS} (env BENCH_SECONDS)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    parser.add_argument("--calibration-samples", type=int, default=128,
                        help="random samples calibrating the INT8 variants (default 128)")
    parser.add_argument("--throughput-seconds", type=float,
                        default=float(os.environ.get("BENCH_THROUGHPUT_SECONDS", 1.0)),
                        help="seconds per variant and number of calls in flight for the "
                        "throughput columns; 0 skips them (env BENCH_THROUGHPUT_SECONDS)")
    parser.add_argument("--throughput-rounds", type=int, default=3,
                        help="windows per variant and number in flight; the column is their "
                        "median (default 3)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--verbose", action="store_true", help="show fuseflow's compile log")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 1 or args.throughput_rounds < 1 or args.seconds <= 0:
        parser.error("--runs, --warmup and --throughput-rounds must be >= 1 and --seconds > 0")
    models = _names(args.models, list(MODELS))
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches takes integers, got {args.batches!r}")
    keys = set(_names(args.variants, [v.key for v in VARIANTS])) | {ORIGINAL.key}
    variants = [v for v in VARIANTS if v.key in keys]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)

    env = environment(args)
    rows: list[Row] = []
    start = time.perf_counter()
    for name in models:
        with tempfile.TemporaryDirectory(prefix=f"fuseflow-bench-{name}-") as tmp:
            os.environ["FUSEFLOW_CACHE_DIR"] = str(Path(tmp) / "compile-cache")
            rows += bench_model(name, batches, variants, args, Path(tmp))
    summ = summary(rows, variants, batches)
    env["total_seconds"] = round(time.perf_counter() - start, 1)
    print_report(env, rows, summ)
    print_coldstart(rows)
    print(f"\n(whole run: {env['total_seconds']:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"environment": env, "rows": [asdict(r) for r in rows], "summary": summ},
            indent=2, default=str))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
