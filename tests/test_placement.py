"""Per-segment backend choice (place.py): one model on OpenVINO and XLA, and never slower.

The CRNN (convolutions, then a bidirectional LSTM, then a dense head: an OCR
model's shape) is the model the choice exists for: its convolutions belong on
OpenVINO and its loops on XLA. Placement by op kind (--no-profile) is
deterministic and asserted exactly; timed placement is asserted by what holds
whatever the machine's load: every compiled segment was measured faster than
TF, and each region got the fastest option that was tried.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

import fuseflow
from tests.conftest import (
    assert_outputs_close,
    assert_ran,
    assert_ran_each,
    fused_segments,
    run_fresh,
    run_saved_model,
    save_tf1,
)


def _crnn(path, steps=16, units=24):
    tf.keras.utils.set_random_seed(0)
    image = tf.keras.Input((16, 4 * steps, 1), name="image")
    x = tf.keras.layers.Conv2D(8, 3, padding="same", activation="relu")(image)
    x = tf.keras.layers.MaxPool2D((2, 2))(x)
    x = tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = tf.keras.layers.MaxPool2D((2, 2))(x)  # 4 x steps x 16
    x = tf.keras.layers.Permute((2, 1, 3))(x)
    x = tf.keras.layers.Reshape((steps, 4 * 16))(x)
    x = tf.keras.layers.Bidirectional(tf.keras.layers.LSTM(units, return_sequences=True))(x)
    out = tf.keras.layers.Dense(11, activation="softmax")(x)
    tf.keras.Model(image, out).export(str(path))
    return {"image": np.random.default_rng(0).normal(size=(1, 16, 4 * steps, 1))
            .astype(np.float32)}


def _report(model_dir) -> dict:
    return json.loads((model_dir / "assets.extra" / "fuseflow_report.json").read_text())


def _segments_with(report: dict, op: str) -> set[str]:
    return {s["backend"] for s in report["segments"] if op in s["op_types"] and s["compiled"]}


def test_crnn_by_kind_puts_convolutions_on_openvino_and_loops_on_xla(tmp_path):
    feeds = _crnn(tmp_path / "m")
    result = fuseflow.saved_model.compile(tmp_path / "m", tmp_path / "c",
                                          compiler_args=["--no-profile"])
    report = _report(tmp_path / "c")
    assert report["placement"]["mode"] == "by kind (not timed)"
    assert _segments_with(report, "Conv2D") == {"openvino"}
    assert _segments_with(report, "While") == {"xla"}
    assert set(result["ops_per_backend"]) == {"openvino", "xla"}
    assert result["backend"] == "openvino+xla" and report["runtime"]["backend"] == "openvino+xla"
    assert result["OnNeuronRatio"] > 0.9
    expected = run_saved_model(tmp_path / "m", feeds)
    actual, stats = run_fresh(tmp_path / "c", feeds, tmp_path, with_stats=True)
    assert_outputs_close(expected, actual, rtol=1e-3, atol=1e-5)
    assert_ran_each(stats, tmp_path / "c")


def test_forced_backend_takes_everything(tmp_path):
    feeds = _crnn(tmp_path / "m", steps=8, units=8)
    result = fuseflow.saved_model.compile(tmp_path / "m", tmp_path / "c",
                                          compiler_args=["--no-profile", "--backend", "openvino"])
    assert result["ops_per_backend"] == {"openvino": result["num_ops_on_backend"]}
    assert _segments_with(_report(tmp_path / "c"), "While") == {"openvino"}
    actual, stats = run_fresh(tmp_path / "c", feeds, tmp_path, with_stats=True)
    assert_outputs_close(run_saved_model(tmp_path / "m", feeds), actual, rtol=1e-3, atol=1e-5)
    assert_ran(stats, "openvino", fused_segments(tmp_path / "c"))


# Five candidates compiled and timed (20-60 s), in make test: it is the default path of a
# model whose regions split into pieces, and a crash there went unseen while it was slow.
def test_timed_placement_keeps_only_segments_faster_than_tf(tmp_path):
    feeds = _crnn(tmp_path / "m", steps=16, units=16)
    result = fuseflow.saved_model.compile(tmp_path / "m", tmp_path / "c",
                                          compiler_args=["--profile"])
    report = _report(tmp_path / "c")
    placement = report["placement"]
    assert placement["mode"] == "timed" and placement["candidates"] >= 3
    for region in placement["regions"]:
        tried = region["tried_ms"]
        # The region whole on each backend and its pieces (conv | loops | head) were timed.
        assert {"openvino", "xla"} <= set(tried) and any(k.startswith("split") for k in tried)
        assert region["tf_ms"] > 0
        if region["chosen"] != "tensorflow":  # the fastest tried, give or take the tie rule
            assert region["ms"] <= min(v for v in tried.values() if v) * 1.06
    for segment in report["segments"]:
        timing = segment["timing"]
        assert timing["latency_ms"] < timing["tf_latency_ms"], segment
    left = [r for r in report["not_compiled"] if r["code"] == "SLOWER_THAN_TF"]
    for row in left:
        assert " ms vs TF " in row["detail"], row
    assert result["num_segments"] == len(report["segments"])
    # Timed again as a whole, in a fresh process, unless one segment is the whole model.
    whole = result["num_segments"] == 1 and result["OnNeuronRatio"] == 1.0
    if result["num_segments"]:
        assert report["model_timing"]["compiled_ms"] > 0
        assert (report["model_timing"].get("source") == "placement") == whole
    actual, stats = run_fresh(tmp_path / "c", feeds, tmp_path, with_stats=True)
    assert_outputs_close(run_saved_model(tmp_path / "m", feeds), actual, rtol=1e-3, atol=1e-5)
    by_backend = set(result["ops_per_backend"]) if result["num_segments"] else set()
    if by_backend == {"openvino", "xla"}:
        assert_ran_each(stats, tmp_path / "c")
    elif by_backend:
        assert_ran(stats, by_backend.pop(), fused_segments(tmp_path / "c"))


def _tiny(path):
    """Two scalar ops: compiled or not, a call costs about the same."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [4], name="x")
        y = tf.identity((x + 1.0) * 2.0, name="y")
        return {"x": x}, {"y": y}

    save_tf1(path, build)
    return {"x": np.arange(4, dtype=np.float32)}


