"""The command line: `fuseflow compile | inspect | bench | auto-multicore | serve`, over the API.

Exit codes: 0 ok, 1 bad input (a FuseflowError, shown as one line), 2 bad
usage (argparse), 3 a bug in fuseflow, 130 interrupted, 141 stdout closed
early. --debug shows the traceback instead of the one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator

from fuseflow import errors

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 3, 130, 141

_MAIN_HELP = """\
fuseflow compiles the parts of a TensorFlow SavedModel that a backend can take
(OpenVINO or XLA) ahead of time and writes a new SavedModel that runs them.

examples:
  fuseflow compile mobilenet/ mobilenet_compiled/
  fuseflow inspect mobilenet_compiled/
  fuseflow bench mobilenet/ mobilenet_compiled/
  fuseflow auto-multicore mobilenet_compiled/ --num-cores 4 --new-model-dir mobilenet_4/

Run `fuseflow COMMAND --help` for each command's options and more examples.
exit codes: 0 ok, 1 bad input (one-line error; --debug for the traceback),
2 bad command line, 3 internal error, 130 interrupted."""

_COMPILE_HELP = """\
examples:
  fuseflow compile resnet/ resnet_c/                      # batch 1, default backend
  fuseflow compile resnet/ resnet_c/ --batch-size 8 --backend xla
  fuseflow compile bert/ bert_c/ --shape input_ids=4,128 --shape attention_mask=4,128
  fuseflow compile model/ model_c/ --feed inputs.npz      # real inputs: every shape measured
  fuseflow compile model/ model_c/ --no-fuse-ops dense/MatMul,dense/BiasAdd
  fuseflow compile model/ model_c/ --compiler-args='--must-compile --timeout 600' \\
      --compiler-workdir work/                            # keeps graph.pb/compile.log per segment
  fuseflow compile model/ model_c/ --graph-html model_c.html --json > result.json

--feed takes an .npz whose keys are signature input keys (or tensor names), e.g.
  np.savez("inputs.npz", input_ids=ids, attention_mask=mask)
The conversion report (segments, and every op type left in TensorFlow with its
reason) is logged and written to NEW_MODEL_DIR/assets.extra/fuseflow_report.json."""

_INSPECT_HELP = """\
examples:
  fuseflow inspect resnet_c/                        # segment table, ops left in TF, load needs
  fuseflow inspect resnet_c/ --json | jq .segments  # the same for scripts
  fuseflow inspect resnet_c/ --graph-html resnet_c.html"""

_BENCH_HELP = """\
examples:
  fuseflow bench resnet/ resnet_c/                  # random inputs at batch 1
  fuseflow bench resnet/ resnet_c/ --batch-size 8 --runs 100 --threads 4
  fuseflow bench bert/ bert_c/ --feed inputs.npz --json

Both models get the same inputs; latency is measured one call at a time,
throughput with --threads calls in flight. The outputs are compared too."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show tracebacks and TensorFlow's own log")
    common.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="fuseflow", description=_MAIN_HELP, formatter_class=raw)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _compile_parser(commands.add_parser(
        "compile", parents=[common], formatter_class=raw, epilog=_COMPILE_HELP,
        help="compile MODEL_DIR into NEW_MODEL_DIR",
        description="Compile a SavedModel (saved_model.compile on the command line)."))
    _inspect_parser(commands.add_parser(
        "inspect", parents=[common], formatter_class=raw, epilog=_INSPECT_HELP,
        help="show what a compiled model holds",
        description="Show a compiled model's segments, the ops left in TensorFlow and why, "
                    "and what loading it needs."))
    _bench_parser(commands.add_parser(
        "bench", parents=[common], formatter_class=raw, epilog=_BENCH_HELP,
        help="latency and throughput of a model and its compiled version",
        description="Time a model and its compiled version on the same inputs."))
    _auto_multicore_parser(commands.add_parser(
        "auto-multicore", parents=[common], formatter_class=raw,
        help="serve concurrent calls of a compiled model on N streams",
        description="auto_multicore on the command line (tf-neuron-auto-multicore): "
                    "each OpenVINO segment runs N streams with a pool of N infer requests."))
    _serve_parser(commands.add_parser(
        "serve", parents=[common], formatter_class=raw, epilog=_SERVE_HELP,
        help="serve models over TF Serving's REST and gRPC APIs (Ray Serve)",
        description="Serve (compiled) SavedModels from TF Serving-style base paths "
                    "(<base>/<version>/saved_model.pb) with TF Serving's REST API, on Ray "
                    "Serve: locally, or on a Ray cluster with --address."))
    return parser


