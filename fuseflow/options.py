"""All compile options in one typed place, parsed from compiler_args and env flags.

compiler_args keep the reference's neuron-cc spelling so tensorflow-neuron
scripts run unchanged; each flag is mapped onto the chosen backend.
FUSEFLOW_CC_FLAGS (or the reference's NEURON_CC_FLAGS) adds flags.

neuron-cc flags that tune Inferentia hardware (SRAM, replication, binaries
format) mean nothing on OpenVINO or XLA: they are accepted, so scripts run
unchanged, and named in one warning. Any other flag is an error.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from dataclasses import dataclass

from fuseflow import errors

FP32_CAST_CHOICES = ("all", "matmult", "matmult-bf16", "matmult-fp16", "all-fp16",
                     "none")
FAST_MATH_CHOICES = ("all", "none", "fp32-cast-all", "fp32-cast-matmult", "no-fp32-cast",
                     "fast-relayout", "no-fast-relayout")
QUANTIZE_CHOICES = ("int8", "none")
ACCURACY_METRICS = ("max", "mean", "top1")  # see fuseflow/accuracy.py
ENV_FLAGS = ("FUSEFLOW_CC_FLAGS", "NEURON_CC_FLAGS")
DEFAULT_TIMEOUT_S = 18000.0
DEFAULT_PROFILE_BUDGET_S = 120.0  # timing candidates at compile time, all together
BACKEND_CHOICES = ("auto", "openvino", "xla")
VERBOSE_LEVELS = {"DEBUG": 2, "INFO": 1, "WARN": 0, "WARNING": 0, "ERROR": 0}

# neuron-cc / tensorflow-neuron flags with no meaning on these backends: flag -> nargs
# (0: a switch, 1: one value, "?": an optional value).
IGNORED_FLAGS: dict[str, int | str] = {
    "--static-weights": 0, "--enable-saturate-infinity": 0,
    "--enable-fast-loading-neuron-binaries": 0, "--enable-fast-context-switch": 0,
    "--enable-replication": "?", "--batching_en": 0, "--max-batch-size": 1,
    "--model-type": 1, "--sb_size": 1, "--spill_dis": 0, "--rematerialization_en": 0,
    "--framework": 1, "--io-config": 1, "--output": 1, "--extract-weights": "?",
}

log = logging.getLogger("fuseflow")


@dataclass(frozen=True)
class CompilerOptions:
    """What the backends and the compile driver need to know."""

    backend: str | None = None  # None: pick by hardware (see saved_model.compile)
    profile: bool = True  # time segments against TF at compile time (place.py)
    profile_budget_s: float = DEFAULT_PROFILE_BUDGET_S
    must_compile: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    workers: int | None = None
    workdir: str | None = None
    verbose: int = 0
    cores: int | None = None  # --neuroncore-pipeline-cores: threads per segment
    fp32_cast: str = "none"
    fast_math: tuple[str, ...] = ()
    max_segments: int | None = None
    dynamic_batch: bool = True
    ignored_flags: tuple[str, ...] = ()  # accepted neuron-cc flags that mean nothing here
    cache: bool = True  # --no-cache: compile every segment, read and write no cache (cache.py)
    retime: bool = False  # --retime: time again what the cache holds timings of (cache.py)
    quantize: str = "none"  # "int8": calibrated post-training quantization (quantize.py)
    calibration_data: str | None = None  # --calibration-data FILE.npz
    accuracy_tolerance: tuple[tuple[str, float], ...] = ()  # metric -> bound (accuracy.py)
    xla_cache: bool = True  # ship XLA executables in the model's assets (xla_cache.py)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print and exit
        raise errors.CompilerArgsError(f"bad compiler flag: {message}")


def _parser() -> _Parser:
    p = _Parser(prog="compiler_args", add_help=False, allow_abbrev=False)
    p.add_argument("--backend", choices=BACKEND_CHOICES)
    p.add_argument("--profile", dest="profile", action="store_true", default=None)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--profile-budget", type=float)
    p.add_argument("--must-compile", action="store_true")
    p.add_argument("--timeout", type=float)
    p.add_argument("--workers", type=int)
    p.add_argument("--workdir")
    p.add_argument("--verbose", type=_verbose_level, nargs="?", const=1)
    p.add_argument("--neuroncore-pipeline-cores", "--num-neuroncores", type=int, dest="cores")
    p.add_argument("--fp32-cast", choices=FP32_CAST_CHOICES)
    p.add_argument("--fast-math", nargs="+", choices=FAST_MATH_CHOICES)
    p.add_argument("--max-segments", type=int)
    p.add_argument("--no-dynamic-batch", action="store_true")
    p.add_argument("--dynamic-batch-size", action="store_true")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--retime", action="store_true")
    p.add_argument("--xla-cache", dest="xla_cache", action="store_true", default=None)
    p.add_argument("--no-xla-cache", dest="xla_cache", action="store_false")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES)
    p.add_argument("--calibration-data")
    p.add_argument("--accuracy-tolerance")
    for flag, nargs in IGNORED_FLAGS.items():
        dest = "ignored_" + flag.strip("-").replace("-", "_")
        if nargs == 0:
            p.add_argument(flag, action="store_true", dest=dest)
        elif nargs == 1:
            p.add_argument(flag, dest=dest)
        else:
            p.add_argument(flag, nargs="?", const="", dest=dest)
    return p


def _verbose_level(text: str) -> int:
    """neuron-cc takes a level name (DEBUG, INFO, WARN, ERROR) or a number."""
    if text.upper() in VERBOSE_LEVELS:
        return VERBOSE_LEVELS[text.upper()]
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid level {text!r}: give a number or one of "
            f"{', '.join(VERBOSE_LEVELS)}") from None


def _as_list(compiler_args) -> list[str]:
    if compiler_args is None:
        return []
    if isinstance(compiler_args, str):
        return shlex.split(compiler_args)
    try:
        args = list(compiler_args)
    except TypeError:
        raise errors.CompilerArgsError(
            f"compiler_args must be a list of strings, got {compiler_args!r}") from None
    bad = [a for a in args if not isinstance(a, (str, int, float))]
    if bad:
        raise errors.CompilerArgsError(f"compiler_args must be strings, got {bad!r}")
    return [str(a) for a in args]


def reference_keywords(max_num_compilers=None, compiler_timeout=None, compiler_recovery=True,
                       compiler_verbose=None, dynamic_batch_size=False) -> list[str]:
    """tensorflow-neuron's compile keywords, as the flags that mean the same here."""
    args = []
    if max_num_compilers is not None:
        args += ["--workers", str(max_num_compilers)]
    if compiler_timeout is not None:
        args += ["--timeout", str(compiler_timeout)]
    if not compiler_recovery:
        args.append("--must-compile")
    if compiler_verbose is not None:
        args += ["--verbose", str(compiler_verbose)]
    if dynamic_batch_size:
        args.append("--dynamic-batch-size")
    return args