def test_segment_slower_than_tf_stays_in_tf_with_both_timings(tmp_path, monkeypatch):
    """Both backends' calls are made 5 ms slower while timed (a tie with TF would go
    either way with the machine's load)."""
    feeds = _tiny(tmp_path / "m")
    monkeypatch.setenv("FUSEFLOW_INJECT_FAULT", "slow")
    result = fuseflow.saved_model.compile(tmp_path / "m", tmp_path / "c",
                                          compiler_args=["--profile"])
    assert result["num_segments"] == 0 and result["OnNeuronRatio"] == 0
    report = _report(tmp_path / "c")
    rows = [r for r in report["not_compiled"] if r["code"] == "SLOWER_THAN_TF"]
    assert {"AddV2", "Mul"} <= {r["op_type"] for r in rows}
    assert all(" ms vs TF " in r["detail"] and "in flight" in r["detail"] for r in rows)
    assert report["placement"]["regions"][0]["chosen"] == "tensorflow"
    monkeypatch.delenv("FUSEFLOW_INJECT_FAULT")
    actual, stats = run_fresh(tmp_path / "c", feeds, tmp_path, with_stats=True)
    np.testing.assert_allclose(actual["y"], (feeds["x"] + 1) * 2)
    assert_ran(stats, "openvino", {})


def test_must_compile_overrides_timing(tmp_path, caplog):
    feeds = _tiny(tmp_path / "m")
    with caplog.at_level("INFO", logger="fuseflow"):
        result = fuseflow.saved_model.compile(
            tmp_path / "m", tmp_path / "c",
            compiler_args=["--profile", "--must-compile", "--backend", "openvino"])
    assert result["num_segments"] == 1
    # The whole model was timed against the original; slower, it says which segment cost.
    # Its one segment holds every op: placement's timing of it is the model's.
    report = _report(tmp_path / "c")
    timing = report["model_timing"]
    assert timing["original_ms"] > 0 and timing["compiled_ms"] > 0
    assert timing["source"] == "placement"
    assert timing["compiled_ms"] == report["segments"][0]["timing"]["latency_ms"]
    slower = [r.message for r in caplog.records if "ran slower than the original" in r.message]
    assert bool(slower) == (timing["speedup"] < 1.0), (timing, slower)
    if slower:
        assert "fuseflow_segment_0 on openvino" in slower[0]
    actual, stats = run_fresh(tmp_path / "c", feeds, tmp_path, with_stats=True)
    np.testing.assert_allclose(actual["y"], (feeds["x"] + 1) * 2)
    assert_ran(stats, "openvino", fused_segments(tmp_path / "c"))


