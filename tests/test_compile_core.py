"""compile() end to end on real TF graphs: reference behaviours, TF1 and TF2 models.

Each test builds a model, compiles it, loads the result in a fresh process
(import fuseflow; tf.saved_model.load) and compares with the original.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    assert_outputs_close,
    op_types,
    run_fresh,
    run_saved_model,
    save_tf1,
    saved_graph,
    tf,
)

import fuseflow
from fuseflow import errors


def compile_model(backend, src, out, **kwargs):
    return fuseflow.saved_model.compile(str(src), str(out), backend=backend, **kwargs)


def fused_nodes(graph_def):
    return [n for n in graph_def.node
            if (n.op == "PartitionedCall" and n.attr["_XlaMustCompile"].b)
            or n.op == "FuseflowOp"]


def _conv_model():
    x1 = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x1")
    x2 = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 4], name="x2")
    w = tf.compat.v1.get_variable("w", [3, 3, 3, 4])
    y = tf.nn.conv2d(x1, w, 1, "SAME") + x2
    y = tf.sigmoid(tf.nn.relu(y), name="y")
    return {"x1": x1, "x2": x2}, {"y": y}


def test_two_input_conv_one_fused_op(backend, tmp_path, rng):
    src = save_tf1(tmp_path / "m", _conv_model)
    out = tmp_path / "c"
    result = compile_model(backend, str(src), str(out), batch_size=2)
    assert result["num_segments"] == 1 and result["OnNeuronRatio"] == 1.0
    graph = saved_graph(out)
    assert len(fused_nodes(graph)) == 1
    assert "Conv2D" not in op_types(graph)
    feeds = {"x1": rng.random((2, 8, 8, 3), np.float32), "x2": rng.random((2, 8, 8, 4),
                                                                         np.float32)}
    expected = run_saved_model(src, feeds)
    assert_outputs_close(expected, run_fresh(out, feeds, tmp_path, backend=backend))
    assert_outputs_close(expected, run_fresh(out, feeds, tmp_path, backend=backend, api="v1"))
    # The input is never touched; the workdir was a temp dir, now gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "m"]


def test_shapes_from_model_feed_dict(backend, tmp_path, rng):
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, None], name="x")
        w = tf.compat.v1.get_variable("w", [6, 5])
        return {"x": x}, {"y": tf.tanh(tf.matmul(x, w) * 2.0)}

    src = save_tf1(tmp_path / "m", build)
    feeds = {"x": rng.random((4, 6), np.float32)}
    with pytest.raises(errors.ShapeError, match="batch_size is not sufficient.*x:0"):
        compile_model(backend, str(src), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
    result = compile_model(backend, str(src), str(tmp_path / "c"), model_feed_dict=feeds)
    assert result["num_segments"] == 1
    sig = tf.saved_model.load(str(tmp_path / "c")).signatures["serving_default"]
    assert sig.structured_input_signature[1]["x"].shape.as_list() == [None, 6]
    assert_outputs_close(run_saved_model(src, feeds), run_fresh(tmp_path / "c", feeds,
                                                                tmp_path, backend=backend))


def test_tags_signatures_and_swapped_inputs(backend, tmp_path, rng):
    def build():
        a = tf.compat.v1.placeholder(tf.float32, [None, 3], name="a")
        b = tf.compat.v1.placeholder(tf.float32, [None, 3], name="b")
        y = tf.nn.relu(a * 2.0 - b)
        z = tf.exp(b - a)
        # "swapped": key a reads tensor b and key b reads tensor a
        return {"a": a, "b": b}, {"y": y}, {"swapped": ({"a": b, "b": a}, {"z": z})}

    src = save_tf1(tmp_path / "m", build, tags=("serve", "gpu"),
                   extra_tag_sets=[("serve",), ("train",)])
    feeds = {"a": rng.random((1, 3), np.float32), "b": rng.random((1, 3), np.float32)}
    with pytest.raises(errors.TagError, match=r"\['nope'\].*tag sets"):
        compile_model(backend, str(src), str(tmp_path / "x"), tags=["nope"])
    with pytest.raises(errors.SignatureError, match="'nope' not found.*swapped"):
        compile_model(backend, str(src), str(tmp_path / "x"), signature_def_key="nope")
    out = tmp_path / "c"
    compile_model(backend, str(src), str(out), tags="serve,gpu",
                                 signature_def_key="swapped")
    proto_sigs = tf.saved_model.load(str(out), tags=["serve", "gpu"]).signatures
    assert list(proto_sigs.keys()) == ["swapped"]
    expected = run_saved_model(src, feeds, signature="swapped", tags=["serve", "gpu"])
    assert_outputs_close(expected,
                         run_fresh(out, feeds, tmp_path, backend=backend, signature="swapped",
                                   tags=["serve", "gpu"]))


def test_lookup_table_and_main_op_survive(backend, tmp_path, rng):
    def build():
        ids = tf.compat.v1.placeholder(tf.string, [None], name="words")
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(["a", "b", "c"]), tf.constant([1, 2, 3], tf.int64)), -1)
        idx = tf.cast(table.lookup(ids), tf.float32)
        w = tf.compat.v1.get_variable("w", [4, 4])
        y = tf.nn.relu(tf.matmul(x, w)) * tf.expand_dims(idx, 1) + 1.0
        return {"words": ids, "x": x}, {"y": y}

    src = save_tf1(tmp_path / "m", build, main_op=tf.compat.v1.tables_initializer)
    feeds = {"words": np.array([b"b", b"z"]), "x": rng.random((2, 4), np.float32)}
    result = compile_model(backend, str(src), str(tmp_path / "c"), batch_size=2)
    assert result["num_segments"] >= 1
    report = result
    assert report["OnNeuronRatio"] < 1.0  # the lookup stays in TF
    graph = saved_graph(tmp_path / "c")
    assert "LookupTableFindV2" in op_types(graph)
    assert_outputs_close(run_saved_model(src, feeds), run_fresh(tmp_path / "c", feeds,
                                                                tmp_path, backend=backend))


def test_inputs_from_the_middle_of_the_graph(backend, tmp_path, rng):
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 5], name="x")
        mid = tf.identity_n([tf.nn.relu(x) + 1.0, x * 3.0], name="mid")
        y = tf.sigmoid(mid[0] * mid[1] - 0.5) + tf.tanh(mid[1])
        return {"m0": mid[0], "m1": mid[1]}, {"y": y}

    src = save_tf1(tmp_path / "m", build)
    feeds = {"m0": rng.random((1, 5), np.float32), "m1": rng.random((1, 5), np.float32)}
    result = compile_model(backend, str(src), str(tmp_path / "c"))
    assert result["num_segments"] == 1
    # everything upstream of the inputs stays as it was
    graph = saved_graph(tmp_path / "c")
    assert {"Relu", "IdentityN"} <= set(op_types(graph))
    assert_outputs_close(run_saved_model(src, feeds), run_fresh(tmp_path / "c", feeds,
                                                                tmp_path, backend=backend))


def test_timeout_falls_back_to_tf_and_must_compile_raises(backend, tmp_path, rng):
    src = save_tf1(tmp_path / "m", _conv_model)
    feeds = {"x1": rng.random((1, 8, 8, 3), np.float32), "x2": rng.random((1, 8, 8, 4),
                                                                         np.float32)}
    result = compile_model(backend, str(src), str(tmp_path / "c"),
                                          compiler_args=["--timeout", "0.01"])
    assert result["num_segments"] == 0 and result["num_segments_failed"] == 1
    assert result["OnNeuronRatio"] == 0.0
    assert "Conv2D" in op_types(saved_graph(tmp_path / "c"))
    assert_outputs_close(run_saved_model(src, feeds), run_fresh(tmp_path / "c", feeds,
                                                                tmp_path, backend=backend))
    with pytest.raises(errors.SegmentCompileError,
                       match=r"following subgraphs failed to compile: \['fuseflow_segment_0'\]"):
        compile_model(backend, str(src), str(tmp_path / "d"),
                                     compiler_args=["--timeout", "0.01", "--must-compile"])
    assert not (tmp_path / "d").exists()


def test_must_compile_from_env(backend, tmp_path, monkeypatch):
    src = save_tf1(tmp_path / "m", _conv_model)
    monkeypatch.setenv("NEURON_CC_FLAGS", "--must-compile --timeout 0.01")
    with pytest.raises(errors.SegmentCompileError):
        compile_model(backend, str(src), str(tmp_path / "d"))


def test_large_constant_scalar_io_and_range_reshape(backend, tmp_path, rng):
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 256], name="x")
        s = tf.compat.v1.placeholder(tf.float32, [], name="s")
        big = tf.constant(rng.random((256, 2048), np.float32))  # 2 MB constant
        h = tf.matmul(x, big) * s
        n = tf.size(tf.range(8))
        h = tf.reshape(h, [-1, n, 256])
        return {"x": x, "s": s}, {"y": tf.reduce_sum(h, axis=[1, 2]),
                                  "total": tf.reduce_sum(h)}

    src = save_tf1(tmp_path / "m", build)
    feeds = {"x": rng.random((1, 256), np.float32), "s": np.float32(0.5)}
    result = compile_model(backend, str(src), str(tmp_path / "c"))
    assert result["num_segments"] == 1
    assert_outputs_close(run_saved_model(src, feeds),
                         run_fresh(tmp_path / "c", feeds, tmp_path, backend=backend),
                         rtol=1e-4, atol=1e-2)


def test_split_outputs_nchw_pool_explicit_padding_batch_matmul(backend, tmp_path, rng):
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 4], name="x")
        a = tf.compat.v1.placeholder(tf.float32, [None, 3, 4], name="a")
        w = tf.compat.v1.get_variable("w", [3, 3, 4, 4])
        y = tf.nn.conv2d(x, w, 1, [[0, 0], [1, 2], [2, 1], [0, 0]])
        y = tf.nn.max_pool2d(tf.nn.relu(y), 2, 2, "VALID")
        parts = tf.split(y, 2, axis=3, name="split")
        bm = tf.linalg.matmul(a, tf.transpose(a, [0, 2, 1]))  # BatchMatMulV2
        return {"x": x, "a": a}, {"p0": parts[0], "p1": parts[1], "bm": bm * 2.0}

    src = save_tf1(tmp_path / "m", build)
    feeds = {"x": rng.random((1, 6, 6, 4), np.float32), "a": rng.random((1, 3, 4), np.float32)}
    compile_model(backend, str(src), str(tmp_path / "c"))
    graph = saved_graph(tmp_path / "c")
    assert "Split" not in op_types(graph) and "BatchMatMulV2" not in op_types(graph)
    assert_outputs_close(run_saved_model(src, feeds), run_fresh(tmp_path / "c", feeds,
                                                                tmp_path, backend=backend))


def test_no_fuse_ops_and_unknown_flag(backend, tmp_path):
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        a = tf.nn.relu(x * 2.0, name="a")
        b = tf.sigmoid(a + 1.0, name="b")
        c = tf.tanh(b * 3.0, name="c")
        return {"x": x}, {"y": tf.exp(c - 1.0, name="y")}

    src = save_tf1(tmp_path / "m", build)
    whole = compile_model(backend, str(src), str(tmp_path / "c1"))
    assert whole["num_segments"] == 1
    split = compile_model(backend, str(src), str(tmp_path / "c2"), no_fuse_ops=["b"])
    assert split["num_segments"] == 2
    assert "Sigmoid" in op_types(saved_graph(tmp_path / "c2"))
    with pytest.raises(errors.CompilerArgsError, match="--bogus"):
        compile_model(backend, str(src), str(tmp_path / "c3"), compiler_args=["--bogus"])
    with pytest.raises(errors.OptionError, match="not_a_node"):
        compile_model(backend, str(src), str(tmp_path / "c4"),
                                     no_fuse_ops=["not_a_node"])


def test_workdir_has_a_folder_per_segment(backend, tmp_path):
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        a = tf.nn.relu(x * 2.0 + 1.0)
        s = tf.strings.as_string(a)  # a string op splits the graph in two
        b = tf.strings.to_number(s)
        return {"x": x}, {"y": tf.tanh(b * 3.0 - 1.0)}

    src = save_tf1(tmp_path / "m", build)
    work = tmp_path / "work"
    result = compile_model(backend, str(src), str(tmp_path / "c"), compiler_workdir=work)
    assert result["num_segments"] == 2
    folders = sorted(p.name for p in work.iterdir())
    assert folders == ["fuseflow_segment_0", "fuseflow_segment_1"]
    for f in folders:
        names = {p.name for p in (work / f).iterdir()}
        assert {"graph.pb", "executable.bin", "compile.log"} <= names
        assert (work / f / "executable.bin").stat().st_size > 0


def test_output_dir_refused_and_input_untouched(backend, tmp_path):
    src = save_tf1(tmp_path / "m", _conv_model)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    (tmp_path / "exists").mkdir()
    with pytest.raises(errors.OutputDirError, match="already exists"):
        compile_model(backend, str(src), str(tmp_path / "exists"))
    with pytest.raises(errors.OutputDirError, match="inside the input"):
        compile_model(backend, str(src), str(src / "out"))
    with pytest.raises(errors.ModelLoadError, match="does not exist"):
        compile_model(backend, str(tmp_path / "nope"), str(tmp_path / "o"))
    compile_model(backend, str(src), str(tmp_path / "ok"))
    assert before == {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_classify_signature_with_tf_example_input(backend, tmp_path, rng):
    """tf.Example strings in, parse ops stay in TF, the dense part is compiled."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        serialized = tf.compat.v1.placeholder(tf.string, [None], name="examples")
        features = tf.io.parse_example(
            serialized, {"f": tf.io.FixedLenFeature([4], tf.float32)})
        w = tf.compat.v1.get_variable("w", [4, 3])
        scores = tf.nn.softmax(tf.nn.relu(tf.matmul(features["f"], w)) * 2.0 + 0.1)
        classes = tf.constant([b"a", b"b", b"c"])
        sess.run(tf.compat.v1.global_variables_initializer())
        sig = tf.compat.v1.saved_model.classification_signature_def(
            serialized, tf.broadcast_to(classes, tf.shape(scores)), scores)
        builder = tf.compat.v1.saved_model.Builder(str(tmp_path / "m"))
        builder.add_meta_graph_and_variables(sess, ["serve"], signature_def_map={
            "classify": sig})
        builder.save()
    values = rng.random((2, 4), np.float32)
    examples = np.array([tf.train.Example(features=tf.train.Features(feature={
        "f": tf.train.Feature(float_list=tf.train.FloatList(value=v))})).SerializeToString()
        for v in values])
    result = compile_model(backend, tmp_path / "m", tmp_path / "c", batch_size=2)
    assert result["num_segments"] == 1
    assert "ParseExampleV2" in op_types(saved_graph(tmp_path / "c"))
    feeds = {"inputs": examples}
    assert_outputs_close(run_saved_model(tmp_path / "m", feeds, signature="classify"),
                         run_fresh(tmp_path / "c", feeds, tmp_path,
                                   backend=backend, signature="classify"))


