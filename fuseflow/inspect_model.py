"""What a compiled SavedModel holds: its segments, what stays in TF, what it needs to load.

Reads saved_model.pb alone; the compile report in assets.extra (when present)
adds what the graph does not keep: shapes of XLA segments, compile times,
segments that failed, and why each op stayed in TensorFlow.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fuseflow import errors
from fuseflow.assets import blob_size, read_asset_libraries
from fuseflow.export import REPORT_DIR
from fuseflow.graph_util import NON_COMPUTE_OPS, node_name, output_index
from fuseflow.load import read_saved_model_proto, select_meta_graph
from fuseflow.report import (
    REPORT_FILE,
    advice,
    format_port,
    not_compiled_table,
    segment_table,
    summary_line,
)
from fuseflow.runtime import summary_lines

_NO_REPORT = "unknown: the model has no fuseflow_report.json"


@dataclass
class LogicalNode:
    """A node of the model as the user wrote it; `segment` is the fused node it runs in."""

    name: str
    op: str
    inputs: list[str]  # source node names
    segment: str | None  # None: runs in TensorFlow


def is_fused(node) -> bool:
    return node.op == "FuseflowOp" or (
        node.op in ("PartitionedCall", "StatefulPartitionedCall")
        and node.attr["_XlaMustCompile"].b)


def _body_name(node) -> str:
    attr = "native_segment" if node.op == "FuseflowOp" else "f"
    return node.attr[attr].func.name


def _backend(node) -> str:
    return node.attr["backend"].s.decode() if node.op == "FuseflowOp" else "xla"


def _reexposed(graph_def, fused: dict) -> set[str]:
    """IdentityN nodes that only give a fused node's outputs their original names."""
    return {n.name for n in graph_def.node
            if n.op == "IdentityN" and n.input
            and all(node_name(i) in fused for i in n.input)}


def logical_graph(graph_def, model_dir=None) -> list[LogicalNode]:
    """The compiled graph with every fused node opened up into the nodes it replaced
    (model_dir: where the fallback functions kept in asset files are)."""
    if model_dir is not None:
        graph_def = _with_asset_libraries(graph_def, model_dir)
    functions = {f.signature.name: f for f in graph_def.library.function}
    fused = {n.name: n for n in graph_def.node if is_fused(n)}
    hidden = _reexposed(graph_def, fused)
    outer = {n.name for n in graph_def.node if n.name not in hidden and n.name not in fused}
    nodes = [LogicalNode(n.name, n.op, [node_name(i) for i in n.input], None)
             for n in graph_def.node if n.name in outer]
    seen = set(outer)
    for name, node in fused.items():
        body = functions[_body_name(node)]
        args = {a.name: node_name(src)
                for a, src in zip(body.signature.input_arg, node.input)}
        for inner in body.node_def:
            if inner.name in seen:  # a constant copied into this segment and another
                continue
            seen.add(inner.name)
            inputs = [args.get(node_name(i), node_name(i)) for i in inner.input]
            nodes.append(LogicalNode(inner.name, inner.op, inputs, name))
    return nodes


def _with_asset_libraries(graph_def, model_dir):
    full = type(graph_def)()
    full.CopyFrom(graph_def)
    read_asset_libraries(full, model_dir)
    return full


def _graph_segments(graph_def, model_dir) -> list[dict]:
    """Segments as the graph alone tells them (report schema; unknowns left empty)."""
    functions = {f.signature.name: f for f in graph_def.library.function}
    out_names = _output_names(graph_def)
    segments = []
    for node in (n for n in graph_def.node if is_fused(n)):
        body = functions[_body_name(node)]
        types = Counter(n.op for n in body.node_def if n.op not in NON_COMPUTE_OPS)
        segments.append({
            "name": node.name, "backend": _backend(node), "compiled": True,
            "node_count": sum(types.values()), "op_types": dict(types.most_common()),
            "inputs": _ports(node, "in", list(node.input)),
            "outputs": _ports(node, "out", out_names.get(node.name, [])),
            "artifact_bytes": blob_size(node, model_dir),
            "compile_seconds": None, "error": None})
    return segments


def _output_names(graph_def) -> dict[str, list[str]]:
    """fused node -> the original tensor name of each of its outputs."""
    names: dict[str, dict[int, str]] = {}
    for n in graph_def.node:
        if n.op == "IdentityN":
            for j, inp in enumerate(n.input):
                names.setdefault(node_name(inp), {})[output_index(inp)] = f"{n.name}:{j}"
    return {k: [v[i] for i in sorted(v)] for k, v in names.items()}


def _ports(node, side: str, names: list[str]) -> list[dict]:
    from fuseflow.tf_compat import tf

    types = node.attr["Tin" if side == "in" else "Tout"].list.type
    shapes = node.attr[f"{'input' if side == 'in' else 'output'}_shapes"].list.shape
    ports = []
    for k, dtype in enumerate(types):
        shape = tf.TensorShape(shapes[k]).as_list() if k < len(shapes) else None
        ports.append({"name": names[k] if k < len(names) else f"{node.name}:{k}",
                      "dtype": tf.dtypes.as_dtype(dtype).name, "shape": shape})
    return ports


def _graph_tf_ops(nodes: list[LogicalNode]) -> list[dict]:
    counts = Counter(n.op for n in nodes if n.segment is None and n.op not in NON_COMPUTE_OPS)
    examples: dict[str, list[str]] = {}
    for n in nodes:
        if n.segment is None and n.op in counts and len(examples.get(n.op, [])) < 3:
            examples.setdefault(n.op, []).append(n.name)
    return [{"op_type": op, "count": c, "reason": _NO_REPORT, "code": None,
             "nodes": examples[op], "detail": None} for op, c in counts.most_common()]


