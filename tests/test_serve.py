"""`fuseflow serve`, run as users run it: a subprocess on Ray Serve, plain HTTP requests in the
JSON of TF Serving's REST API documentation and gRPC Predict calls with TF Serving's own client
stubs, answers compared with the original model in TF.

One server (one replica per model) is shared by the module: Ray starts slowly on a shared CPU.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import fused_segments, run_saved_model, save_tf1, tf

import fuseflow
from bench.serve_process import ServeProcess, fuseflow_command

pytest.importorskip("ray.serve")

W = np.linspace(-1, 1, 8 * 4, dtype=np.float32).reshape(8, 4)


def _dense(scale: float):
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
        return {"x": x}, {"y": tf.nn.relu(tf.matmul(x, W * scale) + 0.5) * 2.0}
    return build


def _save_docs_model(path):
    """The inputs of TF Serving's REST API doc example (tag, signal, sensor) in a predict
    signature, plus a classify and a regress signature over serialized tf.Examples."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        tag = tf.compat.v1.placeholder(tf.string, [None], name="tag")
        signal_ = tf.compat.v1.placeholder(tf.float32, [None, 5], name="signal")
        sensor = tf.compat.v1.placeholder(tf.float32, [None, 2, 2], name="sensor")
        score = tf.reduce_sum(signal_, axis=1) * 2.0 + tf.reduce_sum(sensor, axis=[1, 2])
        tagged = tf.strings.join([tag, tf.strings.as_string(score, precision=1)], separator=":")
        serialized = tf.compat.v1.placeholder(tf.string, [None], name="tf_example")
        features = tf.io.parse_example(serialized, {
            "x": tf.io.FixedLenFeature([2], tf.float32),
            "code": tf.io.FixedLenFeature([], tf.int64, default_value=0)})
        logits = tf.matmul(features["x"], tf.constant([[1.0, -1.0], [0.5, 2.0]])) + \
            tf.cast(features["code"], tf.float32)[:, None] * tf.constant([[0.0, 1.0]])
        classes = tf.tile(tf.constant([["cat", "dog"]]), [tf.shape(serialized)[0], 1])
        value = tf.reduce_sum(features["x"], axis=1, keepdims=True) + 1.0
        sigs = tf.compat.v1.saved_model.signature_def_utils
        predict = tf.compat.v1.saved_model.predict_signature_def
        builder = tf.compat.v1.saved_model.Builder(str(path))
        builder.add_meta_graph_and_variables(sess, ["serve"], signature_def_map={
            "serving_default": predict({"tag": tag, "signal": signal_, "sensor": sensor},
                                       {"score": score, "tagged": tagged}),
            "scaled": predict({"signal": signal_}, {"scaled": signal_ * 3.0}),
            "classify_x_to_y": sigs.classification_signature_def(
                serialized, classes, tf.nn.softmax(logits)),
            "regress_x": sigs.regression_signature_def(serialized, value)})
        builder.save()
    return path


def _example(x, code):
    return tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=x)),
        "code": tf.train.Feature(int64_list=tf.train.Int64List(value=[code]))}))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model root, running server). The server starts before the compiled model exists: Ray
    starts while fuseflow compiles, and the model is served once its version 1 appears."""
    root = tmp_path_factory.mktemp("serve")
    save_tf1(root / "dense_orig", _dense(1.0))
    _save_docs_model(root / "docs/1")
    save_tf1(root / "versioned/1", _dense(1.0))
    save_tf1(root / "v2_staging", _dense(-2.0))
    (root / "dense").mkdir()
    server = ServeProcess(fuseflow_command() + [
        "serve", "--model", f"dense={root / 'dense'}", "--model", f"docs={root / 'docs'}",
        "--model", f"versioned={root / 'versioned'}",
        "--batching", "dense=16,100", "--poll-seconds", "0.5", "--max-body-mb", "0.05"])
    server.start()
    try:
        fuseflow.saved_model.compile(str(root / "dense_orig"), str(root / "dense_build"),
                                     batch_size=1)
        assert fused_segments(root / "dense_build")  # what is served is a compiled model
        os.rename(root / "dense_build", root / "dense/1")  # a version appears whole
        yield root, server.wait_healthy()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def models(served):
    return served[0]


@pytest.fixture(scope="module")
def server(served):
    return served[1]


def _dense_tf(models, x):
    return run_saved_model(models / "dense_orig", {"x": np.asarray(x, np.float32)})["y"]


def _grpc_stub(server):
    """TF Serving's client, as its docs show it: no extra metadata on the calls."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def _predict_request(name, inputs: dict, signature=None, version=None, output_filter=()):
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if signature is not None:
        request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    request.output_filter.extend(output_filter)
    return request


