"""The partitioner on GraphDefs built by hand: cycle safety, sizes, exclusions."""

from __future__ import annotations

import pytest
from conftest import tf

from bench.synthetic import random_dag
from fuseflow import errors
from fuseflow.graph_util import node_name
from fuseflow.partition import PartitionOptions, partition_graph
from fuseflow.reasons import Reason


def graph(*edges: str, ops: dict | None = None):
    """graph('a>b', 'b>c') with every node an AddV2 unless ops says otherwise."""
    g = tf.compat.v1.GraphDef()
    nodes = {}
    for e in edges:
        for name in e.split(">"):
            if name not in nodes:
                nodes[name] = g.node.add(name=name, op=(ops or {}).get(name, "AddV2"))
    for e in edges:
        src, dst = e.split(">")
        nodes[dst].input.append(src)
    return g


def run(g, unsupported=(), inputs=("x",), minimum=1, **kw):
    support = {n.name: (Reason.UNSUPPORTED_OP if n.name in unsupported else None)
               for n in g.node}
    return partition_graph(g, support, inputs, PartitionOptions(minimum_segment_size=minimum,
                                                                **kw))


def segments_of(p):
    return sorted(sorted(s.nodes) for s in p.segments)


def test_chain_is_one_segment():
    g = graph("x>a", "a>b", "b>c", ops={"x": "Placeholder"})
    assert segments_of(run(g)) == [["a", "b", "c"]]


def test_merge_that_would_make_a_cycle_is_refused():
    g = graph("x>a", "a>u", "u>c", "a>c", ops={"x": "Placeholder"})
    p = run(g, unsupported={"u"})
    assert segments_of(p) == [["a"], ["c"]]
    assert p.excluded["u"] is Reason.UNSUPPORTED_OP


def test_cycle_through_a_longer_path_and_siblings_still_merge():
    # a feeds b and c directly and through u; d joins b and c.
    g = graph("x>a", "a>b", "a>c", "a>u", "u>c", "b>d", "c>d", ops={"x": "Placeholder"})
    assert segments_of(run(g, unsupported={"u"})) == [["a", "b"], ["c", "d"]]


def test_minimum_segment_size_ignores_identity():
    g = graph("x>a", "a>i", "i>b", "b>u", "u>c", "c>j",
              ops={"x": "Placeholder", "i": "Identity", "j": "Identity"})
    p = run(g, unsupported={"u"}, minimum=2)
    assert segments_of(p) == [["a", "b", "i"]]
    assert p.excluded["c"] is Reason.SMALL_SEGMENT and p.excluded["j"] is Reason.SMALL_SEGMENT


def test_upstream_of_inputs_no_fuse_ops_and_control_inputs():
    g = graph("x>a", "a>m", "m>b", "b>c", "c>d", ops={"x": "Placeholder"})
    next(n for n in g.node if n.name == "d").input.append("^a")
    p = run(g, inputs=("m",), no_fuse_ops=frozenset({"c"}))
    assert segments_of(p) == [["b"]]
    assert p.excluded["a"] is Reason.UPSTREAM_OF_INPUT
    assert p.excluded["m"] is Reason.UPSTREAM_OF_INPUT
    assert p.excluded["c"] is Reason.NO_FUSE_OPS
    assert p.excluded["d"] is Reason.CONTROL_INPUT


def test_max_segments_keeps_the_largest():
    g = graph("x>a", "a>u", "u>b", "b>c", "c>v", "v>d", ops={"x": "Placeholder"})
    p = run(g, unsupported={"u", "v"}, max_segments=1)
    assert segments_of(p) == [["b", "c"]]


def test_bad_graphs_raise_graph_errors():
    with pytest.raises(errors.GraphError, match="cycle"):
        run(graph("x>a", "a>b", "b>a", ops={"x": "Placeholder"}))
    g = graph("x>a", ops={"x": "Placeholder"})
    g.node[1].input.append("ghost:0")
    with pytest.raises(errors.GraphError, match="ghost"):
        run(g)
    g = graph("x>a", ops={"x": "Placeholder"})
    g.node.add(name="a", op="AddV2")
    with pytest.raises(errors.GraphError, match="duplicate"):
        run(g)


def assert_contracts_to_dag(g, p) -> None:
    """Fusing every segment of p at once leaves an acyclic graph."""
    owner = {n: s.name for s in p.segments for n in s.nodes}
    edges: dict[str, set[str]] = {}
    for n in g.node:
        for i in n.input:
            a, b = owner.get(node_name(i), node_name(i)), owner.get(n.name, n.name)
            if a != b:
                edges.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(v):  # iterative DFS cycle check
        stack = [(v, iter(edges.get(v, ())))]
        state[v] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                raise AssertionError(f"cycle through {nxt}")
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(edges.get(nxt, ()))))

    for v in list(edges):
        if v not in state:
            visit(v)