def read_report(model_dir) -> dict | None:
    path = Path(model_dir) / REPORT_DIR / REPORT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise errors.ModelLoadError(f"{path} is not valid JSON ({e}): recompile the model or "
                                    "delete the file") from None


def _signature(meta_graph) -> tuple[str, dict]:
    from fuseflow.load import select_signature
    from fuseflow.tf_compat import tf

    key = select_signature(meta_graph, None)
    sig = meta_graph.signature_def[key]

    def ports(infos):
        return [{"name": k, "tensor": v.name, "dtype": tf.dtypes.as_dtype(v.dtype).name,
                 "shape": None if v.tensor_shape.unknown_rank else
                 [d.size if d.size >= 0 else None for d in v.tensor_shape.dim]}
                for k, v in sorted(infos.items())]
    return key, {"inputs": ports(sig.inputs), "outputs": ports(sig.outputs)}


def load_requirements(graph_def, report: dict | None) -> dict:
    """What loading the model needs: the backend, its version, and the op library if any."""
    runtime = dict((report or {}).get("runtime") or {})
    if any(n.op == "FuseflowOp" for n in graph_def.node):
        from fuseflow.native import library_path

        runtime.setdefault("backend", next(_backend(n) for n in graph_def.node
                                           if n.op == "FuseflowOp"))
        runtime["op_library"] = str(library_path())
        runtime["op_library_built"] = library_path().is_file()
        runtime.setdefault("needs", "import fuseflow before loading the model")
    elif any(is_fused(n) for n in graph_def.node):
        runtime.setdefault("backend", "xla")
        runtime.setdefault("needs", "TensorFlow with XLA; TF Serving on CPU: "
                                    "--xla_cpu_compilation_enabled=true")
    return runtime


def inspect_model(model_dir) -> dict:
    """Everything `fuseflow inspect` shows, as the report's JSON schema plus model facts."""
    model_dir = os.fspath(model_dir)
    proto = read_saved_model_proto(model_dir)
    tags, meta_graph = select_meta_graph(proto, None)
    graph_def = _with_asset_libraries(meta_graph.graph_def, model_dir)
    report = read_report(model_dir)
    nodes = logical_graph(graph_def)
    key, signature = _signature(meta_graph)
    data = _from_graph(graph_def, nodes, model_dir) if report is None else {
        k: v for k, v in report.items() if k != "runtime"}
    data["advice"] = advice(data) if report is not None else []
    return {"model": model_dir, "tags": tags, "signature": key, **signature,
            "tensorflow_version": meta_graph.meta_info_def.tensorflow_version,
            "report_found": report is not None, **data,
            "runtime": load_requirements(graph_def, report)}


def _from_graph(graph_def, nodes: list[LogicalNode], model_dir) -> dict:
    segments = _graph_segments(graph_def, model_dir)
    on_backend = sum(s["node_count"] for s in segments)
    tf_ops = _graph_tf_ops(nodes)
    total = on_backend + sum(r["count"] for r in tf_ops)
    backends = sorted({s["backend"] for s in segments}) or ["none"]
    return {"OnNeuronRatio": on_backend / total if total else 0.0, "num_ops_original": None,
            "num_ops_optimized": total, "num_ops_on_backend": on_backend,
            "num_segments": len(segments), "num_segments_failed": 0,
            "backend": ",".join(backends), "segments": segments, "not_compiled": tf_ops,
            "unknown_shapes": []}


def format_inspect(info: dict) -> str:
    """The text `fuseflow inspect` prints: model facts, load needs, the report's tables."""
    lines = [f"{info['model']}: tags {','.join(info['tags'])}, signature {info['signature']}, "
             f"written by TensorFlow {info['tensorflow_version'] or '?'}",
             "  inputs:  " + _signature_ports(info["inputs"]),
             "  outputs: " + _signature_ports(info["outputs"])]
    if not info["segments"]:
        return "\n".join(lines + ["  no fused segments: not a model compiled by fuseflow"])
    lines += ["  " + summary_line(info)] + _runtime_lines(info["runtime"])
    if not info["report_found"]:
        lines.append(f"  no {REPORT_DIR}/{REPORT_FILE}: shapes, times and reasons unknown")
    if info.get("accuracy"):
        from fuseflow.accuracy import summary_lines as accuracy_lines

        lines += ["  " + line for line in accuracy_lines(info["accuracy"])]
    lines += ["", segment_table(info["segments"])]
    if info["not_compiled"]:
        lines += ["", not_compiled_table(info["not_compiled"])]
    lines += [f"warning: {a}" for a in info["advice"]]
    if "run" in info:
        lines += ["", f"one call on random inputs (batch {info['run']['batch_size']}):"]
        lines += ["  " + line for line in summary_lines(info["run"]) or ["no fused op ran"]]
    return "\n".join(lines)


def _runtime_lines(runtime: dict) -> list[str]:
    plain = ("backend", "needs", "op_library", "op_library_built")
    versions = ", ".join(f"{k} {v}" for k, v in runtime.items() if k not in plain)
    lines = [f"  backend: {runtime.get('backend', '?')}" + (f" ({versions})" if versions else "")]
    if "op_library" in runtime:
        state = "built" if runtime["op_library_built"] else "not built: import fuseflow builds it"
        lines.append(f"  op library: {runtime['op_library']} ({state})")
    if "needs" in runtime:
        lines.append(f"  load needs: {runtime['needs']}")
    return lines


def _signature_ports(ports: list[dict]) -> str:
    return ", ".join(f"{p['name']} {format_port(p)}" for p in ports) or "-"
