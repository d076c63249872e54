"""The OpenVINO backend alone, on real TF graphs and real OpenVINO (no native op needed).

Compiled blobs are imported with openvino.Core().import_model and the same
properties, as the native op does, and compared with TensorFlow.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import replace

import numpy as np
import openvino as ov
import pytest
from conftest import tf

from fuseflow.backends.base import Port, SegmentGraph
from fuseflow.backends.openvino import (
    OpenVinoBackend,
    OpenVinoCompileError,
    cpu_capabilities,
    properties,
)
from fuseflow.options import CompilerOptions
from fuseflow.reasons import Reason
from fuseflow.shapes import TensorInfo


def tensor_infos(graph: tf.Graph) -> dict[str, TensorInfo]:
    return {t.name: TensorInfo(t.dtype, None if t.shape.rank is None else
                               tuple(t.shape.as_list()))
            for op in graph.get_operations() for t in op.outputs}


def segment_of(graph: tf.Graph, inputs: list[str], outputs: list[str]) -> SegmentGraph:
    """A SegmentGraph as extract.py makes it: inputs are the Placeholders fuseflow_input_<i>."""
    def port(name):
        t = graph.get_tensor_by_name(name)
        return Port(name.split(":")[0] if name in inputs else name, t.dtype.as_datatype_enum,
                    tuple(t.shape.as_list()), -1)
    graph_def = graph.as_graph_def()
    return SegmentGraph(name="seg0", graph_def_bytes=graph_def.SerializeToString(),
                        inputs=tuple(port(n) for n in inputs),
                        outputs=tuple(port(n) for n in outputs),
                        op_types=tuple(sorted({n.op for n in graph_def.node})),
                        node_count=len(graph_def.node))


def run_blob(blob: bytes, options: CompilerOptions, feeds: list[np.ndarray]):
    """Outputs by position and by name, from the blob imported as the native op would."""
    props = dict(p.split("=", 1) for p in properties(options))
    compiled = ov.Core().import_model(io.BytesIO(blob), "CPU", props)
    by_position = compiled(feeds)
    by_name = compiled({f"fuseflow_input_{i}": v for i, v in enumerate(feeds)})
    return ([by_position[k] for k in range(len(compiled.outputs))],
            [by_name[compiled.output(f"output_{k}")] for k in range(len(compiled.outputs))])


def tf_run(graph: tf.Graph, outputs: list[str], feeds: dict[str, np.ndarray]):
    with tf.compat.v1.Session(graph=graph) as sess:
        return sess.run(outputs, feeds)


def test_support_from_the_frontend():
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, 8, 8, 3], name="x")
        w = tf.constant(np.ones([3, 3, 3, 4], np.float32), name="w")
        conv = tf.nn.conv2d(x, w, 1, "SAME", name="conv")
        relu = tf.nn.relu(conv, name="relu")
        flat = tf.reshape(relu, [1, 256], name="flat")
        mm = tf.matmul(flat, tf.constant(np.ones([256, 5], np.float32)), name="mm")
        tf.nn.relu(tf.raw_ops.BesselI0e(x=mm, name="bessel"), name="after")
        tf.raw_ops.Fingerprint(data=mm, method="farmhash64", name="fingerprint")
        tf.random.uniform([2], name="random")
        tf.add(tf.cast(mm, tf.float64, name="to_f64"), 1.0, name="add_f64")
        dyn = tf.compat.v1.placeholder(tf.float32, [None, 4], name="dyn")
        tf.nn.relu(dyn, name="dyn_relu")
    support = OpenVinoBackend().support(graph.as_graph_def(), tensor_infos(graph),
                                        CompilerOptions())
    for name in ("conv", "relu", "flat", "mm", "after"):
        assert support[name] is None, name
    for name in ("bessel", "random/RandomUniform", "x", "w"):
        assert support[name] == Reason.UNSUPPORTED_OP, name
    assert support["fingerprint"] == Reason.DTYPE  # its method input is a string
    assert support["to_f64"] == support["add_f64"] == Reason.DTYPE
    assert support["dyn_relu"] == Reason.UNKNOWN_SHAPE


def _two_output_graph():
    rng = np.random.default_rng(0)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2, 8, 8, 3], name="fuseflow_input_0")
        b = tf.compat.v1.placeholder(tf.float32, [2, 5], name="fuseflow_input_1")
        w = tf.constant(rng.standard_normal([3, 3, 3, 4]).astype(np.float32))
        relu = tf.nn.relu(tf.nn.conv2d(x, w, 1, "SAME"), name="relu")
        flat = tf.reshape(relu, [2, 256])
        mm = tf.matmul(flat, tf.constant(rng.standard_normal([256, 5]).astype(np.float32)))
        tf.nn.sigmoid(tf.add(mm, b), name="out")
        tf.identity(relu, name="relu_copy")
        tf.split(relu, 2, axis=3, name="split")
        tf.identity(tf.constant([1.0, 2.0]), name="const_out")
        tf.identity(x, name="passthrough")
    feeds = [rng.standard_normal([2, 8, 8, 3]).astype(np.float32),
             rng.standard_normal([2, 5]).astype(np.float32)]
    return graph, feeds


@pytest.mark.parametrize("outputs", [
    ["out:0", "relu:0"],  # an internal tensor (also read inside) as an output
    ["split:1", "out:0", "relu:0", "relu_copy:0"],  # a second output index; one value twice
])
def test_compile_matches_tensorflow(tmp_path, outputs):
    graph, feeds = _two_output_graph()
    segment = segment_of(graph, ["fuseflow_input_0:0", "fuseflow_input_1:0"], outputs)
    options = CompilerOptions(workdir=str(tmp_path))  # kept: the IR is written beside
    artifact = OpenVinoBackend().compile(segment, options, tmp_path)
    expected = tf_run(graph, outputs, {"fuseflow_input_0:0": feeds[0],
                                       "fuseflow_input_1:0": feeds[1]})
    by_position, by_name = run_blob(artifact.executable, options, feeds)
    for got in (by_position, by_name):
        assert len(got) == len(expected)
        for k, (g, e) in enumerate(zip(got, expected)):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=outputs[k])
    assert "INFERENCE_PRECISION_HINT=f32" in artifact.log
    assert (tmp_path / "model.xml").exists() and (tmp_path / "model.bin").exists()


def test_constant_only_output_is_refused(tmp_path):
    graph, _ = _two_output_graph()
    segment = segment_of(graph, ["fuseflow_input_0:0", "fuseflow_input_1:0"],
                         ["out:0", "const_out:0"])
    with pytest.raises(OpenVinoCompileError, match=r"const_out:0.*constants"):
        OpenVinoBackend().compile(segment, CompilerOptions(), tmp_path)


def test_passed_through_input_is_refused(tmp_path):
    graph, _ = _two_output_graph()
    segment = segment_of(graph, ["fuseflow_input_0:0", "fuseflow_input_1:0"],
                         ["out:0", "passthrough:0"])
    with pytest.raises(OpenVinoCompileError, match="passed through"):
        OpenVinoBackend().compile(segment, CompilerOptions(), tmp_path)


def _precision(props: list[str]) -> str:
    return next(p.split("=")[1] for p in props if p.startswith("INFERENCE_PRECISION_HINT="))


# OPTIMIZATION_CAPABILITIES of CPUs with bf16 (Zen 4, Sapphire Rapids), with f16 (an
# ARM or AMX-FP16 CPU), with both, and with neither (AVX2): whatever CPU runs the tests.
_CPUS = {"bf16": ("FP32", "BF16", "INT8", "BIN", "EXPORT_IMPORT"),
         "f16": ("FP32", "FP16", "INT8", "EXPORT_IMPORT"),
         "both": ("FP32", "BF16", "FP16", "INT8", "EXPORT_IMPORT"),
         "neither": ("FP32", "INT8", "BIN", "EXPORT_IMPORT")}


@pytest.mark.parametrize("cpu", sorted(_CPUS))
def test_properties_mapping(cpu):
    caps = _CPUS[cpu]
    bf16 = "bf16" if cpu in ("bf16", "both") else "f32"
    f16 = "f16" if cpu in ("f16", "both") else "f32"

    def mapped(options):
        return properties(options, caps)

    default = mapped(CompilerOptions())
    assert default == ["INFERENCE_PRECISION_HINT=f32", "EXECUTION_MODE_HINT=ACCURACY",
                       "PERFORMANCE_HINT=LATENCY", "ENABLE_CPU_PINNING=NO"]
    assert "INFERENCE_NUM_THREADS=3" in mapped(CompilerOptions(cores=3))
    for cast in ("all", "matmult", "matmult-bf16"):
        assert _precision(mapped(CompilerOptions(fp32_cast=cast))) == bf16, cast
    for cast in ("all-fp16", "matmult-fp16"):
        assert _precision(mapped(CompilerOptions(fp32_cast=cast))) == f16, cast
    fast = mapped(CompilerOptions(fast_math=("all",)))
    assert "EXECUTION_MODE_HINT=PERFORMANCE" in fast and _precision(fast) == bf16
    assert _precision(mapped(CompilerOptions(fast_math=("fp32-cast-matmult",)))) == bf16
    for words in (("none",), ("all", "no-fp32-cast")):
        props = mapped(CompilerOptions(fp32_cast="all", fast_math=words))
        assert _precision(props) == "f32", words
    assert "EXECUTION_MODE_HINT=ACCURACY" in mapped(CompilerOptions(fast_math=("none",)))


def test_properties_default_to_this_cpus_capabilities():
    options = CompilerOptions(fp32_cast="all")
    assert properties(options) == properties(options, cpu_capabilities())


def test_bf16_blob_differs_from_f32(tmp_path):
    if "BF16" not in cpu_capabilities():  # shown by pytest -rs (make test)
        pytest.skip("this CPU has no bf16: OPTIMIZATION_CAPABILITIES "
                    + " ".join(cpu_capabilities()))
    graph, feeds = _two_output_graph()
    segment = segment_of(graph, ["fuseflow_input_0:0", "fuseflow_input_1:0"], ["relu:0"])
    options = CompilerOptions(fp32_cast="all")
    artifact = OpenVinoBackend().compile(segment, options, tmp_path)
    expected = tf_run(graph, ["relu:0"], {"fuseflow_input_0:0": feeds[0],
                                          "fuseflow_input_1:0": feeds[1]})[0]
    got = run_blob(artifact.executable, options, feeds)[0][0]
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert 1e-5 < error < 3e-2
    assert "precision in effect: bf16" in artifact.log


def test_fused_node_attrs(tmp_path):
    graph, _ = _two_output_graph()
    segment = segment_of(graph, ["fuseflow_input_0:0", "fuseflow_input_1:0"],
                         ["out:0", "relu:0"])
    segment = replace(segment, inputs=(replace(segment.inputs[0], batch_axis=0),
                                       segment.inputs[1]))
    backend = OpenVinoBackend()
    options = CompilerOptions(cores=2)
    artifact = backend.compile(segment, options, tmp_path)
    node = backend.fused_node(segment, "seg0_native", artifact, options)
    assert node.name == "seg0" and node.op == "FuseflowOp" and not node.input
    a = node.attr
    assert sorted(a) == sorted([
        "Tin", "Tout", "backend", "executable", "executable_crc32", "native_segment",
        "input_names",
        "output_names", "input_shapes", "output_shapes", "input_batch_axis",
        "output_batch_axis", "properties", "max_infer_requests"])
    assert list(a["Tin"].list.type) == [tf.float32.as_datatype_enum] * 2
    assert list(a["Tout"].list.type) == [tf.float32.as_datatype_enum] * 2
    assert a["backend"].s == b"openvino" and a["executable"].s == artifact.executable
    assert a["executable_crc32"].s == f"{zlib.crc32(artifact.executable):08x}".encode()
    assert a["native_segment"].func.name == "seg0_native"
    assert list(a["input_names"].list.s) == [b"fuseflow_input_0", b"fuseflow_input_1"]
    assert list(a["output_names"].list.s) == [b"output_0", b"output_1"]
    assert [tf.TensorShape(s).as_list() for s in a["input_shapes"].list.shape] == [
        [2, 8, 8, 3], [2, 5]]
    assert [tf.TensorShape(s).as_list() for s in a["output_shapes"].list.shape] == [
        [2, 5], [2, 8, 8, 4]]
    assert list(a["input_batch_axis"].list.i) == [0, -1]
    assert list(a["output_batch_axis"].list.i) == [-1, -1]
    assert [s.decode() for s in a["properties"].list.s] == properties(options)
    assert a["max_infer_requests"].i == 0
    info = backend.runtime_info()
    assert info["backend"] == "openvino" and info["openvino"] == ov.get_version()


def test_dtype_numbers_are_tfs():
    """base.DTYPES stands in for TF's enum in the compiler process, which has no TF."""
    from fuseflow.backends.base import DTYPES

    assert {name: tf.as_dtype(name).as_datatype_enum for name in DTYPES} == DTYPES


