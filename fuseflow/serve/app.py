"""The Ray Serve application: one `ModelServer` deployment per model, behind a `Gateway`.

The gateway is the HTTP ingress: it parses TF Serving's REST paths, answers health and
metrics, and calls the model's deployment through its handle with the raw body, retrying
a request whose replica died (predict is idempotent) and answering 503 when retries run
out. It is the gRPC ingress too: Ray Serve's gRPC proxy calls its `Predict` with TF
Serving's PredictRequest, which goes on to the model's deployment as bytes.

A `ModelServer` replica imports fuseflow (so FuseflowOp is registered), serves the latest
version of its base path, picks up new versions, parses and answers the JSON (or the
PredictRequest), and gathers concurrent requests into one model call with Ray Serve's
`@serve.batch`.

One model on one replica needs no router: the model deployment is then the ingress
itself (the same routes, one process hop less per request; see `direct_ingress`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fuseflow.serve import grpcapi, rest
from fuseflow.serve.rest import RestError

log = logging.getLogger("fuseflow.serve")

RETRIES = 3  # calls of a replica that died mid-request, before the gateway answers 503

# Ray Serve's own knobs (ray/serve/_private/constants.py; part of its
# RAY_SERVE_THROUGHPUT_OPTIMIZED set) for the Ray that `fuseflow serve` starts: user code
# and the handle router on the replica's own event loop rather than one thread each
# (fewer thread hand-offs per request on few cores; the model runs in its own thread
# anyway), and Serve's logs to their files only, not to stderr as well. An environment
# that sets one keeps its value.
LOCAL_SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                   "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
                   "RAY_SERVE_LOG_TO_STDERR": "0"}


@dataclass(frozen=True)
class ModelConfig:
    """One `--model NAME=BASE_PATH` and its batching."""

    name: str
    base_path: str
    max_batch_size: int = 8
    batch_wait_ms: float = 2.0


@dataclass(frozen=True)
class ServeConfig:
    models: tuple[ModelConfig, ...]
    port: int = 8501  # TF Serving's REST port
    grpc_port: int = 0  # TF Serving's gRPC PredictionService.Predict there; 0: no gRPC
    host: str = "0.0.0.0"
    replicas: int = 1
    address: str | None = None  # None: start a local Ray instance
    threads: int | None = None  # OpenVINO/TF threads per replica; None: cores // replicas
    poll_seconds: float = 1.0  # TF Serving's --file_system_poll_wait_seconds
    max_body_bytes: int = 64 << 20
    runtime_env: dict = field(default_factory=dict)


@dataclass
class _Call:
    """One request's feeds, waiting in a batch."""

    version: object  # versions.LoadedVersion
    signature: object  # versions.Signature
    feeds: dict[str, np.ndarray]

    def group(self) -> tuple:
        """Calls with the same group can be concatenated along dim 0."""
        return (id(self.version), self.signature.key,
                tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(self.feeds.items())))


_TF_ERRORS = {"InvalidArgumentError": "INVALID_ARGUMENT", "NotFoundError": "NOT_FOUND",
              "FailedPreconditionError": "FAILED_PRECONDITION", "OutOfRangeError": "OUT_OF_RANGE",
              "ResourceExhaustedError": "RESOURCE_EXHAUSTED", "UnimplementedError":
              "UNIMPLEMENTED", "UnavailableError": "UNAVAILABLE"}


def _as_rest_error(e: Exception) -> RestError:
    if isinstance(e, RestError):
        return e
    from fuseflow.errors import reason

    return RestError(_TF_ERRORS.get(type(e).__name__, "INTERNAL"), reason(e))


