"""The command line, run as users run it: a subprocess of the installed `fuseflow` script."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, assert_ran, fused_segments, save_tf1, tf

from fuseflow import cli, progress


def _command() -> list[str]:
    script = Path(sys.executable).parent / "fuseflow"  # what `pip install` puts on PATH
    return [str(script)] if script.exists() else [sys.executable, "-m", "fuseflow.cli"]


def fuseflow(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(_command() + [str(a) for a in args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, **kwargs)


def _string_in_the_middle():
    x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
    text = tf.strings.as_string(tf.nn.relu(x * 2.0 + 1.0))
    return {"x": x}, {"y": tf.tanh(tf.strings.to_number(text) * 3.0) + 1.0}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """`fuseflow compile` with most options, run once; its outputs are checked below."""
    root = tmp_path_factory.mktemp("cli")
    save_tf1(root / "m", _string_in_the_middle)
    proc = fuseflow("compile", root / "m", root / "c", "--backend", "xla", "--shape", "x=2,8",
                    "--tags", "serve", "--signature-def-key", "serving_default",
                    "--minimum-segment-size", "2", "--compiler-args=--timeout 300",
                    "--compiler-workdir", root / "work", "--graph-html", root / "g.html",
                    "--json")
    return root, proc


def test_compile_prints_json_and_logs_the_report(compiled):
    root, proc = compiled
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["num_segments"] == 2 and result["backend"] == "xla"
    assert "Segments:" in proc.stderr and "Left in TensorFlow:" in proc.stderr
    assert "operates on strings" in proc.stderr
    assert "\x1b[K" not in proc.stderr  # not a terminal: plain log lines, no bar
    assert "compiled fuseflow_segment_1" in proc.stderr
    report = json.loads((root / "c/assets.extra/fuseflow_report.json").read_text())
    assert report["segments"][0]["inputs"][0]["shape"] == [2, 8]
    assert (root / "work/fuseflow_segment_0/compile.log").exists()
    assert "<svg" in (root / "g.html").read_text()


def test_inspect_prints_the_same_tables_and_json(compiled):
    root, _ = compiled
    text = fuseflow("inspect", root / "c")
    assert text.returncode == 0, text.stderr
    assert "fuseflow_segment_1" in text.stdout and "AsString" in text.stdout
    assert "load needs" in text.stdout
    as_json = fuseflow("inspect", root / "c", "--json", "--graph-html", root / "i.html")
    info = json.loads(as_json.stdout)
    report = json.loads((root / "c/assets.extra/fuseflow_report.json").read_text())
    assert info["segments"] == report["segments"]
    assert info["runtime"]["backend"] == "xla"
    assert (root / "i.html").stat().st_size > 1000


def test_inspect_run_shows_the_path_each_segment_took(compiled):
    root, _ = compiled
    proc = fuseflow("inspect", root / "c", "--run", "--json")
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)["run"]
    assert_ran(run, "xla", fused_segments(root / "c"))
    text = fuseflow("inspect", root / "c", "--run")
    assert text.returncode == 0, text.stderr
    assert "one call on random inputs" in text.stdout
    assert re.search(r"XLA: \d+ compilations, \d+ launches; clusters compiled: "
                     r".*fuseflow_segment_0", text.stdout), text.stdout


def test_bench_compares_both_models_on_the_same_inputs(compiled):
    root, _ = compiled
    proc = fuseflow("bench", root / "m", root / "c", "--runs", 3, "--warmup", 1,
                    "--batch-size", 2, "--threads", 2)
    assert proc.returncode == 0, proc.stderr
    for word in ("original", "compiled", "latency p50", "throughput", "max abs difference"):
        assert word in proc.stdout
    result = json.loads(fuseflow("bench", root / "m", root / "c", "--runs", 2, "--json").stdout)
    assert result["batch_size"] == 1 and result["compiled"]["p50_ms"] > 0
    assert result["max_abs_diff"]["y"] < 1e-4


def _unknown_shape():
    x = tf.compat.v1.placeholder(tf.float32, [1, 8], name="x")
    picked = tf.boolean_mask(x, x > 0.3)
    y = tf.tanh(tf.nn.relu(picked) * 3.0 + 1.0)
    return {"x": x}, {"y": tf.reduce_sum(tf.sigmoid(y) * 2.0 - y)}


def test_feed_from_npz_measures_unknown_shapes(tmp_path):
    save_tf1(tmp_path / "m", _unknown_shape)
    np.savez(tmp_path / "inputs.npz", x=np.linspace(-1, 1, 8, dtype=np.float32)[None])
    proc = fuseflow("compile", tmp_path / "m", tmp_path / "c", "--backend", "xla",
                    "--feed", tmp_path / "inputs.npz", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["OnNeuronRatio"] > 0.5


def _bad_inputs(tmp_path) -> dict[str, list]:
    model = tmp_path / "m"
    save_tf1(model, _string_in_the_middle)
    (tmp_path / "taken").mkdir()
    return {
        "missing model": ["compile", tmp_path / "nope", tmp_path / "out"],
        "output exists": ["compile", model, tmp_path / "taken"],
        "bad shape": ["compile", model, tmp_path / "out", "--shape", "x=1,eight"],
        "missing feed": ["compile", model, tmp_path / "out", "--feed", tmp_path / "no.npz"],
        "bad compiler flag": ["compile", model, tmp_path / "out", "--compiler-args=--fast"],
        "inspect missing": ["inspect", tmp_path / "nope"],
    }


def test_bad_input_is_one_line_and_exit_1(tmp_path):
    for what, args in _bad_inputs(tmp_path).items():
        proc = fuseflow(*args)
        assert proc.returncode == cli.EXIT_BAD_INPUT, (what, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fuseflow: error: "), (what, lines)
        assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = fuseflow("inspect", tmp_path / "nope", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "ModelLoadError" in proc.stderr


def _two_segment_model():
    x = tf.compat.v1.placeholder(tf.float32, [1, 8], name="x")
    hist = tf.histogram_fixed_width(tf.nn.relu(x * 2.0), [0.0, 3.0], nbins=8)
    return {"x": x}, {"y": tf.tanh(tf.cast(hist, tf.float32) * 0.5) + 1.0}


def test_progress_bar_on_a_terminal(tmp_path):
    save_tf1(tmp_path / "m", _two_segment_model)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(_command() + ["compile", str(tmp_path / "m"), str(tmp_path / "c"),
                                          "--backend", "xla"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=600) == 0, seen.decode(errors="replace")[-2000:]
    text = seen.decode(errors="replace")
    assert "compiling [" in text and "] 2/2 " in text and "\x1b[K" in text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_only_on_a_terminal():
    handler = progress.enable(io.StringIO())
    progress.update(1, 3, "seg")  # not a terminal: nothing drawn
    assert handler.stream.getvalue() == ""
    terminal = _Terminal()
    progress.enable(terminal)
    try:
        progress.update(0, 3, "")
        progress.update(3, 3, "seg_2")
    finally:
        progress.disable()
    assert "3/3" in terminal.getvalue() and terminal.getvalue().endswith("\n")


def test_help_teaches_by_example(capsys):
    for args in (["--help"], ["compile", "--help"], ["inspect", "--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(args)
        assert exit_info.value.code == 0
        assert "examples:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compile"])  # missing MODEL_DIR: a usage error
    assert exit_info.value.code == 2


def test_shape_and_name_options_parse():
    assert cli.parse_shape("input_ids:0=4,128") == ("input_ids:0", [4, 128])
    assert cli.parse_shape("scalar=") == ("scalar", [])
    with pytest.raises(cli.errors.OptionError, match="NAME=D0,D1"):
        cli.parse_shape("1,224,224,3")
    assert cli._node_names(["a,b", " c "]) == ["a", "b", "c"]


def test_main_called_from_python_leaves_the_loggers_as_they_were(caplog):
    """A script or test calling cli.main() keeps its logging: fuseflow's records still reach
    the root logger's handlers afterwards (they didn't: caplog saw nothing after a CLI call)."""
    log = logging.getLogger("fuseflow")
    before = log.level, log.propagate, list(log.handlers)
    with pytest.raises(SystemExit):
        cli.main(["compile"])  # argparse exits before any logging is set up
    assert cli.main(["inspect", "/does/not/exist"]) == cli.EXIT_BAD_INPUT
    assert (log.level, log.propagate, list(log.handlers)) == before
    with caplog.at_level("WARNING", logger="fuseflow"):
        log.warning("still seen")
    assert [r.getMessage() for r in caplog.records] == ["still seen"]
