"""Counts, reasons and OnNeuronRatio: what was compiled, what was not, and why.

The report is built once after compiling, logged as tables, and written as
JSON into the compiled model; `fuseflow inspect` prints the same tables from
that JSON, so every formatting function here works on the JSON form.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field

from fuseflow.compile import CompiledSegment
from fuseflow.graph_util import count_ops, node_name
from fuseflow.reasons import Reason

log = logging.getLogger("fuseflow")

LOW_RATIO = 0.3
REPORT_FILE = "fuseflow_report.json"
_EXAMPLE_NODES = 3  # node names kept per not-compiled row: enough to find them
_MAX_SOURCES = 8  # unknown-shape sources tracked per tensor: bounds the cost on huge graphs


@dataclass
class SegmentReport:
    name: str
    backend: str
    compiled: bool
    node_count: int
    op_types: dict[str, int]  # op type -> nodes, most frequent first
    inputs: list[dict]
    outputs: list[dict]
    artifact_bytes: int
    compile_seconds: float
    error: str | None = None
    timing: dict | None = None  # measured against TF at compile time (place.py)
    cached: bool = False  # taken from the compile cache, not compiled
    timings: dict[str, float] = field(default_factory=dict)  # the worker's steps, seconds


@dataclass
class NotCompiled:
    """All nodes of one op type left in TensorFlow for one reason."""

    op_type: str
    reason: Reason
    count: int
    nodes: list[str]  # a few of them, to find in the graph
    detail: str | None = None  # COMPILE_FAILED: the compiler's first error line

    def to_json(self) -> dict:
        return {**asdict(self), "reason": self.reason.value, "code": self.reason.name}


@dataclass
class UnknownShape:
    """A tensor whose shape static inference could not fix, where unknown shapes start."""

    tensor: str
    dtype: str
    shape: list[int | None] | None  # None: unknown rank
    ops: int  # ops kept in TF because their shapes depend on this tensor


@dataclass
class CompileReport:
    backend: str
    num_ops_original: int
    num_ops_optimized: int
    num_ops_on_backend: int
    segments: list[SegmentReport] = field(default_factory=list)
    not_compiled: list[NotCompiled] = field(default_factory=list)  # most ops first
    unknown_shapes: list[UnknownShape] = field(default_factory=list)  # costliest first
    dynamic_batch: bool = True  # the compiled model accepts any batch size
    placement: dict | None = None  # how backends were chosen: mode, timings, seconds
    model_timing: dict | None = None  # the whole compiled model against the original
    timings: dict[str, float] = field(default_factory=dict)  # compile() stage -> seconds
    accuracy: dict | None = None  # below f32: the accuracy guard's figures (accuracy.py)

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
            "ops_per_backend": self.ops_per_backend(),
            "dynamic_batch": self.dynamic_batch,
            **({"accuracy": self.accuracy} if self.accuracy is not None else {}),
        }

    def ops_per_backend(self) -> dict[str, int]:
        counts: Counter = Counter()
        for s in self.segments:
            if s.compiled:
                counts[s.backend] += s.node_count
        return dict(counts) or {self.backend: 0}

    def to_json(self) -> dict:
        data = {**self.result(), "segments": [asdict(s) for s in self.segments],
                "placement": self.placement, "model_timing": self.model_timing,
                "not_compiled": [r.to_json() for r in self.not_compiled],
                "unknown_shapes": [asdict(u) for u in self.unknown_shapes],
                "timings": self.timings}
        data["advice"] = advice(data)
        return data


def _ports(ports) -> list[dict]:
    from fuseflow.tf_compat import tf

    return [{"name": p.name, "dtype": tf.dtypes.as_dtype(p.dtype).name, "shape": list(p.shape),
             "batch_axis": p.batch_axis} for p in ports]


def build_report(backend: str, num_ops_original: int, graph_def, excluded: dict[str, Reason],
                 compiled: list[CompiledSegment], tensor_infos=None,
                 details: dict[str, str] | None = None,
                 timings: dict[str, dict] | None = None) -> CompileReport:
    """tensor_infos (tensor -> TensorInfo) lets the report name where unknown shapes start;
    details (node -> text) says more about why a node was excluded (e.g. its timings);
    timings (segment name -> figures) are the segments' own, measured against TF."""
    op_of = {n.name: n.op for n in graph_def.node}
    unknown = []
    if tensor_infos is not None:
        unknown = unknown_shape_sources(graph_def, tensor_infos, excluded)
    timings = timings or {}
    return CompileReport(
        backend=backend, num_ops_original=num_ops_original,
        num_ops_optimized=count_ops(graph_def),
        num_ops_on_backend=sum(c.segment.node_count for c in compiled if c.artifact is not None),
        segments=[_segment_report(c, c.backend or backend, op_of, timings.get(c.segment.name))
                  for c in compiled],
        not_compiled=_not_compiled(compiled, excluded, op_of, details or {}),
        unknown_shapes=unknown)