def _grpc_error(stub, request):
    import grpc

    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request, 60.0)
    return caught.value.code(), caught.value.details()


def _compiled_calls(server, name="dense") -> int:
    ops = server.get(f"/fuseflow/stats/{name}")[1]["runtime"]["ops"]
    assert ops and not any(op["fallback"] for op in ops.values()), ops
    return sum(op["compiled"] for op in ops.values())


def test_predict_row_and_columnar_forms_match_tf(server, models):
    x = (np.arange(16, dtype=np.float32).reshape(2, 8) - 5) / 3
    want = _dense_tf(models, x)
    status, body = server.post("/v1/models/dense:predict", {"instances": x.tolist()})
    assert status == 200, body
    np.testing.assert_allclose(body["predictions"], want, rtol=1e-4, atol=1e-5)
    status, body = server.post("/v1/models/dense/versions/1:predict",
                               {"signature_name": "serving_default", "inputs": {"x": x.tolist()}})
    assert status == 200, body
    np.testing.assert_allclose(body["outputs"], want, rtol=1e-4, atol=1e-5)
    stats = server.get("/fuseflow/stats/dense")[1]["runtime"]["ops"]
    assert stats and all(op["compiled"] >= 1 and not op["fallback"] for op in stats.values())


def test_the_docs_json_with_named_inputs_signature_name_and_strings(server, models):
    # the request bodies of TF Serving's REST API doc ("Specifying input tensors")
    row = {"instances": [{"tag": "foo", "signal": [1, 2, 3, 4, 5], "sensor": [[1, 2], [3, 4]]},
                         {"tag": "bar", "signal": [3, 4, 1, 2, 5], "sensor": [[4, 5], [6, 8]]}]}
    columns = {"inputs": {"tag": ["foo", "bar"], "signal": [[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]],
                          "sensor": [[[1, 2], [3, 4]], [[4, 5], [6, 8]]]}}
    feeds = {k: np.asarray(v, np.float32 if k != "tag" else object)
             for k, v in columns["inputs"].items()}
    want = run_saved_model(models / "docs/1", feeds)
    status, body = server.post("/v1/models/docs:predict", row)
    assert status == 200, body
    assert [p["tagged"] for p in body["predictions"]] == [t.decode() for t in want["tagged"]]
    np.testing.assert_allclose([p["score"] for p in body["predictions"]], want["score"])
    status, body = server.post("/v1/models/docs:predict", columns)
    assert status == 200, body
    np.testing.assert_allclose(body["outputs"]["score"], want["score"])
    assert body["outputs"]["tagged"] == ["foo:40.0", "bar:53.0"]
    status, body = server.post("/v1/models/docs:predict", {
        "signature_name": "scaled", "instances": [[1, 2, 3, 4, 5]]})
    assert status == 200 and body == {"predictions": [[3.0, 6.0, 9.0, 12.0, 15.0]]}, body
    # binary strings as {"b64": ...}
    status, body = server.post("/v1/models/docs:predict", {"instances": [
        {"tag": {"b64": "Zm9v"}, "signal": [0, 0, 0, 0, 1], "sensor": [[0, 0], [0, 0]]}]})
    assert status == 200 and body["predictions"][0]["tagged"] == "foo:2.0", body


