"""Stage 4b: calibration data -> per-segment calibration sets -> INT8 segments (NNCF).

A segment's inputs are often intermediate tensors of the model, so the model
itself is calibrated, not the segment: the original (optimized, not yet
compiled) graph runs in TensorFlow on the user's samples, and every segment's
input values are collected from the tensors that feed it
(SegmentGraph.input_sources). They are written as `calibration.npz` in the
segment's work directory, where the compile worker (a separate process) finds
them and quantizes the segment's OpenVINO model with nncf.quantize before
compiling it.

Sample counts follow NNCF's advice: nncf.quantize's default subset_size is
300 samples, which it documents as enough for most models; fuseflow calibrates
on at most that many (in batches of the compiled batch size). A segment with
attention (MatMul feeding Softmax) is quantized with ModelType.TRANSFORMER,
which keeps softmax and layer-norm paths in floating point and applies
SmoothQuant. The model is quantized after OpenVINO's model-level fusions
(backends/openvino.py `_fused`). The ops left in floating point run at bf16
where the CPU has it; segments with no quantizable op come out unchanged, at
the precision they would otherwise have had.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fuseflow import errors
from fuseflow.backends.base import SegmentGraph

if TYPE_CHECKING:  # the compiler process quantizes without TensorFlow (compile_worker.py)
    from fuseflow.load import LoadedModel

log = logging.getLogger("fuseflow")

CALIBRATION_FILE = "calibration.npz"
NNCF_SUBSET_SIZE = 300  # nncf.quantize's default subset_size: its advice on sample count
HOLDOUT_FRACTION = 0.2  # of the user's samples, kept back for the accuracy guard
QUANTIZED_OP_TYPES = ("FakeQuantize", "FakeConvert")


@dataclass
class CalibrationSet:
    """The user's samples as model-level feed dicts at the compiled batch size."""

    calibrate: list[dict[str, np.ndarray]]  # tensor name -> array
    holdout: list[dict[str, np.ndarray]]
    source: str  # where the samples came from, for the report
    samples: int = 0
    notes: list[str] = field(default_factory=list)

    def stacked(self, rows: int) -> dict[str, np.ndarray]:
        """The first `rows` samples (fewer where there are fewer), held-out ones first, as
        one array per tensor name: only the batches that hold them are copied."""
        batches, have = [], 0
        for batch in self.holdout + self.calibrate:
            if have >= rows:
                break
            batches.append(batch)
            have += len(next(iter(batch.values())))
        return {name: np.concatenate([b[name] for b in batches])[:rows]
                for name in (batches[0] if batches else {})}


def _as_arrays(model: LoadedModel, feed, what: str) -> dict[str, np.ndarray]:
    """One feed dict (signature keys or tensor names) -> {tensor name: array}, checked."""
    from fuseflow.shapes import _key_lookup

    if not isinstance(feed, Mapping):
        raise errors.OptionError(
            f"{what} must be a dict {{input name: array}} or an iterable of such dicts, got "
            f"{type(feed).__name__}")
    values = _key_lookup(model, dict(feed), what)
    specs = {s.key: s for s in model.inputs}
    missing = sorted(set(specs) - set(values))
    if missing:
        raise errors.OptionError(f"{what} has no value for inputs {missing}: give one for every "
                                 f"input of signature {model.signature_key!r}")
    out = {}
    for key, value in values.items():
        spec = specs[key]
        array = np.asarray(value)
        if spec.dtype.name == "string" or array.dtype.kind not in "biuf" or array.ndim == 0:
            raise errors.OptionError(
                f"{what}[{key!r}] must be a numeric array with samples along axis 0, got "
                f"{array.dtype} of shape {array.shape}")
        out[spec.tensor_name] = array.astype(spec.dtype.as_numpy_dtype, copy=False)
    counts = {len(a) for a in out.values()}
    if len(counts) != 1:
        raise errors.OptionError(
            f"{what} inputs hold different sample counts "
            f"{ {k: len(a) for k, a in out.items()} }: give N samples of every input")
    return out


