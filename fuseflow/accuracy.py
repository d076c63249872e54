"""Stage 5b: the accuracy guard for every precision below f32.

The compile worker checks each artifact on random inputs, which is enough
for f32 and says little for int8, bf16 or f16. Here the compiled model is
compared end to end with the original on samples the user gave and that
calibration did not see (random inputs when the user gave none):

- max relative error: the largest difference over the output's largest value;
- mean relative error: mean |difference| over mean |value|;
- top-1 agreement, for classification-shaped outputs (rank 2, floats, > 1 class);
- per segment, the error it adds: the segment run on the original model's
  values at its inputs, against the original's values at its outputs.

While a bound is broken, the segment adding the most error is demoted one
step (int8 -> bf16 -> f32; bf16 or f16 -> f32) and recompiled, until the
model fits or every segment is at f32.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fuseflow.backends.base import Backend, SegmentGraph
from fuseflow.batch import run_feeds
from fuseflow.compile import CompiledSegment
from fuseflow.options import CompilerOptions
from fuseflow.quantize import CalibrationSet, segment_values

log = logging.getLogger("fuseflow")

# Default bounds: outputs within 5% on average, at most 2% of top-1 answers changed.
# The max error is reported, not bounded (one element near zero dominates it) unless asked.
DEFAULT_TOLERANCE = {"max": math.inf, "mean": 0.05, "top1": 0.02}


def ladder(options: CompilerOptions, backend: Backend) -> list[str]:
    """The precisions a segment may go through, the requested one first."""
    if backend.name != "openvino":
        return ["f32"]
    from fuseflow.backends.openvino import _requested

    start = "int8" if options.quantize == "int8" else _requested(options)[0]
    return {"int8": ["int8", "bf16", "f32"], "bf16": ["bf16", "f32"],
            "f16": ["f16", "f32"]}.get(start, ["f32"])


def guarded(options: CompilerOptions, backend: Backend) -> bool:
    """Is anything below f32 asked for (so the guard must run)?"""
    return ladder(options, backend)[0] != "f32"


def options_at(options: CompilerOptions, level: str) -> CompilerOptions:
    """The options that compile a segment at one precision of the ladder."""
    if level == "int8":
        return options
    cast = {"bf16": "all", "f16": "all-fp16", "f32": "none"}[level]
    return dataclasses.replace(options, quantize="none", fp32_cast=cast, fast_math=())


@dataclass
class Metrics:
    max_relative_error: float
    mean_relative_error: float
    top1_agreement: float | None  # None: no classification-shaped output
    top1_samples: int = 0

    def breaks(self, bounds: dict[str, float]) -> list[str]:
        broken = []
        if self.max_relative_error > bounds["max"]:
            broken.append(f"max relative error {self.max_relative_error:.3g} > {bounds['max']}")
        if self.mean_relative_error > bounds["mean"]:
            broken.append(f"mean relative error {self.mean_relative_error:.3g} > "
                          f"{bounds['mean']}")
        if self.top1_agreement is not None and self.top1_resolves(bounds) \
                and 1 - self.top1_agreement > bounds["top1"] + 1e-9:
            broken.append(f"top-1 agreement {self.top1_agreement:.3f} < {1 - bounds['top1']}")
        return broken

    def top1_resolves(self, bounds: dict[str, float]) -> bool:
        """Can this many samples tell the bound? One flip among 4 samples is 25%: below
        1/bound samples, top-1 agreement is reported, not enforced."""
        return self.top1_samples * bounds["top1"] >= 1 - 1e-9


@dataclass
class AccuracyReport:
    """What the guard measured and did, as it goes into the result and the report."""

    requested: str
    source: str
    holdout_batches: int
    samples: int
    tolerance: dict[str, float]
    metrics: Metrics | None = None
    fits: bool = True
    segments: list[dict] = field(default_factory=list)  # name, precision, added error, ...
    demoted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["tolerance"] = {k: (None if math.isinf(v) else v) for k, v in self.tolerance.items()}
        if self.metrics is not None:
            data.update(data.pop("metrics"))
        return data


def _mean_relative(want: np.ndarray, got: np.ndarray) -> float:
    want, got = want.astype(np.float64), got.astype(np.float64)
    return float(np.mean(np.abs(want - got)) / (np.mean(np.abs(want)) + 1e-12))


def _max_relative(want: np.ndarray, got: np.ndarray) -> float:
    want, got = want.astype(np.float64), got.astype(np.float64)
    return float(np.max(np.abs(want - got)) / (np.max(np.abs(want)) + 1e-12))


def compare(expected: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> Metrics:
    """Metrics over every float output of every batch (worst output)."""
    max_err, mean_err, agree, total = 0.0, 0.0, 0, 0
    per_output: dict[int, tuple[list, list]] = {}
    for want_row, got_row in zip(expected, actual):
        for k, (want, got) in enumerate(zip(want_row, got_row)):
            want, got = np.asarray(want), np.asarray(got)
            if want.dtype.kind != "f" or want.size == 0:
                continue
            per_output.setdefault(k, ([], []))
            per_output[k][0].append(want)
            per_output[k][1].append(got)
    for wants, gots in per_output.values():
        want, got = np.concatenate([w.ravel() for w in wants]), np.concatenate(
            [g.ravel() for g in gots])
        if not np.all(np.isfinite(got) == np.isfinite(want)):
            return Metrics(math.inf, math.inf, 0.0 if wants[0].ndim == 2 else None)
        finite = np.isfinite(want)
        max_err = max(max_err, _max_relative(want[finite], got[finite]))
        mean_err = max(mean_err, _mean_relative(want[finite], got[finite]))
        if wants[0].ndim == 2 and wants[0].shape[1] > 1:
            for w, g in zip(wants, gots):
                agree += int(np.sum(np.argmax(w, 1) == np.argmax(g, 1)))
                total += len(w)
    return Metrics(max_err, mean_err, agree / total if total else None, total)


def _quantized_ops(item: CompiledSegment) -> int | None:
    found = re.search(r"(\d+) FakeQuantize op", item.artifact.log if item.artifact else "")
    return int(found.group(1)) if found else None


def guard(graph_def, init_nodes: list[str], fetches: list[str], compiled: list[CompiledSegment],
          calib: CalibrationSet, backend: Backend, options: CompilerOptions,
          rewrite: Callable[[list[CompiledSegment]], tuple[object, list]],
          recompile: Callable[[SegmentGraph, CompilerOptions], CompiledSegment],
          selection: dict | None = None) -> tuple[list[CompiledSegment], AccuracyReport]:
    """Measure the compiled model against the original on held-out data, demoting the
    worst segments until it fits the bounds. rewrite(compiled) -> (final GraphDef, the
    asset files holding its fused ops' payloads: assets.move_to_assets);
    recompile(segment, options) -> the segment compiled again at other options;
    selection: segment name -> precision.Choice, where timing chose the precision a
    segment starts at (a step down the ladder when it kept bf16)."""
    steps = ladder(options, backend)
    bounds = {**DEFAULT_TOLERANCE, **dict(options.accuracy_tolerance)}
    report = AccuracyReport(steps[0], calib.source, len(calib.holdout), calib.samples, bounds,
                            notes=list(calib.notes))
    compiled = list(compiled)
    selection = selection or {}
    level = {c.segment.name: steps.index(selection[c.segment.name].kept)
             if c.segment.name in selection and selection[c.segment.name].kept in steps else 0
             for c in compiled if c.artifact is not None}
    history: dict[str, list[str]] = {name: [] for name in level}
    ok_segments = [c.segment for c in compiled if c.artifact is not None]
    seg_ref, expected = segment_values(graph_def, init_nodes, ok_segments, calib.holdout,
                                       outputs=True, fetches=tuple(fetches))
    added: dict[str, float] = {}

    def segment_error(item: CompiledSegment) -> float:
        seg = item.segment
        opts = item.options or options
        rows = seg_ref[seg.name]
        n_in = len(seg.inputs)
        want = [r[n_in:] for r in rows]
        got = [backend.run(seg, item.artifact, opts, r[:n_in]) for r in rows]
        return compare(want, got).mean_relative_error

    while True:
        final, files = rewrite(compiled)
        metrics = compare(expected, run_feeds(final, init_nodes, calib.holdout, fetches,
                                              files))
        for item in compiled:
            if item.artifact is not None and item.segment.name not in added:
                added[item.segment.name] = segment_error(item)
        broken = metrics.breaks(bounds)
        report.metrics = metrics
        if metrics.top1_agreement is not None and not metrics.top1_resolves(bounds):
            note = (f"top-1 agreement reported, not enforced: {metrics.top1_samples} held-out "
                    f"samples cannot resolve a bound of {bounds['top1']:g}")
            if note not in report.notes:
                report.notes.append(note)
        if not broken:
            break
        movable = [c for c in compiled if c.artifact is not None
                   and level[c.segment.name] < len(steps) - 1]
        if not movable:
            report.fits = False
            report.notes.append("does not fit the bounds even with every segment at f32 ("
                                + "; ".join(broken) + ")")
            log.warning("accuracy guard: %s, with every segment demoted as far as it goes",
                        "; ".join(broken))
            break
        worst = max(movable, key=lambda c: added.get(c.segment.name, 0.0))
        name = worst.segment.name
        level[name] += 1
        new_level = steps[level[name]]
        log.warning("accuracy guard: %s; demoting segment %s (adds %.3g mean relative "
                    "error) from %s to %s", "; ".join(broken), name, added.get(name, 0.0),
                    steps[level[name] - 1], new_level)
        history[name].append(steps[level[name] - 1])
        redone = recompile(worst.segment, options_at(options, new_level))
        compiled[compiled.index(worst)] = redone
        added.pop(name, None)
        if redone.artifact is None:  # it failed at this precision: TF runs it, in f32
            level[name] = len(steps) - 1
    for item in compiled:
        name = item.segment.name
        if name not in level:
            continue
        precision = steps[level[name]] if item.artifact is not None else "f32 (TensorFlow)"
        if precision == "int8" and _quantized_ops(item) == 0:
            precision = "int8 (nothing quantizable: f32)"
        entry = {"name": name, "precision": precision,
                 "added_mean_relative_error": added.get(name),
                 "quantized_ops": _quantized_ops(item), "demoted_from": history[name]}
        if name in selection:
            entry["selection"] = selection[name].to_json()
        report.segments.append(entry)
    report.demoted = [n for n, h in history.items() if h]
    return compiled, report


def summary_lines(accuracy: dict) -> list[str]:
    """The guard's figures as `fuseflow inspect` and the compile log show them."""
    top1 = accuracy.get("top1_agreement")
    lines = [f"accuracy guard ({accuracy['requested']} requested; {accuracy['holdout_batches']} "
             f"held-out batch(es) from {accuracy['source']}): max relative error "
             f"{accuracy.get('max_relative_error', float('nan')):.3g}, mean "
             f"{accuracy.get('mean_relative_error', float('nan')):.3g}"
             + (f", top-1 agreement {top1:.3f}" if top1 is not None else "")
             + ("" if accuracy["fits"] else " (OUTSIDE the tolerance)")]
    for seg in accuracy["segments"]:
        err = seg["added_mean_relative_error"]
        lines.append(f"  {seg['name']}: {seg['precision']}"
                     + (f", adds {err:.3g} mean relative error" if err is not None else "")
                     + (f", demoted from {' -> '.join(seg['demoted_from'])}"
                        if seg["demoted_from"] else "")
                     + (_selection_line(seg) if seg.get("selection") else ""))
    return lines


def _selection_line(seg: dict) -> str:
    chosen = seg["selection"]
    if seg["demoted_from"]:  # the guard overruled what timing chose
        return f"; timing had chosen {chosen['kept']} ({chosen['reason']})"
    return f"; {chosen['kept']} kept by timing: {chosen['reason']}"


def prepare(plan, segments: list[SegmentGraph], workdir, backend: Backend
            ) -> CalibrationSet | None:
    """Before compiling: the guard's data (None at f32), and for int8 every segment's
    calibration.npz in its work directory, where the compile worker reads it."""
    from fuseflow import errors
    from fuseflow.quantize import calibration_set, write_calibration

    options = plan.options
    if options.quantize == "int8" and backend.name != "openvino":
        raise errors.OptionError(f"--quantize int8 needs the OpenVINO backend, not "
                                 f"{backend.name}: drop --quantize or use --backend openvino")
    if not guarded(options, backend):
        if plan.calibration_data is not None or options.calibration_data is not None:
            log.warning("calibration data is used by --quantize int8 and the accuracy guard "
                        "below f32 only; this compile runs at f32 and ignores it")
        return None
    int8 = options.quantize == "int8"
    calib = calibration_set(plan.model, plan.inputs.shapes, plan.calibration_data,
                            options.calibration_data, plan.inputs.feeds, required=int8)
    if calib is not None and int8:
        write_calibration(plan.graph_def, plan.model.init_nodes, segments, calib, workdir)
    return calib


def check(plan, compiled: list[CompiledSegment], calib: CalibrationSet, workdir,
          backend: Backend, selection: dict | None = None,
          prebuilt: dict[str, CompiledSegment] | None = None
          ) -> tuple[list[CompiledSegment], AccuracyReport]:
    """After compiling: the guard over plan's graph, recompiling demoted segments in
    the same work directory (or taking them from `prebuilt`, segment name -> its
    compile at the options it carries: precision.select's bf16 ones)."""
    from fuseflow.compile import CompileJob, compile_segments
    from fuseflow.rewrite import rewrite_into_assets

    model, graph_def, options = plan.model, plan.graph_def, plan.options
    keep = set(model.fetch_nodes)

    def recompile(segment: SegmentGraph, opts: CompilerOptions) -> CompiledSegment:
        ready = (prebuilt or {}).get(segment.name)
        if ready is not None and ready.options == opts:
            return ready
        redone = compile_segments([CompileJob(backend.name, segment, segment.name)], opts,
                                  workdir)[0]
        return dataclasses.replace(redone, options=opts)

    # Each candidate as the saved model holds it: blobs and fallbacks in files, not copied
    # into a graph that TF then copies again (ResNet50 int8: 100 MB of fallback weights).
    with tempfile.TemporaryDirectory(prefix="fuseflow-guard-") as folder:
        compiled, report = guard(
            graph_def, model.init_nodes, [s.tensor_name for s in model.outputs], compiled,
            calib, backend, options,
            lambda c: rewrite_into_assets(graph_def, c, options, keep, Path(folder)),
            recompile, selection)
    from fuseflow.logs import shown_info

    with shown_info():
        for line in summary_lines(report.to_json()):
            log.info("%s", line)
    return compiled, report
