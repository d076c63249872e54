"""compile(): the reference API. Runs the pipeline stages, nothing else."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fuseflow import accuracy, errors, xla_cache
from fuseflow.backends import BACKEND_NAMES, get_backend
from fuseflow.batch import OtherBatchCheck, batch_tensors
from fuseflow.cache import CompileCache, timing_key, values_digest
from fuseflow.cache import flush as flush_cache_writes
from fuseflow.compile import (
    CompiledSegment,
    CompileJob,
    cache_keys,
    compile_segments,
    preload_backends,
    prestart_worker,
)
from fuseflow.export import (
    REPORT_DIR,
    assets_folder,
    check_output_dir,
    check_workdir,
    staging_dir,
    write_saved_model,
)
from fuseflow.extract import consumers_outside, extract_segment
from fuseflow.graph_util import NON_COMPUTE_OPS, constant_nodes, node_name, tensor_name
from fuseflow.load import LoadedModel, load_saved_model, model_path
from fuseflow.logs import shown, shown_info, tf_quiet
from fuseflow.loops import refine_loop_shapes
from fuseflow.optimize import optimize_graph
from fuseflow.options import (
    CompilerOptions,
    _as_list,
    parse_compiler_args,
    reference_keywords,
)
from fuseflow.partition import (
    Partition,
    PartitionOptions,
    Segment,
    default_minimum_segment_size,
    partition_graph,
    topological_order,
)
from fuseflow.place import (
    Placement,
    by_kind,
    feed_value_function,
    place,
    preferred_backends,
)
from fuseflow.precision import alternative_job as select_precision_job
from fuseflow.precision import figures_against_tf
from fuseflow.precision import select as select_precision
from fuseflow.reasons import Reason
from fuseflow.report import CompileReport, build_report, log_report, timing_line
from fuseflow.rewrite import rewrite_into_assets
from fuseflow.shapes import (
    InputShapes,
    apply_input_shapes,
    guard_input_shapes,
    infer_tensor_shapes,
    node_tensors,
    resolve_input_shapes,
    serving_shapes,
    synthesized_value,
)
from fuseflow.stages import Stopwatch
from fuseflow.tf_compat import tf
from fuseflow.timing import ModelTimingJob, prestart, time_models, warm_interpreters

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
    """On a CPU each segment goes to the backend that runs it fastest (or stays in TF);
    XLA is the one for GPUs."""
    from fuseflow.backends.xla import has_gpu

    return "xla" if has_gpu() else "auto"


def backend_names(backend: str, options: CompilerOptions) -> list[str]:
    """The backends a compile may use, in order of preference for ops both take. Precision
    below f32 (--quantize, --fp32-cast, --fast-math) is OpenVINO's: auto means OpenVINO."""
    if backend != "auto":
        return [backend]
    if options.quantize != "none" or options.fp32_cast != "none" or options.fast_math:
        return ["openvino"]
    return list(BACKEND_NAMES)


@dataclass
class _Plan:
    """Everything decided before compiling: the graph, its shapes and the proposed segments
    (each coloured with its preferred backend; placement may time and change them)."""

    model: LoadedModel
    inputs: InputShapes
    serving: dict[str, tuple]
    graph_def: object
    infos: dict
    partition: Partition
    backend_name: str
    options: CompilerOptions
    supports: dict[str, dict]  # backend -> {node: Reason | None}
    partitioner: Callable[[dict, dict | None], Partition]
    force_fuse: frozenset[str]
    prefer: dict[str, str]  # node -> the backend its kind runs best on (place.py)
    watch: Stopwatch  # seconds per stage so far
    calibration_data: object = None  # compile(calibration_data=...): see quantize.py