def test_classify_and_regress(server, models):
    # TF Serving's doc shape: "context" shared by every one of "examples"
    request = {"signature_name": "classify_x_to_y", "context": {"code": 1},
               "examples": [{"x": [1.0, 2.0]}, {"x": [-0.5, 0.25]}]}
    serialized = np.array([_example([1.0, 2.0], 1).SerializeToString(),
                           _example([-0.5, 0.25], 1).SerializeToString()], dtype=object)
    want = run_saved_model(models / "docs/1", {"inputs": serialized},
                           signature="classify_x_to_y")
    status, body = server.post("/v1/models/docs:classify", request)
    assert status == 200, body
    assert [[label for label, _ in row] for row in body["result"]] == [["cat", "dog"]] * 2
    np.testing.assert_allclose([[s for _, s in row] for row in body["result"]], want["scores"],
                               rtol=1e-5)
    request["signature_name"] = "regress_x"
    status, body = server.post("/v1/models/docs:regress", request)
    assert status == 200, body
    reg = run_saved_model(models / "docs/1", {"inputs": serialized}, signature="regress_x")
    np.testing.assert_allclose(body["result"], reg["outputs"].reshape(-1), rtol=1e-6)
    status, body = server.post("/v1/models/dense:classify", {**request,
                                                             "signature_name": "serving_default"})
    assert status == 400 and "tensorflow/serving/classify" in body["error"], body


def test_status_and_metadata(server):
    status, body = server.get("/v1/models/dense")
    assert status == 200, body
    assert body == {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {
        "error_code": "OK", "error_message": ""}}]}
    status, body = server.get("/v1/models/dense/metadata")
    assert status == 200, body
    assert body["model_spec"] == {"name": "dense", "signature_name": "", "version": "1"}
    sig = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in sig["inputs"]["x"]["tensor_shape"]["dim"]] == ["-1", "8"]
    assert sig["method_name"] == "tensorflow/serving/predict"


def _metrics(server, within_s: float = 60.0) -> tuple[int, str]:
    """/metrics once Ray's exporter has reported Serve's metrics: it does so on a timer,
    so a server that just started can answer with its process metrics only."""
    deadline = time.monotonic() + within_s
    while True:
        status, text = server.get("/metrics")
        if status != 200 or "ray_serve_" in text or time.monotonic() > deadline:
            return status, text
        time.sleep(1.0)


def test_health_and_metrics(server):
    status, body = server.get("/healthz")
    assert status == 200 and body["status"] == "ok" and all(body["models"].values()), body
    status, text = _metrics(server)
    assert status == 200 and "ray_serve_" in text  # Ray's Prometheus page


@pytest.mark.parametrize("method, path, body, code, words", [
    ("POST", "/v1/models/nope:predict", {"instances": [[0] * 8]}, 404, "Servable not found"),
    ("POST", "/v1/models/dense/versions/7:predict", {"instances": [[0] * 8]}, 404,
     "Specific(dense, 7)"),
    ("GET", "/v1/models/dense/versions/7", None, 404, "Specific(dense, 7)"),
    ("POST", "/v1/models/dense:predict", {"signature_name": "nope", "instances": [[0] * 8]},
     400, "\"nope\" not found"),
    ("POST", "/v1/models/dense:predict", {"inputs": {"z": [[0] * 8]}}, 400,
     "unknown input(s) ['z']"),
    ("POST", "/v1/models/dense:predict", {"instances": [["a"] * 8]}, 400, "expects float32"),
    ("POST", "/v1/models/dense:predict", {"instances": [[0] * 7]}, 400, "got shape [1,7]"),
    ("POST", "/v1/models/dense:predict", {"instances": [[0] * 8, [0] * 7]}, 400,
     "not rectangular"),
    ("POST", "/v1/models/dense:predict", {"examples": []}, 400, "Missing 'inputs' or"),
    ("POST", "/v1/models/dense:predict", b'{"instances": [[0, 0,', 400, "JSON Parse error"),
    ("POST", "/v1/models/dense:predict", b"x" * 60_000, 429, "over the limit"),
])
def test_bad_requests_get_tf_servings_error_shape(server, method, path, body, code, words):
    pid = server.get("/fuseflow/stats/dense")[1]["pid"]
    raw = body if isinstance(body, bytes) else None
    status, answer = server.get(path) if method == "GET" else \
        server.post(path, None if raw else body, raw=raw)
    assert status == code, answer
    assert set(answer) == {"error"} and words in answer["error"], answer
    # the replica is still the same process, and still answers
    status, good = server.post("/v1/models/dense:predict", {"instances": [[0] * 8]})
    assert status == 200 and len(good["predictions"]) == 1
    assert server.get("/fuseflow/stats/dense")[1]["pid"] == pid


