"""OpenVINO backend: a segment becomes a FuseflowOp running an exported OpenVINO CPU blob.

Capability comes from OpenVINO's TensorFlow frontend itself: the frontend has
no public list of supported op types (and support can depend on attributes),
so the whole graph is converted partially once and every node it leaves as a
TFFrameworkNode is unsupported. Per-segment failures are caught at compile
time, and the segment then stays in TensorFlow.

compile() reads the segment GraphDef with core.read_model, the same frontend
path the native op recompiles with. convert_model(graph_def, output=...) can
only pick terminal tensors, so every output k is first read by an Identity
`__fuseflow_ret_<k>` (a name TF never gives a node), and the model is rebuilt
with the segment's inputs and outputs in order.

Port convention, for FuseflowOp's input_names/output_names: compiled input i
is op input i and carries the tensor name `fuseflow_input_<i>` (the segment
Placeholder, the native function's argument); output k is op output k and
carries `output_<k>` (the native function's return value). Position is
authoritative: OpenVINO merges the names of ports that share a tensor (two
outputs of one value answer to both names, harmlessly). compile() imports
its own blob and checks that each name is on its port with the right type and
shape, so binding by name or by position both work; a segment whose output is
one of its inputs passed through, whose input name OpenVINO loses, is refused.

Properties ("KEY=VALUE") go to compile_model and onto the node, because an
imported blob forgets them. Precision: --fp32-cast none -> f32; all, matmult,
matmult-bf16 -> bf16; all-fp16, matmult-fp16 -> f16; 16-bit only where the
CPU lists it in OPTIMIZATION_CAPABILITIES, else f32 with a warning (lacking
FP16, the CPU plugin would silently run f16 as bf16). OpenVINO has no per-op
precision setting reachable from Python or properties (the CPU plugin's
per-node opt-out is the C++-only rt_info `ov::disable_conversion`), so the
matmult variants are whole-model bf16/f16; the plugin already runs the ops
between the last conv/matmul-like op and the outputs in f32. --fast-math
follows neuron-cc: `all` casts to bf16 and sets EXECUTION_MODE_HINT=PERFORMANCE,
`none` and `no-fp32-cast` force f32, `fp32-cast-all`/`-matmult` act like
--fp32-cast, the relayout words change nothing; the last word wins.
--quantize int8 runs the ops NNCF leaves in floating point (softmax, layer norm,
GELU, swish, depthwise convolutions it skips) at bf16 where the CPU has it, as
OpenVINO does by default on such CPUs: a BERT-like encoder's int8 blob ran at
2.21 ms instead of 2.44 ms with them at f32 (bf16 alone: 2.97 ms). int8 is a step
below bf16 on the accuracy ladder, and the guard demotes a segment to bf16 or f32
when it breaks the bound; with --fast-math or --fp32-cast those words decide.
--neuroncore-pipeline-cores N -> INFERENCE_NUM_THREADS=N: N threads per call; the
native op makes the cores left over more streams when it loads (SizeStreams).

The CPU plugin computes int64 as int32 and float64 as float32: float64 stays
in TF (the loss is certain), int64 does not (it matters only past 2**31).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import tempfile
import time
import zlib
from pathlib import Path

import openvino as ov

from fuseflow import errors
from fuseflow.backends.base import (
    DTYPE_NAMES,
    DTYPES,
    Artifact,
    Backend,
    SegmentGraph,
    probe_graph,
)
from fuseflow.graph_util import (
    NON_COMPUTE_OPS,
    body_nodes,
    called_functions,
    constant_nodes,
    node_name,
    without_weights,
)
from fuseflow.options import CompilerOptions
from fuseflow.partition import in_v1_control_flow, topological_order
from fuseflow.reasons import Reason

log = logging.getLogger("fuseflow")

DEVICE = "CPU"
OP_LIBRARY = "fuseflow/native/_fuseflow_op.so"
_RET = "__fuseflow_ret_"
_PRECISION = {"none": "f32", "all": "bf16", "matmult": "bf16", "matmult-bf16": "bf16",
              "all-fp16": "f16", "matmult-fp16": "f16"}
_CAPABILITY = {"bf16": "BF16", "f16": "FP16"}
_FAST_MATH_CAST = {"all": "all", "fp32-cast-all": "all", "fp32-cast-matmult": "matmult",
                   "none": "none", "no-fp32-cast": "none"}


class OpenVinoCompileError(errors.FuseflowError, RuntimeError):
    """OpenVINO compiled a segment into something the fused op could not run."""


@functools.cache
def _core():
    return ov.Core()


# TF dtype -> the OpenVINO type of a port of that dtype; float64 is left out (see above).
OV_TYPES = {DTYPES[name]: getattr(ov.Type, kind) for name, kind in (
    ("float32", "f32"), ("float16", "f16"), ("bfloat16", "bf16"), ("int8", "i8"),
    ("int16", "i16"), ("int32", "i32"), ("int64", "i64"), ("uint8", "u8"), ("uint16", "u16"),
    ("uint32", "u32"), ("uint64", "u64"), ("bool", "boolean"))}


def _requested(options: CompilerOptions) -> tuple[str, bool]:
    """(precision asked for, performance mode) from --fp32-cast and --fast-math."""
    cast, performance = options.fp32_cast, False
    for word in options.fast_math:
        cast = _FAST_MATH_CAST.get(word, cast)
        performance = {"all": True, "none": False}.get(word, performance)
    return _PRECISION[cast], performance


def precision(options: CompilerOptions, capabilities: tuple[str, ...] | None = None) -> str:
    """The inference precision: the one asked for if the CPU has it, else f32.
    `capabilities`: OPTIMIZATION_CAPABILITIES, this CPU's by default."""
    wanted, _ = _requested(options)
    have = cpu_capabilities() if capabilities is None else capabilities
    if (wanted == "f32" and options.quantize == "int8" and not options.fast_math
            and _CAPABILITY["bf16"] in have):
        return "bf16"  # for the ops NNCF leaves in floating point (see the module doc)
    return wanted if wanted == "f32" or _CAPABILITY[wanted] in have else "f32"


