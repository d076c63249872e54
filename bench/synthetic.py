"""Synthetic GraphDefs for partitioner tests and benchmarks."""

from __future__ import annotations

import random

from fuseflow.tf_compat import tf


def random_dag(n: int, seed: int = 0, fan_in: int = 2, window: int = 50,
               unsupported: float = 0.1):
    """A layered-looking random DAG of n nodes and a {node: supported?} map.

    Node i reads up to fan_in earlier nodes from the last `window`, like real
    models whose edges are mostly local.
    """
    rng = random.Random(seed)
    graph = tf.compat.v1.GraphDef()
    support = {}
    graph.node.add(name="n0", op="Placeholder")
    for i in range(1, n):
        node = graph.node.add(name=f"n{i}", op="AddV2")
        for _ in range(rng.randint(1, fan_in)):
            node.input.append(f"n{rng.randint(max(0, i - window), i - 1)}")
        support[node.name] = rng.random() >= unsupported
    return graph, support