_SERVE_HELP = """\
examples:
  fuseflow serve --model resnet=/models/resnet                # REST :8501, gRPC :8500
  fuseflow serve --model a=/models/a --model b=/models/b --replicas 2
  fuseflow serve --model resnet=/models/resnet --batching resnet=16,5   # batch 16, wait 5 ms
  fuseflow serve --model resnet=/models/resnet --address auto  # join a running Ray cluster

  curl -d '{"instances": [[1.0, 2.0]]}' localhost:8501/v1/models/resnet:predict
  curl localhost:8501/v1/models/resnet          # status; /metadata for signatures
  curl localhost:8501/healthz; curl localhost:8501/metrics
  # gRPC: tensorflow_serving.apis' PredictionServiceStub on localhost:8500, unchanged

Drop a new version folder (<base>/2/) in and it is served once it loads and runs."""


def _serve_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="NAME=BASE_PATH",
                   help="a model and its base path (repeat per model)")
    p.add_argument("--port", type=int, default=8501, help="HTTP port (default 8501, TF "
                   "Serving's REST port)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--grpc-port", type=int, metavar="PORT",
                   help="TF Serving's gRPC PredictionService.Predict on this port (default "
                        "8500, TF Serving's --port; all interfaces); 0: no gRPC")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="replicas of each model (default 1)")
    p.add_argument("--address", metavar="RAY_ADDRESS",
                   help="join this Ray cluster (e.g. auto, or ray://head:10001); default: "
                        "start a local Ray instance")
    p.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                   help="requests gathered into one model call (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, metavar="MS",
                   help="longest wait for a batch to fill (default 2 ms)")
    p.add_argument("--batching", action="append", default=[], metavar="NAME=SIZE,WAIT_MS",
                   help="per-model batching, overriding the two flags above")
    p.add_argument("--threads", type=int, metavar="N",
                   help="OpenVINO and TF threads per replica (default: cores // replicas)")
    p.add_argument("--poll-seconds", type=float, default=1.0,
                   help="how often base paths are checked for new versions (default 1)")
    p.add_argument("--max-body-mb", type=float, default=64.0,
                   help="largest request body (default 64 MB)")
    p.add_argument("--runtime-env", metavar="JSON",
                   help="Ray runtime_env for the replicas, e.g. '{\"pip\": [\"fuseflow-0.1.0-"
                        "cp311-cp311-linux_x86_64.whl[serve]\"]}' to install fuseflow on a "
                        "cluster's nodes")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from fuseflow import serve

    if args.replicas < 1:
        raise errors.OptionError(f"--replicas must be >= 1, got {args.replicas}")
    batching = {}
    for spec in args.batching:
        name, _, values = spec.partition("=")
        try:
            size, wait = values.split(",")
            batching[name] = (int(size), float(wait))
        except ValueError:
            raise errors.OptionError(f"--batching {spec!r}: expected NAME=SIZE,WAIT_MS, e.g. "
                                     "resnet=16,5") from None
    models = tuple(serve.model_config(m, batching, (args.max_batch_size, args.batch_wait_ms))
                   for m in args.model)
    names = [m.name for m in models]
    if len(set(names)) != len(names) or set(batching) - set(names):
        raise errors.OptionError(f"--model names must be unique and --batching must name one "
                                 f"of them: models {names}, batching {sorted(batching)}")
    runtime_env = json.loads(args.runtime_env) if args.runtime_env else {}
    grpc_port = _grpc_port(args.grpc_port)
    serve.serve_forever(serve.ServeConfig(
        models, port=args.port, host=args.host, grpc_port=grpc_port, replicas=args.replicas,
        address=args.address,
        threads=args.threads, poll_seconds=args.poll_seconds,
        max_body_bytes=int(args.max_body_mb * (1 << 20)), runtime_env=runtime_env))
    return EXIT_OK