def _segment_report(item: CompiledSegment, backend: str, op_of: dict[str, str],
                    timing: dict | None) -> SegmentReport:
    seg, ok = item.segment, item.artifact is not None
    types = Counter(op_of[n] for n in seg.node_names)
    return SegmentReport(
        name=seg.name, backend=backend, compiled=ok, node_count=seg.node_count,
        op_types=dict(types.most_common()), inputs=_ports(seg.inputs),
        outputs=_ports(seg.outputs), artifact_bytes=len(item.artifact.executable) if ok else 0,
        compile_seconds=round(item.seconds, 3), error=item.error, timing=timing,
        cached=item.cached,
        timings=dict(item.artifact.timings) if ok and not item.cached else {})


def _not_compiled(compiled: list[CompiledSegment], excluded: dict[str, Reason],
                  op_of: dict[str, str], details: dict[str, str]) -> list[NotCompiled]:
    """One row per (op type, reason[, detail]), most nodes first."""
    left: dict[tuple[str, Reason, str | None], list[str]] = {}
    for item in compiled:
        if item.artifact is None:
            for name in item.segment.node_names:
                left.setdefault((op_of[name], Reason.COMPILE_FAILED, item.error), []).append(name)
    for name, reason in excluded.items():
        if reason is not Reason.STRUCTURAL:
            left.setdefault((op_of[name], reason, details.get(name)), []).append(name)
    rows = [NotCompiled(op, reason, len(names), names[:_EXAMPLE_NODES], detail)
            for (op, reason, detail), names in left.items()]
    return sorted(rows, key=lambda r: (-r.count, r.op_type, r.reason.value))


def unknown_shape_sources(graph_def, infos, excluded: dict[str, Reason]) -> list[UnknownShape]:
    """Where unknown shapes start, ranked by how many UNKNOWN_SHAPE ops depend on each.

    A source is an unknown-shape tensor whose producer has only known-shape
    data inputs: fixing it (by measuring it with model_feed_dict) is what
    would let the ops downstream of it compile.
    """
    from fuseflow.partition import topological_order
    from fuseflow.shapes import node_tensors

    nodes = graph_def.node
    sources: dict[str, frozenset[str]] = {}  # unknown tensor -> the sources it derives from
    cost: Counter = Counter()
    for i in topological_order(graph_def):
        node = nodes[i]
        tensors = node_tensors(node, infos)
        inherited = set().union(*(sources.get(t, ()) for t in tensors))
        own = [t for t in tensors if node_name(t) == node.name and not infos[t].fully_defined]
        for t in own:
            sources[t] = frozenset(sorted(inherited)[:_MAX_SOURCES]) if inherited \
                else frozenset({t})
        if excluded.get(node.name) is Reason.UNKNOWN_SHAPE:
            cost.update(inherited | {s for t in own for s in sources[t]})
    return [UnknownShape(t, infos[t].dtype.name,
                         None if infos[t].shape is None else list(infos[t].shape), n)
            for t, n in sorted(cost.items(), key=lambda kv: (-kv[1], kv[0]))]


