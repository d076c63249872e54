"""XLA segments start warm: compiled executables shipped in the SavedModel's assets.

TF has no ahead-of-time path for a `_XlaMustCompile` call: XLA compiles each cluster at
its first call, in every new process. TF's persistent XLA cache
(TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=DIR) writes each executable it
builds to DIR as `{prefix}__{signature}__{hlo hash}__XLA_CPU_JIT.pb` and, in a later
process, loads it instead of building it when the signature and the HLO match exactly.

- Compile: the written model is run once in a fresh process (the whole-model timing
  process, or one of its own with --no-profile) with the cache pointed at a staging
  dir, through both Python loaders (TF2's renames the functions, so its entries differ
  from the TF1 session's, which the C++ loader shares); the entries go to
  assets/fuseflow-xla-cache/.
- `import fuseflow` points TF_XLA_FLAGS at a per-user directory ($FUSEFLOW_CACHE_DIR
  or ~/.cache/fuseflow, then xla/) with a prefix naming this CPU (its model name and
  flags) and TF's version, unless the user chose a cache directory of their own. TF
  reads TF_XLA_FLAGS once, lazily, at the first XLA use: importing fuseflow after
  tensorflow is fine, after running XLA is too late.
- Load: TF's loaders, wrapped here, copy the model's entries with the process's prefix
  into its cache directory before any call. An executable is machine code for one CPU:
  on another CPU (or TF version) the prefix differs, nothing is copied, and XLA
  compiles at the first call as before (and keeps the result for the next process).

A process without fuseflow (TF Serving) gets the same by setting TF_XLA_FLAGS itself:
see `serving_flags` and the README.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("fuseflow")

ASSETS_DIR = "fuseflow-xla-cache"  # under the SavedModel's assets/
TF_DEFAULT_PREFIX = "xla_compile_cache"
_MARK = "FUSEFLOW_XLA_FLAGS"  # env: what fuseflow appended to TF_XLA_FLAGS (children redo it)
_FLAG = "--tf_xla_persistent_cache_"
# CPU only: the prefix names a CPU, not a GPU. TF matches the device type ("CPU") on its
# classic XLA path and the compilation type ("XLA_CPU_JIT") on its PJRT one.
_DEVICE_TYPES = "CPU,XLA_CPU_JIT"


def cache_directory() -> Path:
    from fuseflow.cache import cache_dir

    return cache_dir() / "xla"


@functools.cache
def cpu_prefix() -> str:
    """The cache prefix of executables built here: this CPU's model name and feature flags
    and TF's version (an entry's format and code follow both)."""
    from fuseflow.cache import _cpu_flags, _version

    key = f"{_cpu_flags()} tf {_version('tensorflow')}"
    return f"fuseflow_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def serving_flags(directory, prefix: str | None = None, read_only: bool = False) -> str:
    """The TF_XLA_FLAGS that make a process use the cache at `directory` (a model's
    assets/fuseflow-xla-cache for a server without fuseflow; read_only then)."""
    flags = [f"{_FLAG}directory={directory}", f"{_FLAG}prefix={prefix or cpu_prefix()}",
             f"{_FLAG}device_types={_DEVICE_TYPES}"]
    if read_only:
        flags.append(f"{_FLAG}read_only=true")
    return " ".join(flags)


def _flag(flags: str, name: str) -> str | None:
    found = re.findall(rf"{_FLAG}{name}=(\S*)", flags)
    return found[-1] if found else None


def _user_flags() -> str:
    """TF_XLA_FLAGS less what a parent fuseflow process appended to it."""
    flags = os.environ.get("TF_XLA_FLAGS", "")
    ours = os.environ.get(_MARK)
    if ours and flags.endswith(ours):
        flags = flags[:-len(ours)].rstrip()
    return flags


def configure_process() -> None:
    """Point TF's persistent XLA cache at the per-user directory, after the user's own
    TF_XLA_FLAGS; a user's cache directory is theirs: left alone."""
    flags = _user_flags()
    os.environ.pop(_MARK, None)
    directory = str(cache_directory())
    if _flag(flags, "directory") is not None or re.search(r"\s", directory):
        os.environ["TF_XLA_FLAGS"] = flags  # a path with spaces: TF splits flags on them
        if not flags:
            del os.environ["TF_XLA_FLAGS"]
        return
    ours = f"{_FLAG}directory={directory}"
    if _flag(flags, "prefix") is None:
        ours += f" {_FLAG}prefix={cpu_prefix()}"
    if _flag(flags, "device_types") is None:
        ours += f" {_FLAG}device_types={_DEVICE_TYPES}"
    os.environ["TF_XLA_FLAGS"] = f"{flags} {ours}".strip()
    os.environ[_MARK] = ours


def trim(directory: Path, limit_bytes: int | None = None) -> int:
    """Delete the oldest executables while the per-user cache holds more than the limit
    ($FUSEFLOW_XLA_CACHE_MB, default 2048): every XLA compile in a process that imported
    fuseflow lands there. Run where entries are added on purpose (install, and compile()
    after its fill run), not at import. How many were deleted; never raises."""
    if limit_bytes is None:
        try:
            limit_bytes = int(os.environ.get("FUSEFLOW_XLA_CACHE_MB", "2048")) << 20
        except ValueError:
            limit_bytes = 2048 << 20
    try:
        entries = [(e.stat(), e) for e in directory.glob("*.pb")]
    except OSError:
        return 0
    total = sum(st.st_size for st, _ in entries)
    deleted = 0
    for st, entry in sorted(entries, key=lambda item: item[0].st_mtime):
        if total <= limit_bytes:
            break
        try:
            entry.unlink()
        except OSError:
            continue
        total -= st.st_size
        deleted += 1
    return deleted


