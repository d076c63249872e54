"""Stage 4: graph + a backend's capability -> segments, cycle-safe.

Union-find clustering along data edges (the TF-TRT segmenter's idea) over a
contracted graph that keeps a topological order incrementally
(Pearce-Kelly, as TF's GraphCycles does): a merge only searches the window of
ranks between the two clusters, so cost stays near-linear in graph size.
The partitioner knows nothing of backends: it gets a {node: reason|None} map.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from fuseflow import errors
from fuseflow.graph_util import NON_COMPUTE_OPS, is_control, node_name, tensor_name
from fuseflow.reasons import Reason

# Ops that never count toward a segment's size (the reference's rule).
PASS_THROUGH_OPS = frozenset({"Identity", "IdentityN", "Snapshot", "StopGradient", "NoOp"})
_V1_CONTROL_FLOW = frozenset({"Enter", "Exit", "Switch", "Merge", "NextIteration",
                              "LoopCond", "RefEnter", "RefExit", "RefSwitch", "RefMerge",
                              "RefNextIteration"})

_BACKEND_REFUSALS = frozenset({Reason.UNSUPPORTED_OP, Reason.DTYPE, Reason.BODY_UNSUPPORTED})


@dataclass(frozen=True)
class PartitionOptions:
    minimum_segment_size: int
    no_fuse_ops: frozenset[str] = frozenset()
    force_fuse_ops: frozenset[str] = frozenset()
    max_segments: int | None = None


@dataclass
class Segment:
    """A proposed segment: the nodes to fuse, in topological order."""

    name: str
    nodes: list[str]
    size: int  # nodes that count (pass-through ops excluded)
    colour: str | None = None  # what its nodes share (e.g. the backend placed on them)


@dataclass
class Partition:
    segments: list[Segment]
    excluded: dict[str, Reason] = field(default_factory=dict)  # node -> why it stays in TF


def default_minimum_segment_size(graph_def) -> int:
    """The reference's default: min(2, max(1, non-Placeholder ops))."""
    ops = sum(1 for n in graph_def.node if n.op != "Placeholder")
    return min(2, max(1, ops))


class _ClusterGraph:
    """A DAG of clusters with an incrementally maintained topological order."""

    def __init__(self, n: int, edges: Iterable[tuple[int, int]]):
        self.out: list[set[int]] = [set() for _ in range(n)]
        self.inn: list[set[int]] = [set() for _ in range(n)]
        for a, b in edges:
            if a != b:
                self.out[a].add(b)
                self.inn[b].add(a)
        self.rank = list(range(n))  # callers number nodes in topological order
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def _reachable(self, src: int, dst: int) -> bool:
        """Is dst reachable from src? Only ranks up to rank[dst] can lie on a path."""
        limit, seen, stack = self.rank[dst], {src}, [src]
        while stack:
            for nxt in self.out[stack.pop()]:
                if nxt == dst:
                    return True
                if nxt not in seen and self.rank[nxt] < limit:
                    seen.add(nxt)
                    stack.append(nxt)
        return False

    def contract(self, a: int, b: int) -> bool:
        """Merge cluster b into a along edge a->b (or, with no edge, where b ranks after
        a), unless another path a~>b exists."""
        self.out[a].discard(b)
        self.inn[b].discard(a)
        if self._reachable(a, b):
            self.out[a].add(b)
            self.inn[b].add(a)
            return False
        self.parent[b] = a
        preds, succs = self.inn[b], self.out[b]
        self.inn[b], self.out[b] = set(), set()
        for p in preds:
            self.out[p].discard(b)
            self._add_edge(p, a)
        for s in succs:
            self.inn[s].discard(b)
            self._add_edge(a, s)
        return True

    def _add_edge(self, x: int, y: int) -> None:
        if x == y or y in self.out[x]:
            return
        self.out[x].add(y)
        self.inn[y].add(x)
        if self.rank[x] > self.rank[y]:
            self._reorder(x, y)

    def _reorder(self, x: int, y: int) -> None:
        """Pearce-Kelly: fix the order after adding x->y with rank[x] > rank[y]."""
        hi, lo = self.rank[x], self.rank[y]
        forward = self._collect(y, self.out, lambda r: r < hi)
        if x in forward:  # cannot happen when contract() checked reachability
            raise AssertionError("partitioner created a cycle")
        backward = self._collect(x, self.inn, lambda r: r > lo)
        members = sorted(backward, key=self.rank.__getitem__) + sorted(
            forward, key=self.rank.__getitem__)
        for node, r in zip(members, sorted(self.rank[m] for m in members)):
            self.rank[node] = r

    def _collect(self, start: int, adj: list[set[int]], in_window) -> list[int]:
        seen, stack = {start}, [start]
        while stack:
            for nxt in adj[stack.pop()]:
                if nxt not in seen and in_window(self.rank[nxt]):
                    seen.add(nxt)
                    stack.append(nxt)
        return list(seen)


