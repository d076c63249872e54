"""The conformance zoo: every model family compiles, answers equal, and keeps its coverage.

For each model and backend: build it from code, compile it, run original and compiled
in fresh processes, and check the answers, that the backend really ran, the
OnNeuronRatio, the number of segments, the exact op types left in TensorFlow with
their reasons, and whether the model still runs at other batch sizes, against
`expectations.py`. A lower ratio or more segments than pinned
fails: coverage never regresses silently.

`make test` runs the models marked fast; `make zoo` runs all of them, keeps the compiled
models and writes .build/zoo/results.json for `python -m bench.zoo` (the README table).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_ran, assert_ran_each, fused_segments, run_fresh
from expectations import EXPECTED, MUST_BE_WHOLE, Expected
from families import ZOO, ZooModel

import fuseflow
from fuseflow.backends.base import relative_error

RESULTS = os.environ.get("FUSEFLOW_ZOO_OUT")  # a folder: keep models and results there


def _cases():
    for (name, backend), expected in EXPECTED.items():
        model = ZOO[name]
        # make test: the fast models on the default CPU backend; make zoo: everything.
        marks = [] if model.fast and backend in ("openvino", "auto") else [pytest.mark.slow]
        if expected.known_issue:
            marks.append(pytest.mark.xfail(strict=True, reason=expected.known_issue))
        yield pytest.param(model, backend, expected, marks=marks, id=f"{name}-{backend}")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each model is built and run by TF once, whichever backends compile it."""
    cache: dict[str, tuple[Path, dict, dict]] = {}

    def get(model: ZooModel):
        if model.name not in cache:
            path = tmp_path_factory.mktemp("zoo") / "original"
            feeds = model.build(path)
            outputs = run_fresh(path, feeds, tmp_path_factory.mktemp("fresh"))
            cache[model.name] = (path, feeds, outputs)
        return cache[model.name]
    return get


def _left_in_tf(report: dict) -> dict[str, str]:
    """Compute op types left in TF -> reason code (structural plumbing not counted)."""
    left: dict[str, set[str]] = {}
    for row in report["not_compiled"]:
        if row["code"] != "STRUCTURAL":
            left.setdefault(row["op_type"], set()).add(row["code"])
    return {op: ",".join(sorted(codes)) for op, codes in sorted(left.items())}


@pytest.mark.parametrize("model,backend,expected", _cases())
def test_zoo_model(model: ZooModel, backend: str, expected: Expected, built, tmp_path):
    original, feeds, want = built(model)
    out = tmp_path / "compiled"
    result = fuseflow.saved_model.compile(
        str(original), str(out), batch_size=model.batch_size,
        compiler_args=["--backend", backend])
    report = json.loads((out / "assets.extra" / "fuseflow_report.json").read_text())
    got, stats = run_fresh(out, feeds, tmp_path, with_stats=True)

    errors = {k: relative_error(want[k], got[k]) for k in want}
    left = _left_in_tf(report)
    record = {"model": model.name, "family": model.family, "backend": backend,
              "ratio": result["OnNeuronRatio"], "segments": result["num_segments"],
              "segments_failed": result["num_segments_failed"], "left_in_tf": left,
              "max_error": max(errors.values()), "dynamic_batch": result["dynamic_batch"]}
    _keep(record, original, out, feeds)

    assert sorted(got) == sorted(want)
    assert max(errors.values()) <= expected.tolerance, errors
    assert result["num_segments_failed"] == 0, report["segments"]
    # The backend ran: every fused op on its compiled executable (OpenVINO), every
    # segment compiled and launched as an XLA cluster; never the TF fallback.
    assert result["num_segments"] >= 1
    used = set(result["ops_per_backend"])
    if len(used) > 1:
        assert_ran_each(stats, out)
    else:
        assert_ran(stats, used.pop(), fused_segments(out))
    assert result["OnNeuronRatio"] >= expected.ratio - 1e-9, (
        f"coverage fell: {result['OnNeuronRatio']:.4f} < pinned {expected.ratio}; {left}")
    assert result["num_segments"] <= expected.segments, (
        f"{result['num_segments']} segments, pinned {expected.segments}")
    assert left == expected.left_in_tf
    assert result["dynamic_batch"] == expected.dynamic_batch, (
        f"dynamic_batch {result['dynamic_batch']}, pinned {expected.dynamic_batch}")
    if model.family in MUST_BE_WHOLE and backend in ("openvino", "auto"):
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