def _plan(model_dir, batch_size, model_shape_feed_dict, model_feed_dict, tags,
          signature_def_key, minimum_segment_size, no_fuse_ops, force_fuse_ops,
          subgraph_builder_function, options: CompilerOptions) -> _Plan:
    """Load, fix shapes, optimize and partition: the stages before any compiler runs."""
    no_fuse = _names(no_fuse_ops, "no_fuse_ops")
    force_fuse = _names(force_fuse_ops, "force_fuse_ops")
    if minimum_segment_size is not None and (
            isinstance(minimum_segment_size, bool) or not isinstance(minimum_segment_size, int)
            or minimum_segment_size < 1):
        raise errors.OptionError(
            f"minimum_segment_size must be a positive integer, got {minimum_segment_size!r}")
    if subgraph_builder_function is not None and not callable(subgraph_builder_function):
        raise errors.OptionError("subgraph_builder_function must be a callable taking a "
                                 f"NodeDef and returning a bool, got {subgraph_builder_function!r}")
    backend_name = options.backend or default_backend()
    backends = {name: get_backend(name) for name in backend_names(backend_name, options)}

    watch = Stopwatch()
    model = load_saved_model(model_dir, tags, signature_def_key)
    watch.lap("loading")
    inputs = resolve_input_shapes(model, batch_size, model_shape_feed_dict, model_feed_dict)
    serving = serving_shapes(model, inputs, options.dynamic_batch)
    graph_def = apply_input_shapes(model.graph_def, model, inputs.shapes)
    watch.lap("shapes")
    graph_def = optimize_graph(graph_def, model.fetch_nodes)
    refined = refine_loop_shapes(graph_def)
    if refined is not graph_def:
        # Loop outputs now have static shapes: fold the Shape/Fill chains that read them
        # (a stacked LSTM's zero state), which backends need as constants.
        graph_def = optimize_graph(refined, model.fetch_nodes)
    _check_names(graph_def, no_fuse | force_fuse)
    if subgraph_builder_function is not None:
        chosen_on, chosen_off = _builder_choices(graph_def, subgraph_builder_function)
        force_fuse, no_fuse = force_fuse | chosen_on, no_fuse | chosen_off
    watch.lap("grappler")
    infos = infer_tensor_shapes(graph_def, model, inputs)
    watch.lap("shapes")
    supports = {name: b.support(graph_def, infos, options) for name, b in backends.items()}
    watch.lap("probe")
    internal = _variant_tensors(infos)
    partition_options = PartitionOptions(
        minimum_segment_size=minimum_segment_size or default_minimum_segment_size(graph_def),
        no_fuse_ops=no_fuse, force_fuse_ops=force_fuse, max_segments=options.max_segments)
    input_nodes = [node_name(s.tensor_name) for s in model.inputs]

    def partitioner(support: dict, colour: dict | None) -> Partition:
        return partition_graph(graph_def, support, input_nodes, partition_options,
                               dtype_reason=lambda node: _dtype_reason(node, infos),
                               internal_tensors=internal, colour=colour)

    prefer = preferred_backends(graph_def, supports, force_fuse, internal)
    partition = by_kind(graph_def, supports, prefer, force_fuse, partitioner)
    preload_backends(sorted({s.colour.split("/")[-1] for s in partition.segments
                             if s.colour}))  # XLA's, when a loop went to it
    watch.lap("partition")
    return _Plan(model, inputs, serving, graph_def, infos, partition, backend_name, options,
                 supports, partitioner, force_fuse, prefer, watch)


def _builder_choices(graph_def, builder) -> tuple[frozenset[str], frozenset[str]]:
    """subgraph_builder_function(node_def) -> bool over the computing nodes: (on, off).
    None means no opinion: fuseflow decides as without the function."""
    on, off = set(), set()
    for node in graph_def.node:
        if node.op in NON_COMPUTE_OPS:
            continue
        choice = builder(node)
        if choice is not None:
            (on if choice else off).add(node.name)
    return frozenset(on), frozenset(off)