def properties(options: CompilerOptions,
               capabilities: tuple[str, ...] | None = None) -> list[str]:
    """OpenVINO CPU properties for the options, as "KEY=VALUE" strings (`capabilities`
    as for precision())."""
    _, performance = _requested(options)
    props = [f"INFERENCE_PRECISION_HINT={precision(options, capabilities)}",
             f"EXECUTION_MODE_HINT={'PERFORMANCE' if performance else 'ACCURACY'}",
             "PERFORMANCE_HINT=LATENCY", "ENABLE_CPU_PINNING=NO"]
    if options.cores:
        props.append(f"INFERENCE_NUM_THREADS={options.cores}")
    return props


@functools.cache
def cpu_capabilities() -> tuple[str, ...]:
    return tuple(_core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))


def _as_map(props) -> dict[str, str]:
    return dict(p.split("=", 1) for p in props)


def frontend_probe(mode: str, paths: list[str]) -> list:
    """"partial" GRAPH: the names of the nodes the frontend leaves unconverted.
    "whole" GRAPH...: per one-node graph "ok", "constant" (an operand that must be a
    constant is not) or "unsupported". Runs in a compiler process (_run_probe)."""
    from openvino.frontend import FrontEndManager

    frontend = FrontEndManager().load_by_framework("tf")
    if mode == "partial":
        model = frontend.convert_partially(frontend.load(paths[0]))
        # A loop or conditional is unconverted when anything in its bodies is.
        return [op.get_friendly_name() for op in model.get_ordered_ops()
                if op.get_type_name() == "TFFrameworkNode"
                or any(map(_unconverted, _bodies(op)))]
    verdicts = []
    for path in paths:
        try:
            frontend.convert(frontend.load(path))
            verdicts.append("ok")
        except Exception as e:  # noqa: BLE001 - the frontend's refusal is the answer
            verdicts.append("constant" if "cannot be folded to Constant" in str(e)
                            else "unsupported")
    return verdicts


def _bodies(op) -> list:
    if hasattr(op, "get_then_body"):
        return [op.get_then_body(), op.get_else_body()]
    return [op.get_function()] if hasattr(op, "get_function") else []


def _unconverted(model) -> bool:
    return any(op.get_type_name() == "TFFrameworkNode" or any(map(_unconverted, _bodies(op)))
               for op in model.get_ordered_ops())


