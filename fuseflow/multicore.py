"""auto_multicore: a compiled model that serves concurrent calls on N independent streams.

The reference replicates a compiled model over N NeuronCores. On the CPU the
OpenVINO equivalent is streams: NUM_STREAMS=N splits the cores into N groups
that each run one inference at a time, and the fused op keeps a pool of N
infer requests, so N calls in flight run side by side instead of queueing on
one. Only the fused ops' attributes change: no recompiling.
XLA segments have no such knob and are left as they are (with a warning).
"""

from __future__ import annotations

import logging
import os
import shutil

from fuseflow import errors

log = logging.getLogger("fuseflow")


def _check_cores(num_cores) -> int:
    if isinstance(num_cores, bool) or not isinstance(num_cores, int) or num_cores < 1:
        raise errors.OptionError(f"num_cores must be a positive integer, got {num_cores!r}")
    return num_cores


def set_streams(graph_def, num_cores: int) -> int:
    """Make every OpenVINO fused op of graph_def run num_cores streams; returns how many."""
    changed, xla = 0, 0
    for node in graph_def.node:
        if node.op != "FuseflowOp":
            xla += "_XlaMustCompile" in node.attr and node.attr["_XlaMustCompile"].b
            continue
        kept = [p for p in node.attr["properties"].list.s
                if not p.startswith((b"NUM_STREAMS=", b"PERFORMANCE_HINT="))]
        hint = b"PERFORMANCE_HINT=" + (b"THROUGHPUT" if num_cores > 1 else b"LATENCY")
        del node.attr["properties"].list.s[:]
        node.attr["properties"].list.s.extend(
            kept + [hint, f"NUM_STREAMS={num_cores}".encode()])
        node.attr["max_infer_requests"].i = num_cores
        changed += 1
    if xla:
        log.warning("auto_multicore: %d XLA segment(s) left as they are (XLA has no "
                    "streams); TensorFlow already runs concurrent calls side by side", xla)
    return changed


def auto_multicore(func_or_model_dir, example_inputs=None, num_cores=1, *,
                   new_model_dir=None):
    """A traced model (from fuseflow.trace) or a compiled SavedModel dir, on num_cores streams.

    With a traced model, returns a new traced model (example_inputs is
    accepted for the reference's signature; the traced shapes are kept).
    With a model dir, writes new_model_dir and returns its path.
    """
    from fuseflow.trace import TracedModel

    num_cores = _check_cores(num_cores)
    if isinstance(func_or_model_dir, TracedModel):
        old = func_or_model_dir
        graph_def = type(old._compiled.graph_def)()
        graph_def.CopyFrom(old._compiled.graph_def)
        if not set_streams(graph_def, num_cores):
            log.warning("auto_multicore: the model has no OpenVINO segment to replicate")
        compiled = type(old._compiled)(graph_def, old._compiled.input_names,
                                       old._compiled.output_names,
                                       old._compiled.output_structure)
        return TracedModel(compiled, list(old._input_specs), old.on_neuron_ratio)
    if isinstance(func_or_model_dir, (str, os.PathLike)):
        return _model_dir(os.fspath(func_or_model_dir), new_model_dir, num_cores)
    raise errors.OptionError(
        "auto_multicore takes a model returned by fuseflow.trace or the path of a compiled "
        f"SavedModel, got {func_or_model_dir!r}: trace or compile the model first")


def _model_dir(model_dir: str, new_model_dir, num_cores: int) -> str:
    from fuseflow.export import check_output_dir
    from fuseflow.load import read_saved_model_proto

    if new_model_dir is None:
        raise errors.OptionError("auto_multicore on a model directory needs new_model_dir=")
    proto = read_saved_model_proto(model_dir)
    out = check_output_dir(model_dir, new_model_dir)
    changed = sum(set_streams(mg.graph_def, num_cores) for mg in proto.meta_graphs)
    if not changed:
        log.warning("auto_multicore: %s has no OpenVINO segment to replicate", model_dir)
    tmp = out.parent / f".{out.name}.fuseflow-tmp"
    shutil.copytree(model_dir, tmp)
    try:
        (tmp / "saved_model.pb").write_bytes(proto.SerializeToString())
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