def _grpc_port(port: int | None) -> int:
    """--grpc-port: 8500 unless told otherwise, as TF Serving; without the
    tensorflow-serving-api protos, an error if asked for, else REST only (with a warning)."""
    from fuseflow.serve import grpcapi

    if port is not None and not 0 <= port < 65536:
        raise errors.OptionError(f"--grpc-port must be a port number, or 0 for no gRPC; "
                                 f"got {port}")
    if port == 0 or grpcapi.available():
        return grpcapi.DEFAULT_PORT if port is None else port
    if port is not None:
        raise errors.OptionError(f"--grpc-port needs TF Serving's protos: "
                                 f"{grpcapi.INSTALL_HINT} (or --grpc-port 0 for REST only)")
    print("fuseflow serve: tensorflow-serving-api is not installed: REST only, no gRPC on "
          f"port {grpcapi.DEFAULT_PORT} ({grpcapi.INSTALL_HINT} adds it)", file=sys.stderr)
    return 0


def _auto_multicore_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="COMPILED_DIR", help="a SavedModel written by fuseflow")
    p.add_argument("--num-cores", "--num_cores", type=int, required=True, metavar="N",
                   help="independent streams: N calls in flight run side by side")
    p.add_argument("--new-model-dir", "--new_model_dir", required=True, metavar="DIR",
                   help="where to write (must not exist)")
    p.set_defaults(run=run_auto_multicore)


def _compile_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the SavedModel to compile")
    p.add_argument("new_model_dir", metavar="NEW_MODEL_DIR", help="where to write (must not "
                   "exist)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="fills an unknown dim 0 of every input (default 1)")
    p.add_argument("--shape", action="append", metavar="NAME=D0,D1,...",
                   help="an input's shape, e.g. image=1,224,224,3 (repeat per input)")
    p.add_argument("--feed", action="append", metavar="FILE.npz",
                   help="real input values; the model is run once to measure every shape")
    p.add_argument("--tags", metavar="TAG[,TAG]", help="MetaGraphDef tag set (default serve)")
    p.add_argument("--signature-def-key", metavar="KEY",
                   help="signature to compile (default serving_default)")
    p.add_argument("--minimum-segment-size", type=int, metavar="N",
                   help="smallest segment worth compiling (default 2)")
    p.add_argument("--no-fuse-ops", action="append", metavar="NODE[,NODE]",
                   help="node names to keep in TensorFlow")
    p.add_argument("--force-fuse-ops", action="append", metavar="NODE[,NODE]",
                   help="node names to compile even if the backend would rather not")
    p.add_argument("--compiler-args", metavar="'FLAGS'",
                   help="compiler flags as one string: --compiler-args='--must-compile "
                        "--timeout 600' (note the =)")
    p.add_argument("--compiler-workdir", metavar="DIR",
                   help="keep each segment's graph.pb, executable and compile.log here")
    p.add_argument("--backend", choices=("auto", "openvino", "xla"),
                   help="default: auto on CPU (each segment on the backend that runs it "
                        "fastest, or TF), xla where a GPU is present")
    p.add_argument("--no-profile", action="store_true",
                   help="don't time segments against TF at compile time (faster compile; "
                        "backends are then chosen by op kind)")
    p.add_argument("--retime", action="store_true",
                   help="time segments again even where the compile cache holds their "
                        "timings from an earlier compile")
    p.add_argument("--quantize", choices=("int8", "none"),
                   help="int8: calibrated post-training quantization (OpenVINO, NNCF)")
    p.add_argument("--calibration-data", metavar="FILE.npz",
                   help="samples for --quantize int8 and the accuracy guard: one array per "
                        "input, N samples on axis 0 (default: the --feed values)")
    p.add_argument("--accuracy-tolerance", metavar="X|METRIC=X[,...]",
                   help="bound on the error below f32: a number (mean relative error) or "
                        "max=, mean=, top1= pairs")
    p.add_argument("--graph-html", metavar="FILE", help="also draw the compiled graph here")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(run=run_compile)


def _inspect_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="COMPILED_DIR", help="a SavedModel written by fuseflow")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--graph-html", metavar="FILE", help="also draw the graph here")
    p.add_argument("--run", action="store_true", dest="run_once",
                   help="also run the model once on random inputs (batch 1) and show which "
                        "path each fused op took: compiled, recompiled or TF fallback")
    p.set_defaults(run=run_inspect)


