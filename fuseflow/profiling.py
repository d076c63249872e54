"""saved_model.profile: where a (compiled) model spends its time, op by op and segment by segment.

The reference loads the model, warms it up, runs it once with a full trace,
writes a Chrome trace and returns TF's profiler analysis. fuseflow does the
same with TF's own tracing (RunOptions FULL_TRACE, client.timeline) and
returns the times as plain data; fused ops are named as segments (with their
backend) both in the result and in the Chrome trace.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from fuseflow import errors
from fuseflow.logs import shown_info, tf_quiet
from fuseflow.tf_compat import tf

log = logging.getLogger("fuseflow")


@dataclass
class OpTime:
    name: str
    op: str
    micros: int
    segment: bool  # a fused op: a whole segment ran here


@dataclass
class ProfileResult:
    """Times of the traced run, longest first."""

    total_micros: int
    ops: list[OpTime] = field(default_factory=list)
    segments: list[dict] = field(default_factory=list)  # name, backend, micros, ops
    timeline_json: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _random_feed(spec, shape, rng) -> np.ndarray:
    dtype = spec.dtype
    if dtype == tf.string:
        return np.full(shape, b"", dtype=object)
    if dtype == tf.bool:
        return np.zeros(shape, bool)
    if dtype.is_integer:
        return np.zeros(shape, dtype.as_numpy_dtype)
    return rng.standard_normal(shape).astype(dtype.as_numpy_dtype)


def _feeds(model_dir, tags, signature_def_key, batch_size, model_shape_feed_dict,
           model_feed_dict, meta_graph, key) -> dict[str, np.ndarray]:
    """Tensor name -> value: model_feed_dict, else random values of the resolved shapes."""
    from fuseflow.load import LoadedModel, _specs
    from fuseflow.shapes import resolve_input_shapes

    sig = meta_graph.signature_def[key]
    model = LoadedModel(model_dir=model_dir, tags=list(meta_graph.meta_info_def.tags),
                        signature_key=key, method_name=sig.method_name,
                        inputs=_specs(sig.inputs), outputs=_specs(sig.outputs),
                        graph_def=meta_graph.graph_def)
    resolved = resolve_input_shapes(model, batch_size, model_shape_feed_dict, model_feed_dict)
    if resolved.feeds is not None:
        return dict(resolved.feeds)
    rng = np.random.default_rng(0)
    return {s.tensor_name: _random_feed(s, resolved.shapes[s.key], rng) for s in model.inputs}


def profile(model_dir, timeline_json=None, batch_size=1, model_shape_feed_dict=None,
            model_feed_dict=None, tags=None, signature_def_key=None, config=None,
            num_warmup_runs=1, op_log=None, cmd="scope", options=None) -> ProfileResult:
    """Warm up, run once with a full trace, write the Chrome trace to timeline_json.

    op_log, cmd and options (arguments of TF1's tfprof) are accepted and unused:
    the result carries the per-op and per-segment times directly.
    """
    from tensorflow.python.client import timeline

    from fuseflow.inspect_model import _backend, is_fused
    from fuseflow.load import (
        model_path,
        read_saved_model_proto,
        select_meta_graph,
        select_signature,
    )

    model_dir = model_path(model_dir)
    if not isinstance(num_warmup_runs, int) or num_warmup_runs < 0:
        raise errors.OptionError(
            f"num_warmup_runs must be a non-negative integer, got {num_warmup_runs!r}")
    proto = read_saved_model_proto(model_dir)
    tag_list, meta_graph = select_meta_graph(proto, tags)
    key = select_signature(meta_graph, signature_def_key)
    feeds = _feeds(model_dir, tags, signature_def_key, batch_size, model_shape_feed_dict,
                   model_feed_dict, meta_graph, key)
    fetches = {k: v.name for k, v in meta_graph.signature_def[key].outputs.items()}
    graph = tf.Graph()
    with tf_quiet(), graph.as_default(), tf.compat.v1.Session(graph=graph,
                                                              config=config) as sess:
        tf.compat.v1.saved_model.load(sess, tag_list, model_dir)
        for _ in range(num_warmup_runs):
            sess.run(fetches, feeds)
        run_options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
        metadata = tf.compat.v1.RunMetadata()
        sess.run(fetches, feeds, options=run_options, run_metadata=metadata)
        fused = {n.name: n for n in graph.as_graph_def().node if is_fused(n)}
        op_type = {op.name: op.type for op in graph.get_operations()}

    times: dict[str, int] = {}
    for device in metadata.step_stats.dev_stats:
        for stats in device.node_stats:
            name = stats.node_name.split(":")[0]
            if name in op_type:
                times[name] = max(times.get(name, 0), stats.all_end_rel_micros)
    ops = sorted((OpTime(n, op_type[n], t, n in fused) for n, t in times.items()),
                 key=lambda o: -o.micros)
    segments = [{"name": o.name, "backend": _backend(fused[o.name]), "micros": o.micros,
                 "ops": _segment_size(fused[o.name], graph, model_dir)}
                for o in ops if o.segment]
    result = ProfileResult(total_micros=sum(o.micros for o in ops), ops=ops, segments=segments)
    if timeline_json is not None:
        trace = json.loads(timeline.Timeline(metadata.step_stats).generate_chrome_trace_format())
        for event in trace.get("traceEvents", []):
            node = event.get("args", {}).get("name")
            if node in fused:
                event["name"] = f"segment {node} [{_backend(fused[node])}]"
                event["cat"] = "fuseflow segment"
        with open(timeline_json, "w") as f:
            json.dump(trace, f)
        result.timeline_json = str(timeline_json)
    with shown_info():
        for seg in segments:
            log.info("segment %s [%s]: %d us", seg["name"], seg["backend"], seg["micros"])
        log.info("profiled %s: %d ops, %d us in all%s", model_dir, len(ops),
                 result.total_micros, f"; timeline in {timeline_json}" if timeline_json else "")
    return result


def _segment_size(node, graph, model_dir) -> int:
    """Computing ops in a fused node's embedded subgraph (kept in the model's assets)."""
    from fuseflow.assets import read_asset_libraries
    from fuseflow.graph_util import NON_COMPUTE_OPS
    from fuseflow.inspect_model import _body_name

    graph_def = graph.as_graph_def()
    read_asset_libraries(graph_def, model_dir)
    library = {f.signature.name: f for f in graph_def.library.function}
    body = library.get(_body_name(node))
    return 0 if body is None else sum(n.op not in NON_COMPUTE_OPS for n in body.node_def)
