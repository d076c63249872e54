"""fuseflow.runtime: the delta between two snapshots, and the lines inspect --run prints."""

from __future__ import annotations

from fuseflow.runtime import since, summary_lines


def _op(compiled=0, recompiled=0, fallback=0, reasons=None, recompile_reason=""):
    return {"compiled": compiled, "recompiled": recompiled, "fallback": fallback,
            "recompile_reason": recompile_reason, "fallback_reasons": reasons or {}}


def test_since_keeps_only_what_changed():
    before = {"ops": {"a": _op(compiled=3), "b": _op(fallback=1, reasons={
        "shape": {"calls": 1, "message": "input shapes [1] fit neither"}})},
              "xla": {"compilations": 1, "launches": 4, "cache_loads": 0, "clusters": {"f": 1}}}
    after = {"ops": {"a": _op(compiled=3), "b": _op(compiled=2, fallback=3, reasons={
        "shape": {"calls": 2, "message": "input shapes [1] fit neither"},
        "infer": {"calls": 1, "message": "OpenVINO inference failed"}}), "c": _op(recompiled=1)},
             "xla": {"compilations": 3, "launches": 9, "cache_loads": 1,
                     "clusters": {"f": 1, "g": 2}}}
    delta = since(before, after)
    assert sorted(delta["ops"]) == ["b", "c"]  # a did not run in between
    assert delta["ops"]["b"]["compiled"] == 2 and delta["ops"]["b"]["fallback"] == 2
    assert {k: v["calls"] for k, v in delta["ops"]["b"]["fallback_reasons"].items()} == \
        {"shape": 1, "infer": 1}
    assert delta["xla"] == {"compilations": 2, "launches": 5, "cache_loads": 1,
                            "clusters": {"g": 2}}


def test_summary_lines_name_every_path_and_reason():
    stats = {"ops": {"seg": _op(compiled=1, recompiled=2, fallback=1,
                                recompile_reason="version mismatch",
                                reasons={"shape": {"calls": 1, "message": "fit neither"}})},
             "xla": {"compilations": 1, "launches": 2, "cache_loads": 1, "clusters": {"f": 1}}}
    assert summary_lines(stats) == [
        "seg: 1 compiled, 2 recompiled, 1 TensorFlow fallback (recompiled: version mismatch);"
        " fallback shape x1: fit neither",
        "XLA: 1 compilations, 2 launches; clusters compiled: f x1; 1 executables loaded "
        "from the persistent cache"]
    assert summary_lines({"ops": {}, "xla": {"compilations": 0, "launches": 0,
                                             "clusters": {}}}) == []