def _bench_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the original SavedModel")
    p.add_argument("compiled_dir", metavar="COMPILED_DIR", help="its compiled version")
    p.add_argument("--feed", action="append", metavar="FILE.npz",
                   help="input values (default: random, at --batch-size)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="batch of the random inputs (default 1)")
    p.add_argument("--runs", type=int, default=30, metavar="N", help="timed calls (default 30)")
    p.add_argument("--warmup", type=int, default=5, metavar="N",
                   help="untimed calls first (default 5)")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                   help="calls in flight for throughput (default: min(4, CPUs))")
    p.add_argument("--tags", metavar="TAG[,TAG]", help="MetaGraphDef tag set (default serve)")
    p.add_argument("--signature-def-key", metavar="KEY",
                   help="signature to time (default serving_default)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_bench)


def parse_shape(text: str) -> tuple[str, list[int]]:
    """'image=1,224,224,3' -> ('image', [1, 224, 224, 3]); names may hold ':' and '/'."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = [int(d) for d in dims.split(",")] if dims.strip() else []
    except ValueError:
        shape = None
    if not sep or not name or shape is None:
        raise errors.OptionError(f"--shape {text!r} is not NAME=D0,D1,...: write e.g. "
                                 "--shape image=1,224,224,3")
    return name, shape


def load_feeds(paths: list[str]) -> dict:
    """Merge .npz files into one {input name: array} dict."""
    import numpy as np

    feeds: dict = {}
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise errors.OptionError(f"--feed {path!r} is not a readable .npz file ({e}); "
                                     "write one with numpy.savez(path, input_name=array)") \
                from None
        twice = sorted(set(arrays) & set(feeds))
        if twice:
            raise errors.OptionError(f"--feed files give inputs {twice} more than once")
        feeds.update(arrays)
    return feeds


def _node_names(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [name.strip() for v in values for name in v.split(",") if name.strip()]


def run_compile(args) -> int:
    import fuseflow

    shapes = dict(parse_shape(s) for s in args.shape) if args.shape else None
    feeds = load_feeds(args.feed) if args.feed else None
    start = time.monotonic()
    result = fuseflow.saved_model.compile(
        args.model_dir, args.new_model_dir, batch_size=args.batch_size,
        model_shape_feed_dict=shapes, model_feed_dict=feeds, tags=args.tags,
        signature_def_key=args.signature_def_key,
        minimum_segment_size=args.minimum_segment_size,
        no_fuse_ops=_node_names(args.no_fuse_ops), compiler_args=_compiler_args(args),
        compiler_workdir=args.compiler_workdir, backend=args.backend,
        force_fuse_ops=_node_names(args.force_fuse_ops))
    if args.graph_html:
        _write_html(args.new_model_dir, args.graph_html)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        from fuseflow.report import summary_line

        print(f"wrote {args.new_model_dir} in {time.monotonic() - start:.1f} s: "
              f"{summary_line(result)}")
    return EXIT_OK


def _compiler_args(args) -> list[str]:
    """--compiler-args plus the compile flags the CLI also takes on its own."""
    flags = shlex.split(args.compiler_args) if args.compiler_args else []
    if args.no_profile:
        flags.append("--no-profile")
    if args.retime:
        flags.append("--retime")
    for flag, value in (("--quantize", args.quantize),
                        ("--calibration-data", args.calibration_data),
                        ("--accuracy-tolerance", args.accuracy_tolerance)):
        if value is not None:
            flags += [flag, value]
    return flags


def run_auto_multicore(args) -> int:
    from fuseflow.multicore import auto_multicore

    out = auto_multicore(args.model_dir, None, args.num_cores, new_model_dir=args.new_model_dir)
    print(f"wrote {out} ({args.num_cores} streams per segment)")
    return EXIT_OK


def run_inspect(args) -> int:
    from fuseflow.inspect_model import format_inspect, inspect_model

    info = inspect_model(args.model_dir)
    if args.run_once:
        info["run"] = _run_once(args.model_dir, info)
    if args.graph_html:
        _write_html(args.model_dir, args.graph_html)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return EXIT_OK


def _run_once(model_dir: str, info: dict) -> dict:
    """One call on random inputs; fuseflow.runtime_stats() of that call alone."""
    from fuseflow.runtime import runtime_stats, since

    fn = _load_signature(model_dir, ",".join(info["tags"]), info["signature"])
    feeds = _random_feeds(fn, 1)
    before = runtime_stats()
    _call(fn, feeds)
    return {"batch_size": _batch_of(feeds), **since(before)}


def _write_html(model_dir: str, path: str) -> None:
    from fuseflow.graph_html import write_graph_html

    logging.getLogger("fuseflow").info("graph picture: %s", write_graph_html(model_dir, path))


def run_bench(args) -> int:
    for name in ("runs", "threads", "batch_size"):
        if getattr(args, name) < 1:
            raise errors.OptionError(f"--{name.replace('_', '-')} must be at least 1")
    original = _load_signature(args.model_dir, args.tags, args.signature_def_key)
    compiled = _load_signature(args.compiled_dir, args.tags, args.signature_def_key)
    feeds = load_feeds(args.feed) if args.feed else _random_feeds(compiled, args.batch_size)
    result = {"batch_size": _batch_of(feeds), "runs": args.runs, "threads": args.threads}
    outputs = {}
    for label, fn in (("original", original), ("compiled", compiled)):
        outputs[label] = _call(fn, feeds)
        result[label] = _measure(fn, feeds, args)
    result["speedup"] = {
        "latency_p50": result["original"]["p50_ms"] / result["compiled"]["p50_ms"],
        "throughput": result["compiled"]["per_s"] / result["original"]["per_s"]}
    result["max_abs_diff"] = _max_abs_diff(outputs["original"], outputs["compiled"])
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return EXIT_OK


def _load_signature(model_dir: str, tags: str | None, key: str | None):
    """The signature as a callable (it keeps its loaded model alive)."""
    from fuseflow.load import read_saved_model_proto
    from fuseflow.tf_compat import tf

    read_saved_model_proto(model_dir)  # a missing or broken model fails with a clear error
    try:
        loaded = tf.saved_model.load(model_dir, tags=tags.split(",") if tags else None)
    except Exception as e:  # TF raises many types; all mean "cannot load"
        raise errors.ModelLoadError(f"TensorFlow cannot load {model_dir!r}: {_one_line(e)}") \
            from None
    keys = sorted(loaded.signatures)
    key = key or ("serving_default" if "serving_default" in keys else (keys or [None])[0])
    if key not in loaded.signatures:
        raise errors.SignatureError(f"{model_dir!r} has no signature {key!r}; it has {keys}: "
                                    "pass one as --signature-def-key")
    return loaded.signatures[key]


def _random_feeds(fn, batch_size: int) -> dict:
    """Inputs at the signature's shapes; integers are 0, a valid index for any embedding."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for name, spec in fn.structured_input_signature[1].items():
        shape = spec.shape.as_list() if spec.shape.rank is not None else None
        if shape and shape[0] is None:
            shape[0] = batch_size
        if shape is None or None in shape:
            raise errors.ShapeError(f"input {name!r} has shape {spec.shape}: random inputs need "
                                    "known dims; pass --feed inputs.npz")
        dtype = spec.dtype.as_numpy_dtype
        if spec.dtype.is_floating:
            feeds[name] = rng.random(shape).astype(dtype)
        elif spec.dtype == "string":
            feeds[name] = np.full(shape, b"x", dtype=object)
        else:
            feeds[name] = np.zeros(shape, dtype)
    return feeds


def _batch_of(feeds: dict) -> int:
    shapes = [v.shape for v in feeds.values() if getattr(v, "ndim", 0)]
    return int(shapes[0][0]) if shapes else 1


def _call(fn, feeds: dict) -> dict:
    try:
        return {k: v.numpy() for k, v in fn(**feeds).items()}
    except (TypeError, ValueError) as e:
        raise errors.ShapeError(f"the inputs do not fit the signature: {_one_line(e)}") \
            from None


def _measure(fn, feeds: dict, args) -> dict:
    """Latency one call at a time; throughput with args.threads calls in flight."""
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    for _ in range(args.warmup):
        _call(fn, feeds)
    samples = []
    for _ in range(args.runs):
        start = time.perf_counter()
        _call(fn, feeds)
        samples.append(1000 * (time.perf_counter() - start))
    samples.sort()
    start = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(lambda _: _call(fn, feeds), range(args.runs)))
    per_s = args.runs * _batch_of(feeds) / (time.perf_counter() - start)
    return {"p50_ms": statistics.median(samples),
            "p90_ms": samples[min(len(samples) - 1, int(0.9 * len(samples)))],
            "mean_ms": statistics.fmean(samples), "per_s": per_s}