def _run_probe(mode: str, graph_defs: list) -> list:
    """frontend_probe for graph_defs, in a compiler process: the frontend aborts the whole
    process on some graphs (seen with ParseExampleV2), and the user's process must
    survive that. The one compile() started has OpenVINO imported already: a probe
    process of its own spent 0.25 s of ResNet50's 0.6 s importing it."""
    from fuseflow.compile import call_in_worker

    with tempfile.TemporaryDirectory(prefix="fuseflow-ov-") as tmp:
        paths = [str(Path(tmp) / f"graph_{k}.pb") for k in range(len(graph_defs))]
        for path, graph_def in zip(paths, graph_defs):
            Path(path).write_bytes(graph_def.SerializeToString())
        try:
            return call_in_worker("fuseflow.backends.openvino:frontend_probe", (mode, paths),
                                  ("openvino",), timeout_s=600)
        except RuntimeError as e:
            raise RuntimeError(f"the frontend failed: {e}") from None


def _frontend_verdicts(graph_def, candidates: set[str], infos, options: CompilerOptions
                       ) -> dict[str, Reason | None]:
    """Each candidate the frontend leaves unconverted, with why (None: it converts alone,
    refused only in its context). Kept in the compile cache by the probe graph's bytes
    (without its weights, so small to hash): a recompile starts no frontend process.

    The probe's weights are Placeholders of their dtype and shape: which ops convert
    does not hang on weight values, and given constants (even as one zero broadcast) the
    frontend spent 0.3 s of ResNet50's compile folding them. A node that needs one as a
    constant is asked again alone, with its constants (_refusal_reasons)."""
    from fuseflow.cache import CompileCache, timing_key

    constants = constant_nodes(graph_def)
    probe, _ = without_weights(probe_graph(graph_def, candidates, infos, constants))
    _zero_weights(probe)  # those without_weights leaves: a TF1 loop frame's
    cache = CompileCache.for_options(options)
    key = timing_key("openvino frontend probe",
                     hashlib.sha256(probe.SerializeToString(deterministic=True)).hexdigest())
    stored = _stored_verdicts(cache.lookup_timings(key, "OpenVINO's frontend probe", "probe"))
    if stored is not None:
        return stored
    unconverted = frontend_unsupported(probe) & candidates
    verdicts: dict[str, Reason | None] = {}
    if unconverted:
        try:
            verdicts = _refusal_reasons(graph_def, unconverted, infos, constants)
        except Exception as e:
            log.warning("OpenVINO's frontend failed on a refused node alone (%s)",
                        str(e).splitlines()[0])
            return dict.fromkeys(unconverted, Reason.UNSUPPORTED_OP)  # not kept: may pass
    cache.store_timings(key, {"verdicts": {n: None if r is None else r.name
                                           for n, r in verdicts.items()}}, "probe")
    return verdicts


def _stored_verdicts(entry: dict | None) -> dict[str, Reason | None] | None:
    """A cached probe entry's verdicts; None when there is none or it is not one."""
    if entry is None:
        return None
    try:
        return {n: None if r is None else Reason[r] for n, r in entry["verdicts"].items()}
    except (KeyError, AttributeError, TypeError) as e:  # probed again
        log.debug("compile cache: ignoring a frontend probe entry (%s)", e)
        return None


def frontend_unsupported(graph_def) -> set[str]:
    """Names of the nodes OpenVINO's TensorFlow frontend leaves unconverted."""
    return set(_run_probe("partial", [graph_def]))


_ZEROED_BYTES = 64 << 10


def _zero_weights(graph_def) -> None:
    """Large float constants as one zero broadcast to their shape (TensorProto's short
    form): which ops the frontend converts does not hang on weight values, and the
    child then does not read them."""
    for node in graph_def.node:
        if node.op != "Const" or node.attr["dtype"].type != DTYPES["float32"]:
            continue
        tensor = node.attr["value"].tensor
        if len(tensor.tensor_content) < _ZEROED_BYTES:
            continue
        tensor.ClearField("tensor_content")
        tensor.float_val.append(0.0)


def _refusal_reasons(graph_def, refused: set[str], infos, constants: set[str]
                     ) -> dict[str, Reason | None]:
    """Why the frontend refused each node, asked of the node alone (its constants copied
    in, its other inputs Placeholders of their compiled shapes): a node refused only
    because its context gave it a dynamic input converts alone and is supported."""
    names = sorted(refused)
    verdicts = _run_probe("whole", [probe_graph(graph_def, {n}, infos, constants)
                                    for n in names])
    table = {"ok": None, "constant": Reason.RUNTIME_OPERAND, "unsupported": Reason.UNSUPPORTED_OP}
    return {n: table[v] for n, v in zip(names, verdicts)}


