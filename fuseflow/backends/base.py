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

from fuseflow.graph_util import (
    constant_chain,
    constant_nodes,
    copy_called_functions,
    copy_constant,
    is_control,
    node_name,
    tensor_name,
)
from fuseflow.options import CompilerOptions
from fuseflow.reasons import Reason

# TF's DataType enum values (types.proto) by dtype name: a compiler process runs
# OpenVINO jobs without TensorFlow. test_openvino_backend checks them against TF's.
DTYPES = {"float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int16": 5, "int8": 6,
          "string": 7, "int64": 9, "bool": 10, "bfloat16": 14, "uint16": 17, "float16": 19,
          "uint32": 22, "uint64": 23}
DTYPE_NAMES = {number: name for name, number in DTYPES.items()}


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
    # Where the weights extract.py appended to graph_def_bytes begin (each a GraphDef.node
    # field: a serialized NodeDef); -1 when none were. graph_util.split_weights.
    weights_at: int = -1


@dataclass(frozen=True)
class Artifact:
    """What compiling a segment produced."""

    executable: bytes
    log: str = ""
    files: dict[str, bytes] = field(default_factory=dict)  # extra files for the workdir
    timings: dict[str, float] = field(default_factory=dict)  # seconds per compile step
    # Settings the executable must be loaded with, where they are not the options' own
    # (an int8 segment NNCF found nothing to quantize in keeps the f32 settings).
    properties: list[str] = field(default_factory=list)


class Backend(ABC):
    """A compiler that can take some segments of a TF graph."""

    name: str = ""
    # Compiles again for each input shape it meets (XLA): values derived from the batch
    # may then stay computed in its segments instead of folded at the compiled batch.
    compiles_per_shape: bool = False

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


def random_inputs(segment: SegmentGraph, seed: int = 0) -> list[np.ndarray]:
    """Values every op accepts: normal floats, zero integers (valid indices), False."""
    from fuseflow.tf_compat import tf

    rng = np.random.default_rng(seed)
    values = []
    for port in segment.inputs:
        dtype = tf.dtypes.as_dtype(port.dtype)
        if dtype.is_floating:
            values.append(rng.normal(0, 1, port.shape).astype(dtype.as_numpy_dtype))
        else:
            values.append(np.zeros(port.shape, dtype.as_numpy_dtype))
    return values


def probe_graph(graph_def, keep: set[str], infos, constants: set[str] | None = None):
    """The nodes in keep as extract.py would put them into segments: constants (and the
    chains computing them) copied in, the functions they call carried along, every other
    outside input a Placeholder. Strings,
    resources and stateful ops thus never reach (and crash) the frontend."""
    from fuseflow.tf_compat import tf

    if constants is None:
        constants = constant_nodes(graph_def)
    nodes = {n.name: n for n in graph_def.node}
    probe = tf.compat.v1.GraphDef()
    probe.versions.CopyFrom(graph_def.versions)
    placeholders: dict[str, str] = {}
    copied: set[str] = set()
    for node in graph_def.node:
        if node.name not in keep:
            continue
        copy = probe.node.add()
        copy.CopyFrom(node)
        copy.ClearField("device")
        del copy.input[:]
        for inp in node.input:
            src = node_name(inp)
            if is_control(inp):
                continue
            if src in keep:
                copy.input.append(inp)
                continue
            if src in constants:
                for c in constant_chain(nodes, src, (keep, copied)):
                    copied.add(c)
                    const = probe.node.add()
                    const.CopyFrom(copy_constant(nodes[c]))
                    if nodes[c].op == "Const":  # its TF1 loop frame, when it is in one
                        const.input.extend(i for i in nodes[c].input
                                           if is_control(i) and node_name(i) in keep)
                copy.input.append(inp)
                continue
            tensor = tensor_name(inp)
            if tensor not in placeholders:
                placeholders[tensor] = f"fuseflow_probe_{len(placeholders)}"
                info = infos[tensor]
                ph = probe.node.add(name=placeholders[tensor], op="Placeholder")
                ph.attr["dtype"].type = info.dtype.as_datatype_enum
                if info.shape is not None:
                    ph.attr["shape"].shape.CopyFrom(tf.TensorShape(info.shape).as_proto())
            copy.input.append(placeholders[tensor])
    copy_called_functions(graph_def, probe.node, probe)  # loop and conditional bodies
    return probe
