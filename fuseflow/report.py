"""Counts, reasons and OnNeuronRatio: what was compiled, what was not, and why."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

from fuseflow.compile import CompiledSegment
from fuseflow.graph_util import count_ops
from fuseflow.reasons import Reason

log = logging.getLogger("fuseflow")

LOW_RATIO = 0.3


@dataclass
class SegmentReport:
    name: str
    backend: str
    compiled: bool
    node_count: int
    op_types: list[str]
    inputs: list[dict]
    outputs: list[dict]
    artifact_bytes: int
    compile_seconds: float
    error: str | None = None


@dataclass
class CompileReport:
    backend: str
    num_ops_original: int
    num_ops_optimized: int
    num_ops_on_backend: int
    segments: list[SegmentReport] = field(default_factory=list)
    # op type -> reason -> count, for every op left in TensorFlow
    not_compiled: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.num_ops_on_backend / self.num_ops_optimized if self.num_ops_optimized else 0.0

    def result(self) -> dict:
        """The dict compile() returns: the reference's key plus the counts behind it."""
        compiled = [s for s in self.segments if s.compiled]
        return {
            "OnNeuronRatio": self.ratio,
            "num_ops_original": self.num_ops_original,
            "num_ops_optimized": self.num_ops_optimized,
            "num_ops_on_backend": self.num_ops_on_backend,
            "num_segments": len(compiled),
            "num_segments_failed": len(self.segments) - len(compiled),
            "backend": self.backend,
            "ops_per_backend": {self.backend: self.num_ops_on_backend},
        }

    def to_json(self) -> dict:
        return {**self.result(), "segments": [asdict(s) for s in self.segments],
                "not_compiled": self.not_compiled}


def _ports(ports) -> list[dict]:
    from fuseflow.tf_compat import tf

    return [{"name": p.name, "dtype": tf.dtypes.as_dtype(p.dtype).name, "shape": list(p.shape),
             "batch_axis": p.batch_axis} for p in ports]


def build_report(backend: str, num_ops_original: int, graph_def, excluded: dict[str, Reason],
                 compiled: list[CompiledSegment]) -> CompileReport:
    op_of = {n.name: n.op for n in graph_def.node}
    segments, on_backend = [], 0
    not_compiled: dict[str, Counter] = {}
    for item in compiled:
        seg = item.segment
        ok = item.artifact is not None
        segments.append(SegmentReport(
            name=seg.name, backend=backend, compiled=ok, node_count=seg.node_count,
            op_types=list(seg.op_types), inputs=_ports(seg.inputs), outputs=_ports(seg.outputs),
            artifact_bytes=len(item.artifact.executable) if ok else 0,
            compile_seconds=round(item.seconds, 3), error=item.error))
        if ok:
            on_backend += seg.node_count
        else:
            reason = f"{Reason.COMPILE_FAILED.value}: {item.error}"
            for name in seg.node_names:
                not_compiled.setdefault(op_of[name], Counter())[reason] += 1
    for name, reason in excluded.items():
        if reason is not Reason.STRUCTURAL:
            not_compiled.setdefault(op_of[name], Counter())[reason.value] += 1
    return CompileReport(
        backend=backend, num_ops_original=num_ops_original,
        num_ops_optimized=count_ops(graph_def), num_ops_on_backend=on_backend,
        segments=segments,
        not_compiled={op: dict(c) for op, c in sorted(not_compiled.items())})


def log_report(report: CompileReport) -> None:
    """The reference's three lines, the segments, and what stayed in TF and why."""
    log.info("Number of operations in TensorFlow session: %d", report.num_ops_original)
    log.info("Number of operations after fuseflow optimizations: %d", report.num_ops_optimized)
    log.info("Number of operations placed on %s: %d (OnNeuronRatio %.3f)", report.backend,
             report.num_ops_on_backend, report.ratio)
    for s in report.segments:
        state = "compiled" if s.compiled else f"FAILED ({s.error})"
        log.info("  %s: %d ops, %d in / %d out, %s, %.1f s", s.name, s.node_count,
                 len(s.inputs), len(s.outputs), state, s.compile_seconds)
    if report.not_compiled:
        parts = [f"{op} ({', '.join(f'{n} {r}' for r, n in reasons.items())})"
                 for op, reasons in report.not_compiled.items()]
        log.info("Op types not compiled: %s", "; ".join(parts))
    if report.num_ops_optimized and report.ratio < LOW_RATIO:
        log.warning(
            "only %.0f%% of the operations were compiled, which is probably not what you "
            "want. Most common causes: %s", 100 * report.ratio, _top_causes(report))


def _top_causes(report: CompileReport) -> str:
    totals: Counter = Counter()
    for op, reasons in report.not_compiled.items():
        for reason, n in reasons.items():
            totals[(op, reason)] += n
    advice = {
        Reason.UNKNOWN_SHAPE.value: "pass model_feed_dict or model_shape_feed_dict",
        Reason.NO_FUSE_OPS.value: "remove these names from no_fuse_ops",
        Reason.SMALL_SEGMENT.value: "lower minimum_segment_size",
        Reason.UPSTREAM_OF_INPUT.value: "choose a signature whose inputs come earlier",
    }
    items = []
    for (op, reason), n in totals.most_common(3):
        hint = advice.get(reason, "")
        items.append(f"{n} x {op}: {reason}" + (f" ({hint})" if hint else ""))
    return "; ".join(items) or "no ops the backend supports"
