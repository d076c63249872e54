"""make demo: compile a real model (Keras MobileNetV2, random weights) and compare speed."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import fuseflow
from bench.models import MODELS, export, median_latency_ms, timed_signature


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="MobileNetV2", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--backend", default=None, help="openvino or xla (default: by hardware)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    model = MODELS[args.model]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="fuseflow-demo-") as tmp:
        src, key = export(model, Path(tmp))
        print(f"== {model.name}: exported to {src}")
        start = time.perf_counter()
        result = fuseflow.saved_model.compile(
            str(src), f"{tmp}/compiled", batch_size=args.batch, backend=args.backend)
        seconds = time.perf_counter() - start
        print(f"== compiled in {seconds:.1f} s: {result}")
        feeds = {key: model.feed(args.batch, rng)}
        original, compiled = timed_signature(src), timed_signature(Path(tmp) / "compiled")
        a = {k: v.numpy() for k, v in original(**feeds).items()}
        b = {k: v.numpy() for k, v in compiled(**feeds).items()}
        err = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
        t_orig = median_latency_ms(original, feeds)
        t_comp = median_latency_ms(compiled, feeds)
        print(f"== latency, batch {args.batch} (median of 30 after warm-up):")
        print(f"   original {t_orig:8.2f} ms")
        print(f"   compiled {t_comp:8.2f} ms   speed-up {t_orig / t_comp:.2f}x   "
              f"max abs error {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
