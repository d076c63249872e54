"""Stage 5a: under --quantize int8, int8 or bf16 per segment, by timing.

INT8 is not faster everywhere. On a CPU with AVX-512 bf16 and VNNI, EfficientNetB0
(depthwise convolutions, swish and squeeze-excite multiplies between them) ran at
8.83 ms in int8 and 7.17 ms in bf16 at batch 1, while MobileNetV2 and ResNet50 ran
faster in int8. OpenVINO's per-layer counters (PERF_COUNT) on EfficientNetB0 b1:
its depthwise convolutions ran slower in int8 than in bf16 (3.8 vs 3.0 ms in all),
its 1x1 convolutions only ~15% faster; NNCF's options did not help (depthwise left
out of quantization: Reorders around them, 14.3 ms; preset MIXED: 12.7 ms; bf16
12.6, int8 11.7 ms in that run). Once NNCF quantized the fused model (Swish kept
whole, see openvino._fused) and the rest ran at bf16, int8 and bf16 came within 1%
at batch 1 and int8 was 14% faster at batch 8. So with profiling on (the default),
every int8 segment is compiled at bf16 too (the next step of the accuracy ladder, beside the
int8 compile), both are timed as they will run
(timing.py: the fused node in a TF session, on the segment's first calibration
batch, warmed up, then int8 and bf16 called in turn, call by call, the median of
each), and int8 stays only when it is faster by INT8_MARGIN. The
accuracy guard then starts from the chosen precisions (a segment kept at bf16 can
still be demoted to f32) and reuses the bf16 artifacts compiled here when it demotes
an int8 segment. --no-profile keeps every segment at int8 untimed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fuseflow.accuracy import options_at
from fuseflow.cache import CompileCache, timing_key, values_digest
from fuseflow.compile import CompiledSegment, CompileJob, compile_segments
from fuseflow.logs import shown_info
from fuseflow.options import CompilerOptions
from fuseflow.quantize import read_calibration
from fuseflow.timing import TimingJob, prestart, time_jobs

log = logging.getLogger("fuseflow")

INT8_MARGIN = 0.03  # int8 must be this much faster than bf16 to be kept: bf16 is closer
ALTERNATIVE = "bf16"


@dataclass
class Choice:
    """Which precision a segment keeps and why, as the report shows it."""

    kept: str  # "int8" or "bf16"
    reason: str
    int8_ms: float | None = None
    bf16_ms: float | None = None
    tf_ms: float | None = None  # the segment's own TF ops, timed in turn with the two
    source: str | None = None  # "cache": the timings are an earlier compile's (cache.py)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        for key in ("source", "tf_ms"):
            if data[key] is None:
                del data[key]
        return data


def decide(int8_ms: float, bf16_ms: float, margin: float = INT8_MARGIN) -> Choice:
    """int8 if it is faster than bf16 by `margin`, else bf16."""
    figures = f"{int8_ms:.3g} ms vs {bf16_ms:.3g} ms per call"
    if int8_ms <= bf16_ms * (1 - margin):
        return Choice("int8", f"int8 faster than bf16: {figures}", int8_ms, bf16_ms)
    if int8_ms <= bf16_ms:
        return Choice("bf16", f"int8 not faster than bf16 by {margin:.0%}: {figures}",
                      int8_ms, bf16_ms)
    return Choice("bf16", f"int8 slower than bf16: {figures}", int8_ms, bf16_ms)


def alternative_job(job: CompileJob, options: CompilerOptions) -> CompileJob:
    """The bf16 compile of an int8 job, in its own directory: compiled beside the int8
    one (compile_segments runs them side by side), for select()."""
    return CompileJob(job.backend, job.segment, f"{job.directory}.{ALTERNATIVE}",
                      options_at(options, ALTERNATIVE))


def select(compiled: list[CompiledSegment], options: CompilerOptions, workdir: Path,
           ready: dict[str, CompiledSegment] | None = None
           ) -> tuple[list[CompiledSegment], dict[str, Choice], dict[str, CompiledSegment]]:
    """Time every compiled int8 segment against its bf16 compile and keep the faster.
    ready: segment name -> its bf16 compile (alternative_job) where already made.

    Returns the segments (bf16 ones where bf16 won, with their own options), the
    choice per segment name, and the bf16 compiles by segment name (for the guard)."""
    int8 = [c for c in compiled if c.artifact is not None]
    if not int8:
        return compiled, {}, {}
    bf16_options = options_at(options, ALTERNATIVE)
    prestart()  # the timing process imports TF while any bf16 candidate compiles
    started = time.monotonic()
    ready = dict(ready or {})
    todo = [c for c in int8 if c.segment.name not in ready]
    for c, r in zip(todo, compile_segments(
            [alternative_job(CompileJob(c.backend, c.segment, c.segment.name), options)
             for c in todo], options, workdir)):
        ready[c.segment.name] = r
    alternatives = {name: dataclasses.replace(r, options=bf16_options)
                    for name, r in ready.items() if r.artifact is not None}
    cache = CompileCache.for_options(options)
    jobs, keys, stored = [], {}, {}
    for item in int8:
        name = item.segment.name
        other = alternatives.get(name)
        batches = read_calibration(workdir / name)
        if other is None or not batches:
            continue
        keys[name] = timing_key("int8 or bf16", cache.key(item.backend, item.segment, options),
                                cache.key(other.backend, other.segment, bf16_options),
                                values_digest(batches[0]))
        entry = _stored(cache.lookup_timings(keys[name], f"int8 or bf16 of {name}"))
        if entry is not None:
            stored[name] = entry
            continue
        for level, c, opts in (("int8", item, options), (ALTERNATIVE, other, bf16_options)):
            jobs.append(TimingJob(f"{name}.{level}", c.backend, c.segment, c.artifact,
                                  batches[0], opts, level, in_flight=False, group=name,
                                  blob_file=c.executable_file, segment_file=c.segment_file))
        # TF too: a one-segment model then needs no whole-model timing process (10 s of
        # a 32 s MobileNetV2 int8 compile), as with placement's timings.
        jobs.append(TimingJob(f"{name}.tf", None, item.segment, None, batches[0],
                              in_flight=False, group=name, segment_file=item.segment_file))
    compiled_at = time.monotonic()
    timings, failures = time_jobs(jobs, options, options.profile_budget_s, workdir)
    for name, key in keys.items():
        sides = [timings.get(f"{name}.{level}") for level in ("int8", ALTERNATIVE)]
        if name not in stored and None not in sides:
            tf_side = timings.get(f"{name}.tf")
            cache.store_timings(key, {"int8_ms": sides[0].latency_ms,
                                      "bf16_ms": sides[1].latency_ms,
                                      "tf_ms": tf_side and tf_side.latency_ms})
    log.info("int8 or bf16: %d segment(s) compiled at bf16 in %.1f s (more beside the int8 "
             "compiles), timed in %.1f s%s", len(alternatives), compiled_at - started,
             time.monotonic() - compiled_at,
             f"; {len(stored)} segment(s)' timings from the compile cache" if stored else "")
    choices: dict[str, Choice] = {}
    out = []
    for item in compiled:
        name = item.segment.name
        if item.artifact is None:
            out.append(item)
            continue
        if name in stored:
            int8_ms, bf16_ms, tf_ms = stored[name]
            choice = dataclasses.replace(decide(int8_ms, bf16_ms), tf_ms=tf_ms, source="cache")
        else:
            choice = _choice(name, alternatives.get(name), timings, failures, ready.get(name))
        choices[name] = choice
        with shown_info():
            log.info("segment %s: %s kept (%s)", name, choice.kept, choice.reason)
        out.append(alternatives[name] if choice.kept == ALTERNATIVE else item)
    return out, choices, alternatives


def _stored(entry: dict | None) -> tuple[float, float, float | None] | None:
    """A stored int8-or-bf16 timing entry's (int8_ms, bf16_ms, tf_ms); None if it holds
    less (tf_ms may be None: TF's side did not run)."""
    try:
        tf_ms = entry.get("tf_ms") if entry is not None else None
        return (round(float(entry["int8_ms"]), 4), round(float(entry["bf16_ms"]), 4),
                None if tf_ms is None else round(float(tf_ms), 4)
                ) if entry is not None else None
    except (KeyError, TypeError, ValueError) as e:
        log.debug("compile cache: ignoring an int8-or-bf16 timing entry that lacks parts (%s)",
                  e)
        return None


def _choice(name: str, other: CompiledSegment | None, timings, failures,
            attempt: CompiledSegment | None) -> Choice:
    if other is None:
        why = attempt.error if attempt is not None else "not compiled"
        return Choice("int8", f"{ALTERNATIVE} failed to compile ({why}): int8 kept untimed")
    sides = {}
    for level in ("int8", ALTERNATIVE):
        key = f"{name}.{level}"
        if key not in timings:
            return Choice("int8", f"not timed ({failures.get(key, 'no calibration batch')}): "
                          "int8 kept")
        sides[level] = round(timings[key].latency_ms, 4)
    tf_side = timings.get(f"{name}.tf")
    return dataclasses.replace(decide(sides["int8"], sides[ALTERNATIVE]),
                               tf_ms=tf_side and round(tf_side.latency_ms, 4))


def figures_against_tf(choices: dict[str, Choice], final: dict[str, str]) -> dict[str, dict]:
    """Segment name -> its timing against TF, in placement's form, where the precision the
    segment ended at (final: name -> precision, after the accuracy guard) was timed."""
    out = {}
    for name, choice in choices.items():
        ms = {"int8": choice.int8_ms, ALTERNATIVE: choice.bf16_ms}.get(final.get(name))
        if ms is None or choice.tf_ms is None:
            continue
        out[name] = {"latency_ms": ms, "tf_latency_ms": choice.tf_ms,
                     "speedup": round(choice.tf_ms / max(ms, 1e-9), 3),
                     "timed_by": "int8 or bf16"}
        if choice.source == "cache":
            out[name]["source"] = "cache"
    return out
