"""Stage 4b: which backend runs each part of the graph, or TensorFlow: timed, not guessed.

Neither backend wins everywhere on a CPU: OpenVINO runs convolutions and
attention fastest, XLA runs loops (Keras RNNs) fastest, and a small segment
can be slower than the TF ops it replaces. So placement works in two sizes:

- regions: maximal clusters of nodes that some backend takes;
- pieces: a region cut where the preferred backend changes (loops prefer XLA,
  everything else OpenVINO, a node only one backend takes goes there).

Each region is compiled whole by every backend that takes all of it, and its
pieces by their preferred backends. All are timed against TensorFlow
(timing.py), and each region gets the fastest of: TF, whole on one backend,
or its pieces each on its backend (or TF). The final partition then clusters
nodes by the backend chosen for them, so a loop on XLA can sit between
convolutions on OpenVINO. Without profiling (--no-profile), by_kind places
each node on its preferred backend, a region whose only heavy ops are loops
whole on the loop's backend.

One candidate is ruled out without timing it: a region with convolutions and
no loop is not compiled whole on XLA. XLA:CPU's convolutions are slow (its
depthwise 3x3 runs ~65x slower than TF's), so XLA does not win such a region
from OpenVINO, and trying costs an XLA compile, a check and a timing that
each pay XLA's JIT compile (ResNet50 b1: 43 s, where OpenVINO's candidate took
30 s, of a 123 s compile()). The region is still timed on OpenVINO against
TF: TF keeps it when it is faster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fuseflow.backends.base import random_inputs
from fuseflow.batch import run_graph
from fuseflow.cache import CompileCache, canonical, timing_key
from fuseflow.compile import CompiledSegment, CompileJob, cache_keys, compile_segments
from fuseflow.extract import consumers_outside
from fuseflow.logs import shown_info
from fuseflow.options import CompilerOptions
from fuseflow.partition import Partition, Segment, internal_groups
from fuseflow.reasons import Reason
from fuseflow.tf_compat import tf
from fuseflow.timing import Timing, TimingJob, prestart, time_jobs

log = logging.getLogger("fuseflow")

LOOP_OPS = frozenset({"While", "StatelessWhile"})
LOOP_BACKEND = "xla"  # measured: XLA runs Keras RNN loops 2-4x faster than OpenVINO
# What OpenVINO runs much faster than XLA on a CPU: a region with a loop and none of
# these goes to the loop's backend whole, not cut into small pieces around the loop.
OPENVINO_KINDS = frozenset({"Conv2D", "Conv3D", "DepthwiseConv2dNative",
                            "Conv2DBackpropInput", "Conv3DBackpropInputV2", "BatchMatMul",
                            "BatchMatMulV2", "BatchMatMulV3", "Einsum"})
# What XLA:CPU runs far slower than OpenVINO: a region holding one and no loop is not
# timed whole on XLA (see the module docstring).
CONVOLUTION_KINDS = frozenset(k for k in OPENVINO_KINDS if "Conv" in k)
# Within this fraction, the option with fewer segments wins: timing noise is not a reason
# to cut a region.
_TIE = 0.05
# A compiled segment must beat TF one call at a time by this much: a smaller gain is
# within the noise of timing a sub-millisecond segment on a busy machine. It narrows that
# noise, it does not remove it (seen: a 0.3 ms model timed 7% faster compiled at compile
# time and 8% slower when benchmarked after).
_MARGIN = 0.05
# A compiled segment may run this much slower than TF with calls in flight, for its gain
# one call at a time, before TF keeps it.
_IN_FLIGHT_SLACK = 1.25

Partitioner = Callable[[dict, dict | None], Partition]


@dataclass
class Placement:
    """The final segments, each coloured with its backend, and what was learned."""

    partition: Partition
    compiled: dict[tuple[frozenset, str], CompiledSegment] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)  # node -> why TF keeps it
    timings: dict[frozenset, dict] = field(default_factory=dict)  # nodes -> figures
    summary: dict = field(default_factory=dict)
    timing_key: str | None = None  # the compile cache's key of its timings (cache.py)


def preferred_backends(graph_def, supports: dict[str, dict], force: frozenset[str],
                       internal: set[str]) -> dict[str, str]:
    """node -> the backend it should run on by kind, for every node some backend takes."""
    names = list(supports)
    ops = {n.name: n.op for n in graph_def.node}
    prefer: dict[str, str] = {}
    for name, op in ops.items():
        takers = [b for b in names if supports[b].get(name) is None]
        if not takers and name in force:
            takers = names[:1]
        if not takers:
            continue
        prefer[name] = LOOP_BACKEND if op in LOOP_OPS and LOOP_BACKEND in takers else takers[0]
    # A loop's TensorLists never cross a segment boundary: its group follows the loop.
    for group in internal_groups(graph_def, internal):
        loops = [n for n in group if ops.get(n) in LOOP_OPS and n in prefer]
        first = sorted(group)[0]
        colour = prefer[loops[0]] if loops else prefer.get(first)
        for name in group:
            if colour is not None and name in prefer and (
                    supports[colour].get(name) is None or name in force):
                prefer[name] = colour
    return prefer


def _union(graph_def, supports: dict[str, dict], prefer: dict[str, str]) -> dict:
    """Support for the partitioner: a node some backend takes is taken; otherwise the
    first backend's reason."""
    first = supports[next(iter(supports))]
    return {n.name: None if n.name in prefer else first.get(n.name) for n in graph_def.node}