@pytest.mark.parametrize("seed", range(30))
def test_random_graphs_contract_to_a_dag(seed):
    """Every proposed partition, contracted, must still be acyclic."""
    g, support = random_dag(300, seed=seed, fan_in=3, window=20, unsupported=0.25)
    p = partition_graph(g, {k: None if v else Reason.UNSUPPORTED_OP for k, v in
                            support.items()}, ["n0"], PartitionOptions(minimum_segment_size=1))
    assert all(support[n] for s in p.segments for n in s.nodes)
    assert_contracts_to_dag(g, p)
    # Greedy merging along edges leaves few segments: far fewer than supported nodes.
    assert len(p.segments) < sum(support.values()) / 3


def test_two_colours_fused_together_make_no_cycle():
    """a1>d1 and d2>a2: {a1, a2} alone and {d1, d2, d3} alone are each fine, but fused
    together A feeds D and D feeds A. Colours are clustered in one pass, so one of the
    merges is refused."""
    g = graph("x>a1", "a1>d1", "x>d2", "d2>a2", "a1>a2", "d1>d3", "d2>d3",
              ops={"x": "Placeholder"})
    colour = {"a1": "A", "a2": "A", "d1": "D", "d2": "D", "d3": "D"}
    p = partition_graph(g, {n.name: None for n in g.node}, ["x"],
                        PartitionOptions(minimum_segment_size=1), colour=colour)
    assert_contracts_to_dag(g, p)
    for s in p.segments:
        assert {colour[n] for n in s.nodes} == {s.colour}
    assert segments_of(p) != [["a1", "a2"], ["d1", "d2", "d3"]]


@pytest.mark.parametrize("seed", range(10))
def test_random_coloured_graphs_contract_to_a_dag(seed):
    g, support = random_dag(300, seed=seed, fan_in=3, window=20, unsupported=0.1)
    colour = {n.name: "AB"[k % 3 == 0] for k, n in enumerate(g.node)}
    p = partition_graph(g, {k: None if v else Reason.UNSUPPORTED_OP for k, v in
                            support.items()}, ["n0"], PartitionOptions(minimum_segment_size=1),
                        colour=colour)
    assert all(len({colour[n] for n in s.nodes}) == 1 for s in p.segments)
    assert_contracts_to_dag(g, p)


def test_control_input_of_a_constant_does_not_split_a_segment():
    """Inlined Keras functions give constants control inputs; constants are copied into
    segments without them, so a->k(Const)->c is no path around the merge of a..c
    (NASNetMobile compiled as 7 segments before)."""
    g = graph("x>a", "a>b", "b>c", ops={"x": "Placeholder"})
    const = g.node.add(name="k", op="Const", input=["^a"])
    const.attr["dtype"].type = tf.float32.as_datatype_enum
    const.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(1.0))
    next(n for n in g.node if n.name == "c").input.append("k")
    assert segments_of(run(g)) == [["a", "b", "c"]]

def test_internal_tensor_never_crosses_a_segment_boundary():
    """a's output (a TensorList) feeds b and c. u, which stays in TF, sits on another path
    a -> u -> c, so a and c can't share a segment: a, b and c all stay in TF, the rest is
    clustered again without them."""
    g = graph("x>a", "a>b", "a>u", "u>c", "a>c", "c>d", "x>e", "e>f",
              ops={"x": "Placeholder"})
    p = partition_graph(g, {n.name: Reason.UNSUPPORTED_OP if n.name == "u" else None
                            for n in g.node}, ["x"], PartitionOptions(minimum_segment_size=1),
                        internal_tensors={"a:0"})
    assert all(p.excluded[n] is Reason.INTERNAL_PORT for n in "abc")
    assert segments_of(p) == [["d"], ["e", "f"]]
    # Without the detour all three join one segment.
    g = graph("x>a", "a>b", "a>c", "b>d", "c>d", ops={"x": "Placeholder"})
    p = partition_graph(g, {n.name: None for n in g.node}, ["x"],
                        PartitionOptions(minimum_segment_size=1), internal_tensors={"a:0"})
    assert segments_of(p) == [["a", "b", "c", "d"]]


def test_internal_tensor_group_with_a_refused_member_stays_in_tf():
    g = graph("x>a", "a>b", "b>c", ops={"x": "Placeholder"})
    p = partition_graph(g, {n.name: Reason.UNSUPPORTED_OP if n.name == "b" else None
                            for n in g.node}, ["x"], PartitionOptions(minimum_segment_size=1),
                        internal_tensors={"a:0"})
    assert p.excluded["a"] is Reason.INTERNAL_PORT and p.excluded["b"] is Reason.UNSUPPORTED_OP
    assert segments_of(p) == [["c"]]
