"""The backend interface: what a backend takes, how it compiles, how it runs.

The partitioner knows no backend and a backend knows no clustering: a
backend only answers per node whether it can take it, compiles one
self-contained segment GraphDef, and names the node that runs the result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fuseflow.options import CompilerOptions
from fuseflow.reasons import Reason


@dataclass(frozen=True)
class Port:
    """One segment input (a Placeholder) or output (a tensor) at its compiled shape."""

    name: str  # input: Placeholder node name; output: tensor name "node:index"
    dtype: int  # types_pb2.DataType enum value (picklable)
    shape: tuple[int, ...]
    batch_axis: int  # 0: may be split along dim 0 at run time; -1: fixed


@dataclass(frozen=True)
class SegmentGraph:
    """A segment cut out of the model as a GraphDef that stands alone."""

    name: str
    graph_def_bytes: bytes  # serialized GraphDef; inputs are Placeholders
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    op_types: tuple[str, ...]  # op types of its nodes (for reports)
    node_count: int  # ops that count toward OnNeuronRatio
    node_names: tuple[str, ...] = ()  # the model's nodes it replaces
    input_sources: tuple[str, ...] = ()  # the model's tensors feeding each input


@dataclass(frozen=True)
class Artifact:
    """What compiling a segment produced."""

    executable: bytes
    log: str = ""
    files: dict[str, bytes] = field(default_factory=dict)  # extra files for the workdir


class Backend(ABC):
    """A compiler that can take some segments of a TF graph."""

    name: str = ""

    @abstractmethod
    def support(self, graph_def, tensor_infos, options: CompilerOptions
                ) -> dict[str, Reason | None]:
        """For every node: None if the backend can take it, else why not."""

    @abstractmethod
    def compile(self, segment: SegmentGraph, options: CompilerOptions, workdir: Path
                ) -> Artifact:
        """Compile one segment ahead of time. Runs in a worker process."""

    @abstractmethod
    def run(self, segment: SegmentGraph, artifact: Artifact, options: CompilerOptions,
            inputs: list) -> list:
        """Run a compiled artifact on numpy inputs (checks it before it goes in a model)."""

    def tolerance(self, options: CompilerOptions) -> float:
        """Largest error, relative to the output's magnitude, that still counts as equal."""
        return 1e-3

    @abstractmethod
    def fused_node(self, segment: SegmentGraph, function_name: str, artifact: Artifact,
                   options: CompilerOptions):
        """The NodeDef that replaces the segment; function_name holds its TF subgraph."""

    def runtime_info(self) -> dict[str, str]:
        """What a compiled model needs at load time (for reports and inspect)."""
        return {"backend": self.name}


def relative_error(want, got) -> float:
    """How far got is from want, as backends are judged: the largest difference relative
    to the output's magnitude (floats), the fraction of unequal elements (others); inf
    when the two disagree on which values are finite."""
    want, got = np.asarray(want), np.asarray(got)
    if want.dtype.kind not in "fc":
        return float(np.mean(want != got)) if want.size else 0.0
    want, got = want.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(want)
    if not np.array_equal(finite, np.isfinite(got)):
        return float("inf")
    scale = float(np.max(np.abs(want[finite]), initial=0.0)) + 1e-6
    return float(np.max(np.abs(want[finite] - got[finite]), initial=0.0)) / scale
