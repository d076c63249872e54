"""Stage 2: batch_size / shape feeds / feed dict -> every tensor's shape.

Priority as in the reference: model_feed_dict > model_shape_feed_dict >
batch_size. Static shape inference does most of the work; with a feed dict
the graph is also run so that data-dependent shapes become known.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fuseflow import errors
from fuseflow.graph_util import is_control, node_name, tensor_name
from fuseflow.load import LoadedModel, TensorSpec
from fuseflow.tf_compat import tf

log = logging.getLogger("fuseflow")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class InputShapes:
    """The fixed shape of every signature input, and feed values when given."""

    shapes: dict[str, Shape]  # signature key -> shape
    feeds: dict[str, np.ndarray] | None  # tensor name -> value (model_feed_dict only)


@dataclass(frozen=True)
class TensorInfo:
    dtype: tf.DType
    shape: tuple[int | None, ...] | None  # None: unknown rank

    @property
    def fully_defined(self) -> bool:
        return self.shape is not None and all(d is not None for d in self.shape)


def _key_lookup(model: LoadedModel, feed: dict, what: str) -> dict[str, object]:
    """Map user keys (signature keys or tensor names) to signature keys."""
    if not isinstance(feed, dict):
        raise errors.OptionError(f"{what} must be a dict {{input name: value}}, got "
                                 f"{type(feed).__name__}")
    by_key = {s.key: s.key for s in model.inputs}
    by_key.update({s.tensor_name: s.key for s in model.inputs})
    by_key.update({node_name(s.tensor_name): s.key for s in model.inputs})
    out = {}
    for user_key, value in feed.items():
        if user_key not in by_key:
            raise errors.ShapeError(
                f"{what} key {user_key!r} matches no input of signature "
                f"{model.signature_key!r}; its inputs are "
                f"{[f'{s.key} ({s.tensor_name})' for s in model.inputs]}: use one of those "
                "keys or tensor names")
        out[by_key[user_key]] = value
    return out


def _check_compatible(spec: TensorSpec, shape: Shape, what: str) -> None:
    if spec.shape is None:
        return
    if len(shape) != len(spec.shape) or any(
            d is not None and d != s for d, s in zip(spec.shape, shape)):
        raise errors.ShapeError(
            f"{what} gives input {spec.key!r} ({spec.tensor_name}) the shape {list(shape)}, "
            f"but the model declares {_fmt(spec.shape)}: give a shape of that rank whose "
            "fixed dimensions match")


def _fmt(shape) -> str:
    if shape is None:
        return "<unknown rank>"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _batch_shape(spec: TensorSpec, batch_size: int) -> Shape:
    hint = (f"pass model_shape_feed_dict={{{spec.key!r}: [...]}} or model_feed_dict with "
            "real inputs")
    if spec.shape is None:
        raise errors.ShapeError(
            f"batch_size is not sufficient to determine the shape of input tensor "
            f"{spec.tensor_name} (signature key {spec.key!r}): its rank is unknown; {hint}")
    shape = list(spec.shape)
    if shape and shape[0] is None:
        shape[0] = batch_size
    if any(d is None for d in shape):
        raise errors.ShapeError(
            f"batch_size is not sufficient to determine the shape of input tensor "
            f"{spec.tensor_name} (signature key {spec.key!r}): its shape is "
            f"{_fmt(spec.shape)}; {hint}")
    return tuple(shape)


def resolve_input_shapes(model: LoadedModel, batch_size=1, model_shape_feed_dict=None,
                         model_feed_dict=None) -> InputShapes:
    """Every signature input gets a fully known shape, or a ShapeError says which can't."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise errors.OptionError(f"batch_size must be a positive integer, got {batch_size!r}")
    specs = {s.key: s for s in model.inputs}
    if model_feed_dict is not None:
        values = _key_lookup(model, model_feed_dict, "model_feed_dict")
        missing = sorted(set(specs) - set(values))
        if missing:
            raise errors.ShapeError(
                f"model_feed_dict has no value for inputs {missing}: give a value for every "
                f"input of signature {model.signature_key!r}")
        shapes, feeds = {}, {}
        for key, value in values.items():
            spec = specs[key]
            try:
                array = np.asarray(value)
            except Exception as e:
                raise errors.ShapeError(
                    f"model_feed_dict[{key!r}] is not an array ({e}): pass a numpy array of "
                    f"shape {_fmt(spec.shape)}") from None
            want = spec.dtype.as_numpy_dtype
            if spec.dtype == tf.string:
                ok = array.dtype.kind in "SUO"
            else:
                ok = array.dtype == np.dtype(want) or (
                    array.dtype.kind == np.dtype(want).kind
                    and np.can_cast(array.dtype, want, casting="same_kind"))
            if not ok:
                raise errors.ShapeError(
                    f"model_feed_dict[{key!r}] has dtype {array.dtype}, but input "
                    f"{spec.tensor_name} is {spec.dtype.name}: pass a {spec.dtype.name} array")
            if spec.dtype != tf.string:
                array = array.astype(want, copy=False)
            _check_compatible(spec, array.shape, "model_feed_dict")
            shapes[key] = tuple(array.shape)
            feeds[spec.tensor_name] = array
        return InputShapes(shapes, feeds)
    shapes = {}
    given = {} if model_shape_feed_dict is None else _key_lookup(
        model, model_shape_feed_dict, "model_shape_feed_dict")
    for key, spec in specs.items():
        if key in given:
            shape = given[key]
            if not isinstance(shape, (list, tuple)) or not all(
                    isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
                    for d in shape):
                raise errors.ShapeError(
                    f"model_shape_feed_dict[{key!r}] must be a list of positive integers, "
                    f"got {shape!r}")
            shape = tuple(int(d) for d in shape)
            _check_compatible(spec, shape, "model_shape_feed_dict")
            shapes[key] = shape
        else:
            shapes[key] = _batch_shape(spec, int(batch_size))
    return InputShapes(shapes, None)


