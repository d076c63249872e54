"""Random graphs, compiled with each backend, compute what the original computes.

hypothesis draws a small program: 1-3 float32 inputs with a batch dim, then up
to 10 ops each reading earlier tensors (ops the backends take: unary, binary
with broadcasting, matmul, conv, reductions, concat, split, reshape, slices,
transpose, gather, pad, softmax, constants; ops no backend takes: a string
round trip, a histogram; a few ops that are not per-sample or read the batch
size), then 1-3 of the tensors as outputs. The program is saved as a TF1
SavedModel and compiled at its batch size; the compiled model must give the
original's answers at that batch size and at another one (dynamic batch). No segment
may fail to compile, a program with an op the backends take must get a segment, and
the runtime stats must show the backend ran it (at the compiled batch size: every
fused op on the compiled executable, or XLA compiled its cluster).

Values are kept bounded (a result whose bound grows past 8 is scaled back) so
that rtol/atol 1e-4 compare meaningfully. A failing example prints as a
Program whose ops read like code; `compile_and_compare(backend, program)`
replays it, and the minimal programs of bugs found so far run first (_FOUND).

make test runs 6 fixed examples per backend. FUSEFLOW_FUZZ_EXAMPLES=N
(make fuzz: 1000) runs N examples per backend from a random seed.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    assert_outputs_close,
    assert_ran,
    fused_segments,
    ran_in_process,
    save_tf1,
    tf,
)
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

import fuseflow

BATCH = -1  # dim 0 of a tensor that carries the batch
_EXAMPLES = os.environ.get("FUSEFLOW_FUZZ_EXAMPLES")
_BOUND = 8.0  # a result that may exceed this is scaled back to _RESCALED
_RESCALED = 4.0
_INPUT_SHAPES = ((8,), (16,), (4, 4, 2), (4, 4, 3))
_MAX_BATCH = 13  # the largest other_batch


@dataclass(frozen=True)
class Op:
    """One step of a program: reads tensors `args`, appends its outputs to the list."""

    kind: str
    args: tuple[int, ...]
    param: tuple = ()
    scale: float = 1.0  # multiplies the result (keeps values bounded)

    def __repr__(self):
        scale = f" * {self.scale:.4g}" if self.scale != 1.0 else ""
        args = ", ".join(f"t{a}" for a in self.args)
        return f"{self.kind}{self.param!r}({args}){scale}"


@dataclass(frozen=True)
class Program:
    inputs: tuple[tuple[int, ...], ...]  # per-sample shapes
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]  # tensor indices; inputs are t0..t{n-1}
    batch: int  # compiled at this batch size
    other_batch: int  # also run at this one
    seed: int

    def __repr__(self):
        lines = [f"Program(batch={self.batch}, other_batch={self.other_batch}, "
                 f"seed={self.seed})"]
        lines += [f"  t{i} = input[B, {', '.join(map(str, s))}]"
                  for i, s in enumerate(self.inputs)]
        k = len(self.inputs)
        for op in self.ops:
            n = _OUTPUT_COUNT.get(op.kind, 1)
            lines.append(f"  {', '.join(f't{k + j}' for j in range(n))} = {op!r}")
            k += n
        lines.append(f"  outputs: {', '.join(f't{i}' for i in self.outputs)}")
        return "\n".join(lines)

    def feeds(self, batch: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed + batch)
        return {f"x{i}": rng.uniform(-2, 2, (batch, *s)).astype(np.float32)
                for i, s in enumerate(self.inputs)}


_OUTPUT_COUNT = {"split": 2}


# -- drawing a program: tensors are tracked as (shape with BATCH or 1 in dim 0, bound) --

@dataclass(frozen=True)
class _Meta:
    shape: tuple[int, ...]
    bound: float


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    if len(a) != len(b):
        return None
    out = []
    for x, y in zip(a, b):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(out)


def _pick(draw, candidates: list[int]) -> int | None:
    return draw(st.sampled_from(candidates)) if candidates else None


def _draw_unary(draw, ts):
    i = draw(st.integers(0, len(ts) - 1))
    fn = draw(st.sampled_from(["relu", "tanh", "sigmoid", "abs", "neg", "exp_tanh"]))
    bound = {"tanh": 1.0, "sigmoid": 1.0, "exp_tanh": math.e}.get(fn, ts[i].bound)
    return Op("unary", (i,), (fn,)), [_Meta(ts[i].shape, bound)]


def _draw_binary(draw, ts):
    i = draw(st.integers(0, len(ts) - 1))
    a = ts[i]
    fn = draw(st.sampled_from(["add", "mul", "sub", "maximum", "minimum", "where_pos"]))
    others = [j for j, t in enumerate(ts) if _broadcast(a.shape, t.shape) is not None]
    if draw(st.booleans()) and others:
        j = draw(st.sampled_from(others))
        shape, b_bound, args, param = _broadcast(a.shape, ts[j].shape), ts[j].bound, (i, j), ()
    else:
        const = draw(st.sampled_from(["scalar", "last", "sample"]))
        shape, b_bound, args, param = a.shape, 1.0, (i,), (const,)
    bound = {"add": a.bound + b_bound, "sub": a.bound + b_bound,
             "mul": a.bound * b_bound}.get(fn, max(a.bound, b_bound))
    return Op("binary", args, (fn, *param)), [_Meta(shape, bound)]


def _draw_matmul(draw, ts):
    i = _pick(draw, [j for j, t in enumerate(ts) if len(t.shape) == 2])
    if i is None:
        return None
    units = draw(st.sampled_from([3, 8, 16]))
    bias = draw(st.booleans())
    bound = ts[i].bound * 2 * math.sqrt(ts[i].shape[1]) + bias
    return Op("matmul", (i,), (units, bias)), [_Meta((ts[i].shape[0], units), bound)]


def _draw_conv(draw, ts):
    i = _pick(draw, [j for j, t in enumerate(ts) if len(t.shape) == 4])
    if i is None:
        return None
    k = draw(st.sampled_from([1, 3]))
    out = draw(st.sampled_from([2, 3, 4]))
    n, h, w, c = ts[i].shape
    bound = ts[i].bound * 2 * math.sqrt(k * k * c)
    return Op("conv", (i,), (k, out)), [_Meta((n, h, w, out), bound)]


def _draw_reduce(draw, ts):
    i = _pick(draw, [j for j, t in enumerate(ts) if len(t.shape) >= 2])
    if i is None:
        return None
    shape = ts[i].shape
    fn = draw(st.sampled_from(["mean", "sum", "max"]))
    # Mostly a per-sample axis; sometimes the batch axis (not per-sample: dynamic batch
    # must not split such a segment).
    axis = draw(st.integers(1, len(shape) - 1) | st.just(0))
    keepdims = draw(st.booleans())
    out = tuple(1 if k == axis else d for k, d in enumerate(shape))
    if not keepdims:
        out = out[:axis] + out[axis + 1:]
    bound = ts[i].bound * (shape[axis] if fn == "sum" and axis else 1)
    if fn == "sum" and axis == 0:
        bound = ts[i].bound * _MAX_BATCH
    return Op("reduce", (i,), (fn, axis, keepdims)), [_Meta(out, bound)]


def _draw_concat(draw, ts):
    i = draw(st.integers(0, len(ts) - 1))
    shape = ts[i].shape
    same = [j for j, t in enumerate(ts) if t.shape[:-1] == shape[:-1]]
    more = draw(st.lists(st.sampled_from(same), min_size=1, max_size=2))
    args = (i, *more)
    last = sum(ts[j].shape[-1] for j in args)
    return (Op("concat", args), [_Meta((*shape[:-1], last), max(ts[j].bound for j in args))])


def _draw_split(draw, ts):
    i = _pick(draw, [j for j, t in enumerate(ts) if len(t.shape) >= 2 and t.shape[-1] >= 2])
    if i is None:
        return None
    shape, n = ts[i].shape, ts[i].shape[-1]
    sizes = (n // 2, n - n // 2) if n % 2 == 0 and draw(st.booleans()) else (1, n - 1)
    param = ("even",) if sizes[0] == sizes[1] else ("sizes", sizes)
    return Op("split", (i,), param), [_Meta((*shape[:-1], s), ts[i].bound) for s in sizes]


def _draw_reshape(draw, ts):
    i = _pick(draw, [j for j, t in enumerate(ts) if t.shape[0] == BATCH and len(t.shape) >= 2])
    if i is None:
        return None
    size = math.prod(ts[i].shape[1:])
    targets = [(size,)] + ([(4, 4, size // 16)] if size % 16 == 0 else [])
    target = draw(st.sampled_from(targets))
    via_shape = draw(st.booleans())  # [tf.shape(x)[0], ...] instead of [-1, ...]
    return (Op("reshape", (i,), (target, via_shape)),
            [_Meta((BATCH, *target), ts[i].bound)])


def _draw_slice(draw, ts):
    i = _pick(draw, [j for j, t in enumerate(ts) if len(t.shape) >= 2 and t.shape[-1] >= 2])
    if i is None:
        return None
    shape = ts[i].shape
    if draw(st.integers(0, 3)) == 0:  # the first sample only: not per-sample
        return Op("slice", (i,), ("first_sample",)), [_Meta((1, *shape[1:]), ts[i].bound)]
    k = draw(st.integers(1, shape[-1] - 1))
    return Op("slice", (i,), ("last_axis", k)), [_Meta((*shape[:-1], k), ts[i].bound)]


def _draw_transpose(draw, ts):
    i = _pick(draw, [j for j, t in enumerate(ts) if len(t.shape) >= 3])
    if i is None:
        return None
    shape = ts[i].shape
    perm = (0, *draw(st.permutations(range(1, len(shape)))))
    return (Op("transpose", (i,), (perm,)),
            [_Meta(tuple(shape[p] for p in perm), ts[i].bound)])


def _draw_gather(draw, ts):
    i = _pick(draw, [j for j, t in enumerate(ts) if len(t.shape) >= 2])
    if i is None:
        return None
    shape = ts[i].shape
    indices = tuple(draw(st.lists(st.integers(0, shape[-1] - 1), min_size=1, max_size=6)))
    return (Op("gather", (i,), (indices,)),
            [_Meta((*shape[:-1], len(indices)), ts[i].bound)])


def _draw_pad(draw, ts):
    i = _pick(draw, [j for j, t in enumerate(ts) if len(t.shape) >= 2])
    if i is None:
        return None
    shape = ts[i].shape
    before, after = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    return (Op("pad", (i,), (before, after)),
            [_Meta((*shape[:-1], shape[-1] + before + after), ts[i].bound)])


def _draw_softmax(draw, ts):
    i = _pick(draw, [j for j, t in enumerate(ts) if len(t.shape) >= 2])
    if i is None:
        return None
    return Op("softmax", (i,)), [_Meta(ts[i].shape, 1.0)]


def _draw_batch_size(draw, ts):
    """x divided by the run-time batch size, read with Shape or Size."""
    i = _pick(draw, [j for j, t in enumerate(ts) if t.shape[0] == BATCH])
    if i is None:
        return None
    return Op("batch_size", (i,), (draw(st.sampled_from(["shape", "size"])),)), [ts[i]]


def _draw_string(draw, ts):
    i = draw(st.integers(0, len(ts) - 1))
    return Op("string_round_trip", (i,)), [ts[i]]


def _draw_histogram(draw, ts):
    i = draw(st.integers(0, len(ts) - 1))
    bins = draw(st.sampled_from([4, 8, 16]))
    return (Op("histogram", (i,), (bins, round(ts[i].bound, 3))),
            [_Meta((1, bins), _MAX_BATCH)])


def _draw_const(draw, ts):
    shape = draw(st.sampled_from([(1, 8), (1, 16), (1, 4, 4, 3)]))
    return Op("const", (), (shape,)), [_Meta(shape, 1.0)]


_DRAWERS = {"unary": _draw_unary, "binary": _draw_binary, "matmul": _draw_matmul,
            "conv": _draw_conv, "reduce": _draw_reduce, "concat": _draw_concat,
            "split": _draw_split, "reshape": _draw_reshape,
            "string_round_trip": _draw_string, "histogram": _draw_histogram,
            "const": _draw_const, "slice": _draw_slice, "transpose": _draw_transpose,
            "gather": _draw_gather, "pad": _draw_pad, "softmax": _draw_softmax,
            "batch_size": _draw_batch_size}
# Ops the backends take come up more often than those they don't.
_KINDS = ["unary", "binary", "unary", "binary", "matmul", "conv", "reduce", "concat", "split",
          "reshape", "slice", "transpose", "gather", "pad", "softmax", "batch_size",
          "string_round_trip", "histogram", "const"]


@st.composite
def programs(draw, max_ops=10):
    inputs = tuple(draw(st.lists(st.sampled_from(_INPUT_SHAPES), min_size=1, max_size=3)))
    metas = [_Meta((BATCH, *s), 2.0) for s in inputs]
    ops = []
    for _ in range(draw(st.integers(1, max_ops))):
        drawn = _DRAWERS[draw(st.sampled_from(_KINDS))](draw, metas)
        if drawn is None:
            continue
        op, outs = drawn
        bound = max(m.bound for m in outs)
        if bound > _BOUND:
            op = Op(op.kind, op.args, op.param, _RESCALED / bound)
            outs = [_Meta(m.shape, _RESCALED) for m in outs]
        ops.append(op)
        metas.extend(outs)
    n = len(metas)
    outputs = tuple(draw(st.lists(st.integers(0, n - 1).map(lambda k: n - 1 - k),
                                  min_size=1, max_size=3)))
    batch = draw(st.integers(1, 5))
    other = draw(st.sampled_from([b for b in (1, batch + 1, 2 * batch + 3) if b != batch]))
    return Program(inputs, tuple(ops), outputs, batch, other, draw(st.integers(0, 2**16)))


# -- building the TF1 graph of a program --

def _apply(op: Op, xs: list, rng: np.random.Generator) -> list:
    def const(shape, scale=1.0):
        return tf.constant(rng.uniform(-scale, scale, shape).astype(np.float32))

    x = xs[0] if xs else None
    if op.kind == "unary":
        fn = op.param[0]
        if fn == "exp_tanh":
            return [tf.exp(tf.tanh(x))]
        return [{"relu": tf.nn.relu, "tanh": tf.tanh, "sigmoid": tf.sigmoid, "abs": tf.abs,
                 "neg": tf.negative}[fn](x)]
    if op.kind == "binary":
        fn, rest = op.param[0], op.param[1:]
        if rest:
            per_sample = x.shape.as_list()[1:]
            shape = {"scalar": [], "last": per_sample[-1:], "sample": per_sample}[rest[0]]
            y = const(shape)
        else:
            y = xs[1]
        if fn == "where_pos":
            return [tf.where(x > 0, x, y * tf.ones_like(x))]
        return [{"add": tf.add, "mul": tf.multiply, "sub": tf.subtract,
                 "maximum": tf.maximum, "minimum": tf.minimum}[fn](x, y)]
    if op.kind == "matmul":
        units, bias = op.param
        n = x.shape.as_list()[1]
        y = tf.matmul(x, const([n, units], math.sqrt(3 / n)))
        return [tf.nn.bias_add(y, const([units])) if bias else y]
    if op.kind == "conv":
        k, out = op.param
        c = x.shape.as_list()[3]
        return [tf.nn.conv2d(x, const([k, k, c, out], math.sqrt(3 / (k * k * c))), 1, "SAME")]
    if op.kind == "reduce":
        fn, axis, keepdims = op.param
        return [getattr(tf, f"reduce_{fn}")(x, axis=axis, keepdims=keepdims)]
    if op.kind == "concat":
        return [tf.concat(xs, axis=-1)]
    if op.kind == "split":
        return tf.split(x, 2 if op.param[0] == "even" else list(op.param[1]), axis=-1)
    if op.kind == "reshape":
        target, via_shape = op.param
        shape = (tf.concat([tf.shape(x)[:1], list(target)], 0) if via_shape
                 else [-1, *target])
        return [tf.reshape(x, shape)]
    if op.kind == "slice":
        return [x[:1] if op.param[0] == "first_sample" else x[..., :op.param[1]]]
    if op.kind == "transpose":
        return [tf.transpose(x, op.param[0])]
    if op.kind == "gather":
        return [tf.gather(x, list(op.param[0]), axis=-1)]
    if op.kind == "pad":
        rank = len(x.shape)
        return [tf.pad(x, [[0, 0]] * (rank - 1) + [list(op.param)], constant_values=0.5)]
    if op.kind == "softmax":
        return [tf.nn.softmax(x)]
    if op.kind == "batch_size":
        if op.param[0] == "shape":
            return [x / tf.cast(tf.shape(x)[0], tf.float32)]
        per_sample = math.prod(x.shape.as_list()[1:])
        return [x * (per_sample / tf.cast(tf.size(x), tf.float32))]
    if op.kind == "string_round_trip":
        return [tf.strings.to_number(tf.strings.as_string(x), tf.float32)]
    if op.kind == "histogram":
        bins, bound = op.param
        hist = tf.histogram_fixed_width(x, [-bound, bound], nbins=bins)
        # Counts over the whole batch, per sample of x: at most the batch size.
        hist = tf.cast(hist, tf.float32) / math.prod(x.shape.as_list()[1:])
        return [tf.reshape(hist, [1, bins])]
    if op.kind == "const":
        return [const(op.param[0])]
    raise AssertionError(op.kind)


def build_graph(program: Program):
    """save_tf1's build function: (inputs, outputs) of the program's graph."""
    inputs = {f"x{i}": tf.compat.v1.placeholder(tf.float32, [None, *s], name=f"x{i}")
              for i, s in enumerate(program.inputs)}
    tensors = list(inputs.values())
    for k, op in enumerate(program.ops):
        outs = _apply(op, [tensors[i] for i in op.args],
                      np.random.default_rng(program.seed * 1000 + k))
        tensors.extend(out * op.scale if op.scale != 1.0 else out for out in outs)
    return inputs, {f"y{j}": tensors[i] for j, i in enumerate(program.outputs)}


def _run(signature, feeds: dict) -> dict:
    out = signature(**{k: tf.constant(v) for k, v in feeds.items()})
    return {k: v.numpy() for k, v in out.items()}


def compile_and_compare(backend: str, program: Program) -> dict:
    """Save, compile and run a program at both batch sizes; returns compile()'s result."""
    with tempfile.TemporaryDirectory(prefix="fuseflow-fuzz-") as tmp:
        src, out = Path(tmp) / "m", Path(tmp) / "c"
        save_tf1(src, lambda: build_graph(program))
        result = fuseflow.saved_model.compile(str(src), str(out), batch_size=program.batch,
                                              backend=backend, minimum_segment_size=1)
        # Every segment compiles: a failure (kept in TF) is a bug to count, not to hide.
        assert result["num_segments_failed"] == 0, f"segments failed to compile: {result}"
        if has_supported_op(program):
            assert result["num_segments"] >= 1, f"no segment placed: {result}"
        segments = fused_segments(out)
        original = tf.saved_model.load(str(src)).signatures["serving_default"]
        compiled = tf.saved_model.load(str(out)).signatures["serving_default"]
        for batch in (program.batch, program.other_batch):
            feeds = program.feeds(batch)
            if batch != program.batch and not result["dynamic_batch"]:
                # compile() found the model depends on its batch size and fixed it: other
                # sizes must fail loudly, never answer wrongly.
                with pytest.raises(tf.errors.InvalidArgumentError, match="shape"):
                    _run(compiled, feeds)
                continue
            expected = _run(original, feeds)
            with ran_in_process() as ran:
                actual = _run(compiled, feeds)
            try:
                assert_outputs_close(expected, actual, rtol=1e-4, atol=1e-4)
            except AssertionError as e:
                raise AssertionError(f"at batch {batch} (compiled at {program.batch}), "
                                     f"compile() gave {result}: {e}") from None
            if batch == program.batch:
                assert_ran(ran.stats, backend, segments)
            elif backend == "xla":  # a cluster whose shapes did not change is not recompiled
                assert not ran.stats["ops"], ran.stats
                assert ran.stats["xla"]["launches"] >= len(segments), ran.stats
            else:  # split into compiled chunks, or (not per-sample) the TF fallback
                assert sorted(ran.stats["ops"]) == sorted(segments), ran.stats
                for op in ran.stats["ops"].values():
                    assert not op["recompiled"] and set(op["fallback_reasons"]) <= {"shape"}, op
        return result