def topological_order(graph_def) -> list[int]:
    """Node indices in topological order; NextIteration back edges are ignored."""
    nodes = graph_def.node
    index = {n.name: i for i, n in enumerate(nodes)}
    if len(index) != len(nodes):
        seen, dups = set(), set()
        for n in nodes:
            (dups if n.name in seen else seen).add(n.name)
        raise errors.GraphError(f"the graph has duplicate node names {sorted(dups)[:5]}: "
                                "every node needs a unique name")
    indegree = [0] * len(nodes)
    consumers: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        for inp in n.input:
            src = index.get(node_name(inp))
            if src is None:
                raise errors.GraphError(
                    f"node {n.name!r} reads {inp!r}, which no node produces: the graph is "
                    "broken (re-export the model)")
            if nodes[src].op in ("NextIteration", "RefNextIteration"):
                continue
            indegree[i] += 1
            consumers[src].append(i)
    order = [i for i, d in enumerate(indegree) if d == 0]
    for i in order:  # grows while iterating
        for c in consumers[i]:
            indegree[c] -= 1
            if indegree[c] == 0:
                order.append(c)
    if len(order) != len(nodes):
        stuck = sorted(nodes[i].name for i, d in enumerate(indegree) if d > 0)
        raise errors.GraphError(f"the graph has a cycle through {stuck[:5]}: fuseflow needs "
                                "an acyclic graph (functional control flow)")
    return order


def _upstream(graph_def, roots: Iterable[str]) -> set[str]:
    nodes = {n.name: n for n in graph_def.node}
    seen, stack = set(), [r for r in roots if r in nodes]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack += [node_name(i) for i in nodes[name].input]
    return seen


def in_v1_control_flow(graph_def, order: list[int]) -> set[str]:
    """Nodes inside TF1 while/cond frames (their Exits aside)."""
    nodes = graph_def.node
    if not any(n.op in _V1_CONTROL_FLOW for n in nodes):
        return set()
    inside: set[str] = set()
    for i in order:
        n = nodes[i]
        if n.op in _V1_CONTROL_FLOW and n.op not in ("Exit", "RefExit"):
            inside.add(n.name)
        elif n.op not in ("Exit", "RefExit") and any(
                node_name(x) in inside for x in n.input):
            inside.add(n.name)
    return inside


def _v1_frames(graph_def, order: list[int]) -> list[set[str]]:
    """Each TF1 loop or cond (its Enter..Exit / Switch..Merge nodes and everything
    between them, constants aside) as one group of nodes: it goes to a backend whole
    or not at all."""
    inside = in_v1_control_flow(graph_def, order)
    if not inside:
        return []
    # Constants in a frame (pinned there by a control input) join the union, so what
    # pins them and what reads them are one group, but they are copied, not members.
    members = {n.name for n in graph_def.node if n.name in inside or (
        n.op in ("Exit", "RefExit") and any(node_name(i) in inside for i in n.input))}
    parent = {name: name for name in members}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for n in graph_def.node:
        if n.name in members:
            for inp in n.input:
                if node_name(inp) in members:
                    parent[find(n.name)] = find(node_name(inp))
    compute = {n.name for n in graph_def.node if n.op not in NON_COMPUTE_OPS}
    groups: dict[str, set[str]] = {}
    for name in members & compute:
        groups.setdefault(find(name), set()).add(name)
    return list(groups.values())


def _fixed_exclusions(graph_def, order, support, dtype_reason, input_nodes, options,
                      frames: list[set[str]]) -> dict[str, Reason]:
    """Why each node can't be clustered, before any clustering."""
    upstream = _upstream(graph_def, input_nodes)
    frame_of = {name: k for k, frame in enumerate(frames) for name in frame}
    excluded: dict[str, Reason] = {}
    for n in graph_def.node:
        if n.op in NON_COMPUTE_OPS:  # constants are copied into segments instead
            excluded[n.name] = Reason.STRUCTURAL
        elif n.name in upstream:
            excluded[n.name] = Reason.UPSTREAM_OF_INPUT
        elif n.name in options.no_fuse_ops:
            excluded[n.name] = Reason.NO_FUSE_OPS
        elif any(is_control(i) and frame_of.get(node_name(i), -1) != frame_of.get(n.name, -2)
                 for i in n.input):  # inside a TF1 frame, control edges come along
            excluded[n.name] = Reason.CONTROL_INPUT
        elif (reason := dtype_reason(n)) is not None:
            excluded[n.name] = reason
        elif support.get(n.name) is not None and n.name not in options.force_fuse_ops:
            excluded[n.name] = support[n.name]
    return excluded