def test_grpc_predict_with_tf_servings_client_matches_tf(server, models):
    """PredictionService.Predict through the gateway: a compiled model, a model with string
    inputs and several outputs, output_filter, an explicit version; model_spec echoed."""
    pytest.importorskip("tensorflow_serving.apis")
    stub = _grpc_stub(server)
    x = (np.arange(24, dtype=np.float32).reshape(3, 8) - 7) / 4
    before, calls = server.get("/fuseflow/stats/dense")[1], _compiled_calls(server)
    result = stub.Predict(_predict_request("dense", {"x": x}, "serving_default"), 60.0)
    np.testing.assert_allclose(tf.make_ndarray(result.outputs["y"]), _dense_tf(models, x),
                               rtol=1e-4, atol=1e-5)
    assert (result.model_spec.name, result.model_spec.version.value,
            result.model_spec.signature_name) == ("dense", 1, "serving_default")
    result = stub.Predict(_predict_request("dense", {"x": x[:1]}, version=1), 60.0)
    np.testing.assert_allclose(tf.make_ndarray(result.outputs["y"]), _dense_tf(models, x[:1]),
                               rtol=1e-4, atol=1e-5)
    after = server.get("/fuseflow/stats/dense")[1]
    assert after["grpc_requests"] - before["grpc_requests"] == 2, (before, after)
    assert _compiled_calls(server) >= calls + 2  # OpenVINO ran them, not the TF fallback

    feeds = {"tag": np.array([b"foo", b"bar"], dtype=object),
             "signal": np.array([[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]], np.float32),
             "sensor": np.array([[[1, 2], [3, 4]], [[4, 5], [6, 8]]], np.float32)}
    want = run_saved_model(models / "docs/1", feeds)
    result = stub.Predict(_predict_request("docs", feeds), 60.0)
    assert sorted(result.outputs) == ["score", "tagged"]
    np.testing.assert_allclose(tf.make_ndarray(result.outputs["score"]), want["score"])
    assert list(tf.make_ndarray(result.outputs["tagged"])) == [b"foo:40.0", b"bar:53.0"]
    result = stub.Predict(_predict_request("docs", feeds, output_filter=["tagged"]), 60.0)
    assert list(result.outputs) == ["tagged"]
    result = stub.Predict(_predict_request("docs", {"signal": feeds["signal"]}, "scaled"), 60.0)
    np.testing.assert_allclose(tf.make_ndarray(result.outputs["scaled"]), feeds["signal"] * 3)
    assert result.model_spec.signature_name == "scaled"


def test_grpc_errors_are_tf_servings_status_codes(server):
    pytest.importorskip("tensorflow_serving.apis")
    import grpc
    from tensorflow_serving.apis import classification_pb2

    stub = _grpc_stub(server)
    pid = server.get("/fuseflow/stats/dense")[1]["pid"]
    x = np.zeros((1, 8), np.float32)
    label = _predict_request("dense", {"x": x})
    label.model_spec.version_label = "stable"
    code = grpc.StatusCode
    for request, want, words in [
            (_predict_request("nope", {"x": x}), code.NOT_FOUND, "Latest(nope)"),
            (_predict_request("dense", {"x": x}, version=7), code.NOT_FOUND,
             "Specific(dense, 7)"),
            (_predict_request("dense", {"x": x}, "nope"), code.INVALID_ARGUMENT,
             "\"nope\" not found"),
            (_predict_request("dense", {"z": x}), code.INVALID_ARGUMENT,
             "unknown input(s) ['z']"),
            (_predict_request("dense", {"x": x.astype(np.float64)}), code.INVALID_ARGUMENT,
             "DT_DOUBLE"),
            (_predict_request("dense", {"x": np.zeros((1, 7), np.float32)}),
             code.INVALID_ARGUMENT, "got shape [1,7]"),
            (_predict_request("dense", {"x": x}, output_filter=["nope"]),
             code.INVALID_ARGUMENT, "output tensor alias not found"),
            (label, code.INVALID_ARGUMENT, "version label: stable"),
            # --max-body-mb 0.05 holds for gRPC messages too
            (_predict_request("dense", {"x": np.zeros((2000, 8), np.float32)}),
             code.RESOURCE_EXHAUSTED, "larger than max")]:
        got, details = _grpc_error(stub, request)
        assert got == want and words in details, (request.model_spec, got, details)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(classification_pb2.ClassificationRequest(), 60.0)
    assert caught.value.code() == code.UNIMPLEMENTED, caught.value.details()
    # the replica is the same process, and still answers
    assert stub.Predict(_predict_request("dense", {"x": x}), 60.0).outputs["y"].dtype
    assert server.get("/fuseflow/stats/dense")[1]["pid"] == pid