def _max_abs_diff(a: dict, b: dict) -> dict:
    import numpy as np

    diff = {}
    for key in sorted(set(a) & set(b)):
        x, y = np.asarray(a[key]), np.asarray(b[key])
        numeric = x.shape == y.shape and x.dtype.kind in "fiub" and y.dtype.kind in "fiub"
        diff[key] = float(np.max(np.abs(x.astype(float) - y), initial=0.0)) if numeric \
            else None
    return diff


def format_bench(r: dict) -> str:
    o, c = r["original"], r["compiled"]
    rows = [["latency p50", f"{o['p50_ms']:.2f} ms", f"{c['p50_ms']:.2f} ms",
             f"{r['speedup']['latency_p50']:.2f}x"],
            ["latency p90", f"{o['p90_ms']:.2f} ms", f"{c['p90_ms']:.2f} ms", ""],
            ["throughput", f"{o['per_s']:.1f} /s", f"{c['per_s']:.1f} /s",
             f"{r['speedup']['throughput']:.2f}x"]]
    from fuseflow.report import format_table

    diffs = ", ".join(f"{k} {'n/a' if v is None else f'{v:.2e}'}"
                      for k, v in r["max_abs_diff"].items())
    return (f"batch {r['batch_size']}, {r['runs']} timed calls, throughput with "
            f"{r['threads']} in flight\n"
            + format_table(["", "original", "compiled", "speed-up"], rows, right={1, 2, 3})
            + f"\nmax abs difference of outputs: {diffs}")


class _Formatter(logging.Formatter):
    """Plain lines; warnings and errors say so, since they are what a reader must not miss."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


@contextlib.contextmanager
def _logging(args) -> Iterator[None]:
    """fuseflow's lines on stderr while the command runs; the loggers as they were after
    (main() may be called from Python, as tests and scripts do)."""
    from fuseflow import progress

    log, tf_log = logging.getLogger("fuseflow"), logging.getLogger("tensorflow")
    saved = log.level, log.propagate, tf_log.level
    handler = progress.enable(sys.stderr)
    handler.setFormatter(_Formatter())
    log.addHandler(handler)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    log.propagate = False
    if not args.debug:
        tf_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        progress.disable()
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        tf_log.setLevel(saved[2])


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with _logging(args):
        return _run(args)


def _run(args) -> int:
    try:
        return args.run(args)
    except errors.FuseflowError as e:
        if args.debug:
            raise
        print(f"fuseflow: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("fuseflow: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `fuseflow inspect --json | head`: the reader has enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except Exception as e:  # a bug in fuseflow, not the user's input
        if args.debug:
            raise
        print(f"fuseflow: internal error: {type(e).__name__}: {_one_line(e)} (run again with "
              "--debug for the traceback, and report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