def _load_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise errors.OptionError(f"--calibration-data {path!r} is not a file: give an .npz "
                                 "written by numpy.savez with one array per model input")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as e:
        raise errors.OptionError(
            f"--calibration-data {path!r} is not a readable .npz ({e}); write it with "
            "numpy.savez(path, input_name=array, ...) (no object arrays)") from None


def _samples(model: LoadedModel, calibration_data, options_path, model_feed_dict
             ) -> tuple[dict[str, np.ndarray], str]:
    """All user samples, concatenated along the batch axis, and where they came from."""
    if calibration_data is not None:
        what = "calibration_data"
        if isinstance(calibration_data, Mapping):
            return _as_arrays(model, calibration_data, what), what
        if isinstance(calibration_data, (str, bytes, os.PathLike)) or not isinstance(
                calibration_data, Iterable):
            raise errors.OptionError(
                f"calibration_data must be a dict {{input name: array with N samples on axis "
                f"0}} or an iterable of feed dicts, got {type(calibration_data).__name__} (for "
                "a file, pass compiler_args=['--calibration-data', 'FILE.npz'])")
        feeds = [_as_arrays(model, f, f"{what}[{k}]") for k, f in enumerate(calibration_data)]
        if not feeds:
            raise errors.OptionError("calibration_data is empty: give at least one feed dict")
        return {t: np.concatenate([f[t] for f in feeds]) for t in feeds[0]}, what
    if options_path is not None:
        what = f"--calibration-data {options_path}"
        return _as_arrays(model, _load_npz(options_path), what), what
    if model_feed_dict is not None:
        return _as_arrays(model, model_feed_dict, "model_feed_dict"), "model_feed_dict"
    return {}, ""


