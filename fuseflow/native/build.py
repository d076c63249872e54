"""Compile the FuseflowOp library (`_fuseflow_op.so`) against the installed TF and OpenVINO wheels.

The build is skipped when the stamp file next to the library records the same hash of
(sources, compiler command, TF version, OpenVINO version). Two processes may build at once:
a lock serializes them, and each writes a temp file that is renamed into place, so a reader
never sees a half-written library.

Run as `python -m fuseflow.native.build [--force]`.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

NATIVE_DIR = Path(__file__).resolve().parent
LIBRARY = NATIVE_DIR / "_fuseflow_op.so"
STAMP = NATIVE_DIR / "_fuseflow_op.stamp"
LOCK = NATIVE_DIR / "_fuseflow_op.lock"
SOURCES = ("fuseflow_op.cc", "openvino_model.cc", "runtime_stats.cc")
HEADERS = ("openvino_model.h", "runtime_stats.h")
STDERR_TAIL_CHARS = 4000


class BuildError(RuntimeError):
    """g++ failed; the message ends with the tail of its stderr."""


def _openvino_dir() -> Path:
    # find_spec locates the wheel without importing it (and its plugins).
    spec = importlib.util.find_spec("openvino")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("the openvino package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _openvino_library(libs: Path) -> str:
    # The wheel has only the versioned name (libopenvino.so.2641), no libopenvino.so.
    found = sorted(glob.glob(str(libs / "libopenvino.so.*")))
    if not found:
        raise BuildError(f"no libopenvino.so.* in {libs}")
    return Path(found[0]).name


def _tf_flags() -> tuple[list[str], list[str], str]:
    try:
        from fuseflow.tf_compat import tf
    except ImportError:  # loaded by setup.py, where fuseflow itself is not importable
        import tensorflow as tf

    return tf.sysconfig.get_compile_flags(), tf.sysconfig.get_link_flags(), tf.__version__


def _command() -> tuple[list[str], str]:
    """The g++ command line, less its `-o`, and the versions it depends on."""
    compile_flags, link_flags, tf_version = _tf_flags()
    tf_lib = next(flag[2:] for flag in link_flags if flag.startswith("-L"))
    ov_dir = _openvino_dir()
    ov_libs = ov_dir / "libs"
    command = [
        shutil.which("g++") or "g++",
        "-O2",
        "-fPIC",
        "-shared",
        *compile_flags,
        "-std=c++17",  # after TF's flags so it wins
        "-Wno-deprecated-declarations",  # TF's headers: they would bury real errors
        f"-I{ov_dir / 'include'}",
        *(str(NATIVE_DIR / source) for source in SOURCES),
        *link_flags,
        # XLA's activity listener (per-cluster compilations) lives in the C++ API library.
        "-l:libtensorflow_cc.so.2",
        f"-L{ov_libs}",
        f"-l:{_openvino_library(ov_libs)}",
        f"-Wl,-rpath,{tf_lib}",
        f"-Wl,-rpath,{ov_libs}",
        # Where TF and OpenVINO sit beside an installed fuseflow (a wheel built elsewhere).
        "-Wl,-rpath,$ORIGIN/../../tensorflow",
        "-Wl,-rpath,$ORIGIN/../../openvino/libs",
    ]
    versions = f"tf={tf_version};openvino={importlib.metadata.version('openvino')}"
    return command, versions


def _digest(command: list[str], versions: str) -> str:
    """Sources, flags and versions, but not where TF and OpenVINO are installed: a wheel
    built in pip's isolated environment stays valid in the user's one."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + b"\0" + (NATIVE_DIR / name).read_bytes() + b"\0")
    site = str(_openvino_dir().parent)
    # NATIVE_DIR first: an installed fuseflow sits inside that same site-packages
    portable = [arg.replace(str(NATIVE_DIR), "<native>").replace(site, "<site>")
                for arg in command]
    digest.update("\0".join(portable).encode())
    digest.update(versions.encode())
    return digest.hexdigest()


def _up_to_date(digest: str) -> bool:
    return LIBRARY.exists() and STAMP.exists() and STAMP.read_text().strip() == digest


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _build_locked(command: list[str], digest: str, force: bool) -> None:
    """Compile into a temp file and rename it into place, one process at a time."""
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _up_to_date(digest):  # another process built it meanwhile
            return
        fd, tmp = tempfile.mkstemp(dir=NATIVE_DIR, prefix="_fuseflow_op.", suffix=".so")
        os.close(fd)
        try:
            result = subprocess.run(
                [*command, "-o", tmp], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                raise BuildError(
                    f"g++ failed (exit {result.returncode}) building {LIBRARY.name}:\n"
                    f"{result.stderr[-STDERR_TAIL_CHARS:]}"
                )
            os.chmod(tmp, 0o755)  # mkstemp made it private
            # Library before stamp: whoever sees the new stamp finds the new library.
            os.replace(tmp, LIBRARY)
            _write_atomically(STAMP, digest.encode())
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def build(force: bool = False) -> Path:
    """Compile `_fuseflow_op.so` unless an up-to-date one exists; return its path."""
    command, versions = _command()
    digest = _digest(command, versions)
    if not force and _up_to_date(digest):
        return LIBRARY
    try:
        _build_locked(command, digest, force)
    except OSError as e:  # e.g. a read-only install directory
        raise BuildError(f"cannot build {LIBRARY}: {e}") from e
    return LIBRARY


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(build(force="--force" in args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