@pytest.mark.parametrize("flag", ["--profile-budget=0", "--profile-budget=-1"])
def test_profile_budget_must_be_positive(tmp_path, flag):
    _tiny(tmp_path / "m")
    with pytest.raises(fuseflow.errors.CompilerArgsError, match="--profile-budget"):
        fuseflow.saved_model.compile(tmp_path / "m", tmp_path / "c", compiler_args=[flag])
    assert not (tmp_path / "c").exists()


def _small_cnn(path):
    tf.keras.utils.set_random_seed(0)
    image = tf.keras.Input((16, 16, 3), name="image")
    x = tf.keras.layers.Conv2D(8, 3, activation="relu")(image)
    out = tf.keras.layers.Dense(4)(tf.keras.layers.GlobalAveragePooling2D()(x))
    tf.keras.Model(image, out).export(str(path))
    return {"image": np.random.default_rng(0).normal(size=(1, 16, 16, 3)).astype(np.float32)}


def test_convolution_region_is_timed_on_openvino_only(tmp_path):
    """XLA is not tried on a region of convolutions without loops (place.py); OpenVINO
    still is, against TF."""
    feeds = _small_cnn(tmp_path / "m")
    fuseflow.saved_model.compile(tmp_path / "m", tmp_path / "c", compiler_args=["--profile"])
    placement = _report(tmp_path / "c")["placement"]
    assert placement["mode"] == "timed" and placement["backends"] == ["openvino", "xla"]
    assert placement["candidates"] == 1
    (region,) = placement["regions"]
    assert set(region["tried_ms"]) == {"openvino"} and region["tf_ms"] > 0
    actual = run_fresh(tmp_path / "c", feeds, tmp_path)
    assert_outputs_close(run_saved_model(tmp_path / "m", feeds), actual, rtol=1e-4, atol=1e-5)


def test_segment_its_backend_fails_on_goes_to_the_other(tmp_path, monkeypatch, caplog):
    """OpenVINO fails the segment (an injected compiler error, as a frontend bug would):
    auto compiles it on XLA instead of leaving it in TF."""
    feeds = _small_cnn(tmp_path / "m")
    monkeypatch.setenv("FUSEFLOW_INJECT_FAULT", "error@openvino")
    with caplog.at_level("WARNING", logger="fuseflow"):
        result = fuseflow.saved_model.compile(tmp_path / "m", tmp_path / "c",
                                              compiler_args=["--no-profile"])
    assert result["ops_per_backend"] == {"xla": result["num_ops_on_backend"]}
    assert result["num_segments"] == 1 and result["num_segments_failed"] == 0
    assert any("failed on openvino" in r.message and "compiled on xla instead" in r.message
               for r in caplog.records)
    monkeypatch.delenv("FUSEFLOW_INJECT_FAULT")
    actual, stats = run_fresh(tmp_path / "c", feeds, tmp_path, with_stats=True)
    assert_outputs_close(run_saved_model(tmp_path / "m", feeds), actual, rtol=1e-4, atol=1e-5)
    assert_ran(stats, "xla", fused_segments(tmp_path / "c"))


def _mlp(path):
    """One region both backends take whole (no convolution): OpenVINO and XLA are each
    compiled and timed."""
    w = np.random.default_rng(1).normal(size=(8, 8)).astype(np.float32)

    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
        return {"x": x}, {"y": tf.tanh(tf.matmul(x, w) + 1.0, name="y")}

    save_tf1(path, build)
    return {"x": np.random.default_rng(2).normal(size=(1, 8)).astype(np.float32)}


def _compile_timed(src, out, fault, caplog, *flags, batch_size=1) -> dict:
    """--must-compile: the fastest backend wins whatever TF's time, so a 5 ms fault on one
    backend (timing.py) decides the placement on any machine."""
    caplog.clear()
    with pytest.MonkeyPatch.context() as patch, caplog.at_level("INFO", logger="fuseflow"):
        patch.setenv("FUSEFLOW_INJECT_FAULT", f"slow@{fault}")
        fuseflow.saved_model.compile(src, out, batch_size=batch_size,
                                     compiler_args=["--profile", "--must-compile", *flags])
    return _report(out)


