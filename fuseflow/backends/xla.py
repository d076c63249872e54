"""XLA backend: a segment becomes a TF function called with _XlaMustCompile=true.

Pure TensorFlow, no native code: stock TF Serving loads the result (on CPU
it needs --xla_cpu_compilation_enabled=true). The attribute must sit on the
call node; on the FunctionDef alone TF silently runs the function unjitted.
The ahead-of-time check lowers each segment to optimized HLO, which is kept
in the workdir; XLA compiles it again for the device when the model loads.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fuseflow.backends.base import Artifact, Backend, Port, SegmentGraph, probe_graph
from fuseflow.graph_util import body_nodes, constant_nodes, is_control, node_name, tensor_name
from fuseflow.optimize import FUNCTIONAL_CONTROL_FLOW
from fuseflow.options import CompilerOptions
from fuseflow.reasons import Reason
from fuseflow.shapes import node_shapes_known, node_tensors
from fuseflow.tf_compat import tf

# XLA:CPU is ~65x slower than TF on depthwise convolutions (measured).
_SLOW_ON_CPU = frozenset({"DepthwiseConv2dNative"})
# Ops XLA has kernels for but that make no sense inside a compiled segment.
_NEVER = frozenset({"Placeholder", "Const", "NoOp", "_Arg", "_Retval", "VarHandleOp",
                    "ReadVariableOp", "AssignVariableOp", "PartitionedCall",
                    "StatefulPartitionedCall", "Assert", "PrintV2"})
# Inside a loop's or conditional's body: plumbing XLA compiles along with the body.
_BODY_PLUMBING = frozenset({"Const", "NoOp", "Identity", "IdentityN"})


def has_gpu() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


@functools.cache
def xla_kernels(device_type: str) -> dict[str, list[dict[str, set[int]]]]:
    """Op type -> type constraints of each XLA kernel, from TF's own registry."""
    from tensorflow.python.framework import kernels

    tf.constant(1.0) + 1.0  # the XLA registry is empty until one eager op has run
    table: dict[str, list[dict[str, set[int]]]] = {}
    for k in kernels.get_all_registered_kernels().kernel:
        if k.device_type == device_type:
            table.setdefault(k.op, []).append(
                {c.name: set(c.allowed_values.list.type) for c in k.constraint})
    return table


def _dtypes_ok(node, constraints_list) -> bool:
    for constraints in constraints_list:
        ok = True
        for attr, allowed in constraints.items():
            value = node.attr.get(attr)
            if value is None:
                continue
            types = [value.type] if value.type else list(value.list.type)
            if any(t not in allowed for t in types):
                ok = False
                break
        if ok:
            return True
    return False


_OPAQUE = (tf.resource, tf.variant, tf.string)


def _probe_safe(node, infos) -> bool:
    """Lowering a node alone runs XLA in this process: only plain tensors of known shapes
    go there (XLA crashed the process on a resource read of an unfrozen variable), and no
    loops (their bodies are judged by _body_ok)."""
    if node.op in FUNCTIONAL_CONTROL_FLOW:
        return False
    tensors = node_tensors(node, infos)
    return all(t in infos and infos[t].dtype not in _OPAQUE and infos[t].fully_defined
               for t in tensors)