def _grpc_all_at_once(server, rows: np.ndarray, want) -> tuple[dict, dict]:
    """One gRPC Predict per row, all in flight at once (the stub's futures), each answer
    checked against TF's; the dense model's replica stats before and after."""
    stub = _grpc_stub(server)
    before = server.get("/fuseflow/stats/dense")[1]
    futures = [stub.Predict.future(_predict_request("dense", {"x": r[None]}), 120.0)
               for r in rows]
    for future, expected in zip(futures, want):
        np.testing.assert_allclose(tf.make_ndarray(future.result().outputs["y"])[0], expected,
                                   rtol=1e-4, atol=1e-5)
    return before, server.get("/fuseflow/stats/dense")[1]


def test_concurrent_grpc_requests_are_batched(server, models):
    pytest.importorskip("tensorflow_serving.apis")
    rows = np.random.default_rng(4).normal(size=(48, 8)).astype(np.float32)
    before, after = _grpc_all_at_once(server, rows, _dense_tf(models, rows))
    requests = after["grpc_requests"] - before["grpc_requests"]
    calls = after["model_calls"] - before["model_calls"]
    assert requests == 48 and calls < 48 / 2, (requests, calls)


def _predict_all_at_once(server, rows: np.ndarray, want) -> tuple[dict, dict]:
    """One predict request per row, all in flight at once, each answer checked against
    TF's; the dense model's replica stats before and after."""
    before = server.get("/fuseflow/stats/dense")[1]
    with ThreadPoolExecutor(len(rows)) as pool:
        answers = list(pool.map(lambda r: server.post("/v1/models/dense:predict",
                                                      {"instances": [r.tolist()]}), rows))
    after = server.get("/fuseflow/stats/dense")[1]
    for (status, body), expected in zip(answers, want):
        assert status == 200, body
        np.testing.assert_allclose(body["predictions"][0], expected, rtol=1e-4, atol=1e-5)
    return before, after


def test_concurrent_requests_are_batched_and_answered_correctly(server, models):
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(48, 8)).astype(np.float32)
    want = _dense_tf(models, rows)
    before, after = _predict_all_at_once(server, rows, want)
    requests = after["requests"] - before["requests"]
    calls = after["model_calls"] - before["model_calls"]
    assert requests >= 48 and calls < 48 / 2, (requests, calls)
    assert after["http_requests"] == 0  # three models: the gateway routed every request