def parse_compiler_args(compiler_args=None, compiler_workdir=None, backend=None,
                        environ=None) -> CompilerOptions:
    """compiler_args + env flags + keywords -> CompilerOptions, or CompilerArgsError."""
    environ = os.environ if environ is None else environ
    args = []
    for var in ENV_FLAGS:
        if environ.get(var):
            args += shlex.split(environ[var])
    args += _as_list(compiler_args)
    ns, unknown = _parser().parse_known_args(args)
    if unknown:
        raise errors.CompilerArgsError(
            f"unknown compiler flag(s) {unknown}: fuseflow understands --backend, "
            "--must-compile, --timeout, --workers, --workdir, --verbose, "
            "--neuroncore-pipeline-cores, --fp32-cast, --fast-math, --max-segments, "
            "--no-dynamic-batch, --dynamic-batch-size, --no-cache, --retime, --no-xla-cache, "
            "--quantize, --calibration-data, --accuracy-tolerance and the neuron-cc flags "
            "listed in the README")
    for name, value in (("--timeout", ns.timeout), ("--workers", ns.workers),
                        ("--neuroncore-pipeline-cores", ns.cores),
                        ("--max-segments", ns.max_segments),
                        ("--profile-budget", ns.profile_budget)):
        if value is not None and not value > 0:
            raise errors.CompilerArgsError(f"{name} must be positive, got {value}")
    if ns.dynamic_batch_size and ns.no_dynamic_batch:
        raise errors.CompilerArgsError(
            "--dynamic-batch-size contradicts --no-dynamic-batch: give one of them")
    ignored = tuple(flag for flag in IGNORED_FLAGS
                    if getattr(ns, "ignored_" + flag.strip("-").replace("-", "_")) not in
                    (None, False))
    if ignored:
        log.warning("neuron-cc flags with no meaning on the OpenVINO and XLA backends, "
                    "ignored: %s", " ".join(ignored))
    if backend is not None and ns.backend is not None and backend != ns.backend:
        raise errors.CompilerArgsError(
            f"backend={backend!r} contradicts --backend {ns.backend}: give one of them")
    return CompilerOptions(
        backend=backend or ns.backend,
        profile=ns.profile is not False,
        profile_budget_s=(ns.profile_budget if ns.profile_budget is not None
                          else DEFAULT_PROFILE_BUDGET_S),
        must_compile=ns.must_compile,
        timeout_s=ns.timeout if ns.timeout is not None else DEFAULT_TIMEOUT_S,
        workers=ns.workers,
        workdir=compiler_workdir if compiler_workdir is not None else ns.workdir,
        verbose=ns.verbose or 0,
        cores=ns.cores,
        fp32_cast=ns.fp32_cast or "none",
        fast_math=tuple(ns.fast_math or ()),
        max_segments=ns.max_segments,
        dynamic_batch=not ns.no_dynamic_batch,
        ignored_flags=ignored,
        cache=not ns.no_cache,
        retime=ns.retime,
        quantize=ns.quantize or "none",
        calibration_data=ns.calibration_data,
        accuracy_tolerance=parse_tolerance(ns.accuracy_tolerance),
        xla_cache=ns.xla_cache is not False,
    )


def parse_tolerance(text: str | None) -> tuple[tuple[str, float], ...]:
    """--accuracy-tolerance: a number (the bound on mean relative error) or
    METRIC=X pairs separated by commas, METRIC one of max, mean, top1 (the fraction
    of top-1 answers allowed to change)."""
    if text is None:
        return ()
    pairs = []
    for part in text.split(","):
        metric, _, value = part.strip().rpartition("=")
        metric = metric.strip() or "mean"
        try:
            bound = float(value)
        except ValueError:
            bound = -1.0
        if metric not in ACCURACY_METRICS or not bound >= 0:
            raise errors.CompilerArgsError(
                f"bad --accuracy-tolerance {text!r}: give a non-negative number (the bound on "
                "mean relative error) or METRIC=X pairs such as 'mean=0.02,top1=0.01', "
                f"METRIC one of {', '.join(ACCURACY_METRICS)}")
        pairs.append((metric, bound))
    return tuple(pairs)