def _backends(report: dict) -> list[str]:
    return [s["backend"] for s in report["segments"] if s["compiled"]]


def test_recompile_reuses_placement_timings_from_the_cache(tmp_path, caplog):
    """The second compile would choose OpenVINO if it timed again (XLA is made 5 ms slower
    then); it keeps XLA, with the first compile's figures, and says they are cached."""
    feeds = _mlp(tmp_path / "m")
    first = _compile_timed(tmp_path / "m", tmp_path / "c1", "openvino", caplog)
    assert first["placement"]["source"] == "measured" and _backends(first) == ["xla"]
    [region] = first["placement"]["regions"]
    assert region["tried_ms"]["openvino"] >= 5.0 > region["tried_ms"]["xla"], region
    assert first["model_timing"]["source"] == "placement"
    assert "cached" not in first["model_timing"]

    second = _compile_timed(tmp_path / "m", tmp_path / "c2", "xla", caplog)
    placement = second["placement"]
    assert placement["source"] == "cache" and placement["regions"] == first["placement"][
        "regions"]
    assert _backends(second) == ["xla"]
    [segment] = second["segments"]
    assert segment["cached"] and segment["timing"] == {**first["segments"][0]["timing"],
                                                       "source": "cache"}
    assert second["model_timing"]["cached"] is True
    assert "taken from the compile cache" in caplog.text
    assert "compiled and timed against TensorFlow" not in caplog.text
    out1 = run_fresh(tmp_path / "c1", feeds, tmp_path)
    out2, stats = run_fresh(tmp_path / "c2", feeds, tmp_path, with_stats=True)
    assert_outputs_close(out1, out2, rtol=1e-6, atol=1e-7)
    assert_outputs_close(run_saved_model(tmp_path / "m", feeds), out2, rtol=1e-4, atol=1e-5)
    assert_ran(stats, "xla", fused_segments(tmp_path / "c2"))

    # Another batch is another set of candidates: timed again (and XLA, slow, now loses).
    other = _compile_timed(tmp_path / "m", tmp_path / "c3", "xla", caplog, batch_size=2)
    assert other["placement"]["source"] == "measured" and _backends(other) == ["openvino"]
    assert "compiled and timed against TensorFlow" in caplog.text
    # --retime times again, whatever the cache holds.
    again = _compile_timed(tmp_path / "m", tmp_path / "c4", "xla", caplog, "--retime")
    assert again["placement"]["source"] == "measured" and _backends(again) == ["openvino"]
    assert "timing again (--retime)" in caplog.text


def test_timing_never_times_the_fallback(tmp_path):
    """A timed FuseflowOp carries its fallback without weights (they cost a big model
    seconds per candidate), so a fallback that ran would time TF on zeros: the timing
    must fail instead. A broken blob (not importable, no IR to recompile from) falls
    back; the same segment's good blob is timed."""
    import dataclasses

    from test_openvino_backend import segment_of

    from fuseflow.backends.openvino import OpenVinoBackend
    from fuseflow.options import CompilerOptions
    from fuseflow.timing import TimingJob, time_jobs

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, 256], name="fuseflow_input_0")
        w = tf.constant(np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32))
        tf.tanh(tf.matmul(x, w), name="y")  # w: 256 kB, above the weightless cut
    segment = segment_of(graph, ["fuseflow_input_0:0"], ["y:0"])
    options = CompilerOptions()
    artifact = OpenVinoBackend().compile(segment, options, str(tmp_path))
    broken = dataclasses.replace(artifact, executable=b"not an OpenVINO blob",
                                 files={})
    feed = [np.ones((1, 256), np.float32)]
    jobs = [TimingJob("good", "openvino", segment, artifact, feed, in_flight=False),
            TimingJob("broken", "openvino", segment, broken, feed, in_flight=False)]
    timings, failures = time_jobs(jobs, options, 60, tmp_path)
    assert "good" in timings and timings["good"].latency_ms > 0, failures
    assert "broken" not in timings
    assert "the compiled segment did not run" in failures["broken"], failures