def test_one_model_is_its_own_ingress_with_the_same_routes(models):
    """One model on one replica: HTTP goes straight to the model replica (no gateway), and
    the routes, errors, versions and batching are the gateway's."""
    command = fuseflow_command() + ["serve", "--model", f"dense={models / 'dense'}",
                                    "--batching", "dense=16,100", "--max-body-mb", "0.05"]
    rows = np.random.default_rng(3).normal(size=(32, 8)).astype(np.float32)
    want = _dense_tf(models, rows)
    with ServeProcess(command) as server:
        status, body = server.post("/v1/models/dense:predict", {"instances": rows[:2].tolist()})
        assert status == 200, body
        np.testing.assert_allclose(body["predictions"], want[:2], rtol=1e-4, atol=1e-5)
        status, body = server.post("/v1/models/dense/versions/1:predict",
                                   {"inputs": {"x": rows[:1].tolist()}})
        assert status == 200, body
        np.testing.assert_allclose(body["outputs"], want[:1], rtol=1e-4, atol=1e-5)
        for method, path, sent, code, words in [
                ("POST", "/v1/models/nope:predict", {"instances": [[0] * 8]}, 404,
                 "Servable not found for request: Latest(nope)"),
                ("POST", "/v1/models/dense/versions/7:predict", {"instances": [[0] * 8]}, 404,
                 "Specific(dense, 7)"),
                ("GET", "/v1/models/nope/versions/2", None, 404, "Specific(nope, 2)"),
                ("GET", "/v2/other", None, 400, "Malformed request"),
                ("POST", "/v1/models/dense:predict", b"[1, 2]", 400, "must be a JSON object"),
                ("POST", "/v1/models/dense:predict", b"x" * 60_000, 429, "over the limit")]:
            raw = sent if isinstance(sent, bytes) else None
            status, answer = server.get(path) if method == "GET" else \
                server.post(path, None if raw else sent, raw=raw)
            assert status == code and set(answer) == {"error"}, (path, status, answer)
            assert words in answer["error"], answer
        status, body = server.get("/v1/models/dense")
        assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
        status, body = server.get("/v1/models/dense/metadata")
        assert status == 200 and body["model_spec"]["version"] == "1", body
        status, body = server.get("/healthz")
        assert status == 200 and body == {"status": "ok", "models": {"dense": True}}, body
        status, text = _metrics(server)
        assert status == 200 and "ray_serve_" in text
        assert server.get("/fuseflow/stats/nope")[0] == 404
        before, after = _predict_all_at_once(server, rows, want)
        grpc_checked = _direct_grpc(server, rows, want)
    assert after["model_calls"] - before["model_calls"] < 32 / 2, (before, after)
    # every REST request reached this replica over HTTP, none through a gateway's handle
    assert after["http_requests"] == after["requests"] >= 32 + 4, after
    assert grpc_checked in ("skipped", "ok")


def _direct_grpc(server, rows, want) -> str:
    """The one-model server's gRPC Predict: the model replica is the gRPC ingress too."""
    try:
        import tensorflow_serving.apis  # noqa: F401
    except ImportError:
        return "skipped"
    import grpc

    stub = _grpc_stub(server)
    result = stub.Predict(_predict_request("dense", {"x": rows[:2]}), 60.0)
    np.testing.assert_allclose(tf.make_ndarray(result.outputs["y"]), want[:2], rtol=1e-4,
                               atol=1e-5)
    assert result.model_spec.version.value == 1
    assert _grpc_error(stub, _predict_request("nope", {"x": rows[:1]}))[0] == \
        grpc.StatusCode.NOT_FOUND
    before, after = _grpc_all_at_once(server, rows, want)
    assert after["grpc_requests"] - before["grpc_requests"] == 32, (before, after)
    assert after["model_calls"] - before["model_calls"] < 32 / 2, (before, after)
    assert after["requests"] == after["http_requests"] + after["grpc_requests"], after
    return "ok"


def test_new_version_is_picked_up_and_old_one_answers_until_then(server, models):
    x = np.ones((1, 8), np.float32)
    v1 = run_saved_model(models / "versioned/1", {"x": x})["y"]
    v2 = run_saved_model(models / "v2_staging", {"x": x})["y"]
    assert not np.allclose(v1, v2)
    # written aside, then renamed in: a half-copied folder is never a version
    shutil.copytree(models / "v2_staging", models / "versioned/.2.tmp")
    os.rename(models / "versioned/.2.tmp", models / "versioned/2")
    seen, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        status, body = server.post("/v1/models/versioned:predict", {"instances": x.tolist()})
        assert status == 200, body
        got = np.asarray(body["predictions"])
        assert np.allclose(got, v1, rtol=1e-5) or np.allclose(got, v2, rtol=1e-5), got
        seen.append(1 if np.allclose(got, v1, rtol=1e-5) else 2)
        if seen[-1] == 2:
            break
        time.sleep(0.2)
    assert seen[-1] == 2, f"version 2 not served after 120 s: {seen}"
    assert server.get("/v1/models/versioned")[1]["model_version_status"][0]["version"] == "2"
    status, body = server.post("/v1/models/versioned/versions/1:predict",
                               {"instances": x.tolist()})
    assert status == 404 and "Specific(versioned, 1)" in body["error"], body
    # a broken version 3 never replaces the working version 2
    (models / "versioned/3").mkdir()
    (models / "versioned/3/saved_model.pb").write_bytes(b"not a SavedModel")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = server.get("/v1/models/versioned")[1]["model_version_status"]
        if len(states) == 2:
            break
        time.sleep(0.5)
    assert [(s["version"], s["state"]) for s in states] == [("2", "AVAILABLE"), ("3", "END")]
    assert states[1]["status"]["error_message"], states
    status, body = server.post("/v1/models/versioned:predict", {"instances": x.tolist()})
    assert status == 200 and np.allclose(body["predictions"], v2, rtol=1e-5), body