class _Ingress:
    """TF Serving's REST routes, /healthz, /metrics and per-model stats over HTTP; the
    subclass says how a model is called (through a handle, or in this replica)."""

    names: tuple[str, ...]
    max_body_bytes: int

    async def __call__(self, request):
        from starlette.responses import JSONResponse, PlainTextResponse, Response

        path = request.url.path
        if path == "/healthz":
            ready = await self._ready()
            ok = all(ready.values())
            return JSONResponse({"status": "ok" if ok else "unavailable", "models": ready},
                                status_code=200 if ok else 503)
        if path == "/metrics":
            return PlainTextResponse(await asyncio.get_running_loop().run_in_executor(
                None, _ray_metrics))
        if path.startswith("/fuseflow/stats/"):
            name = path.rsplit("/", 1)[1]
            if name not in self.names:
                return JSONResponse({"error": "no such model"}, status_code=404)
            return JSONResponse(await self._stats(name))
        try:
            route = rest.parse_path(path, request.method)
            if route.model not in self.names:
                spec = f"Specific({route.model}, {route.version})" if route.version is not None \
                    else f"Latest({route.model})"
                raise RestError("NOT_FOUND", f"Servable not found for request: {spec}")
            raw = await _read_body(request, self.max_body_bytes) \
                if request.method == "POST" else b""
            status, payload = await self._call(route, raw)
        except RestError as e:
            status, payload = e.http_status, rest.dumps(e.body())
        return Response(payload, status_code=status, media_type="application/json")

    async def Predict(self, request, grpc_context=None):  # noqa: N802 (the RPC's name)
        """TF Serving's gRPC PredictionService.Predict, as Ray Serve's gRPC proxy calls it:
        the parsed PredictRequest in, a PredictResponse out, errors as the call's status."""
        name = request.model_spec.name
        if name in self.names:
            code, message, raw = await self._predict_grpc(name, request.SerializeToString())
        else:
            try:
                spec = grpcapi.model_spec(request)
                code, message = "NOT_FOUND", grpcapi.not_found(spec.name, spec.version).message
            except RestError as e:
                code, message = e.code, e.message
            raw = b""
        return grpcapi.answer(grpc_context, code, message, raw)

    async def Classify(self, request, grpc_context=None):  # noqa: N802
        return grpcapi.unimplemented(grpc_context, "Classify")

    async def Regress(self, request, grpc_context=None):  # noqa: N802
        return grpcapi.unimplemented(grpc_context, "Regress")

    async def MultiInference(self, request, grpc_context=None):  # noqa: N802
        return grpcapi.unimplemented(grpc_context, "MultiInference")

    async def GetModelMetadata(self, request, grpc_context=None):  # noqa: N802
        return grpcapi.unimplemented(grpc_context, "GetModelMetadata")

    async def _ready(self) -> dict[str, bool]:
        raise NotImplementedError

    async def _stats(self, name: str) -> dict:
        raise NotImplementedError

    async def _call(self, route: rest.Route, raw: bytes) -> tuple[int, bytes]:
        raise NotImplementedError

    async def _predict_grpc(self, name: str, raw: bytes) -> tuple[str, str, bytes]:
        raise NotImplementedError