def compile(model_dir, new_model_dir, batch_size=1, model_shape_feed_dict=None,
            model_feed_dict=None, tags=None, signature_def_key=None, strip_default_attrs=False,
            config_proto=None, minimum_segment_size=None, no_fuse_ops=None, compiler_args=None,
            compiler_workdir=None, *, backend=None, force_fuse_ops=None,
            subgraph_builder_function=None, supported_op_types=None, dynamic_batch_size=False,
            compiler_timeout=None, compiler_recovery=True, compiler_verbose=None,
            max_num_compilers=None, calibration_data=None) -> dict:
    """Compile a SavedModel into a new one whose supported segments run on a backend.

    Returns {'OnNeuronRatio': ..., and the counts behind it}.
    The reference's keywords are taken too: strip_default_attrs and
    config_proto need nothing (default attrs are always stripped; no session
    config is needed); dynamic_batch_size, compiler_timeout, compiler_recovery,
    compiler_verbose and max_num_compilers are the flags --dynamic-batch-size,
    --timeout, --must-compile (when False), --verbose and --workers;
    supported_op_types keeps every other op type in TensorFlow.
    subgraph_builder_function(node_def) -> bool, when given, is asked about every
    computing node of the optimized graph: True forces it into a segment (as
    force_fuse_ops), False keeps it in TensorFlow (as no_fuse_ops).
    calibration_data ({input: array with N samples on axis 0}, or an iterable of
    feed dicts) calibrates --quantize int8 and feeds the accuracy guard that runs
    below f32 (fuseflow/quantize.py, fuseflow/accuracy.py).
    """
    with shown(logging.WARNING), tf_quiet():
        args = _as_list(compiler_args) + reference_keywords(
            max_num_compilers, compiler_timeout, compiler_recovery, compiler_verbose,
            dynamic_batch_size)
        options = parse_compiler_args(args, compiler_workdir, backend)
        if supported_op_types is not None:
            subgraph_builder_function = _only_types(supported_op_types,
                                                    subgraph_builder_function)
        model_dir = model_path(model_dir)
        out = check_output_dir(model_dir, new_model_dir)
        workdir = check_workdir(model_dir, options.workdir)
        backends = backend_names(options.backend or default_backend(), options)
        # Timing compiles candidates on every backend; otherwise XLA's TensorFlow (3 s
        # in the compiler process) is imported once a segment is placed on it.
        prestart_worker([b for b in backends if options.profile or b != "xla"] or backends)
        with warm_interpreters(), _older_objects_frozen():
            plan = _plan(model_dir, batch_size, model_shape_feed_dict, model_feed_dict, tags,
                         signature_def_key, minimum_segment_size, no_fuse_ops,
                         force_fuse_ops, subgraph_builder_function, options)
            plan.calibration_data = calibration_data
            try:
                result = _compile_plan(plan, out, workdir)
            finally:
                flush_cache_writes()  # the compile cache writes its entries in the background
        with shown_info():
            log.info("Successfully converted %s to %s", model_dir, new_model_dir)
    return result