@pytest.mark.slow
def test_killed_replica_never_gives_a_wrong_answer(models):
    """Kill one of two replicas mid-load: each request succeeds (after a retry) or gets a
    503 with TF Serving's error shape; Ray starts a new replica."""
    command = fuseflow_command() + ["serve", "--model", f"dense={models / 'dense'}",
                                    "--replicas", "2"]
    x = np.random.default_rng(2).normal(size=(1, 8)).astype(np.float32)
    want = _dense_tf(models, x)
    with ServeProcess(command) as server:
        victim = server.get("/fuseflow/stats/dense")[1]["pid"]
        answers, stop = [], threading.Event()

        def load():
            while not stop.is_set() and len(answers) < 2000:
                answers.append(server.post("/v1/models/dense:predict",
                                           {"instances": x.tolist()}, timeout=120))

        threads = [threading.Thread(target=load) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(3)
        os.kill(victim, signal.SIGKILL)
        time.sleep(10)
        stop.set()
        for t in threads:
            t.join()
        assert len(answers) > 20
        for status, body in answers:
            if status == 200:
                np.testing.assert_allclose(body["predictions"], want, rtol=1e-4, atol=1e-5)
            else:
                assert status == 503 and set(body) == {"error"}, (status, body)
        assert sum(s == 200 for s, _ in answers) > len(answers) / 2
        pids, deadline = set(), time.monotonic() + 180
        while time.monotonic() < deadline and len(pids - {victim}) < 2:
            status, body = server.get("/fuseflow/stats/dense")
            if status == 200:
                pids.add(body["pid"])
            time.sleep(0.5)
        assert len(pids - {victim}) == 2, f"Ray did not replace replica {victim}: {pids}"


@pytest.mark.parametrize("args, words", [
    (["--model", "nobase"], "expected NAME=BASE_PATH"),
    (["--model", "m=/does/not/exist"], "is not a directory"),
    (["--model", "m=.", "--replicas", "0"], "--replicas must be >= 1"),
    (["--model", "m=.", "--batching", "m=big"], "expected NAME=SIZE,WAIT_MS"),
    (["--model", "m=.", "--batching", "other=4,1"], "must name one of them"),
    (["--model", "m=.", "--grpc-port", "70000"], "--grpc-port must be a port number"),
    (["--model", "m=.", "--port", "8500", "--grpc-port", "8500"], "need a port each"),
])
def test_bad_serve_command_lines_exit_1_before_starting_ray(args, words, capsys):
    from fuseflow import cli

    assert cli.main(["serve", *args]) == 1
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--port", "--grpc-port"])
def test_a_port_something_listens_on_is_refused_before_starting_ray(flag, tmp_path):
    """Ray Serve's proxies bind with SO_REUSEPORT, as gRPC servers do: without the check,
    fuseflow serve would share a port with such a listener, and some requests would reach
    it instead. The listener here binds the way a gRPC server does."""
    import socket
    import subprocess

    from bench.serve_process import free_port

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
        taken = listener.getsockname()[1]
        other = {"--port": "--grpc-port", "--grpc-port": "--port"}[flag]
        proc = subprocess.run(
            fuseflow_command() + ["serve", "--model", f"m={tmp_path}", "--host", "127.0.0.1",
                                  flag, str(taken), other, str(free_port())],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]  # after a warning: m has no version yet
    assert f"{flag} {taken}: 127.0.0.1:{taken} cannot be bound" in last, proc.stderr
