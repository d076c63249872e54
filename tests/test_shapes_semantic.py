"""Shapes beyond TF's shape functions: op semantics, then synthesized runs.

A TF1 wide-and-deep serving graph (tf.Example -> ParseExampleV2 -> vocabulary
table -> embedding -> dense tower) compiles its whole dense tower, because
a table lookup answers in its keys' shape. A numeric model whose loop
output TF cannot shape is measured on synthesized inputs. Shapes that depend
on the input values (boolean_mask, Unique) stay unknown.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_outputs_close, run_fresh, run_saved_model, save_tf1, tf

import fuseflow

tf1 = tf.compat.v1
FALLBACK = "runs its segment with TensorFlow"
VOCAB = ["sports", "news", "music", "games"]


def _compile(tmp_path, src, **kwargs) -> tuple[dict, dict]:
    out = tmp_path / "c"
    result = fuseflow.saved_model.compile(str(src), str(out), backend="openvino", **kwargs)
    report = json.loads((out / "assets.extra" / "fuseflow_report.json").read_text())
    return result, report


def _left_in_tf(report) -> dict[str, str]:
    return {r["op_type"]: r["code"] for r in report["not_compiled"]}


def _dense(x, sizes, activation):
    for k, n in enumerate(sizes):
        w = tf1.get_variable(f"w{k}", [x.shape[1], n])
        b = tf1.get_variable(f"b{k}", [n], initializer=tf1.random_normal_initializer())
        x = tf.matmul(x, w) + b
        x = activation(x) if k < len(sizes) - 1 else x
    return x


def _wide_and_deep():
    serialized = tf1.placeholder(tf.string, [None], name="examples")
    features = tf1.io.parse_example(serialized, {
        "topics": tf1.io.FixedLenFeature([2], tf.string, default_value=["", ""]),
        "age": tf1.io.FixedLenFeature([1], tf.float32, default_value=[0.0]),
        "scores": tf1.io.FixedLenFeature([3], tf.float32, default_value=[0.0] * 3)})
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(VOCAB), tf.constant(np.arange(len(VOCAB)), tf.int64)), len(VOCAB))
    ids = table.lookup(features["topics"])
    embeddings = tf1.get_variable("embeddings", [len(VOCAB) + 1, 8])
    embedded = tf.reshape(tf.nn.embedding_lookup(embeddings, ids), [-1, 16])
    x = tf.concat([embedded, features["age"] / 100.0, features["scores"]], axis=1)
    logits = _dense(x, [16, 8, 3], tf.nn.relu)
    return {"examples": serialized}, {"probabilities": tf.nn.softmax(logits)}


def _example(topics, age, scores) -> bytes:
    feature = {
        "topics": tf.train.Feature(bytes_list=tf.train.BytesList(value=topics)),
        "age": tf.train.Feature(float_list=tf.train.FloatList(value=[age])),
        "scores": tf.train.Feature(float_list=tf.train.FloatList(value=scores))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_wide_and_deep_compiles_its_whole_dense_tower(tmp_path):
    src = save_tf1(tmp_path / "m", _wide_and_deep, main_op=tf1.tables_initializer)
    result, report = _compile(tmp_path, src, batch_size=2)
    assert result["num_segments"] == 1
    [segment] = report["segments"]
    # every float op after the lookups, the embedding gather included
    assert set(segment["op_types"]) == {"GatherV2", "Reshape", "Mul", "ConcatV2", "MatMul",
                                        "AddV2", "Relu", "Softmax"}, segment["op_types"]
    assert _left_in_tf(report) == {"ParseExampleV2": "STRING", "LookupTableFindV2": "STRING",
                                   "LookupTableImportV2": "STRING", "HashTableV2": "DTYPE"}
    assert report["unknown_shapes"] == []
    feeds = {"examples": np.array([_example([b"news", b"unknown"], 31.0, [0.5, -1.0, 2.0]),
                                   _example([b"games", b"sports"], 64.0, [1.5, 0.0, -0.5])])}
    want = run_saved_model(src, feeds)
    got, log = run_fresh(tmp_path / "c", feeds, tmp_path, with_log=True)
    assert FALLBACK not in log
    assert_outputs_close(want, got)


def _loop_model(wide: bool = False):
    """A loop that appends a feature block three times: TF shapes its output
    [?, ?] (the loop variable's invariant), every run makes it [batch, 18].
    wide: the block comes through a weight over graph_util.STAND_IN_BYTES, which static
    shape inference takes as a stand-in; the run that measures the loop needs its values."""
    x = tf1.placeholder(tf.float32, [None, 6], name="x")
    w_in = tf.constant(np.linspace(-1, 1, 6 * 4096).reshape(6, 4096).astype(np.float32))
    features = tf.matmul(x, w_in)[:, :6] if wide else x

    def body(i, acc):
        return i + 1, tf.concat([acc, tf.tanh(features) * tf.cast(i + 1, tf.float32)], 1)

    _, blocks = tf.while_loop(lambda i, acc: i < 3, body, [tf.constant(0), x[:, :0]],
                              shape_invariants=[tf.TensorShape([]), tf.TensorShape([None, None])])
    w = tf.constant(np.linspace(-1, 1, 18 * 4).reshape(18, 4).astype(np.float32))
    return {"x": x}, {"y": tf.nn.softmax(tf.nn.relu(tf.matmul(blocks, w) + 0.5) * 2.0)}


@pytest.mark.parametrize("wide", [False, True])
def test_numeric_shapes_are_measured_on_synthesized_inputs(tmp_path, rng, wide):
    src = save_tf1(tmp_path / "m", lambda: _loop_model(wide))
    result, report = _compile(tmp_path, src, batch_size=2)
    after_loop = {"MatMul", "AddV2", "Relu", "Mul", "Softmax"}
    assert any(after_loop <= set(s["op_types"]) for s in report["segments"]), report["segments"]
    unknown = {r["op_type"] for r in report["not_compiled"] if r["code"] == "UNKNOWN_SHAPE"}
    assert unknown <= {"Exit"}, report["not_compiled"]  # the loop's own plumbing at most
    feeds = {"x": rng.standard_normal((2, 6)).astype(np.float32)}
    want = run_saved_model(src, feeds)
    got, log = run_fresh(tmp_path / "c", feeds, tmp_path, with_log=True)
    assert FALLBACK not in log
    assert_outputs_close(want, got)


def _data_dependent():
    x = tf1.placeholder(tf.float32, [None, 6], name="x")
    positive = tf.boolean_mask(x, x > 0.0)
    masked = tf.reduce_sum(tf.nn.relu(tf.sin(positive) * 2.0 + 1.0))
    distinct = tf.reduce_sum(tf.exp(tf.unique(tf.reshape(x, [-1])).y * 0.5))
    dense = tf.reduce_sum(tf.tanh(x) * 3.0)
    return {"x": x}, {"y": masked + distinct + dense}


def test_shapes_that_depend_on_values_stay_unknown(tmp_path, rng):
    """Random inputs give every element of x a distinct value; all-zero inputs do not:
    the synthesized runs disagree, so boolean_mask's and Unique's consumers stay in TF."""
    src = save_tf1(tmp_path / "m", _data_dependent)
    _, report = _compile(tmp_path, src, batch_size=2)
    unknown = {r["op_type"] for r in report["not_compiled"] if r["code"] == "UNKNOWN_SHAPE"}
    assert {"Sin", "Relu", "Exp"} <= unknown, report["not_compiled"]
    assert any({"Tanh", "Sum"} <= set(s["op_types"]) for s in report["segments"])
    sources = {u["tensor"].split(":")[0].split("/")[-1] for u in report["unknown_shapes"]}
    assert sources & {"Where", "Unique", "GatherV2", "Squeeze"}, report["unknown_shapes"]
    feeds = {"x": rng.standard_normal((2, 6)).astype(np.float32)}
    assert_outputs_close(run_saved_model(src, feeds), run_fresh(tmp_path / "c", feeds, tmp_path))


def _text_classifier(path, sequence_length):
    """Keras' text classification recipe: TextVectorization inside the model."""
    import keras

    vectorize = keras.layers.TextVectorization(max_tokens=40,
                                               output_sequence_length=sequence_length)
    vectorize.adapt(["the cat sat on the mat", "a dog ran far away", "hello world again"])
    text = keras.Input((), dtype="string", name="text")
    x = keras.layers.Embedding(40, 16)(vectorize(text))
    x = keras.layers.Dense(16, activation="relu")(x)
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(x))
    keras.Model(text, out).export(str(path), verbose=False)
    return {"text": np.array([b"the dog sat on a mat", b"hello"])}