async def _read_body(request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise RestError("RESOURCE_EXHAUSTED", f"Request body of {declared} bytes is over "
                        f"the limit of {max_bytes} bytes (--max-body-mb)")
    raw = await request.body()
    if len(raw) > max_bytes:
        raise RestError("RESOURCE_EXHAUSTED", f"Request body of {len(raw)} bytes is over "
                        f"the limit of {max_bytes} bytes (--max-body-mb)")
    return raw


class ModelServer(_Ingress):
    """A replica of one model: its versions, its batcher, its counters. Called by the
    gateway's handle (`handle`), or over HTTP when it is the ingress (`__call__`)."""

    def __init__(self, model: ModelConfig, threads: int | None, poll_seconds: float,
                 max_body_bytes: int = 64 << 20):
        from ray import serve
        from ray.serve.metrics import Counter

        from fuseflow.serve.versions import ModelVersions

        _set_tf_threads(threads)
        self.model = model
        self.names, self.max_body_bytes = (model.name,), max_body_bytes
        self.versions = ModelVersions(model.name, model.base_path, threads)
        self.versions.refresh()
        self.requests = self.model_calls = self.http_requests = self.grpc_requests = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{model.name}")
        self._requests_metric = Counter("fuseflow_serve_requests", "requests per model",
                                        tag_keys=("model",))
        self._calls_metric = Counter("fuseflow_serve_model_calls",
                                     "model calls per model (one per batch)",
                                     tag_keys=("model",))

        @serve.batch(max_batch_size=model.max_batch_size,
                     batch_wait_timeout_s=model.batch_wait_ms / 1000)
        async def batched(calls: list[_Call]) -> list:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._run_calls, calls)

        self._batched = batched
        self._stop = threading.Event()
        threading.Thread(target=self._watch, args=(poll_seconds,), daemon=True,
                         name=f"watch-{model.name}").start()

    def _watch(self, poll_seconds: float) -> None:
        while not self._stop.wait(poll_seconds):
            try:
                self.versions.refresh()
            except Exception:  # a bad folder must not end the watcher
                log.exception("model %s: checking %s for new versions failed",
                              self.model.name, self.model.base_path)

    def _run_calls(self, calls: list[_Call]) -> list:
        """Each group of compatible calls as one model call, split back per request."""
        results: list = [None] * len(calls)
        groups: dict[tuple, list[int]] = {}
        for i, call in enumerate(calls):
            groups.setdefault(call.group(), []).append(i)
        for members in groups.values():
            first = calls[members[0]]
            sizes = [len(next(iter(calls[i].feeds.values()))) for i in members]
            try:
                if len(members) == 1:
                    outs = [self._run(first.version, first.signature, first.feeds)]
                else:
                    feeds = {k: np.concatenate([calls[i].feeds[k] for i in members])
                             for k in first.feeds}
                    merged = self._run(first.version, first.signature, feeds)
                    if not all(v.ndim and v.shape[0] == sum(sizes) for v in merged.values()):
                        # an output not batch-major: these requests run one by one
                        outs = [self._run(calls[i].version, calls[i].signature, calls[i].feeds)
                                for i in members]
                    else:
                        bounds = np.cumsum(sizes)[:-1]
                        split = {k: np.split(v, bounds) for k, v in merged.items()}
                        outs = [{k: split[k][j] for k in merged} for j in range(len(members))]
                for i, out in zip(members, outs):
                    results[i] = out
            except Exception as e:  # one bad batch answers its own requests, nothing else
                for i in members:
                    results[i] = _as_rest_error(e)
        return results

    def _run(self, version, signature, feeds):
        self.model_calls += 1
        self._calls_metric.inc(tags={"model": self.model.name})
        return version.run(signature, feeds)

    async def _outputs(self, version, signature, feeds, batchable: bool) -> dict:
        if batchable and self.model.max_batch_size > 1 and all(v.ndim >= 1
                                                              for v in feeds.values()):
            out = await self._batched(_Call(version, signature, feeds))
        else:
            loop = asyncio.get_running_loop()
            try:
                out = await loop.run_in_executor(self._pool, self._run, version, signature,
                                                 feeds)
            except Exception as e:
                out = _as_rest_error(e)
        if isinstance(out, RestError):
            raise out
        return out

    async def handle(self, verb: str, version: int | None, raw: bytes) -> tuple[int, bytes]:
        """One REST call, its body as sent: (HTTP status, JSON body), errors in TF Serving's
        shape. Bytes both ways: nothing but the body crosses the process boundary."""
        status, payload = await self._answer(verb, version, raw)
        return status, rest.dumps(payload)

    async def _answer(self, verb: str, version: int | None, raw: bytes) -> tuple[int, dict]:
        self.requests += 1
        self._requests_metric.inc(tags={"model": self.model.name})
        try:
            body = rest.parse_body(raw) if raw else {}
            if verb == "status":
                return 200, self.versions.status(version)
            loaded = self.versions.get(version)
            if verb == "metadata":
                return 200, {"model_spec": {"name": self.model.name, "signature_name": "",
                                            "version": str(loaded.version)},
                             "metadata": loaded.metadata}
            signature = loaded.signature(body.get("signature_name"))
            if verb == "predict":
                feeds, row_form = rest.predict_inputs(body, signature.inputs)
                outputs = await self._outputs(loaded, signature, feeds, row_form)
                return 200, rest.predict_response(outputs, row_form)
            method = rest.CLASSIFY_METHOD if verb == "classify" else rest.REGRESS_METHOD
            if signature.method != method or len(signature.inputs) != 1:
                raise RestError("INVALID_ARGUMENT", f"Expected {verb} signature method_name to "
                                f"be {method}. Was: {signature.method}")
            key = next(iter(signature.inputs))
            outputs = await self._outputs(loaded, signature, {key: rest.examples(body)}, True)
            return 200, (rest.classify_response(outputs) if verb == "classify"
                         else rest.regress_response(outputs))
        except Exception as e:  # nothing a request sends takes the replica down
            error = _as_rest_error(e)
            if not isinstance(e, RestError):
                log.warning("model %s: %s", self.model.name, error.message)
            return error.http_status, error.body()

    async def predict_grpc(self, raw: bytes) -> tuple[str, str, bytes]:
        """One gRPC Predict, its PredictRequest serialized: (status code name, message,
        serialized PredictResponse). The REST path's version lookup, signatures, input
        checks and batching; bytes both ways across the process boundary."""
        self.requests += 1
        self.grpc_requests += 1
        self._requests_metric.inc(tags={"model": self.model.name})
        try:
            request = grpcapi.parse(raw)
            spec = grpcapi.model_spec(request)
            if spec.name != self.model.name:
                raise grpcapi.not_found(spec.name, spec.version)
            loaded = self.versions.get(spec.version)
            signature = loaded.signature(spec.signature_name)
            keys = grpcapi.output_keys(request, signature.outputs)
            feeds = grpcapi.feeds(request, signature.inputs)
            outputs = await self._outputs(loaded, signature, feeds,
                                          grpcapi.batchable(feeds, signature.inputs))
            return "OK", "", grpcapi.response(spec, loaded.version, signature.key, outputs,
                                              keys)
        except Exception as e:  # nothing a request sends takes the replica down
            error = _as_rest_error(e)
            if not isinstance(e, RestError):
                log.warning("model %s: %s", self.model.name, error.message)
            return error.code, error.message, b""

    async def _predict_grpc(self, name: str, raw: bytes) -> tuple[str, str, bytes]:
        return await self.predict_grpc(raw)

    def ready(self) -> bool:
        return self.versions.latest is not None

    async def _ready(self) -> dict[str, bool]:
        return {self.model.name: self.ready()}

    async def _stats(self, name: str) -> dict:
        return self.stats()

    async def _call(self, route: rest.Route, raw: bytes) -> tuple[int, bytes]:
        self.http_requests += 1  # this replica is the ingress: HTTP came straight here
        return await self.handle(route.verb, route.version, raw)

    def stats(self) -> dict:
        """This replica's counters: what batching saved, which process answered."""
        from fuseflow.runtime import runtime_stats

        latest = self.versions.latest
        return {"pid": os.getpid(), "requests": self.requests, "model_calls": self.model_calls,
                "http_requests": self.http_requests, "grpc_requests": self.grpc_requests,
                "version": latest.version if latest else None, "runtime": runtime_stats()}


