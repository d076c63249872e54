"""Partitioner cost on synthetic graphs of 10k-200k nodes (near-linear is the goal)."""

from __future__ import annotations

import time

from bench.synthetic import random_dag
from fuseflow.partition import PartitionOptions, partition_graph
from fuseflow.reasons import Reason


def main() -> None:
    print(f"{'nodes':>8} {'segments':>9} {'seconds':>8} {'us/node':>8}")
    for n in (10_000, 50_000, 100_000, 200_000):
        graph, support = random_dag(n, seed=1, fan_in=3, window=50, unsupported=0.1)
        reasons = {k: None if v else Reason.UNSUPPORTED_OP for k, v in support.items()}
        start = time.perf_counter()
        p = partition_graph(graph, reasons, ["n0"], PartitionOptions(minimum_segment_size=2))
        seconds = time.perf_counter() - start
        print(f"{n:>8} {len(p.segments):>9} {seconds:>8.2f} {1e6 * seconds / n:>8.1f}")


if __name__ == "__main__":
    main()