def test_returned_identities_encode_as_tf_would():
    """The Identity per output that compile() appends, encoded without TF: what TF's own
    GraphDef gives, here with a name past one length byte and every port dtype."""
    from fuseflow.backends.base import DTYPES
    from fuseflow.backends.openvino import OV_TYPES, returned

    long = "scope/" * 30 + "x"
    outputs = tuple(Port(f"{long}:{k}", dtype, (2,), -1) for k, dtype in
                    enumerate([DTYPES["float32"], *sorted(OV_TYPES)]))
    segment = SegmentGraph("seg0", b"", (), outputs, (), 0)
    want = tf.compat.v1.GraphDef()
    for k, port in enumerate(outputs):
        want.node.add(name=f"__fuseflow_ret_{k}", op="Identity", input=[port.name]
                      ).attr["T"].type = port.dtype
    assert tf.compat.v1.GraphDef.FromString(returned(segment)) == want


def test_the_check_compares_each_output_with_tfs():
    """The parent's check of a worker's outputs (compile.compare): a wrong shape, an
    error past the tolerance, or a NaN where TF has a number rejects the artifact."""
    from fuseflow.compile import compare

    ports = (Port("a:0", 1, (2,), -1), Port("b:0", 1, (2,), -1))
    segment = SegmentGraph("seg0", b"", (), ports, (), 0)
    want = [np.array([1.0, 2.0]), np.array([3.0, 4.0])]
    assert "max relative error 2.50e-03" in compare(
        segment, want, [want[0], np.array([3.0, 4.01])], 1e-2, "random inputs")
    with pytest.raises(ValueError, match=r"output b:0 differs from TF by 2\.50e-03"):
        compare(segment, want, [want[0], np.array([3.0, 4.01])], 1e-3, "random inputs")
    with pytest.raises(ValueError, match=r"output a:0 has shape \(3,\)"):
        compare(segment, want, [np.zeros(3), want[1]], 1e-3, "random inputs")
    with pytest.raises(ValueError, match="non-finite"):
        compare(segment, want, [np.array([1.0, np.nan]), want[1]], 1e-3, "random inputs")