def fill_env(staging: Path) -> dict[str, str]:
    """The environment of a process whose XLA executables go to `staging`, under this
    CPU's prefix (whatever cache the user chose for themselves)."""
    flags = " ".join(f for f in _user_flags().split() if not f.startswith(_FLAG))
    env = {k: v for k, v in os.environ.items() if k != _MARK}
    env["TF_XLA_FLAGS"] = f"{flags} {serving_flags(staging)}".strip()
    return env


def ship(staging: Path, model_dir: Path) -> list[str]:
    """Copy the executables built under this CPU's prefix into the model's assets; their
    file names."""
    entries = sorted(staging.glob(f"{cpu_prefix()}__*.pb")) if staging.is_dir() else []
    if not entries:
        return []
    target = Path(model_dir) / "assets" / ASSETS_DIR
    target.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        shutil.copyfile(entry, target / entry.name)
    return [e.name for e in entries]


def entries_key(graph_def, serving) -> str:
    """The compile cache's key of the executables a written graph ships: TF names them by
    the graph's functions and their HLO, so the same graph bytes, served at the same
    shapes, on this CPU and TF (the prefix) give the same entries."""
    from fuseflow.cache import timing_key

    digest = hashlib.sha256(graph_def.SerializeToString(deterministic=True)).hexdigest()
    return timing_key("xla cache entries", digest, serving, cpu_prefix())


def reuse(cache, key: str, model_dir: Path) -> list[str]:
    """The entries an earlier compile of the same graph shipped (cache: a CompileCache),
    copied into the model's assets; their names ([] when none is stored)."""
    stored = cache.lookup(key)
    if stored is None or not stored.files:
        return []
    target = Path(model_dir) / "assets" / ASSETS_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name, data in stored.files.items():
        (target / Path(name).name).write_bytes(data)
    return sorted(stored.files)


def remember(cache, key: str, model_dir: Path, names: list[str]) -> None:
    """Keep the shipped entries in the compile cache, for reuse()."""
    from fuseflow.backends.base import Artifact

    folder = Path(model_dir) / "assets" / ASSETS_DIR
    cache.store(key, Artifact(b"", "XLA executables shipped in a model's assets",
                              {name: (folder / name).read_bytes() for name in names}))


def install(model_dir) -> int:
    """Copy the model's shipped executables that this process's cache would look up (its
    prefix) into its cache directory; how many were copied. Never fails a load."""
    source = Path(os.fspath(model_dir)) / "assets" / ASSETS_DIR
    flags = os.environ.get("TF_XLA_FLAGS", "")
    directory = _flag(flags, "directory")
    read_only = re.findall(rf"{_FLAG}read_only(?:=(\S*))?(?:\s|$)", flags)
    if not directory or (read_only and read_only[-1].lower() in ("", "true", "1")) \
            or not source.is_dir():
        return 0
    prefix = _flag(flags, "prefix") or TF_DEFAULT_PREFIX
    copied = 0
    try:
        entries = [e for e in source.glob(f"{prefix}__*.pb")
                   if not (Path(directory) / e.name).exists()]
        if entries:
            Path(directory).mkdir(parents=True, exist_ok=True)
        for entry in entries:
            # Renamed into place: a process compiling meanwhile never reads half a file.
            with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as f:
                f.write(entry.read_bytes())
            os.replace(f.name, Path(directory) / entry.name)
            copied += 1
    except OSError as e:  # a cold start, not a failed load
        log.info("XLA executables of %s not installed in %s: %s", source.parent.parent,
                 directory, e)
    if copied:
        trim(Path(directory))
    return copied


def hook_loaders() -> None:
    """TF's SavedModel loaders (TF1 loader.load, tf.saved_model.load of a TF1 model) install
    the model's executables before they build anything that could call XLA."""
    try:
        from tensorflow.python.saved_model import loader_impl
    except ImportError:  # another TF layout: models still load, cold
        return
    cls = loader_impl.SavedModelLoader
    original = cls.__init__
    if getattr(original, "_fuseflow_xla_cache", False):
        return

    @functools.wraps(original)
    def init(self, export_dir, *args, **kwargs):
        original(self, export_dir, *args, **kwargs)
        install(export_dir)

    init._fuseflow_xla_cache = True
    cls.__init__ = init


def has_xla_segments(graph_def) -> bool:
    nodes = [*graph_def.node, *(n for f in graph_def.library.function for n in f.node_def)]
    return any(n.attr["_XlaMustCompile"].b for n in nodes
               if n.op in ("PartitionedCall", "StatefulPartitionedCall"))


__all__ = ["ASSETS_DIR", "cache_directory", "cpu_prefix", "serving_flags",
           "configure_process", "fill_env", "ship", "install", "hook_loaders", "trim",
           "has_xla_segments"]