@contextlib.contextmanager
def _older_objects_frozen():
    """The objects alive before the compile out of the cyclic garbage collector's walks
    while it runs (gc.freeze), given back after: with TF imported, the full collection a
    compile set off walked 400,000 of them (ResNet50: 0.17 s of 3.4 s). What the compile
    makes is still collected. A process that froze its own (a server before forking)
    keeps them frozen: then nothing is done."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _only_types(types, builder):
    """supported_op_types as a subgraph_builder_function: other types stay in TensorFlow."""
    allowed = _names(types, "supported_op_types")

    def choose(node):
        if node.op not in allowed:
            return False
        return None if builder is None else builder(node)

    return choose


def _compile_plan(plan: _Plan, out: Path, workdir: Path | None) -> dict:
    """Place, extract, compile, rewrite, check the batch, report and write the model."""
    model, inputs, graph_def, infos, options = (plan.model, plan.inputs, plan.graph_def,
                                                plan.infos, plan.options)
    serving = plan.serving
    fetches = {tensor_name(s.tensor_name) for s in model.outputs}
    batch_info = None
    if options.dynamic_batch:
        batch_info = batch_tensors(
            graph_def, topological_order(graph_def), infos,
            [tensor_name(s.tensor_name) for s in model.inputs],
            _batch_dim(inputs.shapes))
    constants = constant_nodes(graph_def)

    def extract(segment: Segment, consumers: dict):
        # A placement piece's colour is "region/backend" (place.py), a segment's the backend.
        backend = get_backend(segment.colour.split("/")[-1] if segment.colour
                              else next(iter(plan.supports)))
        return extract_segment(graph_def, segment, infos, consumers, fetches, batch_info,
                               constants, backend.compiles_per_shape)

    watch = plan.watch
    # The original at another batch size, for the check after rewriting (batch.py).
    other_batch = None if serving == inputs.shapes else OtherBatchCheck(model, serving,
                                                                         inputs.shapes)
    with _workdir(workdir) as work:
        placement = Placement(plan.partition, summary={
            "mode": "forced" if len(plan.supports) == 1 else "by kind (not timed)",
            "backends": list(plan.supports)})
        # int8 segments are calibrated before compiling (accuracy.prepare): timed
        # candidates would be f32, so int8 models are placed by kind; each int8 segment
        # is then timed against its bf16 compile (precision.py).
        model_key, stored_model_timing = None, None
        if options.profile and options.quantize == "none":
            values = _input_values(model, inputs)
            placement = place(graph_def, plan.supports, plan.prefer, plan.partitioner, options,
                              plan.force_fuse, extract,
                              feed_value_function(graph_def, model, values), work,
                              values_key=values_digest(values))
            watch.lap("placement")
            model_key = _model_timing_key(placement, serving, options)
            stored_model_timing = CompileCache.for_options(options).lookup_timings(
                model_key, "the whole model's timing")
            if len(placement.partition.segments) != 1 and stored_model_timing is None:
                prestart()  # for the whole model's timing (_timed_by_placement), after export
        partition = placement.partition
        members_of = {n: s.name for s in partition.segments for n in s.nodes}
        consumers = consumers_outside(graph_def, members_of)
        segments = [extract(s, consumers) for s in partition.segments]
        watch.lap("extract")
        chosen = get_backend(next(iter(plan.supports)))
        calibration = accuracy.prepare(plan, segments, work, chosen)
        if calibration is not None and other_batch is not None:
            other_batch.use_samples(calibration.stacked(_batch_dim(inputs.shapes) + 1))
        ready: dict[int, CompiledSegment] = {}
        jobs = []
        for k, (seg, graph) in enumerate(zip(partition.segments, segments)):
            done = placement.compiled.get((frozenset(seg.nodes), seg.colour))
            if done is not None:
                ready[k] = CompiledSegment(graph, done.artifact, None, done.seconds,
                                           done.backend, done.cached)
            else:
                jobs.append((k, CompileJob(seg.colour, graph, graph.name)))
        # Under int8 with profiling, each segment's bf16 compile runs beside its int8 one:
        # precision.select times the two.
        timed_int8 = options.quantize == "int8" and options.profile and calibration is not None
        extra = [select_precision_job(j, options) for _, j in jobs] if timed_int8 else []
        all_jobs = [j for _, j in jobs] + extra
        keys = cache_keys(all_jobs, options, work)  # before the check's TF run contends
        if extra:
            prestart()  # the timing process imports TF while the segments compile
        elif other_batch is not None:
            other_batch.start()  # no timing runs until the check: it costs no timing
        results = compile_segments(all_jobs, options, work, keys)
        for (k, _), item in zip(jobs, results):
            ready[k] = item
        alternatives = {item.segment.name: item for item in results[len(jobs):]}
        _compile_elsewhere(ready, partition.segments, plan, work)
        compiled = [ready[k] for k in range(len(segments))]
        accuracy_report = None
        selection, prebuilt = {}, {}
        if timed_int8:
            watch.lap("workers")
            compiled, selection, prebuilt = select_precision(compiled, options, work,
                                                             alternatives)
            watch.lap("int8 or bf16")
        if calibration is not None:
            compiled, accuracy_report = accuracy.check(plan, compiled, calibration, work, chosen,
                                                       selection, prebuilt)
    watch.lap("workers")
    failed = [c.segment.name for c in compiled if c.artifact is None]
    if failed and options.must_compile:
        raise errors.SegmentCompileError(
            f"The following subgraphs failed to compile: {failed} "
            f"({'; '.join(c.error for c in compiled if c.error)}). Drop --must-compile to "
            "let them run in TensorFlow instead")
    used = sorted({c.backend for c in compiled if c.artifact is not None})
    label = "+".join(used) if used else "+".join(plan.supports)
    tolerance = max(get_backend(b).tolerance(options) for b in plan.supports)
    with staging_dir(out) as path, tempfile.TemporaryDirectory(
            prefix="fuseflow-xla-cache-") as staging:
        # The fused ops' blobs and fallback functions into asset files once: the check
        # runs the graph as the saved model will hold it, and the export writes it.
        final, files = rewrite_into_assets(graph_def, compiled, options,
                                           set(model.fetch_nodes), assets_folder(path))
        watch.lap("rewrite")
        why = None if other_batch is None else other_batch.result(final, files, tolerance,
                                                                  serving)
        if why:
            log.warning("the compiled model does not match the original at another batch "
                        "size (%s); most often the model computes with its own batch size "
                        "(e.g. tf.shape(x)[0]), which compiling fixed. The compiled model "
                        "accepts batch %s only; compile again for other batch sizes", why,
                        _batch_dim(inputs.shapes))
            serving = inputs.shapes
            final = guard_input_shapes(final, model, serving)
        final = apply_input_shapes(final, model, serving)
        watch.lap("other-batch check")
        timings = {graph.name: placement.timings.get(frozenset(seg.nodes))
                   for seg, graph in zip(partition.segments, segments)}
        if selection and accuracy_report is not None:
            timings.update(figures_against_tf(selection, {
                s["name"]: s["precision"] for s in accuracy_report.segments}))
        report = build_report(label, model.num_ops, graph_def, partition.excluded, compiled,
                              tensor_infos=infos, details=placement.details, timings=timings)
        report.dynamic_batch = serving != inputs.shapes
        report.placement = placement.summary
        if accuracy_report is not None:
            report.accuracy = accuracy_report.to_json()
        with shown_info():
            log_report(report)
        runtime: dict = {}
        for name in used or list(plan.supports):
            runtime = {**get_backend(name).runtime_info(), **runtime}
        runtime["backend"] = label
        watch.lap("report")
        fill = options.xla_cache and "xla" in used and xla_cache.has_xla_segments(final)
        write_saved_model(final, model, serving, infos, path, files)
        watch.lap("export")
        env = xla_cache.fill_env(Path(staging)) if fill else None
        cache = CompileCache.for_options(options)
        entries_key = xla_cache.entries_key(final, serving) if fill else ""
        # An earlier compile of this very graph shipped its executables: no run for them.
        reused = xla_cache.reuse(cache, entries_key, path) if fill else []
        timed_here = False
        if options.profile and used:
            report.model_timing = _timed_by_placement(report) or _cached_model_timing(
                stored_model_timing, compiled, report)
            if report.model_timing is None:
                report.model_timing = _time_whole_model(model, inputs, path, report, env)
                timed_here = True
                if report.model_timing is not None and model_key is not None:
                    CompileCache.for_options(options).store_timings(model_key, {
                        "model_timing": report.model_timing, "compiled": _compiled_names(
                            compiled)})
            watch.lap("model timing")
        if fill and not timed_here and not reused:
            _run_once(model, inputs, path, env)
        if fill:
            shipped = xla_cache.ship(Path(staging), path)
            if shipped:
                xla_cache.remember(cache, entries_key, path, shipped)
            runtime["xla_cache"] = _xla_cache_report(shipped or reused, not shipped)
            watch.lap("xla cache")
        if "xla" in used:  # this compile's XLA runs added to the per-user cache
            xla_cache.trim(xla_cache.cache_directory())
        report.timings = watch.seconds
        _write_report(path, report, runtime)
    if options.verbose:
        with shown_info():
            log.info("Compile time: %s", timing_line(report.to_json()))
    return report.result()


def _xla_cache_report(entries: list[str], from_cache: bool) -> dict:
    """The shipped XLA executables (built by the run of the written model, or from the
    compile cache) and what a server without fuseflow sets to use them (README: XLA
    segments start warm)."""
    if not entries:
        log.info("no XLA executables to ship with the model: its XLA segments compile at "
                 "their first call in each process")
    cache = f"<model dir>/assets/{xla_cache.ASSETS_DIR}"
    return {"entries": len(entries), **({"source": "cache"} if entries and from_cache else {}),
            "prefix": xla_cache.cpu_prefix(),
            "tf_xla_flags": xla_cache.serving_flags(cache, read_only=True)}


def _model_feeds(model: LoadedModel, inputs: InputShapes) -> dict | None:
    values = _input_values(model, inputs)
    return {s.key: values[s.tensor_name] for s in model.inputs} if values else None


def _run_once(model: LoadedModel, inputs: InputShapes, path: Path, env: dict) -> None:
    """Call the written model once in a fresh process (through both Python loaders), so
    XLA compiles its segments there, with `env` pointing its persistent cache."""
    feeds = _model_feeds(model, inputs)
    if feeds is None:
        return
    with tempfile.TemporaryDirectory(prefix="fuseflow-timing-") as tmp:
        if time_models(ModelTimingJob(None, str(path), list(model.tags), model.signature_key,
                                      feeds, 0.0, both_loaders=True), Path(tmp), env) is None:
            log.info("the compiled model could not be run to fill its XLA cache")


def _timed_by_placement(report: CompileReport) -> dict | None:
    """The whole model's timing when placement (or, under int8, precision.select) already
    took it: one compiled segment holding every op, timed against TF at the compile
    shapes (placement: one call at a time and with calls in flight). Timing the written
    model again in a fresh process would measure the same thing twice (6 s of a 34 s
    ResNet50 compile). TF's figure is then that of the frozen, optimized graph, which is
    no slower than the original's: the speed-up shown errs low."""
    compiled = [s for s in report.segments if s.compiled]
    if len(compiled) != 1 or report.ratio < 1.0 or not compiled[0].timing:
        return None
    figure = compiled[0].timing
    timed_by = figure.get("timed_by", "placement")
    timing = {"original_ms": figure["tf_latency_ms"], "compiled_ms": figure["latency_ms"],
              "speedup": figure["speedup"], "source": timed_by}
    if figure.get("source") == "cache":
        timing["cached"] = True  # placement's timings came from the compile cache
    with shown_info():
        log.info("compiled model: %.3g ms per call, original %.3g ms (%.2fx), timed by "
                 "%s%s: its one segment is the whole model", timing["compiled_ms"],
                 timing["original_ms"], timing["speedup"], timed_by,
                 " (timings from the compile cache)" if timing.get("cached") else "")
    _warn_if_slower(timing, report)
    return timing