def internal_groups(graph_def, internal: Collection[str]) -> list[set[str]]:
    """Nodes joined by tensors that may not cross a segment boundary, as groups that go
    into one segment together or stay in TF together."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for node in graph_def.node:
        for inp in node.input:
            if not is_control(inp) and tensor_name(inp) in internal:
                parent[find(node.name)] = find(node_name(inp))
    groups: dict[str, set[str]] = {}
    for name in parent:
        groups.setdefault(find(name), set()).add(name)
    return [g for g in groups.values() if len(g) > 1]


def partition_graph(graph_def, support: dict[str, Reason | None], input_nodes: Iterable[str],
                    options: PartitionOptions, dtype_reason=lambda node: None,
                    internal_tensors: Collection[str] = (),
                    colour: dict[str, str] | None = None) -> Partition:
    """Propose segments: maximal cycle-free clusters of nodes the backend takes.

    colour (node -> a label, e.g. the backend chosen for it): only nodes of one colour
    join one segment, all clusters found in one pass so that together they stay
    cycle-free. A group below (TensorLists, a TF1 frame) must be of one colour.

    internal_tensors (e.g. TensorLists, dtype variant) may flow inside a segment but
    never in or out of one: their producer and consumers join one segment or none.
    A TF1 loop or cond (Enter/Merge/Switch/Exit frame) likewise joins one whole.
    Clustering alone can't promise that (another path may keep two of them apart),
    so a group that came out split is kept in TF and the clustering is redone.
    """
    order = topological_order(graph_def)
    frames = _v1_frames(graph_def, order)
    excluded = _fixed_exclusions(graph_def, order, support, dtype_reason,
                                 set(input_nodes), options, frames)
    groups = [(g, Reason.INTERNAL_PORT) for g in internal_groups(graph_def,
                                                                 set(internal_tensors))]
    groups += [(g, Reason.CONTROL_FLOW) for g in frames]
    for frame in frames:  # the backend can't run the loop: that is the reason for all of it
        if any(excluded.get(n) in _BACKEND_REFUSALS for n in frame):
            excluded.update(dict.fromkeys(frame, Reason.CONTROL_FLOW))
    while True:
        for group, reason in groups:
            if any(name in excluded for name in group):
                for name in group:
                    excluded.setdefault(name, reason)
        partition = _cluster(graph_def, order, dict(excluded), options,
                             [g for g, _ in groups], colour or {})
        segment_of = {n: s.name for s in partition.segments for n in s.nodes}
        split = [(g, r) for g, r in groups if len({segment_of.get(n) for n in g}) > 1]
        if not split:
            return partition
        for group, reason in split:
            for name in group:
                excluded.setdefault(name, reason)


def _cluster(graph_def, order: list[int], excluded: dict[str, Reason],
             options: PartitionOptions, groups: list[set[str]], colour: dict[str, str]
             ) -> Partition:
    nodes = graph_def.node
    position = {i: p for p, i in enumerate(order)}
    index = {n.name: position[i] for i, n in enumerate(nodes)}
    names = [nodes[i].name for i in order]
    edges = []
    for i in order:
        if nodes[i].op == "Const":
            # Constants are copied into the segments that read them, without their
            # control inputs (inlined Keras functions add those): an edge into one
            # would make a path around a merge and split the segment for nothing.
            continue
        for inp in nodes[i].input:
            src = nodes[order[index[node_name(inp)]]]
            if nodes[i].op == "Const" and is_control(inp):
                continue  # pins a constant into a TF1 frame; segments copy constants
            if src.op not in ("NextIteration", "RefNextIteration"):
                edges.append((index[src.name], index[nodes[i].name]))
    graph = _ClusterGraph(len(order), edges)
    candidate = [name not in excluded for name in names]
    tint = [colour.get(name) for name in names]
    for pos in range(len(names)):
        if not candidate[pos]:
            continue
        for inp in nodes[order[pos]].input:
            src = index[node_name(inp)]
            if not candidate[src] or tint[src] != tint[pos]:
                continue
            a, b = graph.find(src), graph.find(pos)
            if a != b:
                graph.contract(a, b)
    for group in groups:  # members joined only by control edges (a TF1 frame) join too
        positions = [index[n] for n in group if candidate[index[n]]]
        for pos in positions[1:]:
            if tint[pos] != tint[positions[0]]:
                continue  # a split group: partition_graph keeps it in TF
            a, b = sorted((graph.find(positions[0]), graph.find(pos)),
                          key=graph.rank.__getitem__)
            if a != b:
                graph.contract(a, b)  # refused if a path through other nodes joins them
    return _collect_segments(names, candidate, graph, nodes, order, excluded, options, tint)


def _collect_segments(names, candidate, graph, nodes, order, excluded, options,
                      tint) -> Partition:
    members: dict[int, list[int]] = {}
    for pos in range(len(names)):
        if candidate[pos]:
            members.setdefault(graph.find(pos), []).append(pos)
    clusters = []
    for root, positions in members.items():
        size = sum(1 for p in positions if nodes[order[p]].op not in PASS_THROUGH_OPS)
        clusters.append((size, root, sorted(positions)))
    keep = [c for c in clusters if c[0] >= options.minimum_segment_size and c[0] > 0]
    if options.max_segments is not None:
        keep = sorted(keep, key=lambda c: -c[0])[:options.max_segments]
    kept_roots = {c[1] for c in keep}
    for _size, root, positions in clusters:
        if root not in kept_roots:
            for p in positions:
                excluded[names[p]] = Reason.SMALL_SEGMENT
    keep.sort(key=lambda c: c[2][0])
    segments = [Segment(f"fuseflow_segment_{k}", [names[p] for p in positions], size,
                        tint[positions[0]])
                for k, (size, _root, positions) in enumerate(keep)]
    return Partition(segments, excluded)
