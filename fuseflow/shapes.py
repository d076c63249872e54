"""Stage 2: batch_size / shape feeds / feed dict -> every tensor's shape.

Priority as in the reference: model_feed_dict > model_shape_feed_dict >
batch_size. Static shape inference does most of the work; op semantics fill
in where TF's shape functions give up (table lookups); what is still unknown
is measured by running the graph, on the feed dict or, for numeric inputs, on
synthesized ones (see infer_tensor_shapes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fuseflow import errors
from fuseflow.graph_util import is_control, node_name, tensor_name, without_weights
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
    """Shape and dtype of every tensor, found in three steps:

    1. TF's static shape inference. Signature inputs in the middle of the
       graph (not Placeholders) are mapped to fixed-shape placeholders so
       their consumers' shapes become known too.
    2. Where TF's shape function gives up on an op whose semantics fix its
       output shape (a table lookup: the keys' shape plus the value shape),
       that shape is set and TF's inference runs again downstream of it.
    3. Still unknown: with model_feed_dict the graph is run on it; without,
       if every input is numeric, it is run on synthesized inputs of the
       compile shapes, and only the dims that every run agrees on are kept.
    """
    # Shapes need no weight values: they stay out (a stand-in has the same dtype and
    # shape), and come in only for a run. ResNet50's 100 MB imported cost 0.3 s.
    light, weights = without_weights(graph_def)
    refined: dict[str, TensorInfo] = {}
    while True:
        graph, input_map = _import(light, model, inputs, refined)
        infos = _static_infos(graph, input_map, refined)
        found = _semantic_shapes(graph, infos)
        if not found:
            break
        refined.update({t: TensorInfo(infos[t].dtype, shape) for t, shape in found.items()})
    if refined:
        log.info("shapes from op semantics: %s", ", ".join(
            f"{t} {_fmt(i.shape)}" for t, i in sorted(refined.items())))
    runnable = inputs.feeds or all(s.dtype.is_numpy_compatible or s.dtype == tf.string
                                   for s in model.inputs)
    if not runnable or not _measurable(graph, infos, set(input_map)):
        return infos
    if refined or weights:  # runnable: no stand-ins
        graph, input_map = _import(graph_def, model, inputs, {})
    if inputs.feeds:
        feed_dict = {input_map[tensor_name(k)]: v for k, v in inputs.feeds.items()}
        _measure_unknown(graph, infos, feed_dict, set(input_map), model.init_nodes)
    else:
        _measure_synthesized(graph, infos, input_map, model, inputs)
    return infos


_FEED_PREFIX = "fuseflow_shape_feed_"
_REFINED_PREFIX = "fuseflow_shape_refined_"


def _import(graph_def, model: LoadedModel, inputs: InputShapes,
            refined: dict[str, TensorInfo]):
    """The graph with signature inputs (and tensors whose shapes were refined) replaced
    by placeholders of their shapes, and the signature inputs' placeholders."""
    graph = tf.Graph()
    with graph.as_default():
        input_map = {
            tensor_name(s.tensor_name): tf.compat.v1.placeholder(
                s.dtype, inputs.shapes[s.key], name=f"{_FEED_PREFIX}{k}")
            for k, s in enumerate(model.inputs)}
        stand_ins = {t: tf.compat.v1.placeholder(info.dtype, info.shape,
                                                 name=f"{_REFINED_PREFIX}{k}")
                     for k, (t, info) in enumerate(sorted(refined.items()))}
        tf.graph_util.import_graph_def(graph_def, input_map={**stand_ins, **input_map},
                                       name="")
    return graph, input_map


def _static_infos(graph, input_map: dict, refined: dict) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for op in graph.get_operations():
        if op.name.startswith((_FEED_PREFIX, _REFINED_PREFIX)):
            continue
        for t in op.outputs:
            shape = None if t.shape.rank is None else tuple(t.shape.as_list())
            infos[t.name] = TensorInfo(t.dtype, shape)
    for name, placeholder in input_map.items():
        infos[name] = TensorInfo(placeholder.dtype, tuple(placeholder.shape.as_list()))
    infos.update(refined)
    return infos


def _semantic_shapes(graph, infos: dict[str, TensorInfo]) -> dict[str, tuple]:
    """Output shapes TF's shape functions leave unknown but the op's meaning fixes."""
    found = {}
    for op in graph.get_operations():
        rule = _SHAPE_RULES.get(op.type)
        if rule is None:
            continue
        for k, shape in rule(op).items():
            t = op.outputs[k].name
            if (shape is not None and shape.is_fully_defined() and t in infos
                    and not infos[t].fully_defined):
                found[t] = tuple(shape.as_list())
    return found


def _lookup_shape(op) -> dict[int, tf.TensorShape | None]:
    """A lookup answers per key: the keys' shape plus the table's value shape, which
    is the default value's shape (scalar-valued tables may also take one default per
    key, so a non-scalar default counts only where the table declares value_shape)."""
    keys, default = op.inputs[1].shape, op.inputs[2].shape
    if default.rank == 0:
        return {0: keys}
    table = op.inputs[0].op
    if "value_shape" in table.node_def.attr:
        return {0: keys.concatenate(tf.TensorShape(table.get_attr("value_shape")))}
    return {0: None}


def _parse_example_shapes(op) -> dict[int, tf.TensorShape | None]:
    """Dense outputs: the batch (serialized's shape) plus each fixed dense_shape."""
    batch = op.inputs[0].shape
    num_sparse = op.get_attr("num_sparse")
    shapes = {}
    for k, dense in enumerate(op.get_attr("dense_shapes")):
        dense = tf.TensorShape(dense)
        if dense.is_fully_defined():
            shapes[3 * num_sparse + k] = batch.concatenate(dense)
    return shapes


def _parse_single_example_shapes(op) -> dict[int, tf.TensorShape | None]:
    num_sparse = op.get_attr("num_sparse")
    return {3 * num_sparse + k: tf.TensorShape(d)
            for k, d in enumerate(op.get_attr("dense_shapes"))}


_SHAPE_RULES = {
    "LookupTableFindV2": _lookup_shape,
    "LookupTableFind": _lookup_shape,
    "ParseExampleV2": _parse_example_shapes,
    "ParseSingleExample": _parse_single_example_shapes,
}


def _measurable(graph, infos: dict[str, TensorInfo], fed: set[str]) -> list[str]:
    """Tensors still unknown that a session can fetch: not resources or variants, not
    inside TF1 loop/cond frames (those never enter a segment anyway)."""
    inside = _inside_v1_frames(graph)
    return [name for name, info in infos.items()
            if not info.fully_defined and name not in fed
            and info.dtype not in (tf.resource, tf.variant)
            and graph.get_tensor_by_name(name).op.name not in inside]


_V1_FRAME_OPS = frozenset({"Switch", "Merge", "Enter", "NextIteration", "LoopCond",
                           "RefSwitch", "RefMerge", "RefEnter", "RefNextIteration"})


def _inside_v1_frames(graph) -> set[str]:
    """Ops of TF1 loops and conds and everything after them, up to a loop's Exit."""
    stack = [op for op in graph.get_operations() if op.type in _V1_FRAME_OPS]
    inside = {op.name for op in stack}
    while stack:
        for t in stack.pop().outputs:
            for consumer in t.consumers():
                if consumer.name not in inside and consumer.type not in ("Exit", "RefExit"):
                    inside.add(consumer.name)
                    stack.append(consumer)
    return inside


def _run(graph, fetches: list[str], feed_dict, init_nodes: list[str]) -> list:
    with tf.compat.v1.Session(graph=graph) as sess:
        names = {op.name for op in graph.get_operations()}
        init = [n for n in init_nodes if n in names]
        if init:  # table initializers (main_op): lookups fail without them
            sess.run([graph.get_operation_by_name(n) for n in init])
        return sess.run(fetches, feed_dict=feed_dict)


def _measure_unknown(graph, infos: dict[str, TensorInfo], feed_dict, fed: set[str],
                     init_nodes: list[str]) -> None:
    """Run the graph once with the user's feeds to learn data-dependent shapes."""
    wanted = _measurable(graph, infos, fed)
    if not wanted:
        return
    try:
        values = _run(graph, wanted, feed_dict, init_nodes)
    except Exception as e:
        raise errors.ShapeError(
            f"running the model on model_feed_dict failed: {errors.reason(e)}. Check that the feed "
            "values are valid inputs for this model") from None
    for name, value in zip(wanted, values):
        infos[name] = TensorInfo(infos[name].dtype, tuple(np.shape(value)))


# Text for string inputs: a few words, many words, then none (run 2). A shape that follows
# the text's length (tokens of a ragged split) differs between them and stays unknown;
# one that does not (TextVectorization's output_sequence_length) is kept. Inputs that
# must parse (serialized tf.Example) fail on them and measure nothing.
_WORDS = ("the", "a", "of", "and", "model", "hello", "x", "42")
_WORD_COUNTS = (3, 40, 0)


def synthesized_value(dtype: tf.DType, shape: tuple[int, ...], run: int) -> np.ndarray:
    """Run 0 and 1: random values (ints 0 or 1: valid indices and ids for any table);
    run 2: all zeros, which changes any size that counts or selects values. Strings:
    text of _WORD_COUNTS[run] words."""
    if dtype == tf.string:
        rng = np.random.default_rng(run)
        texts = [" ".join(rng.choice(_WORDS, _WORD_COUNTS[run])).encode()
                 for _ in range(int(np.prod(shape, dtype=np.int64)))]
        return np.array(texts, dtype=object).reshape(shape)
    want = dtype.as_numpy_dtype
    if run == 2:
        return np.zeros(shape, want)
    rng = np.random.default_rng(run)
    if dtype.is_floating or dtype.is_complex:
        return rng.standard_normal(shape).astype(want)
    if dtype == tf.bool:
        return rng.random(shape) < 0.5
    return rng.integers(0, 2, shape).astype(want)


def _measure_synthesized(graph, infos: dict[str, TensorInfo], input_map: dict,
                         model: LoadedModel, inputs: InputShapes) -> None:
    """Measure the shapes still unknown by running the graph on synthesized inputs of the
    compile shapes. A shape that depends on the input values (boolean_mask, Unique,
    Where) differs between random and all-zero inputs, so only the dims that agree in
    all three runs are kept; a run that fails measures nothing. A shape measured wrong
    costs speed, not answers: a FuseflowOp given other shapes runs its TF fallback."""
    wanted = _measurable(graph, infos, set(input_map))
    if not wanted:
        return
    runs = []
    for run in range(3):
        feed_dict = {input_map[tensor_name(s.tensor_name)]:
                     synthesized_value(s.dtype, inputs.shapes[s.key], run) for s in model.inputs}
        try:
            runs.append([np.shape(v) for v in _run(graph, wanted, feed_dict, model.init_nodes)])
        except Exception as e:
            log.info("shapes left unknown: the model did not run on synthesized inputs (%s)",
                     errors.reason(e))
            return
    for k, name in enumerate(wanted):
        shapes = {r[k] for r in runs}
        if len({len(s) for s in shapes}) != 1:
            continue
        # An empty dim says "nothing selected" on these inputs, not "always empty".
        dims = [d[0] if len(set(d)) == 1 and d[0] > 0 else None for d in zip(*shapes)]
        static = infos[name].shape
        if static is not None and len(static) == len(dims):
            dims = [s if s is not None else d for s, d in zip(static, dims)]
        infos[name] = TensorInfo(infos[name].dtype, tuple(dims))


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