def test_string_inputs_are_synthesized_for_text_models(tmp_path):
    """Without a feed dict, text of several lengths is synthesized: the vectorizer's
    fixed-length output is the same in every run, so everything after it compiles."""
    feeds = _text_classifier(tmp_path / "m", sequence_length=12)
    result, report = _compile(tmp_path, tmp_path / "m", batch_size=2)
    assert any({"MatMul", "Mean"} <= set(s["op_types"]) for s in report["segments"]), \
        report["segments"]
    assert result["OnNeuronRatio"] > 0.5, _left_in_tf(report)
    want = run_saved_model(tmp_path / "m", feeds)
    got, log = run_fresh(tmp_path / "c", feeds, tmp_path, with_log=True)
    assert FALLBACK not in log
    assert_outputs_close(want, got)


def test_string_lengths_that_shape_tensors_stay_unknown(tmp_path):
    """Without output_sequence_length the vectorizer pads to the longest text: its
    width follows the text, the synthesized runs disagree, and its consumers stay in TF
    (answers right on texts of any length)."""
    feeds = _text_classifier(tmp_path / "m", sequence_length=None)
    _, report = _compile(tmp_path, tmp_path / "m", batch_size=2)
    unknown = {r["op_type"] for r in report["not_compiled"] if r["code"] == "UNKNOWN_SHAPE"}
    assert "MatMul" in unknown or "BatchMatMulV2" in unknown or "Mean" in unknown, \
        report["not_compiled"]
    for texts in (feeds["text"], np.array([b"a", b"the cat sat on the mat and ran far away"])):
        want = run_saved_model(tmp_path / "m", {"text": texts})
        assert_outputs_close(want, run_fresh(tmp_path / "c", {"text": texts}, tmp_path))