def by_kind(graph_def, supports: dict[str, dict], prefer: dict[str, str],
            force: frozenset[str], partition: Partitioner) -> Partition:
    """Placement without timing: each node on its preferred backend, except that a region
    whose only heavy ops are loops goes whole to the loop's backend (the embedding and the
    dense head of an RNN are not worth their own segments)."""
    union = _union(graph_def, supports, prefer)
    colour = dict(prefer)
    if LOOP_BACKEND in supports and len(supports) > 1:
        ops = {n.name: n.op for n in graph_def.node}
        for region in partition(union, None).segments:
            kinds = {ops[n] for n in region.nodes}
            if kinds & LOOP_OPS and not kinds & OPENVINO_KINDS and all(
                    supports[LOOP_BACKEND].get(n) is None or n in force for n in region.nodes):
                colour.update(dict.fromkeys(region.nodes, LOOP_BACKEND))
    return partition(union, colour)


def place(graph_def, supports: dict[str, dict], prefer: dict[str, str],
          partition: Partitioner, options: CompilerOptions, force: frozenset[str],
          extract: Callable[[Segment, dict], object], feed_values: Callable[[list], dict],
          workdir: Path, values_key: str = "") -> Placement:
    """Choose a backend (or TF) for every part of the graph by timing; see the module
    docstring. (Without profiling, by_kind places.)

    partition(support, colour) runs the partitioner with the caller's fixed options;
    extract(segment, consumers) cuts a segment out; feed_values(tensors) gives the
    original model's values of those tensors on the compile inputs (or {}); values_key
    names those inputs (cache.values_digest) for the compile cache, which keeps the
    timings: an unchanged model recompiled on this machine reuses them, untimed."""
    names = list(supports)
    union = _union(graph_def, supports, prefer)
    ops = {n.name: n.op for n in graph_def.node}
    started = time.monotonic()
    regions = partition(union, None)
    region_of = {n: s.name for s in regions.segments for n in s.nodes}
    pieces = partition(union, {n: f"{region_of.get(n)}/{b}" for n, b in prefer.items()})
    candidates: list[tuple[str, str, Segment]] = []  # (key, backend, segment)
    plans = []
    for region in regions.segments:
        nodes = set(region.nodes)
        whole = [b for b in names
                 if all(supports[b].get(n) is None or n in force for n in nodes)]
        whole = _worth_timing(whole, {ops[n] for n in nodes})
        inside = [p for p in pieces.segments if set(p.nodes) <= nodes]
        split = [] if len(inside) == 1 and set(inside[0].nodes) == nodes else inside
        plans.append((region, whole, split))
        for b in whole:
            candidates.append((f"{region.name}.{b}", b, region))
        for k, piece in enumerate(split):
            candidates.append((f"{region.name}.piece{k}.{piece.colour.split('/')[1]}",
                               piece.colour.split("/")[1], piece))

    graphs = {}
    for key, _, seg in candidates:
        consumers = consumers_outside(graph_def, dict.fromkeys(seg.nodes, key))
        graphs[key] = dataclasses.replace(extract(seg, consumers), name=key)
    jobs = [CompileJob(b, graphs[key], f"placement/{key}") for key, b, _ in candidates]
    artifact_keys = cache_keys(jobs, options)
    cache = CompileCache.for_options(options)
    timings_key = _timing_key(graph_def, candidates, graphs, artifact_keys, names, values_key)
    stored = _stored_timings(cache.lookup_timings(timings_key, "placement"))
    compiled: dict[str, CompiledSegment] = {}
    if stored is None:
        prestart()  # the timing process imports TF while the candidates compile
        compiled = {k: c for (k, _, _), c in zip(candidates, compile_segments(
            jobs, options, workdir, artifact_keys))}
        timings, failures = _time_candidates(candidates, graphs, compiled, feed_values,
                                             options, workdir)
        if not any(_transient(c.error) for c in compiled.values() if c.error) and not any(
                _transient(why) for why in failures.values()):
            cache.store_timings(timings_key, {
                "timings": {k: dataclasses.asdict(t) for k, t in timings.items()},
                "failures": failures, "seconds": round(time.monotonic() - started, 2)})
    else:
        timings, failures, timed_s = stored
    for k, why in failures.items():
        log.info("placement: %s not timed: %s", k, why)

    colour: dict[str, str] = {}
    details: dict[str, str] = {}
    decisions = []
    figures: dict[frozenset, dict] = {}
    for region, whole, split in plans:
        choice = _decide(region, whole, split, timings, prefer, force, options)
        decisions.append(choice.summary)
        for seg, backend, figure in choice.parts:
            figures[frozenset(seg.nodes)] = figure
            for n in seg.nodes:
                if backend is None:
                    details[n] = figure["detail"]
                else:
                    colour[n] = backend
    support = {n: (None if n in colour else Reason.SLOWER_THAN_TF if n in details
                   else union.get(n)) for n in union}
    final = partition(support, colour)
    source = "measured" if stored is None else "cache"
    if stored is not None:
        # Only the candidates that became segments are needed: from the artifact cache.
        wanted = {(frozenset(s.nodes), s.colour) for s in final.segments}
        chosen = [i for i, (_, b, seg) in enumerate(candidates)
                  if (frozenset(seg.nodes), b) in wanted]
        compiled = {candidates[i][0]: c for i, c in zip(chosen, compile_segments(
            [jobs[i] for i in chosen], options, workdir, [artifact_keys[i] for i in chosen]))}
        for figure in figures.values():
            if figure:
                figure["source"] = source
    reuse = {(frozenset(seg.nodes), b): compiled[k] for k, b, seg in candidates
             if k in compiled and compiled[k].artifact is not None}
    seconds = time.monotonic() - started
    with shown_info():
        if stored is None:
            log.info("placement: %d candidate segments compiled and timed against TensorFlow "
                     "in %.1f s (--no-profile skips this)", len(candidates), seconds)
        else:
            log.info("placement: timings of %d candidate segments taken from the compile "
                     "cache (timed by an earlier compile in %.1f s; --retime times them "
                     "again)", len(candidates), timed_s)
    return Placement(final, reuse, details, figures, {
        "mode": "timed", "backends": names, "seconds": round(seconds, 2),
        "candidates": len(candidates), "source": source, "regions": decisions}, timings_key)


