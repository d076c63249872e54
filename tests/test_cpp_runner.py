"""The C++ SavedModel runner agrees with Python TF on TF1 and TF2 SavedModels."""

import numpy as np
import pytest
import tensorflow as tf
from cpp_runner import run_saved_model_cpp


def test_tf1_builder_model(tmp_path):
    export_dir = tmp_path / "tf1"
    a_val = np.arange(6, dtype=np.float32).reshape(2, 3)
    b_val = np.full((2, 3), 0.5, dtype=np.float32)
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        a = tf.compat.v1.placeholder(tf.float32, [None, 3], name="a")
        b = tf.compat.v1.placeholder(tf.float32, [None, 3], name="b")
        w = tf.compat.v1.get_variable(
            "w", initializer=np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
        )
        y = tf.matmul(a * b + 1.0, w)
        sess.run(tf.compat.v1.global_variables_initializer())
        expected = sess.run(y, {a: a_val, b: b_val})
        builder = tf.compat.v1.saved_model.Builder(str(export_dir))
        signature = tf.compat.v1.saved_model.predict_signature_def(
            inputs={"a": a, "b": b}, outputs={"y": y}
        )
        builder.add_meta_graph_and_variables(
            sess, ["serve"], signature_def_map={"serving_default": signature}
        )
        builder.save()

    out = run_saved_model_cpp(export_dir, {"a": a_val, "b": b_val})
    assert out.keys() == {"y"}
    np.testing.assert_allclose(out["y"], expected, rtol=1e-6)


class _Dense(tf.Module):
    def __init__(self):
        self.w = tf.Variable(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def __call__(self, x):
        return {"y": tf.nn.relu(tf.matmul(x, self.w))}


def test_tf2_saved_model(tmp_path):
    module = _Dense()
    tf.saved_model.save(module, str(tmp_path), signatures=module.__call__)
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)

    out = run_saved_model_cpp(tmp_path, {"x": x})
    np.testing.assert_allclose(out["y"], module(tf.constant(x))["y"].numpy(), rtol=1e-6)


class _Dtypes(tf.Module):
    @tf.function(
        input_signature=[
            tf.TensorSpec([2, 2], tf.float64),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([3], tf.int64),
            tf.TensorSpec([2], tf.bool),
            tf.TensorSpec([2, 1], tf.uint8),
        ]
    )
    def __call__(self, f64, i32, i64, b, u8):
        return {"f64": f64 * 2, "i32": i32 + 1, "i64": i64 * 3, "b": ~b, "u8": u8 + 1}


def test_npy_dtypes_and_shapes_round_trip(tmp_path):
    """Checks the runner's hand-written .npy reader and writer, incl. 0-d arrays."""
    module = _Dtypes()
    tf.saved_model.save(module, str(tmp_path), signatures=module.__call__)
    feeds = {
        "f64": np.array([[1.5, -2.0], [3.0, 1e300]]),
        "i32": np.array(7, dtype=np.int32),
        "i64": np.array([2**40, -1, 0], dtype=np.int64),
        "b": np.array([True, False]),
        "u8": np.array([[0], [254]], dtype=np.uint8),
    }

    out = run_saved_model_cpp(tmp_path, feeds)
    expected = {k: v.numpy() for k, v in module(**feeds).items()}
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
        np.testing.assert_array_equal(out[key], value)


def test_unknown_signature_names_the_key(tmp_path):
    module = _Dense()
    tf.saved_model.save(module, str(tmp_path), signatures=module.__call__)
    with pytest.raises(AssertionError, match="no_such_signature"):
        run_saved_model_cpp(
            tmp_path, {"x": np.zeros((1, 3), np.float32)}, signature="no_such_signature"
        )
