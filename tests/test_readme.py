"""Every python and sh block of README.md runs exactly as printed, in order, in one temp dir.

A block is skipped only when the line before its fence is an HTML comment
starting with `<!-- not-run` (which says why). Blocks with another language
tag, or none, are output examples and are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def readme_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, code, line number) of each python/sh block not marked not-run."""
    blocks = []
    for m in _FENCE.finditer(text):
        lang, code = m.group(1), m.group(2)
        if lang not in ("python", "sh"):
            continue
        before = text[:m.start()].rstrip("\n").splitlines()
        if before and before[-1].strip().startswith("<!-- not-run"):
            continue
        blocks.append((lang, code, text[:m.start()].count("\n") + 1))
    return blocks


def test_extractor_honours_the_marker():
    text = ("```python\nprint(1)\n```\n<!-- not-run: slow -->\n```sh\nmake demo\n```\n"
            "```\noutput\n```\n```sh\necho hi\n```\n")
    assert [(lang, code) for lang, code, _ in readme_blocks(text)] == [
        ("python", "print(1)\n"), ("sh", "echo hi\n")]


def test_readme_runs_as_written(tmp_path):
    blocks = readme_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 4
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for k, (lang, code, line) in enumerate(blocks):
        script = tmp_path / f"block_{k}.{'py' if lang == 'python' else 'sh'}"
        script.write_text(code)
        command = [sys.executable, str(script)] if lang == "python" else \
            ["bash", "-e", "-o", "pipefail", str(script)]
        proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                              timeout=1200, env=env)
        assert proc.returncode == 0, (f"README.md line {line} ({lang} block) failed:\n"
                                      f"{code}\n--- stderr:\n{proc.stderr[-4000:]}")