def _timing_key(graph_def, candidates: list[tuple[str, str, Segment]], graphs: dict,
                artifact_keys: list[str], backends: list[str], values_key: str) -> str:
    """What placement's timings depend on: each candidate (its artifact key: its graph,
    ports, backend and options), the model's tensors that feed it, the nodes outside every
    candidate (they compute those tensors), the model's input values, the backends tried."""
    inside = {n for _, _, seg in candidates for n in seg.nodes}
    outside = tf.compat.v1.GraphDef(library=graph_def.library)
    outside.node.extend(node for node in graph_def.node if node.name not in inside)
    outside = hashlib.sha256(canonical(outside))
    shown = [(k, b, sorted(seg.nodes), a, list(graphs[k].input_sources))
             for (k, b, seg), a in zip(candidates, artifact_keys)]
    return timing_key("placement", backends, shown, outside.hexdigest(), values_key)


def _stored_timings(entry: dict | None) -> tuple[dict[str, Timing], dict[str, str], float] | None:
    """A placement timing entry's timings, failures and seconds; None if it holds less."""
    if entry is None:
        return None
    try:
        timings = {k: Timing(float(t["latency_ms"]), float(t["in_flight_ms"]), int(t["runs"]))
                   for k, t in entry["timings"].items()}
        failures = {str(k): str(v) for k, v in entry["failures"].items()}
        return timings, failures, float(entry["seconds"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        log.debug("compile cache: ignoring a placement timing entry that lacks parts (%s)", e)
        return None


def _transient(why: str) -> bool:
    """A failure that may not happen again (a timeout, a dead process, the budget spent):
    timings that miss a candidate for one of these are not kept."""
    return any(word in why for word in ("timed out", "died", "budget"))


def _time_candidates(candidates: list[tuple[str, str, Segment]], graphs: dict,
                     compiled: dict[str, CompiledSegment], feed_values, options: CompilerOptions,
                     workdir: Path) -> tuple[dict[str, Timing], dict[str, str]]:
    """Every compiled candidate and the TF ops it replaces, timed on the model's values."""
    values = feed_values(sorted({t for g in graphs.values() for t in g.input_sources}))
    timing_jobs, seen_tf = [], set()
    for key, backend, seg in candidates:
        graph = graphs[key]
        inputs = [values[t] if t in values else v
                  for t, v in zip(graph.input_sources, random_inputs(graph))]
        tf_key = _tf_key(seg)
        done = compiled[key]
        if tf_key not in seen_tf:
            seen_tf.add(tf_key)
            timing_jobs.append(TimingJob(tf_key, None, graph, None, inputs,
                                         segment_file=done.segment_file))
        if done.artifact is not None:
            timing_jobs.append(TimingJob(key, backend, graph, done.artifact, inputs,
                                         blob_file=done.executable_file,
                                         segment_file=done.segment_file))
    return time_jobs(timing_jobs, options, options.profile_budget_s, workdir)


def _worth_timing(whole: list[str], kinds: set[str]) -> list[str]:
    """The backends worth compiling a region on whole: XLA is left out for convolutions
    (no loop), where OpenVINO takes the region too (module docstring)."""
    if (LOOP_BACKEND in whole and len(whole) > 1 and kinds & CONVOLUTION_KINDS
            and not kinds & LOOP_OPS):
        return [b for b in whole if b != LOOP_BACKEND]
    return whole


def _tf_key(seg: Segment) -> str:
    return f"{seg.name}.tf" if seg.colour is None else f"{seg.name}.{seg.colour}.tf"


@dataclass
class _Choice:
    parts: list[tuple[Segment, str | None, dict]]  # (nodes, backend or None for TF, figures)
    summary: dict


def _figure(timings: dict[str, Timing], key: str, tf_key: str) -> dict | None:
    if key not in timings or tf_key not in timings:
        return None
    mine, theirs = timings[key], timings[tf_key]
    return {"latency_ms": round(mine.latency_ms, 4), "tf_latency_ms": round(theirs.latency_ms, 4),
            "in_flight_ms": round(mine.in_flight_ms, 4),
            "tf_in_flight_ms": round(theirs.in_flight_ms, 4),
            "speedup": round(theirs.latency_ms / max(mine.latency_ms, 1e-9), 3)}


def _beats_tf(figure: dict) -> bool:
    return (figure["latency_ms"] < figure["tf_latency_ms"] * (1 - _MARGIN)
            and figure["in_flight_ms"] <= figure["tf_in_flight_ms"] * _IN_FLIGHT_SLACK)


def _slower_detail(figure: dict | None, backend: str) -> str:
    if figure is None:
        return f"{backend}: not timed"
    return (f"{backend} {figure['latency_ms']:.3g} ms vs TF {figure['tf_latency_ms']:.3g} ms "
            f"per call; {figure['in_flight_ms']:.3g} vs {figure['tf_in_flight_ms']:.3g} ms "
            f"with calls in flight")


def _decide(region: Segment, whole: list[str], split: list[Segment], timings,
            prefer: dict[str, str], force: frozenset[str], options: CompilerOptions
            ) -> _Choice:
    """The fastest of TF, the region whole on one backend, or its pieces."""
    keep_anyway = options.must_compile or any(n in force for n in region.nodes)
    tf_key = _tf_key(region)
    tf_ms = timings[tf_key].latency_ms if tf_key in timings else None
    options_ms: list[tuple[float, int, list]] = []  # (ms, segments, parts)
    tried: dict[str, float | None] = {}
    for b in whole:
        figure = _figure(timings, f"{region.name}.{b}", tf_key)
        tried[b] = figure and figure["latency_ms"]
        if figure is not None and (keep_anyway or _beats_tf(figure)):
            options_ms.append((figure["latency_ms"], 1, [(region, b, figure)]))
    if split:
        total, parts, ok = 0.0, [], True
        for k, piece in enumerate(split):
            b = piece.colour.split("/")[1]
            figure = _figure(timings, f"{region.name}.piece{k}.{b}", _tf_key(piece))
            piece_tf = timings.get(_tf_key(piece))
            if figure is not None and (keep_anyway or _beats_tf(figure)):
                total += figure["latency_ms"]
                parts.append((piece, b, figure))
            elif piece_tf is not None:
                total += piece_tf.latency_ms
                parts.append((piece, None, {**(figure or {}),
                                            "detail": _slower_detail(figure, b)}))
            else:
                ok = False
        if ok and tf_ms is not None:
            inside = sum(timings[_tf_key(p)].latency_ms for p in split)
            total += max(0.0, tf_ms - inside)  # nodes of the region in no piece stay in TF
            options_ms.append((total, sum(1 for p in parts if p[1]), parts))
            tried["split: " + ", ".join(b or "tensorflow" for _, b, _ in parts)] = round(
                total, 4)
    summary = {"region": region.name, "ops": region.size, "tf_ms": tf_ms, "tried_ms": tried}
    if not options_ms:
        if tf_ms is None:
            # Nothing could be timed: the preferred backends, as without profiling.
            parts = [(p, p.colour.split("/")[1], {}) for p in split] or [
                (region, whole[0] if whole else prefer.get(region.nodes[0]), {})]
            summary["chosen"] = "not timed: " + ", ".join(sorted({b for _, b, _ in parts}))
            return _Choice(parts, summary)
        backend = whole[0] if whole else prefer.get(region.nodes[0])
        figure = _figure(timings, f"{region.name}.{backend}", tf_key)
        summary["chosen"] = "tensorflow"
        return _Choice([(region, None, {**(figure or {}),
                                        "detail": _slower_detail(figure, backend)})], summary)
    best = min(ms for ms, _, _ in options_ms)
    near = [o for o in options_ms if o[0] <= best * (1 + _TIE)]
    ms, _, parts = min(near, key=lambda o: (o[1], o[0]))
    summary.update(chosen=", ".join(sorted({b or "tensorflow" for _, b, _ in parts})),
                   ms=round(ms, 4), segments=len([p for p in parts if p[1]]))
    return _Choice(parts, summary)


def feed_value_function(graph_def, model, input_values: dict[str, np.ndarray]):
    """tensors -> their values when the optimized graph runs on input_values ({} when the
    model can't run on them: the caller falls back to random values)."""
    def values(tensors: list[str]) -> dict[str, np.ndarray]:
        if not tensors or not input_values:
            return {}
        if set(tensors) <= set(input_values):  # segments read only the model's inputs
            return {t: input_values[t] for t in tensors}
        got = run_graph(graph_def, model.init_nodes, input_values, tensors)
        if got is None:
            log.info("placement times segments on random inputs: the model did not run on "
                     "synthesized inputs")
            return {}
        return dict(zip(tensors, got))

    return values