def _body_convertible(graph_def, node) -> bool:
    """No stateful or unknown op in a loop's/conditional's bodies: they never reach (and
    may crash) the frontend; the frontend judges the rest in the probe."""
    from tensorflow.python.framework import op_def_registry

    from fuseflow.optimize import FUNCTIONAL_CONTROL_FLOW

    for n in body_nodes(graph_def, node):
        op_def = op_def_registry.get(n.op)
        if n.op in FUNCTIONAL_CONTROL_FLOW:
            continue
        if op_def is None or op_def.is_stateful:
            return False
    return True


class OpenVinoBackend(Backend):
    name = "openvino"

    def support(self, graph_def, tensor_infos, options: CompilerOptions
                ) -> dict[str, Reason | None]:
        from tensorflow.python.framework import op_def_registry

        from fuseflow.optimize import FUNCTIONAL_CONTROL_FLOW
        from fuseflow.shapes import node_shapes_known, node_tensors
        from fuseflow.tf_compat import tf

        result: dict[str, Reason | None] = {}
        # Inside a TF1 loop TF knows no shapes (Enter gives none); the frontend infers
        # them, and the frame goes whole into a segment whose ports have known shapes.
        frames = in_v1_control_flow(graph_def, topological_order(graph_def))
        for node in graph_def.node:
            op_def = op_def_registry.get(node.op)
            control_flow = node.op in FUNCTIONAL_CONTROL_FLOW
            if (node.op in NON_COMPUTE_OPS or op_def is None
                    or (op_def.is_stateful and not control_flow)
                    or (called_functions(node.attr.values()) and not control_flow)):
                result[node.name] = Reason.UNSUPPORTED_OP
            elif control_flow and not _body_convertible(graph_def, node):
                result[node.name] = Reason.BODY_UNSUPPORTED
            elif any(t in tensor_infos and tensor_infos[t].dtype.as_datatype_enum not in OV_TYPES
                     and tensor_infos[t].dtype != tf.variant
                     for t in node_tensors(node, tensor_infos)):
                result[node.name] = Reason.DTYPE
            elif not node_shapes_known(node, tensor_infos) and not (
                    node.name in frames or node.op == "Exit" and all(
                        tensor_infos[t].fully_defined for t in node_tensors(node, tensor_infos)
                        if node_name(t) == node.name)):
                result[node.name] = Reason.UNKNOWN_SHAPE
            else:
                result[node.name] = None
        candidates = {n for n, r in result.items() if r is None}
        try:
            verdicts = _frontend_verdicts(graph_def, candidates, tensor_infos, options)
        except Exception as e:  # compile() still decides per segment
            log.warning("OpenVINO's frontend could not convert the graph (%s); deciding "
                        "support per segment at compile time", str(e).splitlines()[0])
            return result
        result.update(verdicts)
        unconverted = set(verdicts)
        op_of = {n.name: n.op for n in graph_def.node}
        for name in unconverted:  # a loop or conditional the frontend refused: its body
            if op_of[name] in FUNCTIONAL_CONTROL_FLOW and result[name] is not None:
                result[name] = Reason.BODY_UNSUPPORTED
        return result

    def compile(self, segment: SegmentGraph, options: CompilerOptions, workdir: Path
                ) -> Artifact:
        times = {}
        start = time.perf_counter()
        # The Identities serialized alone and appended: protobuf parses concatenated
        # GraphDefs as one with their nodes joined, and the segment's bytes (ResNet50:
        # 100 MB) are neither parsed nor serialized again.
        path = Path(workdir) / "openvino_input.pb"
        with open(path, "wb") as f:
            f.write(segment.graph_def_bytes)
            f.write(returned(segment))
        model = _ordered_model(_core().read_model(str(path)), segment)
        times["convert"] = time.perf_counter() - start
        quantized = None
        if options.quantize == "int8":  # calibrated by NNCF on the segment's own inputs
            from fuseflow.quantize import quantize_model, quantized_ops

            start = time.perf_counter()
            model = _fused(model)
            model, quantized = quantize_model(model, Path(workdir))
            times["quantize"] = time.perf_counter() - start
            if not quantized_ops(model):  # nothing to quantize: the precision it would have had
                options = dataclasses.replace(options, quantize="none")

        props = properties(options)
        start = time.perf_counter()
        compiled = _core().compile_model(model, DEVICE, _as_map(props))
        blob = compiled.export_model().getvalue()
        times["compile"] = time.perf_counter() - start
        start = time.perf_counter()
        _check_ports(_import(blob, tuple(props)), segment)
        times["import check"] = time.perf_counter() - start
        if options.workdir:  # compiler_workdir, kept for the user: the IR beside the blob
            ov.save_model(model, str(Path(workdir) / "model.xml"), compress_to_fp16=False)

        lines = [f"OpenVINO {ov.get_version()} {DEVICE}, segment {segment.name}",
                 f"properties: {' '.join(props)}",
                 "precision in effect: "
                 + compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()]
        if quantized:
            lines.append(quantized)
        wanted, _ = _requested(options)
        if wanted != "f32" and precision(options) == "f32":
            log.warning("this CPU has no %s (OPTIMIZATION_CAPABILITIES: %s): %s compiled in "
                        "f32", wanted, " ".join(cpu_capabilities()), segment.name)
            lines.append(f"{wanted} asked for, but this CPU has no {_CAPABILITY[wanted]}: f32")
        lines += [f"input  {n} <- {p.name} {_fmt(p)}"
                  for n, p in zip(input_names(segment), segment.inputs)]
        lines += [f"output {n} <- {p.name} {_fmt(p)}"
                  for n, p in zip(output_names(segment), segment.outputs)]
        ir = ", IR in model.xml/.bin" if options.workdir else ""
        lines.append(f"blob {len(blob)} bytes{ir}; "
                     + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
        return Artifact(executable=blob, log="\n".join(lines) + "\n",
                        timings={f"openvino {k}": round(v, 3) for k, v in times.items()},
                        properties=props)

    def run(self, segment: SegmentGraph, artifact: Artifact, options: CompilerOptions,
            inputs: list) -> list:
        compiled = _import(artifact.executable, tuple(artifact.properties
                                                      or properties(options)))
        results = compiled(list(inputs))
        return [results[k] for k in range(len(compiled.outputs))]

    def tolerance(self, options: CompilerOptions) -> float:
        # f32 matches TF to ~1e-6; bf16 keeps 8 mantissa bits (~0.4% error per model).
        # int8 is checked for garbage only here (random inputs fall outside the calibrated
        # ranges, where int8 is wrong by design): the accuracy guard judges it on real data.
        if options.quantize == "int8":
            return 1.0
        return 1e-3 if precision(options) == "f32" else 1e-1

    def fused_node(self, segment: SegmentGraph, function_name: str, artifact: Artifact,
                   options: CompilerOptions):
        from fuseflow.tf_compat import tf

        node = tf.compat.v1.NodeDef(name=segment.name, op="FuseflowOp")
        node.attr["Tin"].list.type.extend(p.dtype for p in segment.inputs)
        node.attr["Tout"].list.type.extend(p.dtype for p in segment.outputs)
        node.attr["backend"].s = self.name.encode()
        node.attr["executable"].s = artifact.executable
        node.attr["executable_crc32"].s = f"{zlib.crc32(artifact.executable):08x}".encode()
        node.attr["native_segment"].func.name = function_name
        node.attr["input_names"].list.s.extend(n.encode() for n in input_names(segment))
        node.attr["output_names"].list.s.extend(n.encode() for n in output_names(segment))
        node.attr["input_shapes"].list.shape.extend(
            tf.TensorShape(p.shape).as_proto() for p in segment.inputs)
        node.attr["output_shapes"].list.shape.extend(
            tf.TensorShape(p.shape).as_proto() for p in segment.outputs)
        node.attr["input_batch_axis"].list.i.extend(p.batch_axis for p in segment.inputs)
        node.attr["output_batch_axis"].list.i.extend(p.batch_axis for p in segment.outputs)
        node.attr["properties"].list.s.extend(
            p.encode() for p in artifact.properties or properties(options))
        node.attr["max_infer_requests"].i = 0
        return node

    def runtime_info(self) -> dict[str, str]:
        return {"backend": self.name, "openvino": ov.get_version(), "device": DEVICE,
                "op_library": OP_LIBRARY, "needs": "import fuseflow before loading the model"}


def input_names(segment: SegmentGraph) -> list[str]:
    return [f"fuseflow_input_{i}" for i in range(len(segment.inputs))]


def output_names(segment: SegmentGraph) -> list[str]:
    return [f"output_{k}" for k in range(len(segment.outputs))]


def _fmt(port) -> str:
    return f"{DTYPE_NAMES.get(port.dtype, port.dtype)}{list(port.shape)}"


def returned(segment: SegmentGraph) -> bytes:
    """A GraphDef of one Identity `__fuseflow_ret_<k>` per output, encoded here: the
    compiler process has no TensorFlow to build it with. Wire format: GraphDef.node = 1;
    NodeDef name = 1, op = 2, input = 3, attr = 5 (map entries: key = 1, value = 2);
    AttrValue.type = 6. test_openvino_backend compares it with TF's."""
    from fuseflow.graph_util import field_header

    def field(number: int, data: bytes) -> bytes:
        return field_header(number, len(data)) + data

    graph = b""
    for k, port in enumerate(segment.outputs):
        # AttrValue.type: tag and value one byte each (a varint field; dtypes are < 128).
        dtype = field(1, b"T") + field(2, bytes([6 << 3, port.dtype]))
        graph += field(1, field(1, f"{_RET}{k}".encode()) + field(2, b"Identity")
                       + field(3, port.name.encode()) + field(5, dtype))
    return graph


def _fused(model):
    """OpenVINO's model-level fusions (Swish, GELU, MVN, ...), as ov.convert_model applies
    them and core.read_model does not. NNCF places its FakeQuantize ops by pattern on the
    graph it is given: on an unfused one it quantizes between Sigmoid and Multiply, and
    the CPU plugin can no longer fuse them (EfficientNetB0 int8: 6.8 -> 4.9 ms at batch
    1). The plugin makes the same fusions itself when compiling an unquantized model."""
    from openvino._offline_transformations import (
        apply_fused_names_cleanup,
        apply_moc_transformations,
    )

    apply_moc_transformations(model, cf=False, smart_reshape=True)
    apply_fused_names_cleanup(model)
    return model


def _ordered_model(converted, segment: SegmentGraph):
    """The converted model cut to the segment's ports, in order, named and reshaped."""
    parameters = {name: p for p in converted.get_parameters()
                  for name in p.output(0).get_names()}
    results = {r.get_friendly_name(): r for r in converted.get_results()}
    dropped = [p.name for k, p in enumerate(segment.outputs) if f"{_RET}{k}:0" not in results]
    if dropped:
        raise OpenVinoCompileError(
            f"OpenVINO dropped segment output(s) {dropped}: it removes outputs computed from "
            "constants only; the segment stays in TensorFlow")
    unused = [p.name for p in segment.inputs if f"{p.name}:0" not in parameters]
    if unused:
        raise OpenVinoCompileError(f"OpenVINO dropped segment input(s) {unused} (unused after "
                                   "conversion); the segment stays in TensorFlow")
    model = ov.Model([results[f"{_RET}{k}:0"] for k in range(len(segment.outputs))],
                     [parameters[f"{p.name}:0"] for p in segment.inputs], segment.name)
    model.reshape({param.output(0): ov.PartialShape(list(p.shape))
                   for param, p in zip(model.get_parameters(), segment.inputs)})
    for port, name in zip(model.inputs, input_names(segment)):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, output_names(segment)):
        port.get_tensor().set_names({name})
    return model


@functools.lru_cache(maxsize=1)  # compile() checks a blob, then the worker runs it
def _import(blob: bytes, props: tuple[str, ...]):
    """The blob as the native op loads it: imported with the properties it was compiled with."""
    return _core().import_model(blob, DEVICE, _as_map(props))  # bytes: one copy fewer


def _check_ports(imported, segment: SegmentGraph) -> None:
    """Every port at its position, answering to its name, with the segment's type and shape."""
    problems = []
    for what, ports, names, specs in (
            ("input", imported.inputs, input_names(segment), segment.inputs),
            ("output", imported.outputs, output_names(segment), segment.outputs)):
        if len(ports) != len(specs):
            problems.append(f"{len(ports)} {what}s instead of {len(specs)}")
            continue
        for port, name, spec in zip(ports, names, specs):
            if (name not in port.get_names() or port.get_element_type() != OV_TYPES[spec.dtype]
                    or port.get_partial_shape() != ov.PartialShape(list(spec.shape))):
                problems.append(f"{what} {name} ({spec.name}) came out as {port}")
    if problems:
        raise OpenVinoCompileError(
            "the compiled model's ports do not match the segment (an output that is an input "
            f"passed through loses its name): {'; '.join(problems)}")
