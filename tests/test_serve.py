"""`fuseflow serve`, run as users run it: a subprocess on Ray Serve, plain HTTP requests in the
JSON of TF Serving's REST API documentation, answers compared with the original model in TF.

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
    assert after["model_calls"] - before["model_calls"] < 32 / 2, (before, after)
    # every REST request reached this replica over HTTP, none through a gateway's handle
    assert after["http_requests"] == after["requests"] >= 32 + 4, after


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
])
def test_bad_serve_command_lines_exit_1_before_starting_ray(args, words, capsys):
    from fuseflow import cli

    assert cli.main(["serve", *args]) == 1
    assert words in capsys.readouterr().err