def _model_timing_key(placement: Placement, serving: dict, options: CompilerOptions
                      ) -> str | None:
    """The compile cache's key of the whole model's timing: placement's timings (and so
    the model, its candidates and the options that reach the backends), what placement
    chose (which must_compile and force_fuse_ops change) and the shapes it serves at."""
    if placement.timing_key is None:
        return None
    chosen = [(s.name, s.colour, sorted(s.nodes)) for s in placement.partition.segments]
    return timing_key("model", placement.timing_key, chosen, serving, options.must_compile,
                      options.dynamic_batch)


def _compiled_names(compiled: list[CompiledSegment]) -> list[list[str]]:
    return [[c.segment.name, c.backend] for c in compiled if c.artifact is not None]


def _cached_model_timing(stored: dict | None, compiled: list[CompiledSegment],
                         report: CompileReport) -> dict | None:
    """The whole model's timing an earlier compile of the same model took, if its segments
    compiled as they did then (a segment that failed this time makes another model)."""
    if stored is None:
        return None
    timing = stored.get("model_timing")
    try:
        ok = (stored.get("compiled") == _compiled_names(compiled) and isinstance(timing, dict)
              and all(isinstance(timing[k], (int, float))
                      for k in ("original_ms", "compiled_ms", "speedup")))
    except KeyError:
        ok = False
    if not ok:
        log.debug("compile cache: the stored whole-model timing does not fit; timing again")
        return None
    timing = {**timing, "source": "cache"}
    with shown_info():
        log.info("compiled model: %.3g ms per call, original %.3g ms (%.2fx), timed by an "
                 "earlier compile of the same model (compile cache; --retime times again)",
                 timing["compiled_ms"], timing["original_ms"], timing["speedup"])
    _warn_if_slower(timing, report)
    return timing