def calibration_set(model: LoadedModel, shapes: dict[str, tuple], calibration_data,
                    options_path: str | None, model_feed_dict, required: bool,
                    random_batches: int = 4) -> CalibrationSet | None:
    """The user's samples split into calibration and held-out batches of the compiled
    shape; random inputs when there are none and `required` is False (None when the
    model takes no numeric input)."""
    samples, source = _samples(model, calibration_data, options_path, model_feed_dict)
    if not samples:
        if required:
            raise errors.OptionError(
                "--quantize int8 needs calibration data: pass calibration_data={input name: "
                "array with N samples on axis 0} (or an iterable of feed dicts) to compile(), "
                "--calibration-data FILE.npz, or at least model_feed_dict; "
                f"{NNCF_SUBSET_SIZE} representative samples are NNCF's advice")
        return _random_set(model, shapes, random_batches)
    by_tensor = {s.tensor_name: shapes[s.key] for s in model.inputs}
    for tensor, array in samples.items():
        want = by_tensor[tensor]
        if tuple(array.shape[1:]) != tuple(want[1:]):
            raise errors.OptionError(
                f"{source}: input {tensor} has samples of shape {tuple(array.shape[1:])}, the "
                f"model is compiled for {tuple(want[1:])}: give arrays of shape "
                f"(N, {', '.join(map(str, want[1:]))})")
    n = len(next(iter(samples.values())))
    batch = next(iter(by_tensor.values()))[0]
    notes = []
    if n < batch:  # too few for one batch: repeat them
        samples = {t: np.resize(a, (batch, *a.shape[1:])) for t, a in samples.items()}
        notes.append(f"{n} samples repeated to fill one batch of {batch}")
    batches = [{t: a[k:k + batch] for t, a in samples.items()}
               for k in range(0, max(n, batch) - batch + 1, batch)]
    if len(batches) < 2:
        notes.append("too few samples to hold any back: the accuracy guard checks on the "
                     "calibration samples")
        return CalibrationSet(batches, batches, source, n, notes)
    held = max(1, round(len(batches) * HOLDOUT_FRACTION))
    calibrate = batches[:-held][:max(1, NNCF_SUBSET_SIZE // batch)]
    return CalibrationSet(calibrate, batches[-held:], source, n, notes)


def _random_set(model: LoadedModel, shapes, batches: int) -> CalibrationSet | None:
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(batches):
        feed = {}
        for spec in model.inputs:
            if spec.dtype.name == "string":
                return None
            dtype = spec.dtype.as_numpy_dtype
            shape = shapes[spec.key]
            feed[spec.tensor_name] = (rng.normal(0, 1, shape).astype(dtype)
                                      if spec.dtype.is_floating else np.zeros(shape, dtype))
        feeds.append(feed)
    return CalibrationSet(feeds[:1], feeds, "random inputs (no user data given)",
                          batches * (next(iter(shapes.values()), (1,)) or (1,))[0])


def segment_values(graph_def, init_nodes, segments: list[SegmentGraph], feeds: list[dict],
                   outputs: bool = False, fetches: tuple[str, ...] = ()
                   ) -> tuple[dict[str, list[list[np.ndarray]]], list[list[np.ndarray]]]:
    """Per segment, per feed: its input values (and then its output values, if asked)
    as the original graph computes them; and per feed, the values of `fetches` (the
    model's outputs, say), from the same run."""
    from fuseflow.batch import run_feeds

    wanted, index = [], {}
    names_of = {seg.name: list(seg.input_sources) + ([p.name for p in seg.outputs]
                                                     if outputs else [])
                for seg in segments}
    for t in [*fetches, *(t for names in names_of.values() for t in names)]:
        if t not in index:
            index[t] = len(wanted)
            wanted.append(t)
    values = run_feeds(graph_def, init_nodes, feeds, wanted) if wanted else [[]] * len(feeds)
    per_segment = {seg.name: [[row[index[t]] for t in names_of[seg.name]] for row in values]
                   for seg in segments}
    return per_segment, [[row[index[t]] for t in fetches] for row in values]


def write_calibration(graph_def, init_nodes, segments: list[SegmentGraph],
                      calib: CalibrationSet, workdir: Path) -> None:
    """Each segment's input values on the calibration samples, as calibration.npz in its
    work directory (stacked: axis 0 counts batches)."""
    values, _ = segment_values(graph_def, init_nodes, segments, calib.calibrate)
    for seg in segments:
        seg_dir = workdir / seg.name
        seg_dir.mkdir(parents=True, exist_ok=True)
        rows = values[seg.name]
        np.savez(seg_dir / CALIBRATION_FILE,
                 **{f"input_{i}": np.stack([r[i] for r in rows]) for i in range(len(seg.inputs))})


def read_calibration(seg_dir: Path) -> list[list[np.ndarray]] | None:
    """calibration.npz as a list of batches (one array per segment input), or None."""
    path = Path(seg_dir) / CALIBRATION_FILE
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        arrays = [data[f"input_{i}"] for i in range(len(data.files))]
    count = len(arrays[0]) if arrays else 0
    return [[a[k] for a in arrays] for k in range(count)]


def has_attention(model) -> bool:
    """A MatMul whose result reaches a Softmax: the pattern NNCF's transformer mode is for."""
    softmax = [op for op in model.get_ordered_ops() if op.get_type_name() == "Softmax"]
    seen = set()
    stack = list(softmax)
    while stack:  # walk up from every Softmax, a few ops deep
        op = stack.pop()
        if id(op) in seen or len(seen) > 10000:
            continue
        seen.add(id(op))
        for value in op.inputs():
            parent = value.get_source_output().get_node()
            if parent.get_type_name() == "MatMul":
                return True
            if parent.get_type_name() not in ("Parameter", "Constant"):
                stack.append(parent)
    return False


def quantized_ops(model) -> int:
    return sum(op.get_type_name() in QUANTIZED_OP_TYPES for op in model.get_ordered_ops())


def _calibration_error(reference, candidate, batches) -> float:
    """Mean relative error of candidate against reference over the first output, on
    (a few of) the calibration batches."""
    import openvino as ov

    core, props = ov.Core(), {"INFERENCE_PRECISION_HINT": "f32"}
    want, got = core.compile_model(reference, "CPU", props), core.compile_model(
        candidate, "CPU", props)
    diff = scale = 0.0
    for batch in batches[:8]:
        a, b = (np.asarray(want(batch)[0], np.float64), np.asarray(got(batch)[0], np.float64))
        diff += float(np.mean(np.abs(a - b)))
        scale += float(np.mean(np.abs(a)))
    return diff / (scale + 1e-12)


def _quantize_cnn(nncf, model, batches) -> tuple[object | None, str]:
    """nncf.quantize with its defaults; if it fails, once more without bias correction
    (NNCF 3.4 fails on a bias added as a scalar constant: "cannot reshape array")."""
    try:
        return nncf.quantize(model.clone(), nncf.Dataset(batches),
                             subset_size=len(batches)), ""
    except Exception as e:  # noqa: BLE001 - retried, then the segment stays unquantized
        first = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    try:
        return nncf.quantize(
            model.clone(), nncf.Dataset(batches), subset_size=len(batches),
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                disable_bias_correction=True)), f" (bias correction off: {first})"
    except Exception as e:  # noqa: BLE001
        return None, f"{first}; without bias correction: {type(e).__name__}: {e}"


def quantize_model(model, seg_dir: Path) -> tuple[object, str]:
    """The segment's OpenVINO model quantized to INT8 by NNCF on its calibration.npz,
    and a log line. Runs in the compile worker.

    With attention, NNCF's transformer model type; its SmoothQuant step helps large
    encoders and can hurt small ones (seen: 18% error with it, 0.5% without, on a
    2-layer encoder), so both are made and the one closer to f32 on the calibration
    data is kept."""
    import nncf

    nncf.set_log_level(logging.WARNING)  # no progress bars in the compile log
    batches = read_calibration(seg_dir)
    if not batches:
        raise errors.OptionError(f"no {CALIBRATION_FILE} in {seg_dir}: the segment cannot be "
                                 "calibrated")
    transformer = has_attention(model)
    if not transformer:
        quantized, note = _quantize_cnn(nncf, model, batches)
        if quantized is None:
            return model, f"int8: nncf {nncf.__version__} failed ({note}): segment left unquantized"
    else:
        candidates = {}
        for label, alpha in (("SmoothQuant", None), ("no SmoothQuant", -1)):
            extra = {} if alpha is None else {"advanced_parameters": (
                nncf.AdvancedQuantizationParameters(
                    smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=alpha)))}
            try:
                q = nncf.quantize(model.clone(), nncf.Dataset(batches),
                                  subset_size=len(batches),
                                  model_type=nncf.ModelType.TRANSFORMER, **extra)
            except Exception as e:  # noqa: BLE001 - the other candidate may do
                log.warning("nncf.quantize (%s) failed: %s", label, e)
                continue
            candidates[label] = (_calibration_error(model, q, batches), q)
        if not candidates:
            return model, f"int8: nncf {nncf.__version__} failed: segment left unquantized"
        label = min(candidates, key=lambda k: candidates[k][0])
        quantized = candidates[label][1]
        note = (", transformer model type (attention found), " + label + " ("
                + ", ".join(f"{k}: {e:.2g}" for k, (e, _) in candidates.items())
                + " mean relative error on calibration data)")
    count = quantized_ops(quantized)
    line = (f"int8: nncf {nncf.__version__} quantize on {len(batches)} calibration batch(es)"
            f"{note}: {count} FakeQuantize op(s)")
    return quantized, line