def test_a_big_blob_goes_to_the_timing_process_as_a_file(tmp_path):
    """A blob over a megabyte is written to a file that the timed FuseflowOp maps, as a
    compiled model's asset, instead of riding in the pickle (ResNet50's 100 MB cost each
    candidate about a second). The timing proves the op ran that blob: its fallback has
    no weights here, and a fallback that ran fails the timing."""
    import pickle

    from test_openvino_backend import segment_of

    from fuseflow.backends.openvino import OpenVinoBackend
    from fuseflow.options import CompilerOptions
    from fuseflow.timing import _BLOB_FILE_BYTES, TimingJob, time_jobs

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, 1024], name="fuseflow_input_0")
        w = tf.constant(np.random.default_rng(0).normal(size=(1024, 512)).astype(np.float32))
        tf.tanh(tf.matmul(x, w), name="y")  # 2 MB of weights: a blob over the cut
    segment = segment_of(graph, ["fuseflow_input_0:0"], ["y:0"])
    options = CompilerOptions()
    artifact = OpenVinoBackend().compile(segment, options, str(tmp_path))
    assert len(artifact.executable) > _BLOB_FILE_BYTES
    feed = [np.ones((1, 1024), np.float32)]
    timings, failures = time_jobs(
        [TimingJob("big", "openvino", segment, artifact, feed, in_flight=False)], options,
        60, tmp_path)
    assert "big" in timings and timings["big"].latency_ms > 0, failures
    jobs, _, _ = pickle.loads((tmp_path / "timing_main_in.pkl").read_bytes())
    assert jobs[0].artifact.executable == b""
    assert open(jobs[0].executable_file, "rb").read() == artifact.executable


def test_the_compile_s_own_files_go_to_the_timing_process_by_path(tmp_path):
    """Where the compile left a candidate's blob and its segment's GraphDef in files (its
    executable.bin and graph.pb), the timing process reads those: neither rides in the
    pickle, and no blob is written again. TF's side runs the GraphDef read from its file;
    each candidate ran its own blob (a fallback has no weights there: it fails the
    timing), though the two files share a name."""
    import pickle

    from test_openvino_backend import segment_of

    from fuseflow.backends.openvino import OpenVinoBackend
    from fuseflow.compile import EXECUTABLE_FILE, SEGMENT_FILE
    from fuseflow.options import CompilerOptions
    from fuseflow.timing import TimingJob, time_jobs

    options = CompilerOptions()
    feed = [np.ones((1, 1024), np.float32)]
    jobs = []
    for name, width in (("a", 512), ("b", 384)):
        graph = tf.Graph()
        with graph.as_default():
            x = tf.compat.v1.placeholder(tf.float32, [1, 1024], name="fuseflow_input_0")
            w = tf.constant(np.random.default_rng(width).normal(size=(1024, width)).astype(
                np.float32))
            tf.tanh(tf.matmul(x, w), name="y")  # over a megabyte of weights
        segment = segment_of(graph, ["fuseflow_input_0:0"], ["y:0"])
        artifact = OpenVinoBackend().compile(segment, options, str(tmp_path))
        seg_dir = tmp_path / "placement" / name
        seg_dir.mkdir(parents=True)
        (seg_dir / EXECUTABLE_FILE).write_bytes(artifact.executable)
        (seg_dir / SEGMENT_FILE).write_bytes(segment.graph_def_bytes)
        files = {"blob_file": seg_dir / EXECUTABLE_FILE, "segment_file": seg_dir / SEGMENT_FILE}
        if name == "a":
            jobs.append(TimingJob("a.tf", None, segment, None, feed, in_flight=False,
                                  segment_file=files["segment_file"]))
        jobs.append(TimingJob(name, "openvino", segment, artifact, feed, in_flight=False,
                              **files))
    timings, failures = time_jobs(jobs, options, 60, tmp_path)
    assert set(timings) == {"a.tf", "a", "b"}, failures
    sent, _, _ = pickle.loads((tmp_path / "timing_main_in.pkl").read_bytes())
    assert all(job.segment.graph_def_bytes == b"" for job in sent)
    assert [job.executable_file for job in sent] == [
        None, str(tmp_path / "placement/a" / EXECUTABLE_FILE),
        str(tmp_path / "placement/b" / EXECUTABLE_FILE)]
    assert all(job.artifact is None or job.artifact.executable == b"" for job in sent)
    assert not list(tmp_path.glob("timing_blob_*"))


