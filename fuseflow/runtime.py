"""Which path ran: per fused op, calls run by the compiled executable, by a recompiled
one, or by the TensorFlow fallback (with why), and what XLA compiled and launched.

The counts live in the native op library (so the C++ loader sees the same ones) and in
TF's own monitoring: XLA's compilation and launch counters, and the cluster names XLA
broadcasts when it compiles one. They are process-wide and only grow; `since()` gives
the calls between two snapshots. Everything is plain dicts, ready to export as JSON or
as serving metrics.
"""

from __future__ import annotations

import ctypes
import json

from fuseflow import native

_reader = None


def _read_json() -> str:
    global _reader
    if _reader is None:
        native.load_op_library()  # builds and loads it; CDLL then finds the same copy
        function = ctypes.CDLL(str(native.library_path())).fuseflow_runtime_stats_json
        function.restype = ctypes.c_int64
        function.argtypes = [ctypes.c_char_p, ctypes.c_int64]
        _reader = function
    while True:
        size = _reader(None, 0) + 256  # room for calls counted in between
        buffer = ctypes.create_string_buffer(size)
        if _reader(buffer, size) < size:
            return buffer.value.decode()


def runtime_stats() -> dict:
    """This process's counts so far.

    {"ops": {segment: {"compiled": calls run by the imported executable,
                       "recompiled": calls run by one recompiled here (its import failed;
                                     "recompile_reason" says why),
                       "fallback": calls run by TensorFlow,
                       "fallback_reasons": {kind: {"calls": n, "message": first reason}},
                       "streams": OpenVINO streams the executable runs (0: not loaded),
                       "infer_requests": the most of its calls OpenVINO has run at once}},
     "xla": {"compilations": XLA compilations, "launches": XLA cluster launches,
             "cache_loads": compilations whose executable was loaded from TF's
                            persistent XLA cache instead of being built (xla_cache.py),
             "clusters": {cluster (function) name: compilations}}}

    Fallback kinds: "not_compiled", "unknown_backend", "load_failed" (the executable
    could not be imported nor recompiled), "shape" (inputs fit neither the compiled
    shapes nor a split along the batch axis), "infer" (OpenVINO failed the call).
    """
    return json.loads(_read_json())


def since(before: dict, after: dict | None = None) -> dict:
    """The counts between two snapshots of runtime_stats(); `after` defaults to now."""
    after = runtime_stats() if after is None else after
    ops = {}
    for name, op in after["ops"].items():
        old = before["ops"].get(name, {})
        delta = {k: op[k] - old.get(k, 0) for k in ("compiled", "recompiled", "fallback")}
        if not any(delta.values()):
            continue
        reasons = {}
        for kind, why in op["fallback_reasons"].items():
            calls = why["calls"] - old.get("fallback_reasons", {}).get(kind, {}).get("calls", 0)
            if calls:
                reasons[kind] = {"calls": calls, "message": why["message"]}
        ops[name] = {**delta, "recompile_reason": op["recompile_reason"],
                     "fallback_reasons": reasons, "streams": op.get("streams", 0),
                     "infer_requests": op.get("infer_requests", 0)}
    xla = after["xla"]
    clusters = {name: n - before["xla"]["clusters"].get(name, 0)
                for name, n in xla["clusters"].items()}
    return {"ops": ops,
            "xla": {"compilations": xla["compilations"] - before["xla"]["compilations"],
                    "launches": xla["launches"] - before["xla"]["launches"],
                    "cache_loads": xla.get("cache_loads", 0)
                    - before["xla"].get("cache_loads", 0),
                    "clusters": {name: n for name, n in clusters.items() if n}}}


def summary_lines(stats: dict) -> list[str]:
    """One line per fused op and one for XLA, for `fuseflow inspect --run` and logs."""
    lines = []
    for name, op in sorted(stats["ops"].items()):
        line = (f"{name}: {op['compiled']} compiled, {op['recompiled']} recompiled, "
                f"{op['fallback']} TensorFlow fallback")
        if op["recompiled"]:
            line += f" (recompiled: {op['recompile_reason']})"
        for kind, why in sorted(op["fallback_reasons"].items()):
            line += f"; fallback {kind} x{why['calls']}: {why['message']}"
        lines.append(line)
    xla = stats["xla"]
    if xla["compilations"] or xla["launches"] or xla["clusters"]:
        clusters = ", ".join(f"{name} x{n}" for name, n in sorted(xla["clusters"].items()))
        loaded = xla.get("cache_loads", 0)
        lines.append(f"XLA: {xla['compilations']} compilations, {xla['launches']} launches"
                     + (f"; clusters compiled: {clusters}" if clusters else "")
                     + (f"; {loaded} executables loaded from the persistent cache"
                        if loaded else ""))
    return lines