def _set_tf_threads(threads: int | None) -> None:
    if not threads:
        return
    from fuseflow.tf_compat import tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TF's context already started in this process
        log.warning("TF thread pools already started; not limited to %d threads", threads)


def _replica_died_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
             "NodeDiedError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


class Gateway(_Ingress):
    """HTTP ingress in front of several models (or replicas): routes each request to its
    model's deployment, retrying one whose replica died."""

    def __init__(self, handles: dict, max_body_bytes: int):
        self.handles, self.max_body_bytes = handles, max_body_bytes
        self.names = tuple(handles)
        self._died = _replica_died_errors()

    async def _stats(self, name: str) -> dict:
        return await self.handles[name].stats.remote()

    async def _retrying(self, name: str, call):
        """`await call()` (a handle call of model `name`), again on another replica if the
        one serving it died; UNAVAILABLE once RETRIES attempts failed."""
        last: BaseException | None = None
        for attempt in range(RETRIES):
            try:
                return await call()
            except self._died as e:  # the replica went away: Ray replaces it, we retry
                last = e
                log.warning("model %s: replica died (attempt %d): %s", name,
                            attempt + 1, type(e).__name__)
                await asyncio.sleep(0.5 * (attempt + 1))
        raise RestError("UNAVAILABLE", f"Model {name}: the replica serving this request died "
                        f"and {RETRIES} attempts failed ({type(last).__name__}); retry later")

    async def _call(self, route: rest.Route, raw: bytes) -> tuple[int, bytes]:
        handle = self.handles[route.model]
        try:
            return await self._retrying(route.model, lambda: handle.handle.remote(
                route.verb, route.version, raw))
        except RestError as e:
            return e.http_status, rest.dumps(e.body())

    async def _predict_grpc(self, name: str, raw: bytes) -> tuple[str, str, bytes]:
        handle = self.handles[name]
        try:
            return await self._retrying(name, lambda: handle.predict_grpc.remote(raw))
        except RestError as e:
            return e.code, e.message, b""

    async def _ready(self) -> dict[str, bool]:
        ready = {}
        for name, handle in self.handles.items():
            try:
                ready[name] = await handle.ready.remote()
            except self._died:
                ready[name] = False
        return ready


