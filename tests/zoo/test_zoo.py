"""The conformance zoo: every model family compiles, answers equal, and keeps its coverage.

For each model and backend: build it from code, compile it, run original and compiled
in fresh processes, and check the answers, that the backend really ran, the
OnNeuronRatio, the number of segments, and the exact op types left in TensorFlow with
their reasons against `expectations.py`. A lower ratio or more segments than pinned
fails: coverage never regresses silently.

`make test` runs the models marked fast; `make zoo` runs all of them, keeps the compiled
models and writes .build/zoo/results.json for `python -m bench.zoo` (the README table).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from expectations import EXPECTED, MUST_BE_WHOLE, Expected
from families import ZOO, ZooModel

import fuseflow
from fuseflow.backends.base import relative_error

RESULTS = os.environ.get("FUSEFLOW_ZOO_OUT")  # a folder: keep models and results there


def _cases():
    for (name, backend), expected in EXPECTED.items():
        model = ZOO[name]
        marks = [] if model.fast else [pytest.mark.slow]
        yield pytest.param(model, backend, expected, marks=marks, id=f"{name}-{backend}")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each model is built and run by TF once, whichever backends compile it."""
    cache: dict[str, tuple[Path, dict, dict]] = {}

    def get(model: ZooModel, run_fresh_outputs):
        if model.name not in cache:
            path = tmp_path_factory.mktemp("zoo") / "original"
            feeds = model.build(path)
            outputs, _ = run_fresh_outputs(path, feeds)
            cache[model.name] = (path, feeds, outputs)
        return cache[model.name]
    return get


_FRESH = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import fuseflow
    import tensorflow as tf
    model, feeds_file, out_file = sys.argv[1:]
    feeds = dict(np.load(feeds_file, allow_pickle=False))
    fn = tf.saved_model.load(model).signatures["serving_default"]
    out = {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in feeds.items()}).items()}
    np.savez(out_file, **out)
    counters = fuseflow.native.load_op_library().fuseflow_op_stats()
    print(json.dumps({"openvino_runs": int(counters.openvino_runs),
                      "native_runs": int(counters.native_runs)}))
""")


@pytest.fixture
def fresh_stats(tmp_path_factory):
    """Run a SavedModel once in a new process: (outputs, the fused ops' run counters)."""
    def run(model_dir: Path, feeds: dict) -> tuple[dict, dict]:
        work = tmp_path_factory.mktemp("fresh")
        np.savez(work / "feeds.npz", **feeds)
        proc = subprocess.run(
            [sys.executable, "-c", _FRESH, str(model_dir), str(work / "feeds.npz"),
             str(work / "out.npz")], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"fresh process failed:\n{proc.stderr[-4000:]}"
        with np.load(work / "out.npz") as data:
            return dict(data), json.loads(proc.stdout.strip().splitlines()[-1])
    return run


def _left_in_tf(report: dict) -> dict[str, str]:
    """Compute op types left in TF -> reason code (structural plumbing not counted)."""
    left: dict[str, set[str]] = {}
    for row in report["not_compiled"]:
        if row["code"] != "STRUCTURAL":
            left.setdefault(row["op_type"], set()).add(row["code"])
    return {op: ",".join(sorted(codes)) for op, codes in sorted(left.items())}


@pytest.mark.parametrize("model,backend,expected", _cases())
def test_zoo_model(model: ZooModel, backend: str, expected: Expected, built, fresh_stats,
                   tmp_path):
    original, feeds, want = built(model, fresh_stats)
    out = tmp_path / "compiled"
    result = fuseflow.saved_model.compile(
        str(original), str(out), batch_size=model.batch_size,
        compiler_args=["--backend", backend])
    report = json.loads((out / "assets.extra" / "fuseflow_report.json").read_text())
    got, stats = fresh_stats(out, feeds)

    errors = {k: relative_error(want[k], got[k]) for k in want}
    left = _left_in_tf(report)
    record = {"model": model.name, "family": model.family, "backend": backend,
              "ratio": result["OnNeuronRatio"], "segments": result["num_segments"],
              "segments_failed": result["num_segments_failed"], "left_in_tf": left,
              "max_error": max(errors.values()), "stats": stats}
    _keep(record, original, out, feeds)

    assert sorted(got) == sorted(want)
    assert max(errors.values()) <= expected.tolerance, errors
    assert result["num_segments_failed"] == 0, report["segments"]
    # The backend ran: OpenVINO's executable answered every fused op, no fallback.
    if backend == "openvino":
        assert stats["openvino_runs"] >= result["num_segments"] >= 1, stats
        assert stats["native_runs"] == 0, stats
    assert result["OnNeuronRatio"] >= expected.ratio - 1e-9, (
        f"coverage fell: {result['OnNeuronRatio']:.4f} < pinned {expected.ratio}; {left}")
    assert result["num_segments"] <= expected.segments, (
        f"{result['num_segments']} segments, pinned {expected.segments}")
    assert left == expected.left_in_tf
    if model.family in MUST_BE_WHOLE and backend == "openvino":
        assert result["OnNeuronRatio"] >= 0.97 and result["num_segments"] == 1


def _keep(record: dict, original: Path, compiled: Path, feeds: dict) -> None:
    if not RESULTS:
        return
    folder = Path(RESULTS) / record["model"].replace(" ", "_") / record["backend"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copytree(original, folder / "original")
    shutil.copytree(compiled, folder / "compiled")
    np.savez(folder / "feeds.npz", **feeds)
    (folder / "record.json").write_text(json.dumps(record, indent=2))
