"""Cold start: what loading a compiled model has to parse and keep.

A fused OpenVINO node's blob and its TF fallback (the segment's function with its
weights) live in asset files, not in the graph: the graph a loader parses holds
neither copy of the weights, the blob is mapped at the first call, and the fallback
is read only when it runs.
"""

from __future__ import annotations

import numpy as np
from conftest import (
    assert_outputs_close,
    assert_ran,
    fused_blob,
    fused_segments,
    run_fresh,
    run_saved_model,
    save_tf1,
    saved_graph,
    tf,
)
from test_compile_core import compile_model

WEIGHTS = 256 * 256 * 4  # bytes of one weight matrix below


def _dense_model(batch_statistics: bool = False):
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 256], name="x")
        w = tf.constant(np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32))
        h = tf.nn.relu(tf.matmul(x, w) + 1.0)
        if batch_statistics:  # mixes samples: other batch sizes run the TF fallback
            h = h - tf.reduce_mean(h, axis=0)
        return {"x": x}, {"y": tf.tanh(tf.matmul(h, w * 0.01), name="y")}
    return build


def test_weights_are_in_assets_not_in_the_graph(tmp_path, rng):
    src = save_tf1(tmp_path / "m", _dense_model())
    compile_model("openvino", src, tmp_path / "c")
    graph = saved_graph(tmp_path / "c")
    [node] = [n for n in graph.node if n.op == "FuseflowOp"]
    assert fused_blob(tmp_path / "c", node).stat().st_size > WEIGHTS
    assert node.attr["native_file"].s
    # Neither copy of the weights is in the graph: no constant over 1 kB anywhere, and
    # the fallback function the node names is a stub.
    consts = [n for n in graph.node if n.op == "Const"]
    consts += [n for f in graph.library.function for n in f.node_def if n.op == "Const"]
    assert max(n.ByteSize() for n in consts) < 1024
    assert (tmp_path / "c" / "saved_model.pb").stat().st_size < WEIGHTS // 4
    assert any(n.op == "FuseflowAssets" for n in graph.node)
    feeds = {"x": rng.random((2, 256), np.float32)}
    expected = run_saved_model(src, feeds)
    for api in ("v2", "v1"):
        assert_outputs_close(expected, run_fresh(tmp_path / "c", feeds, tmp_path, api=api,
                                                 backend="openvino"), rtol=1e-3, atol=1e-4)


def test_fallback_runs_from_its_asset_file(tmp_path, rng):
    src = save_tf1(tmp_path / "m", _dense_model(batch_statistics=True))
    compile_model("openvino", src, tmp_path / "c", batch_size=3)
    segments = fused_segments(tmp_path / "c")
    for batch, path in ((3, "compiled"), (5, "fallback")):
        feeds = {"x": rng.random((batch, 256), np.float32)}
        for api in ("v2", "v1"):
            out, stats = run_fresh(tmp_path / "c", feeds, tmp_path, api=api, with_stats=True)
            assert_outputs_close(run_saved_model(src, feeds), out, rtol=1e-3, atol=1e-4)
            assert_ran(stats, "openvino", segments, path=path,
                       reason="shape" if path == "fallback" else None)


def _function(name: str, calls: str | None = None, weights: int = 0):
    from tensorflow.core.framework import function_pb2

    function = function_pb2.FunctionDef()
    function.signature.name = name
    const = function.node_def.add(name="w", op="Const")
    const.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(
        np.arange(weights or 4, dtype=np.float32)))
    if calls:
        call = function.node_def.add(name="call", op="PartitionedCall")
        call.attr["f"].func.name = calls
    return function


def test_move_to_assets_in_place_writes_the_same_files(tmp_path):
    """The fallback library file is written in pieces (never joined into one library
    message first): it parses into exactly the functions the fused node reached, and
    moving in place (the compile's own graph) gives what moving a copy gives."""
    from tensorflow.core.framework import function_pb2

    from fuseflow.assets import move_to_assets

    graph = tf.compat.v1.GraphDef()
    fused = graph.node.add(name="seg/0", op="FuseflowOp")
    fused.attr["executable"].s = bytes(range(256)) * 1000
    fused.attr["native_segment"].func.name = "seg_native"
    other = graph.node.add(name="other", op="PartitionedCall")
    other.attr["f"].func.name = "shared"
    functions = [_function("seg_native", calls="body", weights=300_000), _function("body"),
                 _function("shared")]
    graph.library.function.extend(functions)
    original = tf.compat.v1.GraphDef.FromString(graph.SerializeToString())

    copied, files = move_to_assets(graph, tmp_path / "a")
    assert graph == original  # copy=True leaves its argument alone
    in_place, files_in_place = move_to_assets(graph, tmp_path / "b", copy=False)
    assert in_place is graph and in_place == copied
    assert [f.key for f in files] == [f.key for f in files_in_place]
    assert [f.path.read_bytes() for f in files] == [f.path.read_bytes() for f in files_in_place]

    blob, library = (f.path.read_bytes() for f in files)
    assert blob == original.node[0].attr["executable"].s
    parsed = function_pb2.FunctionDefLibrary.FromString(library)
    assert list(parsed.function) == functions[:2]
    assert library == function_pb2.FunctionDefLibrary(function=functions[:2]).SerializeToString()
    [node] = [n for n in in_place.node if n.op == "FuseflowOp"]
    assert not node.attr["executable"].s
    assert (node.attr["executable_file"].s.decode(), node.attr["native_file"].s.decode()) == (
        files[0].key, files[1].key)
    kept = {f.signature.name: f for f in in_place.library.function}
    assert kept["shared"] == functions[2] and "body" not in kept
    stub = kept["seg_native"]  # its signature over no weights
    assert stub.signature == functions[0].signature and not stub.node_def


def test_payloads_held_apart_are_written_into_the_files(tmp_path):
    """The blob and the fallback's weights rewrite_graph holds out of the graph (Payloads)
    end up in the files as if the graph had carried them; one with no file to go to is a
    bug that raises, not a model silently missing its weights."""
    import pytest
    from tensorflow.core.framework import function_pb2

    from fuseflow.assets import Payloads, move_to_assets

    blob = bytes(range(256)) * 1000
    whole = _function("seg_native", weights=300_000)
    light = function_pb2.FunctionDef()
    light.CopyFrom(whole)
    del light.node_def[:]
    graph = tf.compat.v1.GraphDef()
    fused = graph.node.add(name="seg", op="FuseflowOp")
    fused.attr["native_segment"].func.name = "seg_native"
    graph.library.function.append(light)
    payloads = Payloads(weights={"seg_native": [whole.node_def[0].SerializeToString()]})
    payloads.hold(fused, blob)
    expected = tf.compat.v1.GraphDef()
    expected.CopyFrom(graph)
    expected.node[0].attr["executable"].s = blob
    expected.library.function[0].CopyFrom(whole)

    _, files = move_to_assets(graph, tmp_path / "held", payloads=payloads)
    _, reference = move_to_assets(expected, tmp_path / "whole")
    assert [f.key for f in files] == [f.key for f in reference]
    assert [f.path.read_bytes() for f in files] == [f.path.read_bytes() for f in reference]
    assert not payloads.blobs  # taken

    stray = Payloads(weights={"other": [b""]})
    graph.library.function.add().signature.name = "other"
    with pytest.raises(RuntimeError, match="fuseflow bug"):
        move_to_assets(graph, tmp_path / "stray", payloads=stray)
