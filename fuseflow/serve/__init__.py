"""`fuseflow serve`: compiled models behind TF Serving's REST and gRPC APIs, on Ray Serve.

    fuseflow serve --model resnet=/models/resnet [--model ...] [--port 8501]
                   [--grpc-port 8500] [--replicas N] [--address RAY_ADDRESS]

- rest.py: TF Serving's REST paths, JSON forms and error shape, over numpy.
- grpcapi.py: TF Serving's gRPC PredictRequest/PredictResponse and status codes, over numpy.
- versions.py: a model base path (`<base>/<version>/saved_model.pb`), the latest version
  served, new versions picked up.
- app.py: the Ray Serve application (one deployment per model, batching; a gateway in
  front when several models or replicas are served).

Ray is imported only here, so `import fuseflow` does not need it.
"""

from __future__ import annotations

import logging

from fuseflow import errors
from fuseflow.serve.app import ModelConfig, ServeConfig, serve_forever, start, stop

__all__ = ["ModelConfig", "ServeConfig", "model_config", "serve_forever", "start", "stop"]

log = logging.getLogger("fuseflow.serve")


def model_config(spec: str, batching: dict[str, tuple[int, float]] | None = None,
                 default_batch: tuple[int, float] = (8, 2.0)) -> ModelConfig:
    """`NAME=BASE_PATH` (the --model flag) as a ModelConfig, checking the base path."""
    import os

    from fuseflow.serve.versions import versions_on_disk

    name, sep, base = spec.partition("=")
    if not sep or not name or not base:
        raise errors.OptionError(f"--model {spec!r}: expected NAME=BASE_PATH, e.g. "
                                 "--model resnet=/models/resnet")
    if not os.path.isdir(base):
        raise errors.ModelLoadError(f"--model {name}: base path {base!r} is not a directory: "
                                    "pass the folder that holds <version>/saved_model.pb")
    if not versions_on_disk(base):  # as TF Serving: served once a version appears
        log.warning("--model %s: no version under %s yet; it is served once %s/ (TF "
                    "Serving's <base>/<version>/saved_model.pb layout) appears", name, base,
                    os.path.join(base, "1"))
    size, wait_ms = (batching or {}).get(name, default_batch)
    if size < 1 or wait_ms < 0:
        raise errors.OptionError(f"--model {name}: max batch size must be >= 1 and the wait "
                                 f">= 0 ms, got {size}, {wait_ms}")
    return ModelConfig(name, os.path.abspath(base), size, wait_ms)