def _time_whole_model(model: LoadedModel, inputs: InputShapes, path: Path,
                      report: CompileReport, env: dict | None = None) -> dict | None:
    """Time the written model against the original; warn when it is slower, naming the
    segments that cost the most. With `env` (xla_cache.fill_env), the timing process
    fills the model's XLA cache on the way."""
    feeds = _model_feeds(model, inputs)
    if feeds is None:
        return None
    with tempfile.TemporaryDirectory(prefix="fuseflow-timing-") as tmp:
        timing = time_models(ModelTimingJob(
            model.model_dir, str(path), list(model.tags), model.signature_key, feeds, 1.0,
            both_loaders=env is not None), Path(tmp), env)
    if timing is None:
        log.info("the compiled model could not be timed against the original")
        return None
    with shown_info():
        log.info("compiled model: %.3g ms per call, original %.3g ms (%.2fx), timed here "
                 "at the compile shapes", timing["compiled_ms"], timing["original_ms"],
                 timing["speedup"])
    _warn_if_slower(timing, report)
    return timing


def _warn_if_slower(timing: dict, report: CompileReport) -> None:
    if timing["speedup"] < 1.0:
        costly = sorted((s for s in report.segments if s.compiled and s.timing),
                        key=lambda s: -s.timing["latency_ms"])[:3]
        named = "; ".join(f"{s.name} on {s.backend}: {s.timing['latency_ms']:.3g} ms "
                          f"(TF {s.timing['tf_latency_ms']:.3g} ms)" for s in costly)
        log.warning("the compiled model ran slower than the original here (%.3g ms vs %.3g "
                    "ms per call)%s", timing["compiled_ms"], timing["original_ms"],
                    f"; the segments that cost the most: {named}" if named else "")


