"""Run a SavedModel through TF's C++ loader (as TF Serving would) from tests."""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "tests" / "cpp" / "run_saved_model.cc"
BUILD_DIR = REPO / ".build"
BINARY = BUILD_DIR / "run_saved_model"
TIMEOUT_S = 300


def _compile_command(output: Path) -> list[str]:
    import tensorflow as tf

    lib = tf.sysconfig.get_lib()
    return [
        shutil.which("g++") or "g++",
        str(SOURCE),
        "-o",
        str(output),
        *tf.sysconfig.get_compile_flags(),
        f"-L{lib}",
        # Without --no-as-needed the linker drops libtensorflow_cc, whose static
        # initializers register the session factory ("No session factory registered").
        "-Wl,--no-as-needed",
        "-l:libtensorflow_cc.so.2",
        "-l:libtensorflow_framework.so.2",
        f"-Wl,-rpath,{lib}",
    ]


def build_runner() -> Path:
    """Compile the runner once; the stamp (source + command hash) skips rebuilds."""
    BUILD_DIR.mkdir(exist_ok=True)
    command = _compile_command(BINARY)
    digest = hashlib.sha256(SOURCE.read_bytes() + "\0".join(command).encode()).hexdigest()
    stamp = BUILD_DIR / "run_saved_model.stamp"
    # The lock keeps parallel test processes from compiling the same thing twice.
    with open(BUILD_DIR / "run_saved_model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if BINARY.exists() and stamp.exists() and stamp.read_text() == digest:
            return BINARY
        tmp = BINARY.with_name(f"{BINARY.name}.tmp{os.getpid()}")
        result = subprocess.run(_compile_command(tmp), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise AssertionError(f"compiling {SOURCE.name} failed:\n{result.stderr}")
        tmp.replace(BINARY)
        stamp.write_text(digest)
    return BINARY


def run_saved_model_cpp(
    model_dir,
    feeds: dict[str, np.ndarray],
    signature: str = "serving_default",
    tags=("serve",),
    op_libs=(),
    with_stats=False,
):
    """Run one signature with tensorflow::LoadSavedModel; returns outputs by key, and
    with_stats also fuseflow's runtime stats of that process (needs fuseflow's op
    library in op_libs)."""
    binary = build_runner()
    with tempfile.TemporaryDirectory(prefix="run_saved_model_") as tmp:
        tmp = Path(tmp)
        out_dir = tmp / "out"
        out_dir.mkdir()
        args = [
            str(binary),
            "--model",
            str(model_dir),
            "--tags",
            ",".join(tags),
            "--signature",
            signature,
            "--out-dir",
            str(out_dir),
        ]
        for lib in op_libs:
            args += ["--op-lib", str(lib)]
        for i, (key, value) in enumerate(feeds.items()):
            path = tmp / f"in{i}.npy"
            np.save(path, np.asarray(value, order="C"))
            args += ["--in", f"{key}={path}"]
        # Hide TF's INFO logging so a failure message shows the real error.
        env = {"TF_CPP_MIN_LOG_LEVEL": "1", **os.environ}
        try:
            result = subprocess.run(
                args, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"run_saved_model timed out after {TIMEOUT_S} s") from e
        if result.returncode != 0:
            raise AssertionError(
                f"run_saved_model failed (exit {result.returncode}):\n{result.stderr}"
            )
        outputs = {p.stem: np.load(p) for p in out_dir.glob("*.npy")}
        if not with_stats:
            return outputs
        stats_file = out_dir / "runtime_stats.json"
        assert stats_file.exists(), f"no runtime stats from the op libraries {op_libs}"
        return outputs, json.loads(stats_file.read_text())
