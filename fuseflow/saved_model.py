"""compile(): the reference API. Runs the pipeline stages, nothing else."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fuseflow import errors
from fuseflow.backends import get_backend
from fuseflow.batch import batch_tensors, runs_at_other_batch
from fuseflow.compile import compile_segments
from fuseflow.export import (
    REPORT_DIR,
    check_output_dir,
    check_workdir,
    staging_dir,
    write_saved_model,
)
from fuseflow.extract import consumers_outside, extract_segment
from fuseflow.graph_util import node_name, tensor_name
from fuseflow.load import load_saved_model, model_path
from fuseflow.loops import refine_loop_shapes
from fuseflow.optimize import optimize_graph
from fuseflow.options import parse_compiler_args
from fuseflow.partition import (
    PartitionOptions,
    default_minimum_segment_size,
    partition_graph,
    topological_order,
)
from fuseflow.reasons import Reason
from fuseflow.report import CompileReport, build_report, log_report
from fuseflow.rewrite import rewrite_graph
from fuseflow.shapes import (
    apply_input_shapes,
    guard_input_shapes,
    infer_tensor_shapes,
    node_tensors,
    resolve_input_shapes,
    serving_shapes,
)
from fuseflow.tf_compat import tf

log = logging.getLogger("fuseflow")


def _names(value, what: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = [value]
    try:
        names = frozenset(value)
    except TypeError:
        raise errors.OptionError(f"{what} must be an iterable of node names, got {value!r}") \
            from None
    if not all(isinstance(n, str) for n in names):
        raise errors.OptionError(
            f"{what} must hold node names (strings), got {', '.join(sorted(map(repr, names)))}")
    return names


def default_backend() -> str:
    """OpenVINO is the fast CPU backend; XLA is the one for GPUs."""
    from fuseflow.backends.xla import has_gpu

    return "xla" if has_gpu() else "openvino"


def compile(model_dir, new_model_dir, batch_size=1, model_shape_feed_dict=None,
            model_feed_dict=None, tags=None, signature_def_key=None, minimum_segment_size=None,
            no_fuse_ops=None, compiler_args=None, compiler_workdir=None, *, backend=None,
            force_fuse_ops=None) -> dict:
    """Compile a SavedModel into a new one whose supported segments run on a backend.

    Returns {'OnNeuronRatio': ..., and the counts behind it}.
    """
    options = parse_compiler_args(compiler_args, compiler_workdir, backend)
    model_dir = model_path(model_dir)
    out = check_output_dir(model_dir, new_model_dir)
    workdir = check_workdir(model_dir, options.workdir)
    no_fuse = _names(no_fuse_ops, "no_fuse_ops")
    force_fuse = _names(force_fuse_ops, "force_fuse_ops")
    if minimum_segment_size is not None and (
            isinstance(minimum_segment_size, bool) or not isinstance(minimum_segment_size, int)
            or minimum_segment_size < 1):
        raise errors.OptionError(
            f"minimum_segment_size must be a positive integer, got {minimum_segment_size!r}")
    backend_name = options.backend or default_backend()
    chosen = get_backend(backend_name)

    model = load_saved_model(model_dir, tags, signature_def_key)
    inputs = resolve_input_shapes(model, batch_size, model_shape_feed_dict, model_feed_dict)
    serving = serving_shapes(model, inputs, options.dynamic_batch)
    graph_def = apply_input_shapes(model.graph_def, model, inputs.shapes)
    graph_def = refine_loop_shapes(optimize_graph(graph_def, model.fetch_nodes))
    _check_names(graph_def, no_fuse | force_fuse)
    infos = infer_tensor_shapes(graph_def, model, inputs)

    fetches = {tensor_name(s.tensor_name) for s in model.outputs}
    partition = partition_graph(
        graph_def, chosen.support(graph_def, infos, options),
        [node_name(s.tensor_name) for s in model.inputs],
        PartitionOptions(
            minimum_segment_size=minimum_segment_size or default_minimum_segment_size(graph_def),
            no_fuse_ops=no_fuse, force_fuse_ops=force_fuse, max_segments=options.max_segments),
        dtype_reason=lambda node: _dtype_reason(node, infos),
        internal_tensors=_variant_tensors(infos))
    members_of = {n: s.name for s in partition.segments for n in s.nodes}
    consumers = consumers_outside(graph_def, members_of)
    batch_info = None
    if options.dynamic_batch:
        batch_info = batch_tensors(
            graph_def, topological_order(graph_def), infos,
            [tensor_name(s.tensor_name) for s in model.inputs],
            _batch_dim(inputs.shapes))
    segments = [extract_segment(graph_def, s, infos, consumers, fetches, batch_info)
                for s in partition.segments]

    with _workdir(workdir) as work:
        compiled = compile_segments(backend_name, segments, options, work)
    failed = [c.segment.name for c in compiled if c.artifact is None]
    if failed and options.must_compile:
        raise errors.SegmentCompileError(
            f"The following subgraphs failed to compile: {failed} "
            f"({'; '.join(c.error for c in compiled if c.error)}). Drop --must-compile to "
            "let them run in TensorFlow instead")
    final = rewrite_graph(graph_def, compiled, chosen, options, set(model.fetch_nodes))
    if serving != inputs.shapes and not runs_at_other_batch(
            model, final, serving, inputs.shapes, chosen.tolerance(options)):
        log.warning("the model computes with its own batch size (e.g. tf.shape(x)[0]), "
                    "which compiling fixed: the compiled model accepts batch %s only; "
                    "compile again for other batch sizes", _batch_dim(inputs.shapes))
        serving = inputs.shapes
        final = guard_input_shapes(final, model, serving)
    final = apply_input_shapes(final, model, serving)
    report = build_report(backend_name, model.num_ops, graph_def, partition.excluded, compiled,
                          tensor_infos=infos)
    report.dynamic_batch = serving != inputs.shapes
    log_report(report)
    with staging_dir(out) as path:
        write_saved_model(final, model, serving, infos, path)
        _write_report(path, report, chosen.runtime_info())
    return report.result()


def _batch_dim(shapes: dict[str, tuple]) -> int:
    dims = [s[0] for s in shapes.values() if s]
    return dims[0] if dims and all(d == dims[0] for d in dims) else -1


def _dtype_reason(node, infos) -> Reason | None:
    """Strings and resources never enter a segment, whatever the backend says. Variants
    (TensorLists around a loop) may, but only inside one: see _variant_tensors."""
    dtypes = {infos[t].dtype for t in node_tensors(node, infos) if t in infos}
    if tf.string in dtypes:
        return Reason.STRING
    if tf.resource in dtypes:
        return Reason.DTYPE
    return None


def _variant_tensors(infos) -> set[str]:
    """Tensors that may never be a segment port: no backend passes a TensorList."""
    return {t for t, info in infos.items() if info.dtype == tf.variant}


def _check_names(graph_def, names: frozenset[str]) -> None:
    present = {n.name for n in graph_def.node}
    unknown = sorted(names - present)
    if unknown:
        raise errors.OptionError(
            f"no_fuse_ops/force_fuse_ops name nodes that are not in the optimized graph: "
            f"{unknown[:10]}; use node names (not op types) from the model's graph")


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    """compiler_workdir when given (kept), else a temp dir (removed)."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="fuseflow-work-") as tmp:
        yield Path(tmp)


def _write_report(path: Path, report: CompileReport, runtime: dict) -> None:
    extra = path / REPORT_DIR
    extra.mkdir(exist_ok=True)
    data = {**report.to_json(), "runtime": runtime}
    (extra / "fuseflow_report.json").write_text(json.dumps(data, indent=2))