class XlaBackend(Backend):
    name = "xla"
    compiles_per_shape = True

    def __init__(self):
        self.gpu = has_gpu()
        self.device_type = "XLA_GPU_JIT" if self.gpu else "XLA_CPU_JIT"
        self._functions: dict[tuple, tuple] = {}  # compile() then run() reuse one trace

    def support(self, graph_def, tensor_infos, options: CompilerOptions
                ) -> dict[str, Reason | None]:
        table = xla_kernels(self.device_type)
        result: dict[str, Reason | None] = {}
        for node in graph_def.node:
            if node.op in _NEVER or node.op not in table:
                result[node.name] = Reason.UNSUPPORTED_OP
            elif node.op in FUNCTIONAL_CONTROL_FLOW and not self._body_ok(graph_def, node):
                result[node.name] = Reason.BODY_UNSUPPORTED
            elif not self.gpu and node.op in _SLOW_ON_CPU:
                result[node.name] = Reason.SLOW_ON_BACKEND
            elif not _dtypes_ok(node, table[node.op]):
                result[node.name] = Reason.DTYPE
            elif not node_shapes_known(node, tensor_infos):
                result[node.name] = Reason.UNKNOWN_SHAPE
            else:
                result[node.name] = None
        self._refuse_runtime_operands(graph_def, tensor_infos, result)
        return result

    def _refuse_runtime_operands(self, graph_def, infos, result) -> None:
        """XLA needs axis/shape/size operands as compile-time constants. Constants are
        copied into segments (extract.py); a node with an integer operand computed at run
        time is lowered alone, once per op type and operand slots, to ask XLA whether it
        takes that operand from data."""
        constants = constant_nodes(graph_def)
        groups: dict[tuple[str, tuple[int, ...]], list] = {}
        for node in graph_def.node:
            if result.get(node.name) is not None or not _probe_safe(node, infos):
                continue
            slots = tuple(k for k, inp in enumerate(i for i in node.input if not is_control(i))
                          if node_name(inp) not in constants
                          and infos[tensor_name(inp)].dtype.is_integer)
            if slots:
                groups.setdefault((node.op, slots), []).append(node)
        for members in groups.values():
            if self._needs_constant(graph_def, members[0], infos, constants):
                for node in members:
                    result[node.name] = Reason.RUNTIME_OPERAND

    def _needs_constant(self, graph_def, node, infos, constants) -> bool:
        probe = probe_graph(graph_def, {node.name}, infos, constants)
        placeholders = [n for n in probe.node if n.op == "Placeholder"]
        outputs, k = [], 0
        while (t := f"{node.name}:{k}") in infos:
            outputs.append(Port(t, infos[t].dtype.as_datatype_enum, tuple(infos[t].shape), -1))
            k += 1
        segment = SegmentGraph(
            name="fuseflow_probe", graph_def_bytes=probe.SerializeToString(),
            inputs=tuple(Port(p.name, p.attr["dtype"].type,
                              tuple(tf.TensorShape(p.attr["shape"].shape).as_list()), -1)
                         for p in placeholders),
            outputs=tuple(outputs), op_types=(node.op,), node_count=1)
        try:
            fn, specs = self._trace(segment)
            fn.experimental_get_compiler_ir(*specs)(stage="hlo")
        except Exception as e:
            return "compile-time constant" in str(e)
        return False

    def _body_ok(self, graph_def, node) -> bool:
        """Every op in the bodies, at every depth, has an XLA kernel for its dtypes."""
        table = xla_kernels(self.device_type)
        for n in body_nodes(graph_def, node):
            if n.op in _BODY_PLUMBING:
                continue
            if n.op not in table or not _dtypes_ok(n, table[n.op]) or (
                    not self.gpu and n.op in _SLOW_ON_CPU):
                return False
        return True

    def _jit_function(self, segment: SegmentGraph):
        """The segment as a jit_compile=True tf.function, and its input specs."""
        # By content: a compile worker serves many compiles, whose segments share names.
        key = (segment.name, segment.graph_def_bytes)
        if key not in self._functions:
            self._functions = {key: self._trace(segment)}  # one segment at a time
        return self._functions[key]

    @staticmethod
    def _trace(segment: SegmentGraph):
        graph_def = tf.compat.v1.GraphDef.FromString(segment.graph_def_bytes)
        specs = [tf.TensorSpec(p.shape, tf.dtypes.as_dtype(p.dtype), name=p.name)
                 for p in segment.inputs]
        imported = tf.compat.v1.wrap_function(
            lambda: tf.graph_util.import_graph_def(graph_def, name=""), [])
        pruned = imported.prune(
            feeds=[imported.graph.get_tensor_by_name(f"{p.name}:0") for p in segment.inputs],
            fetches=[imported.graph.get_tensor_by_name(p.name) for p in segment.outputs])
        fn = tf.function(lambda *args: pruned(*args), jit_compile=True, input_signature=specs,
                         autograph=False)
        return fn, specs

    def compile(self, segment: SegmentGraph, options: CompilerOptions, workdir: Path
                ) -> Artifact:
        fn, specs = self._jit_function(segment)
        hlo = fn.experimental_get_compiler_ir(*specs)(stage="optimized_hlo")
        device = "GPU" if self.gpu else "CPU"
        return Artifact(executable=hlo.encode(),
                        log=f"XLA ({device}) lowered {segment.name}: {len(hlo)} chars of "
                            "optimized HLO\n",
                        files={"optimized_hlo.txt": hlo.encode()})

    def run(self, segment: SegmentGraph, artifact: Artifact, options: CompilerOptions,
            inputs: list) -> list:
        fn, _ = self._jit_function(segment)
        return [t.numpy() for t in fn(*inputs)]

    def fused_node(self, segment: SegmentGraph, function_name: str, artifact: Artifact,
                   options: CompilerOptions):
        node = tf.compat.v1.NodeDef(name=segment.name, op="PartitionedCall")
        node.attr["Tin"].list.type.extend([p.dtype for p in segment.inputs])
        node.attr["Tout"].list.type.extend([p.dtype for p in segment.outputs])
        node.attr["f"].func.name = function_name
        node.attr["_XlaMustCompile"].b = True
        node.attr["config"].s = b""
        node.attr["config_proto"].s = b""
        node.attr["executor_type"].s = b""
        return node

    def runtime_info(self) -> dict[str, str]:
        return {"backend": self.name, "tensorflow": tf.__version__,
                "device": "GPU" if self.gpu else "CPU",
                "needs": "TF Serving on CPU: --xla_cpu_compilation_enabled=true"}