def _compile_elsewhere(ready: dict[int, CompiledSegment], segments: list[Segment],
                       plan: _Plan, work: Path) -> None:
    """A segment its backend failed to compile goes to another backend that takes all of
    it (auto only): a frontend's bug then costs speed, not coverage."""
    retry = []
    for k, item in ready.items():
        if item.artifact is not None:
            continue
        others = [b for b in plan.supports if b != item.backend and all(
            plan.supports[b].get(n) is None or n in plan.force_fuse for n in segments[k].nodes)]
        if others:
            name = item.segment.name
            retry.append((k, CompileJob(others[0], item.segment, f"{name}.{others[0]}")))
    if not retry:
        return
    again = compile_segments([j for _, j in retry], plan.options, work)
    for (k, job), item in zip(retry, again):
        if item.artifact is not None:
            log.warning("segment %s failed on %s (%s); compiled on %s instead",
                        job.segment.name, ready[k].backend, ready[k].error, job.backend)
            ready[k] = item


def _input_values(model: LoadedModel, inputs: InputShapes) -> dict:
    """Values to run the model on while timing: the user's feeds, else synthesized ones
    (none for string inputs: segments are then timed on random values)."""
    if inputs.feeds:
        return dict(inputs.feeds)
    if any(s.dtype == tf.string for s in model.inputs):
        return {}
    return {s.tensor_name: synthesized_value(s.dtype, inputs.shapes[s.key], 0)
            for s in model.inputs}


def simple_save(session, export_dir, inputs, outputs, legacy_init_op=None, batch_size=1,
                **kwargs) -> dict:
    """Compile a live session's graph and save it with a serving_default signature.

    Deprecated in the reference as TF's own simple_save is; kept so its scripts
    run. kwargs are compile()'s (shape_feed_dict/feed_dict, the reference's
    names, are taken as model_shape_feed_dict/model_feed_dict).
    Returns what compile() returns.
    """
    from fuseflow.session_compile import save_session

    with shown(logging.WARNING), tf_quiet():
        model_path(export_dir)
        if os.path.exists(os.fspath(export_dir)):
            raise errors.OutputDirError(
                f"export_dir {os.fspath(export_dir)!r} already exists: fuseflow never "
                "overwrites; remove it or choose another path")
        for theirs, ours in (("shape_feed_dict", "model_shape_feed_dict"),
                             ("feed_dict", "model_feed_dict")):
            if theirs in kwargs:
                value = kwargs.pop(theirs)
                kwargs[ours] = None if value is None else {
                    getattr(k, "name", k): v for k, v in value.items()}
        with tempfile.TemporaryDirectory(prefix="fuseflow-simple-save-") as tmp:
            saved = os.path.join(tmp, "model")
            save_session(session, saved, inputs, outputs, legacy_init_op)
            return compile(saved, export_dir, batch_size=batch_size, **kwargs)


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


# The rest of the reference's saved_model module, each in its own file.
from fuseflow.core_binding import inspect_core_binding, set_core_binding  # noqa: E402
from fuseflow.profiling import profile  # noqa: E402

__all__ = ["compile", "simple_save", "profile", "set_core_binding", "inspect_core_binding"]