def serving_shapes(model: LoadedModel, inputs: InputShapes, dynamic_batch: bool
                   ) -> dict[str, tuple[int | None, ...]]:
    """What the compiled signature accepts: the compiled shapes, with dim 0 left free
    where the model had it free (the fused ops split or fall back at run time)."""
    shapes = {}
    for spec in model.inputs:
        shape = inputs.shapes[spec.key]
        if dynamic_batch and shape and (spec.shape is None or spec.shape[0] is None):
            shape = (None, *shape[1:])
        shapes[spec.key] = shape
    return shapes


def apply_input_shapes(graph_def, model: LoadedModel, shapes: dict[str, tuple]):
    """A copy of graph_def whose input Placeholders carry the given shapes."""
    fixed = graph_def.__class__()
    fixed.CopyFrom(graph_def)
    by_node = {node_name(s.tensor_name): shapes[s.key] for s in model.inputs}
    for node in fixed.node:
        if node.op == "Placeholder" and node.name in by_node:
            node.attr["shape"].shape.CopyFrom(
                tf.TensorShape(by_node[node.name]).as_proto())
    return fixed


def guard_input_shapes(graph_def, model: LoadedModel, shapes: dict[str, tuple]):
    """Make every consumer of an input read it through EnsureShape, so a fixed-shape model
    fed another shape fails loudly (TF's loaders don't check Placeholder shapes)."""
    out = graph_def.__class__()
    out.CopyFrom(graph_def)
    guards = {}
    for spec in model.inputs:
        tensor = tensor_name(spec.tensor_name)
        guard = out.node.add(name=f"{node_name(tensor)}/fuseflow_ensure_shape",
                             op="EnsureShape", input=[tensor])
        guard.attr["T"].type = spec.dtype.as_datatype_enum
        guard.attr["shape"].shape.CopyFrom(tf.TensorShape(shapes[spec.key]).as_proto())
        guards[tensor] = f"{guard.name}:0"
    for node in out.node:
        if node.op == "EnsureShape" and node.name.endswith("/fuseflow_ensure_shape"):
            continue
        for k, inp in enumerate(node.input):
            if not is_control(inp) and tensor_name(inp) in guards:
                node.input[k] = guards[tensor_name(inp)]
    return out


def infer_tensor_shapes(graph_def, model: LoadedModel, inputs: InputShapes
                        ) -> dict[str, TensorInfo]:
    """Static shape and dtype of every tensor; with feeds, unknown ones are measured.

    Signature inputs in the middle of the graph (not Placeholders) are mapped
    to fixed-shape placeholders so their consumers' shapes become known too.
    """
    graph = tf.Graph()
    with graph.as_default():
        input_map = {
            tensor_name(s.tensor_name): tf.compat.v1.placeholder(
                s.dtype, inputs.shapes[s.key], name=f"{_FEED_PREFIX}{k}")
            for k, s in enumerate(model.inputs)}
        tf.graph_util.import_graph_def(graph_def, input_map=input_map, name="")
    infos: dict[str, TensorInfo] = {}
    for op in graph.get_operations():
        if op.name.startswith(_FEED_PREFIX):
            continue
        for t in op.outputs:
            shape = None if t.shape.rank is None else tuple(t.shape.as_list())
            infos[t.name] = TensorInfo(t.dtype, shape)
    for name, placeholder in input_map.items():
        infos[name] = TensorInfo(placeholder.dtype, tuple(placeholder.shape.as_list()))
    if inputs.feeds:
        feed_dict = {input_map[tensor_name(k)]: v for k, v in inputs.feeds.items()}
        _measure_unknown(graph, infos, feed_dict, set(input_map), _in_control_flow(graph_def))
    return infos


_FEED_PREFIX = "fuseflow_shape_feed_"


def _measure_unknown(graph, infos: dict[str, TensorInfo], feed_dict, fed: set[str],
                     inside: set[str]) -> None:
    """Run the graph once with the user's feeds to learn data-dependent shapes."""
    wanted = [name for name, info in infos.items()
              if not info.fully_defined and name not in fed
              and info.dtype != tf.resource and info.dtype != tf.variant
              and node_name(name) not in inside]
    if not wanted:
        return
    try:
        with tf.compat.v1.Session(graph=graph) as sess:
            values = sess.run(wanted, feed_dict=feed_dict)
    except Exception as e:
        raise errors.ShapeError(
            f"running the model on model_feed_dict failed: {errors.reason(e)}. Check that the feed "
            "values are valid inputs for this model") from None
    for name, value in zip(wanted, values):
        infos[name] = TensorInfo(infos[name].dtype, tuple(np.shape(value)))


def _in_control_flow(graph_def) -> set[str]:
    """Nodes inside TF1 loops/conds, whose tensors session.run can't fetch (an Exit's can)."""
    from fuseflow.partition import in_v1_control_flow, topological_order

    return in_v1_control_flow(graph_def, topological_order(graph_def))


def node_tensors(node, infos: dict[str, TensorInfo]) -> list[str]:
    """Names of a node's data inputs and of its outputs."""
    tensors = [tensor_name(i) for i in node.input if not is_control(i)]
    k = 0
    while f"{node.name}:{k}" in infos:
        tensors.append(f"{node.name}:{k}")
        k += 1
    return tensors


def node_shapes_known(node, infos: dict[str, TensorInfo]) -> bool:
    """All data inputs and outputs of node have fully known shapes."""
    return all(t in infos and infos[t].fully_defined for t in node_tensors(node, infos))