def _ray_metrics() -> str:
    """This node's Prometheus page, as Ray's metrics agent exports it."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def direct_ingress(config: ServeConfig) -> bool:
    """Whether the model deployment is the HTTP ingress itself (no gateway hop): one
    model on one replica. Several replicas keep the gateway, which retries a request
    whose replica died on another one; Ray's proxy would answer it with a bare 500."""
    return len(config.models) == 1 and config.replicas == 1


def build_app(config: ServeConfig):
    """The bound Ray Serve application: the model itself, or a gateway over one deployment
    per model."""
    from ray import serve

    threads = config.threads or max(1, (os.cpu_count() or 1) // config.replicas)
    direct = direct_ingress(config)
    handles = {}
    for model in config.models:
        deployment = serve.deployment(ModelServer).options(
            name=f"model-{model.name}", num_replicas=config.replicas,
            # requests past these wait in the proxy (or gateway), not in a replica's queue
            max_ongoing_requests=max(8, 2 * model.max_batch_size),
            ray_actor_options={"num_cpus": 0},  # threads are set per replica instead
            health_check_period_s=5, graceful_shutdown_timeout_s=5)
        handles[model.name] = deployment.bind(model, threads, config.poll_seconds,
                                              config.max_body_bytes)
        if direct:
            return handles[model.name]
    gateway = serve.deployment(Gateway).options(
        name="gateway", num_replicas=1, max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=5)
    return gateway.bind(handles, config.max_body_bytes)


def check_ports_free(config: ServeConfig) -> None:
    """Refuse ports that something already listens on. Ray Serve's proxies bind with
    SO_REUSEPORT, so without this check they share the port with the listener (another
    server, or a gRPC server, which binds that way too): the kernel then hands some
    connections to each, and clients get the other server's answers."""
    from fuseflow import errors

    if config.port == config.grpc_port:
        raise errors.OptionError(f"--port and --grpc-port are both {config.port}: REST and "
                                 "gRPC need a port each (TF Serving's are 8501 and 8500)")
    for flag, port in (("--port", config.port), ("--grpc-port", config.grpc_port)):
        if not port:
            continue
        with socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
            try:
                s.bind((config.host, port))
            except OSError as e:
                raise errors.OptionError(
                    f"{flag} {port}: {config.host}:{port} cannot be bound ({e.strerror}): "
                    "another process listens there; stop it or choose another port") from None


def start(config: ServeConfig) -> None:
    """Start (or join, with config.address) Ray and deploy the application; returns once
    every model's first version answers."""
    import ray
    from ray import serve

    if config.address:
        ray.init(address=config.address, namespace="fuseflow", runtime_env=config.runtime_env
                 or None, log_to_driver=False)
    else:
        check_ports_free(config)
        for key, value in LOCAL_SERVE_ENV.items():  # inherited by Ray's processes
            os.environ.setdefault(key, value)
        # --max-body-mb for gRPC too: Ray's gRPC proxy refuses a larger message with
        # RESOURCE_EXHAUSTED (its default is 2 GB)
        os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(config.max_body_bytes))
        # a local instance talks over loopback only
        ray.init(namespace="fuseflow", include_dashboard=False, log_to_driver=False,
                 runtime_env=config.runtime_env or None, _node_ip_address="127.0.0.1")
    grpc_options = None
    if config.grpc_port:  # Ray Serve's gRPC proxy, with TF Serving's PredictionService
        from ray.serve.config import gRPCOptions

        grpc_options = gRPCOptions(port=config.grpc_port,
                                   grpc_servicer_functions=[grpcapi.SERVICER])
    serve.start(http_options={"host": config.host, "port": config.port},
                grpc_options=grpc_options)
    serve.run(build_app(config), name="fuseflow", route_prefix="/", blocking=False)


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(config: ServeConfig) -> None:
    """`fuseflow serve`: start, say where, then wait until interrupted."""
    start(config)
    # after ray.init, which installs its own SIGTERM handler: ours shuts Ray down below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    names = ", ".join(m.name for m in config.models)
    grpc = f", gRPC PredictionService on port {config.grpc_port}" if config.grpc_port else ""
    print(f"fuseflow serve: {names} on http://{config.host}:{config.port}/v1/models/<name>"
          f"{grpc} ({config.replicas} replica(s) each; /healthz, /metrics)", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        stop()