# What to pass to compile() (or change in the model) for each reason.
_HINTS = {
    Reason.UNSUPPORTED_OP: "the backend has no kernel for it: try the other backend",
    Reason.DTYPE: "the backend has no kernel for this dtype: cast in the model, or try the "
                  "other backend",
    Reason.RUNTIME_OPERAND: "an axis/shape/size operand is computed from the data: compute "
                            "it from constants or static shapes in the model",
    Reason.UNKNOWN_SHAPE: "pass model_feed_dict with real inputs: the model is run once to "
                          "measure every shape",
    Reason.STRING: "string ops never compile: move string handling out of the model's middle",
    Reason.CONTROL_INPUT: "control dependencies pin it: drop tf.control_dependencies/asserts "
                          "in the exported model",
    Reason.CONTROL_FLOW: "a TF1 loop/cond goes to a backend only whole: OpenVINO converts "
                         "many (their shapes are measured on synthesized inputs, or on "
                         "model_feed_dict for string inputs), "
                         "XLA none; or rebuild it with tf.while_loop/tf.cond in a tf.function "
                         "(functional While/If) and re-export",
    Reason.INTERNAL_PORT: "a loop's TensorLists must stay inside one segment: see why the "
                          "ops next to them stayed in TF",
    Reason.BODY_UNSUPPORTED: "an op in the loop's/conditional's body has no kernel on the "
                             "backend: try the other backend",
    Reason.NO_FUSE_OPS: "remove these node names from no_fuse_ops",
    Reason.UPSTREAM_OF_INPUT: "it computes a signature input: pick a signature_def_key whose "
                              "inputs come first",
    Reason.SMALL_SEGMENT: "pass a smaller minimum_segment_size",
    Reason.SLOW_ON_BACKEND: "measured slower there: force_fuse_ops forces it in anyway",
    Reason.SLOWER_THAN_TF: "timed at compile time, TensorFlow ran it faster: force_fuse_ops "
                           "or --must-compile compiles it anyway",
    Reason.COMPILE_FAILED: "see compile.log in compiler_workdir; pass the failing node in "
                           "no_fuse_ops so the rest compiles",
}


def advice(report: dict) -> list[str]:
    """When under LOW_RATIO is compiled: what cost the most, and what to pass to fix it."""
    if not report["num_ops_optimized"] or report["OnNeuronRatio"] >= LOW_RATIO:
        return []
    lines = [f"only {100 * report['OnNeuronRatio']:.0f}% of the operations were compiled, "
             "which is probably not what you want. What cost the most:"]
    by_reason: Counter = Counter()
    for row in report["not_compiled"]:
        by_reason[row["reason"]] += row["count"]
    for reason, count in by_reason.most_common(3):
        rows = [r for r in report["not_compiled"] if r["reason"] == reason]
        ops = ", ".join(f"{r['op_type']} x{r['count']}" for r in rows[:4])
        hint = _HINTS.get(Reason[rows[0]["code"]]) if rows[0]["code"] else None
        lines.append(f"{reason}: {_ops(count)} ({ops})" + (f"; {hint}" if hint else ""))
    if report.get("unknown_shapes"):
        worst = ", ".join(f"{u['tensor']} {format_port(u)} ({_ops(u['ops'])})"
                          for u in report["unknown_shapes"][:3])
        lines.append(f"the unknown shapes start at {worst}")
    return lines


def _ops(n: int) -> str:
    return f"{n} op" if n == 1 else f"{n} ops"


def format_port(port: dict) -> str:
    """float32[1,224,224,3]; ? for an unknown dim, [*] for an unknown rank."""
    shape = port.get("shape")
    dims = "*" if shape is None else ",".join("?" if d is None else str(d) for d in shape)
    return f"{port['dtype']}[{dims}]"