def test_vocabulary_file_asset_table(backend, tmp_path, rng):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("zero\none\ntwo\nthree\n")

    def build():
        words = tf.compat.v1.placeholder(tf.string, [None], name="words")
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        table = tf.lookup.StaticHashTable(tf.lookup.TextFileInitializer(
            str(vocab), tf.string, tf.lookup.TextFileIndex.WHOLE_LINE, tf.int64,
            tf.lookup.TextFileIndex.LINE_NUMBER), -1)
        ids = tf.cast(table.lookup(words), tf.float32)
        y = tf.nn.relu(x * 2.0 - 0.5) * tf.expand_dims(ids, 1) + 1.0
        return {"words": words, "x": x}, {"y": y}

    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        inputs, outputs = build()
        asset = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.ASSET_FILEPATHS)
        builder = tf.compat.v1.saved_model.Builder(str(tmp_path / "m"))
        builder.add_meta_graph_and_variables(
            sess, ["serve"], signature_def_map={
                "serving_default": tf.compat.v1.saved_model.predict_signature_def(
                    inputs, outputs)},
            main_op=tf.compat.v1.tables_initializer(), assets_collection=asset)
        builder.save()
    vocab.unlink()  # the model must read its own copy in assets/
    feeds = {"words": np.array([b"two", b"nope"]), "x": rng.random((2, 4), np.float32)}
    compile_model(backend, tmp_path / "m", tmp_path / "c", batch_size=2)
    assert (tmp_path / "c" / "assets" / "vocab.txt").read_text().startswith("zero")
    assert_outputs_close(run_saved_model(tmp_path / "m", feeds),
                         run_fresh(tmp_path / "c", feeds, tmp_path, backend=backend))


def test_the_garbage_collector_is_left_as_it_was(tmp_path):
    """compile() keeps the objects alive before it out of the collector's walks while it
    runs, then gives them back: nothing stays frozen, and a process that froze its own
    keeps them frozen."""
    import gc

    src = save_tf1(tmp_path / "m", _conv_model)
    seen = []
    gc.callbacks.append(lambda phase, info: seen.append(gc.get_freeze_count()))
    try:
        compile_model("openvino", src, tmp_path / "c", batch_size=2,
                      compiler_args=["--no-profile"])
        assert gc.get_freeze_count() == 0 and gc.isenabled()
        assert seen and max(seen) > 0  # frozen while the compile collected
        gc.freeze()
        frozen = gc.get_freeze_count()
        compile_model("openvino", src, tmp_path / "c2", batch_size=2,
                      compiler_args=["--no-profile"])
        assert gc.get_freeze_count() > frozen // 2  # (some died since: no longer counted)
    finally:
        gc.callbacks.pop()
        gc.unfreeze()