_UNSUPPORTED = {"string_round_trip", "histogram"}


def has_supported_op(program: Program) -> bool:
    """Whether an output depends on an op the backends take that reads a graph input
    (ops on constants alone are folded before partitioning). A scaled result is a Mul."""
    live = [True] * len(program.inputs)  # depends on an input
    fusable = [False] * len(program.inputs)  # it or an ancestor is a supported op on live data
    for op in program.ops:
        is_live = any(live[a] for a in op.args)
        supported = is_live and (op.kind not in _UNSUPPORTED or op.scale != 1.0)
        ancestry = supported or any(fusable[a] for a in op.args)
        for _ in range(_OUTPUT_COUNT.get(op.kind, 1)):
            live.append(is_live)
            fusable.append(ancestry)
    return any(fusable[i] for i in program.outputs)


# Minimal programs of bugs the fuzzer found; they run first, every time.
_FOUND = {
    # A signature input no output depends on: compile() raised Grappler's ValueError.
    "unused_input": Program(((8,), (8,)), (Op("unary", (0,), ("relu",)),), (2,), 1, 2, 0),
    # tf.shape(x)[0] / tf.size(x) were folded at the compiled batch size: wrong at others.
    "batch_from_shape": Program(((8,),), (Op("batch_size", (0,), ("shape",)),), (1,), 2, 1, 0),
    "batch_from_size": Program(((8,),), (Op("batch_size", (0,), ("size",)),), (1,), 2, 1, 0),
    # Reshape to [tf.shape(x)[0], -1] (Keras-style): XLA failed at other batch sizes.
    "reshape_from_shape": Program(((4, 4, 2),), (Op("reshape", (0,), ((32,), True)),), (1,),
                                  2, 5, 0),
}


@settings(max_examples=int(_EXAMPLES or 6), derandomize=_EXAMPLES is None, deadline=None,
          database=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(program=programs())
@example(program=_FOUND["unused_input"])
@example(program=_FOUND["batch_from_shape"])
@example(program=_FOUND["batch_from_size"])
@example(program=_FOUND["reshape_from_shape"])
def test_compiled_random_graph_matches_original(backend, program):
    note(repr(program))
    result = compile_and_compare(backend, program)
    event(f"segments compiled: {result['num_segments']}")
