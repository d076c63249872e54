"""The reference's own tutorial scripts, with `import fuseflow as tfn`, run as scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

TUTORIALS = Path(__file__).parent / "tutorials"


@pytest.mark.parametrize("script, expect", [
    # ResNet50 at 224x224 takes minutes on 2 cores: make test-all runs it.
    pytest.param("resnet50_compile.py", "resnet50 ok", marks=pytest.mark.slow),
    ("keras_trace.py", "trace ok"),
    ("simple_save.py", "simple_save ok"),
])
def test_tutorial_runs_unchanged(tmp_path, script, expect):
    proc = subprocess.run([sys.executable, str(TUTORIALS / script)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO),
                               # the OpenVINO path even where a GPU makes XLA the default
                               "FUSEFLOW_CC_FLAGS": "--backend openvino --no-profile"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert expect in proc.stdout
    assert "Number of operations placed on" in proc.stderr  # the lines users know