def _tanh_segment():
    """A one-op segment: cheap to time, for the tests of the timing process itself."""
    from test_openvino_backend import segment_of

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, 64], name="fuseflow_input_0")
        tf.tanh(x * 2.0, name="y")
    return segment_of(graph, ["fuseflow_input_0:0"], ["y:0"])


def test_a_candidate_that_kills_or_hangs_the_timing_costs_its_own_timing(
        tmp_path, monkeypatch, caplog):
    """Candidate a aborts the timing process at its first call: TF's side, timed before
    it, counts, and b and c go to a new process. There c hangs until the process's time
    is up: the log says where it hung (the stacks it writes when asked), and b, timed
    before it, still counts."""
    import dataclasses

    from fuseflow import timing
    from fuseflow.backends.openvino import OpenVinoBackend
    from fuseflow.options import CompilerOptions
    from fuseflow.timing import TimingJob, time_jobs

    segment = _tanh_segment()
    options = CompilerOptions()
    artifact = OpenVinoBackend().compile(segment, options, str(tmp_path))
    feed = [np.ones((1, 64), np.float32)]
    jobs = [TimingJob("a.tf", None, segment, None, feed, in_flight=False)]
    for name in "abc":
        named = dataclasses.replace(segment, name=f"seg_{name}")
        jobs.append(TimingJob(name, "openvino", named, artifact, feed, in_flight=False))
    monkeypatch.setattr(timing, "_START_S", 20)
    monkeypatch.setenv("FUSEFLOW_INJECT_FAULT", "crash:seg_a@openvino")
    first = timing._interpreter  # the env each process starts with: c hangs the second

    def next_fault(env=None):
        proc = first(env)
        monkeypatch.setenv("FUSEFLOW_INJECT_FAULT", "hang:seg_c@openvino")
        return proc

    monkeypatch.setattr(timing, "_interpreter", next_fault)
    with caplog.at_level("WARNING", logger="fuseflow"):
        timings, failures = time_jobs(jobs, options, 20, tmp_path)
    assert set(timings) == {"a.tf", "b"}, failures
    assert failures["a"].startswith("timing process died") and \
        failures["a"].endswith("while timing it"), failures
    assert failures["c"] == "timing process timed out while timing it", failures
    hung = [r.message for r in caplog.records if "ran past its" in r.message]
    assert len(hung) == 1 and "hung_call (timing.py:" in hung[0], hung


def test_a_timing_process_that_writes_no_stacks_is_described():
    """When a timing process that ran past its time wrote no stacks, the warning says why
    it could not: its state (T: stopped; D: waiting on the disk) and the kernel call it
    waits in, or that it had just exited."""
    import os
    import signal
    import subprocess
    import time

    from fuseflow.timing import _process_state

    stopped = subprocess.Popen(["sleep", "60"], start_new_session=True)
    exited = subprocess.Popen(["bash", "-c", "exit 3"], start_new_session=True)
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while "state was T" not in _process_state(stopped) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _process_state(stopped).startswith("its state was T, waiting in ")
        while exited.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _process_state(exited) == "it had just exited with 3"
    finally:
        os.killpg(stopped.pid, signal.SIGKILL)
        stopped.wait()


def test_a_timing_process_is_waited_for_not_what_it_started(tmp_path, monkeypatch):
    """A timing process that started something still running when it ended (here a sleep
    that keeps its stdout and stderr) is done when it ends: the parent waits for the process,
    not for its output to close, which timed out processes that had done their work."""
    import time

    from fuseflow import timing
    from fuseflow.options import CompilerOptions
    from fuseflow.timing import TimingJob, time_jobs

    segment = _tanh_segment()
    feed = [np.ones((1, 64), np.float32)]
    monkeypatch.setattr(timing, "_START_S", 40)
    monkeypatch.setattr(timing, "_STANDBY", "import subprocess\n"
                        "subprocess.Popen(['sleep', '300'])\n" + timing._STANDBY)
    start = time.monotonic()
    timings, failures = time_jobs([TimingJob("a.tf", None, segment, None, feed,
                                             in_flight=False)], CompilerOptions(), 20, tmp_path)
    assert set(timings) == {"a.tf"} and not failures, failures
    assert time.monotonic() - start < 45  # waiting for the output to close: 60 s