def _ports_cell(ports: list[dict]) -> str:
    if not ports:
        return "-"
    more = f" +{len(ports) - 1}" if len(ports) > 1 else ""
    return format_port(ports[0]) + more


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def format_table(headers: list[str], rows: list[list], right: Collection[int] = ()) -> str:
    """Columns padded to their widest cell; columns in `right` are right-aligned."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if k in right else c.ljust(w)
                       for k, (c, w) in enumerate(zip(r, widths))).rstrip() for r in cells]
    return "\n".join(lines)


def segment_table(segments: list[dict]) -> str:
    timed = any(s.get("timing") for s in segments)
    rows = []
    for s in segments:
        types = " ".join(f"{op}({n})" if n > 1 else op for op, n in s["op_types"].items())
        state = "FAILED" if not s["compiled"] else "cached" if s.get("cached") else (
            "-" if s["compile_seconds"] is None else f"{s['compile_seconds']:.1f} s")
        row = [s["name"], s["backend"], s["node_count"], _clip(types, 50),
               _ports_cell(s["inputs"]), _ports_cell(s["outputs"]),
               _size(s["artifact_bytes"]) if s["artifact_bytes"] else "-", state]
        if timed:
            t = s.get("timing")
            row.append(f"{t['speedup']:.2f}x ({t['latency_ms']:.3g} ms)" if t else "-")
        rows.append(row)
    headers = ["segment", "backend", "ops", "op types", "inputs", "outputs", "artifact",
               "compile"] + (["vs TF"] if timed else [])
    return format_table(headers, rows, right={2, 6, 7})


def _example(nodes: list[str], width: int = 50) -> str:
    """The first node's name, its tail kept when too long: the tail tells the op apart."""
    if not nodes:
        return ""
    name = nodes[0] if len(nodes[0]) <= width else "…" + nodes[0][1 - width:]
    return name + (" …" if len(nodes) > 1 else "")


def not_compiled_table(rows: list[dict]) -> str:
    table = []
    for r in rows:
        reason = r["reason"] + (f": {r['detail']}" if r.get("detail") else "")
        table.append([r["op_type"], r["count"], _clip(reason, 70), _example(r["nodes"])])
    return format_table(["op type in TF", "count", "reason", "e.g."], table, right={1})


def summary_line(report: dict) -> str:
    failed = f", {report['num_segments_failed']} failed" if report["num_segments_failed"] else ""
    return (f"{report['num_ops_on_backend']} of {report['num_ops_optimized']} ops on "
            f"{report['backend']} (OnNeuronRatio {report['OnNeuronRatio']:.3f}) in "
            f"{report['num_segments']} segment(s){failed}")


def timing_line(report: dict) -> str:
    """Where compile() spent its time, stage by stage, and the workers' steps summed."""
    stages = report.get("timings") or {}
    steps: dict[str, float] = {}
    for s in report["segments"]:
        for step, seconds in (s.get("timings") or {}).items():
            steps[step] = steps.get(step, 0.0) + seconds
    cached = sum(bool(s.get("cached")) for s in report["segments"])
    text = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
    if steps:
        text += "; in the workers: " + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items())
    if cached:
        text += f"; {cached} segment(s) from the compile cache"
    return text


def log_report(report: CompileReport) -> None:
    """The reference's three lines, the segment table, what stayed in TF and why, advice."""
    data = report.to_json()
    log.info("Number of operations in TensorFlow session: %d", report.num_ops_original)
    log.info("Number of operations after fuseflow optimizations: %d", report.num_ops_optimized)
    log.info("Number of operations placed on %s: %d (OnNeuronRatio %.3f)", report.backend,
             report.num_ops_on_backend, report.ratio)
    if data["segments"]:
        log.info("Segments:\n%s", segment_table(data["segments"]))
    if data["not_compiled"]:
        log.info("Left in TensorFlow:\n%s", not_compiled_table(data["not_compiled"]))
    for line in data["advice"]:
        log.warning("%s", line)
