"""The baseline users would pick instead of fuseflow: tf2onnx, then onnxruntime.

The SavedModel is converted the way users convert it, with tf2onnx's command
line (`python -m tf2onnx.convert --saved-model ...`), in a child process so
that tf2onnx's graph surgery never touches the benchmark's TensorFlow. The
one addition is a handler for `Erfc`, which tf2onnx 1.17 lacks and Keras 3's
exact `gelu` emits (ONNX has `Erf` but no `Erfc`): without it the BERT-like
model converts to an ONNX file that onnxruntime refuses to load. Running this
module as a script is that command line with the handler registered.

onnxruntime runs with its default session options: all graph optimizations,
one intra-op thread per physical core, spinning threads.

Needs the `bench` extra (`pip install -e '.[bench]'`); without it
`unavailable()` says why and the benchmark prints n/a.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def unavailable() -> str | None:
    """None if the baseline can run here, else the reason it can't."""
    missing = []
    for module in ("tf2onnx", "onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
    if missing:
        return ("not installed: " + ", ".join(missing)
                + "; install the extra with pip install -e '.[bench]'")
    return None


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import tf2onnx

    return {"tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def thread_settings() -> str:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    threads = options.intra_op_num_threads or f"default = physical cores ({_physical_cores()})"
    return (f"intra_op_num_threads {threads}, inter_op_num_threads "
            f"{options.inter_op_num_threads or 'default'}, {options.execution_mode.name}, "
            f"{options.graph_optimization_level.name}")


def _physical_cores() -> int:
    cores = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.cpu_count() or 1
    physical = core = None
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip() and core is not None:
            cores.add((physical, core))
            physical = core = None
    return len(cores) or os.cpu_count() or 1


def convert(saved_model: Path, output: Path, timeout_s: float = 1800) -> float:
    """Converts a SavedModel's serving signature to ONNX; returns the seconds it took.

    The time includes the child process's start (Python and TensorFlow import,
    a few seconds), as it does for a user running the command.
    """
    command = [sys.executable, "-m", "bench.onnx_baseline", "--saved-model", str(saved_model),
               "--signature_def", "serving_default", "--output", str(output)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        TF_CPP_MIN_LOG_LEVEL="2")
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or not output.exists():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"tf2onnx failed (exit {done.returncode}): {tail}")
    return seconds


class OnnxRuntimeModel:
    """An ONNX file in an onnxruntime session, called with the signature's feed names."""

    def __init__(self, path: Path):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(
            str(path), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def feed_names(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Signature input keys -> ONNX input names (tf2onnx keeps the keys; else by order)."""
        if set(feeds) == set(self.input_names):
            return feeds
        if len(feeds) == len(self.input_names) == 1:
            return {self.input_names[0]: next(iter(feeds.values()))}
        raise KeyError(f"ONNX inputs {self.input_names} do not match the feeds {sorted(feeds)}")

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, feeds)))


def quantize_static_int8(model: Path, output: Path, samples: np.ndarray,
                         batch: int = 8) -> float:
    """onnxruntime's own post-training static INT8 quantization of the tf2onnx model,
    calibrated on `samples` (the first input's values, N along axis 0): what a user of
    the baseline would run. QDQ format, the default; returns the seconds it took
    (pre-processing included)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    start = time.perf_counter()
    name = OnnxRuntimeModel(model).input_names[0]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: samples[k:k + batch]}
                                 for k in range(0, len(samples), batch)])

        def get_next(self):
            return next(self.batches, None)

    prepared = output.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(model), str(prepared))
    except Exception:  # noqa: BLE001 - pre-processing is advice, not required
        prepared = model
    quantize_static(str(prepared), str(output), Reader(), activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    return time.perf_counter() - start


def _register_erfc() -> None:
    """tf2onnx handler: Erfc(x) = 1 - Erf(x) (opset 9 has Erf)."""
    from tf2onnx import utils
    from tf2onnx.handler import tf_op

    @tf_op("Erfc")
    class Erfc:
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            dtype = ctx.get_dtype(node.input[0])
            one = ctx.make_const(utils.make_name(f"{node.name}_one"),
                                 np.array(1, dtype=utils.map_onnx_to_numpy_type(dtype)))
            erf = ctx.make_node("Erf", [node.input[0]], name=utils.make_name(f"{node.name}_erf"))
            ctx.set_dtype(erf.output[0], dtype)
            ctx.copy_shape(node.input[0], erf.output[0])
            ctx.replace_inputs(node, [one.output[0], erf.output[0]])
            node.type = "Sub"


def main() -> None:
    """`python -m tf2onnx.convert` with the Erfc handler registered."""
    from tf2onnx import convert

    _register_erfc()
    sys.argv[0] = "tf2onnx.convert"
    convert.main()


if __name__ == "__main__":
    main()
