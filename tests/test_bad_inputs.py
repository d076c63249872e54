"""Bad-input catalog: every way a user can get compile() wrong fails cleanly.

Each case makes one bad input from a small valid TF1 model and checks that
compile() raises the right `fuseflow.errors` class with a message that names
the problem, that the input's bytes are unchanged, and that nothing (output,
hidden staging sibling, workdir, temp dir) is left behind.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tf1, tf

import fuseflow
from fuseflow import errors

XLA = ["--backend", "xla"]  # the OpenVINO backend is not needed to reach any of these errors


def _build():
    x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
    z = tf.compat.v1.placeholder(tf.float32, [None, 3], name="z")
    w = tf.compat.v1.get_variable("w", [4, 3])
    h = tf.nn.relu(tf.matmul(x, w), name="h")
    return {"x": x, "z": z}, {"y": tf.sigmoid(h * 2.0 + z, name="y")}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Built once: saving a TF model costs far more than copying one."""
    return save_tf1(tmp_path_factory.mktemp("pristine") / "model", _build)


@dataclass
class Setup:
    """Where one case's compile() reads and writes; make() may change any of it."""

    tmp: Path
    model: Path
    out: Path
    workdir: Path
    kwargs: dict = field(default_factory=dict)


# ---- ways to spoil a model --------------------------------------------------------------


def _edit_meta_graph(model: Path, edit: Callable) -> None:
    """Rewrite saved_model.pb with edit(meta_graph) applied: a real SavedModel whose
    proto holds the defect, as a buggy exporter would write it."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((model / "saved_model.pb").read_bytes())
    edit(proto.meta_graphs[0])
    (model / "saved_model.pb").write_bytes(proto.SerializeToString())


def _node(meta_graph, name: str):
    return next(n for n in meta_graph.graph_def.node if n.name == name)


def graph_edit(edit: Callable) -> Callable[[Setup], None]:
    return lambda s: _edit_meta_graph(s.model, edit)


def _cycle(mg):
    _node(mg, "MatMul").input[0] = "y"  # x @ w now reads y, which depends on MatMul


def _dangling(mg):
    _node(mg, "mul").input[0] = "no_such_node"


def _bad_output_index(mg):
    _node(mg, "mul").input[0] = "h:3"  # Relu has one output


def _duplicate(mg):
    _node(mg, "mul").name = "h"


def _unknown_op(mg):
    _node(mg, "h").op = "FuseflowNoSuchOp"


def _missing_attr(mg):
    del _node(mg, "h").attr["T"]


def _unknown_dims(mg):
    """x declared [?, ?]: batch_size alone cannot fix its shape."""
    mg.signature_def["serving_default"].inputs["x"].tensor_shape.dim[1].size = -1
    _node(mg, "x").attr["shape"].shape.dim[1].size = -1


def _unknown_rank(mg):
    mg.signature_def["serving_default"].inputs["x"].tensor_shape.unknown_rank = True
    del mg.signature_def["serving_default"].inputs["x"].tensor_shape.dim[:]


def _no_outputs(mg):
    mg.signature_def["serving_default"].outputs.clear()


def _no_signatures(mg):
    mg.signature_def.clear()


def _output_not_in_graph(mg):
    mg.signature_def["serving_default"].outputs["y"].name = "ghost:0"


def _sparse_input(mg):
    info = mg.signature_def["serving_default"].inputs["x"]
    info.ClearField("name")
    info.coo_sparse.values_tensor_name = "x:0"


def _no_meta_graphs(s: Setup) -> None:
    from tensorflow.core.protobuf import saved_model_pb2

    (s.model / "saved_model.pb").write_bytes(
        saved_model_pb2.SavedModel(saved_model_schema_version=1).SerializeToString())


def _corrupt_pb(s: Setup) -> None:
    (s.model / "saved_model.pb").write_bytes(b"\xff\xfe this is not a protocol buffer " * 20)


def _truncate_pb(s: Setup) -> None:
    pb = s.model / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[: pb.stat().st_size // 2])


def _empty_pb(s: Setup) -> None:
    (s.model / "saved_model.pb").write_bytes(b"")


def _pbtxt_only(s: Setup) -> None:
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    pb = s.model / "saved_model.pb"
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(pb.read_bytes())
    (s.model / "saved_model.pbtxt").write_text(text_format.MessageToString(proto))
    pb.unlink()


def _pb_is_dir(s: Setup) -> None:
    (s.model / "saved_model.pb").unlink()
    (s.model / "saved_model.pb").mkdir()


def _delete(*names: str) -> Callable[[Setup], None]:
    def make(s: Setup) -> None:
        for name in names:
            for path in s.model.glob(name):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return make


def _garble(pattern: str) -> Callable[[Setup], None]:
    def make(s: Setup) -> None:
        for path in s.model.glob(pattern):
            path.write_bytes(b"\x00garbage\x00" * 8)
    return make


def _data_dependent_model(s: Setup) -> None:
    """A model whose output shape depends on the values fed: Unique then Reshape to
    pairs, which fails at run time when the unique count is odd."""
    def build():
        x = tf.compat.v1.placeholder(tf.float32, [None], name="x")
        pairs = tf.reshape(tf.unique(x).y, [-1, 2], name="pairs")
        return {"x": x}, {"y": tf.exp(pairs) + 1.0}

    shutil.rmtree(s.model)
    save_tf1(s.model, build)


def _model_dir(value: Callable[[Setup], object]) -> Callable[[Setup], None]:
    def make(s: Setup) -> None:
        s.kwargs["model_dir"] = value(s)
    return make


def _empty_model_dir(s: Setup) -> None:
    shutil.rmtree(s.model)
    s.model.mkdir()


def _serving_base_dir(s: Setup) -> None:
    """TF Serving's layout, model/<version>/: the usual wrong model_dir."""
    versions = s.tmp / "versions"
    versions.mkdir()
    s.model.rename(versions / "1")
    versions.rename(s.model)


def _model_dir_is_file(s: Setup) -> None:
    shutil.rmtree(s.model)
    s.model.write_text("not a model")


def _out(value: Callable[[Setup], object]) -> Callable[[Setup], None]:
    def make(s: Setup) -> None:
        s.out = value(s)
    return make


def _out_exists(s: Setup) -> None:
    s.out.mkdir()
    (s.out / "keep.txt").write_text("mine")


def _out_is_file(s: Setup) -> None:
    s.out.write_text("mine")


def _out_under_file(s: Setup) -> None:
    """Root ignores chmod, but nobody can create a folder under a file."""
    (s.tmp / "a_file").write_text("mine")
    s.out = s.tmp / "a_file" / "compiled"


def _workdir(value: Callable[[Setup], object]) -> Callable[[Setup], None]:
    def make(s: Setup) -> None:
        s.workdir = value(s)
    return make


def _workdir_is_file(s: Setup) -> None:
    s.workdir.write_text("mine")


def _workdir_under_file(s: Setup) -> None:
    (s.tmp / "a_file").write_text("mine")
    s.workdir = s.tmp / "a_file" / "work"


# ---- the catalog ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    error: type[errors.FuseflowError]
    match: str  # regex the message must match (re.search)
    kwargs: dict = field(default_factory=dict)
    make: Callable[[Setup], None] | None = None
    env: dict = field(default_factory=dict)


F32 = np.float32
GOOD_FEEDS = {"x": np.ones((2, 4), F32), "z": np.ones((2, 3), F32)}


def _unwritable() -> Path:
    """A folder no one can create, root included (tests run as root, which chmod
    does not stop): /proc refuses mkdir, though os.access calls it writable."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    return Path("/proc/fuseflow-bad-input-test")


CASES = [
    # -- the model directory
    Case("model_dir_missing", errors.ModelLoadError, r"does not exist.*saved_model\.pb",
         make=_model_dir(lambda s: s.tmp / "no_such_model")),
    Case("model_dir_empty", errors.ModelLoadError, r"has no saved_model\.pb.*folder is empty",
         make=_empty_model_dir),
    Case("model_dir_is_serving_base", errors.ModelLoadError,
         r"no saved_model\.pb.*subfolder '1' is one: pass '.*/model/1'",
         make=_serving_base_dir),
    Case("model_dir_is_file", errors.ModelLoadError, r"is a file, not a directory",
         make=_model_dir_is_file),
    Case("model_dir_none", errors.OptionError, r"model_dir must be the path",
         make=_model_dir(lambda s: None)),
    Case("model_dir_empty_string", errors.OptionError, r"model_dir must be the path",
         make=_model_dir(lambda s: "")),
    Case("pb_corrupt", errors.ModelLoadError, r"saved_model\.pb is corrupt or truncated",
         make=_corrupt_pb),
    Case("pb_truncated", errors.ModelLoadError, r"saved_model\.pb is corrupt or truncated",
         make=_truncate_pb),
    Case("pb_empty", errors.ModelLoadError, r"saved_model\.pb is empty \(0 bytes\)",
         make=_empty_pb),
    Case("pb_no_meta_graphs", errors.ModelLoadError, r"holds no MetaGraphDef",
         make=_no_meta_graphs),
    Case("pb_is_directory", errors.ModelLoadError, r"saved_model\.pb is a directory",
         make=_pb_is_dir),
    Case("pbtxt_model", errors.ModelLoadError, r"saved_model\.pbtxt.*binary",
         make=_pbtxt_only),
    Case("variables_dir_missing", errors.ModelLoadError, r"variables.*missing or incomplete",
         make=_delete("variables")),
    Case("variables_index_missing", errors.ModelLoadError,
         r"variables.*missing or incomplete", make=_delete("variables/variables.index")),
    Case("variables_data_missing", errors.ModelLoadError, r"variables.*missing or incomplete",
         make=_delete("variables/variables.data-*")),
    Case("variables_data_corrupt", errors.ModelLoadError, r"variables.*missing or incomplete",
         make=_garble("variables/variables.data-*")),
    # -- malformed graphs inside a real saved_model.pb
    Case("graph_cycle", errors.GraphError, r"has a cycle: .*MatMul.*->.*y",
         make=graph_edit(_cycle)),
    Case("graph_dangling_input", errors.GraphError,
         r"node 'mul' takes input 'no_such_node'.*no node 'no_such_node'",
         make=graph_edit(_dangling)),
    Case("graph_bad_output_index", errors.GraphError, r"cannot import the graph.*\bh\b.*output",
         make=graph_edit(_bad_output_index)),
    Case("graph_duplicate_names", errors.GraphError, r"several nodes named \['h'\]",
         make=graph_edit(_duplicate)),
    Case("graph_unknown_op", errors.GraphError,
         r"does not know: FuseflowNoSuchOp \(node 'h'\).*tf\.load_op_library",
         make=graph_edit(_unknown_op)),
    Case("graph_missing_attr", errors.GraphError, r"cannot import the graph.*attr 'T'",
         make=graph_edit(_missing_attr)),
    # -- tags and signatures
    Case("tags_unknown", errors.TagError, r"no MetaGraphDef with tags \['train'\].*\['serve'\]",
         kwargs={"tags": ["train"]}),
    Case("tags_unknown_string", errors.TagError, r"tags \['gpu', 'serve'\]",
         kwargs={"tags": "serve,gpu"}),
    Case("tags_not_strings", errors.OptionError, r"tags must be strings", kwargs={"tags": [1]}),
    Case("tags_not_iterable", errors.OptionError, r"tags must be an iterable",
         kwargs={"tags": 7}),
    Case("signature_unknown", errors.SignatureError,
         r"signature 'predict' not found.*\['serving_default'\]",
         kwargs={"signature_def_key": "predict"}),
    Case("signature_key_not_string", errors.OptionError, r"signature_def_key must be a string",
         kwargs={"signature_def_key": 3}),
    Case("signature_none_in_model", errors.SignatureError, r"has no signature",
         make=graph_edit(_no_signatures)),
    Case("signature_no_outputs", errors.SignatureError, r"'serving_default' has no outputs",
         make=graph_edit(_no_outputs)),
    Case("signature_tensor_not_in_graph", errors.SignatureError,
         r"maps 'y' to tensor 'ghost:0'.*no node 'ghost'", make=graph_edit(_output_not_in_graph)),
    Case("signature_sparse_input", errors.SignatureError, r"'x' is not a dense tensor",
         make=graph_edit(_sparse_input)),
    # -- shapes and feeds
    Case("batch_size_zero", errors.OptionError, r"batch_size must be a positive integer, got 0",
         kwargs={"batch_size": 0}),
    Case("batch_size_negative", errors.OptionError, r"batch_size .* got -2",
         kwargs={"batch_size": -2}),
    Case("batch_size_float", errors.OptionError, r"batch_size .* got 1\.5",
         kwargs={"batch_size": 1.5}),
    Case("batch_size_string", errors.OptionError, r"batch_size .* got '4'",
         kwargs={"batch_size": "4"}),
    Case("batch_size_bool", errors.OptionError, r"batch_size .* got True",
         kwargs={"batch_size": True}),
    Case("batch_size_insufficient", errors.ShapeError,
         r"batch_size is not sufficient .* input tensor x:0.*\[\?, \?\].*model_shape_feed_dict",
         make=graph_edit(_unknown_dims)),
    Case("batch_size_unknown_rank", errors.ShapeError, r"x:0.*rank is unknown",
         make=graph_edit(_unknown_rank)),
    Case("shape_feed_unknown_key", errors.ShapeError,
         r"model_shape_feed_dict key 'image' matches no input.*x \(x:0\)",
         kwargs={"model_shape_feed_dict": {"image": [1, 4]}}),
    Case("shape_feed_wrong_rank", errors.ShapeError, r"'x' \(x:0\) the shape \[2\].*\[\?, 4\]",
         kwargs={"model_shape_feed_dict": {"x": [2]}}),
    Case("shape_feed_wrong_dim", errors.ShapeError, r"'x' \(x:0\) the shape \[2, 5\]",
         kwargs={"model_shape_feed_dict": {"x": [2, 5]}}),
    Case("shape_feed_float_dims", errors.ShapeError,
         r"model_shape_feed_dict\['x'\] must be a list of positive integers, got \[2, 4\.0\]",
         kwargs={"model_shape_feed_dict": {"x": [2, 4.0]}}),
    Case("shape_feed_zero_dim", errors.ShapeError, r"positive integers, got \[0, 4\]",
         kwargs={"model_shape_feed_dict": {"x": [0, 4]}}),
    Case("shape_feed_string", errors.ShapeError, r"positive integers, got '2,4'",
         kwargs={"model_shape_feed_dict": {"x": "2,4"}}),
    Case("shape_feed_not_dict", errors.OptionError, r"model_shape_feed_dict must be a dict",
         kwargs={"model_shape_feed_dict": [[2, 4]]}),
    Case("feed_unknown_key", errors.ShapeError, r"model_feed_dict key 'image' matches no input",
         kwargs={"model_feed_dict": {**GOOD_FEEDS, "image": np.ones((2, 4), F32)}}),
    Case("feed_missing_input", errors.ShapeError, r"no value for inputs \['z'\]",
         kwargs={"model_feed_dict": {"x": GOOD_FEEDS["x"]}}),
    Case("feed_wrong_rank", errors.ShapeError, r"'x' \(x:0\) the shape \[2, 4, 1\]",
         kwargs={"model_feed_dict": {**GOOD_FEEDS, "x": np.ones((2, 4, 1), F32)}}),
    Case("feed_wrong_shape", errors.ShapeError, r"'z' \(z:0\) the shape \[2, 4\].*\[\?, 3\]",
         kwargs={"model_feed_dict": {**GOOD_FEEDS, "z": np.ones((2, 4), F32)}}),
    Case("feed_wrong_dtype", errors.ShapeError, r"has dtype int32, but input x:0 is float32",
         kwargs={"model_feed_dict": {**GOOD_FEEDS, "x": np.ones((2, 4), np.int32)}}),
    Case("feed_strings_for_floats", errors.ShapeError, r"dtype <U1, but input x:0 is float32",
         kwargs={"model_feed_dict": {**GOOD_FEEDS, "x": np.full((2, 4), "a")}}),
    Case("feed_ragged", errors.ShapeError, r"model_feed_dict\['x'\] is not an array",
         kwargs={"model_feed_dict": {**GOOD_FEEDS, "x": [[1.0], [1.0, 2.0]]}}),
    Case("feed_rejected_by_graph", errors.ShapeError,
         r"running the model on model_feed_dict failed: .*reshape.*at node 'pairs'",
         kwargs={"model_feed_dict": {"x": np.ones(4, F32)}}, make=_data_dependent_model),
    Case("feed_not_dict", errors.OptionError, r"model_feed_dict must be a dict",
         kwargs={"model_feed_dict": [GOOD_FEEDS["x"]]}),
    # -- partitioning options
    Case("no_fuse_ops_unknown_node", errors.OptionError,
         r"not in the optimized graph: \['Conv2D'\].*node names \(not op types\)",
         kwargs={"no_fuse_ops": ["Conv2D"]}),
    Case("no_fuse_ops_not_strings", errors.OptionError, r"no_fuse_ops must hold node names",
         kwargs={"no_fuse_ops": [1]}),
    Case("no_fuse_ops_not_iterable", errors.OptionError, r"no_fuse_ops must be an iterable",
         kwargs={"no_fuse_ops": 1}),
    Case("force_fuse_ops_unknown_node", errors.OptionError, r"\['ghost'\]",
         kwargs={"force_fuse_ops": ["ghost"]}),
    Case("minimum_segment_size_zero", errors.OptionError,
         r"minimum_segment_size must be a positive integer, got 0",
         kwargs={"minimum_segment_size": 0}),
    Case("minimum_segment_size_float", errors.OptionError, r"minimum_segment_size .* got 2\.5",
         kwargs={"minimum_segment_size": 2.5}),
    # -- compiler flags
    Case("flag_unknown", errors.CompilerArgsError, r"unknown compiler flag\(s\) \['--bogus'\]",
         kwargs={"compiler_args": [*XLA, "--bogus"]}),
    Case("flag_stray_value", errors.CompilerArgsError, r"unknown compiler flag\(s\) \['O3'\]",
         kwargs={"compiler_args": [*XLA, "O3"]}),
    Case("flag_timeout_not_number", errors.CompilerArgsError,
         r"--timeout: invalid float value: 'soon'",
         kwargs={"compiler_args": [*XLA, "--timeout", "soon"]}),
    Case("flag_timeout_negative", errors.CompilerArgsError, r"--timeout must be positive",
         kwargs={"compiler_args": [*XLA, "--timeout=-1"]}),
    Case("flag_workers_zero", errors.CompilerArgsError, r"--workers must be positive",
         kwargs={"compiler_args": [*XLA, "--workers", "0"]}),
    Case("flag_missing_value", errors.CompilerArgsError, r"--workers: expected one argument",
         kwargs={"compiler_args": [*XLA, "--workers"]}),
    Case("flag_bad_choice", errors.CompilerArgsError, r"--fp32-cast: invalid choice: 'fp8'",
         kwargs={"compiler_args": [*XLA, "--fp32-cast", "fp8"]}),
    Case("flag_unknown_backend", errors.CompilerArgsError, r"--backend: invalid choice: 'tpu'",
         kwargs={"compiler_args": ["--backend", "tpu"]}),
    Case("flag_backend_conflict", errors.CompilerArgsError, r"contradicts --backend xla",
         kwargs={"backend": "openvino"}),
    Case("flag_args_not_strings", errors.CompilerArgsError, r"must be strings",
         kwargs={"compiler_args": [*XLA, None]}),
    Case("flag_args_not_list", errors.CompilerArgsError, r"must be a list of strings",
         kwargs={"compiler_args": 5}),
    Case("flag_from_env", errors.CompilerArgsError, r"unknown compiler flag\(s\) \['--fast'\]",
         env={"FUSEFLOW_CC_FLAGS": "--fast"}),
    Case("flag_from_neuron_env", errors.CompilerArgsError, r"--verbose: invalid level",
         env={"NEURON_CC_FLAGS": "--verbose=loud"}),
    Case("must_compile_timeout", errors.SegmentCompileError,
         r"failed to compile: \['fuseflow_segment_0'\].*timed out.*Drop --must-compile",
         kwargs={"compiler_args": [*XLA, "--must-compile", "--timeout", "0.01"],
                 "compiler_workdir": None}),
    Case("backend_kwarg_unknown", errors.CompilerArgsError, r"unknown backend 'tpu'",
         kwargs={"backend": "tpu", "compiler_args": None}),
    # -- where the output goes
    Case("out_exists", errors.OutputDirError, r"already exists: fuseflow never overwrites",
         make=_out_exists),
    Case("out_is_file", errors.OutputDirError, r"is an existing file", make=_out_is_file),
    Case("out_under_a_file", errors.OutputDirError, r"a_file' is a file, not a directory",
         make=_out_under_file),
    Case("out_not_writable", errors.OutputDirError, r"'/proc' is not writable",
         make=_out(lambda s: _unwritable() / "compiled")),
    Case("out_inside_input", errors.OutputDirError, r"is inside the input model",
         make=_out(lambda s: s.model / "compiled")),
    Case("out_is_input", errors.OutputDirError, r"already exists", make=_out(lambda s: s.model)),
    Case("out_none", errors.OptionError, r"new_model_dir must be a path",
         make=_out(lambda s: None)),
    Case("workdir_is_file", errors.OutputDirError, r"compiler_workdir .* is a file",
         make=_workdir_is_file),
    Case("workdir_under_a_file", errors.OutputDirError, r"a_file' is a file, not a directory",
         make=_workdir_under_file),
    Case("workdir_not_writable", errors.OutputDirError, r"'/proc' is not writable",
         make=_workdir(lambda s: _unwritable())),
    Case("workdir_inside_input", errors.OutputDirError,
         r"compiler_workdir .* is inside the input model", make=_workdir(lambda s: s.model / "w")),
    Case("workdir_not_a_path", errors.OptionError, r"compiler_workdir must be a path",
         make=_workdir(lambda s: 42)),
]


# ---- the test ---------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, str]:
    """Every path under root -> sha256 of its bytes ('dir' for folders)."""
    if not root.exists():
        return {}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): "dir" if p.is_dir()
            else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _hidden(folder) -> set[str]:
    folder = Path(folder)
    return {p.name for p in folder.iterdir() if p.name.startswith(".")} \
        if folder.is_dir() else set()


def _state(path) -> dict[str, str] | None:
    """What is at a path the case passed in (None: not a path; {} : nothing there)."""
    return _tree(Path(path)) if isinstance(path, (str, Path)) and str(path) else None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, pristine: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("NEURON_CC_FLAGS", raising=False)
    monkeypatch.setenv("FUSEFLOW_CC_FLAGS", "--no-profile")  # conftest's, unless the case's
    for var, value in case.env.items():
        monkeypatch.setenv(var, value)
    systmp = tmp_path / "systmp"  # fuseflow's own temp dirs land here, where we can look
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    setup = Setup(tmp=tmp_path, model=tmp_path / "model", out=tmp_path / "out",
                  workdir=tmp_path / "work")
    shutil.copytree(pristine, setup.model)
    if case.make:
        case.make(setup)
    kwargs = {"compiler_args": XLA, "compiler_workdir": setup.workdir, **case.kwargs,
              **setup.kwargs}
    model_dir = kwargs.pop("model_dir", setup.model)
    model_before, out_before, work_before = (
        _state(model_dir), _state(setup.out), _state(setup.workdir))
    hidden_before = _hidden(setup.out.parent) if isinstance(setup.out, Path) else set()
    everything_before = _tree(tmp_path)

    with pytest.raises(case.error, match=case.match) as raised:
        fuseflow.saved_model.compile(model_dir, setup.out, **kwargs)

    # pytest.raises accepts subclasses: the exact class is the one the catalog names
    assert type(raised.value) is case.error, type(raised.value)
    assert _state(model_dir) == model_before, "the input model's bytes changed"
    assert _state(setup.out) == out_before, "a failed compile wrote new_model_dir"
    if isinstance(setup.out, Path):
        left = _hidden(setup.out.parent) - hidden_before
        assert not left, f"hidden staging dirs left beside new_model_dir: {left}"
    assert _state(setup.workdir) == work_before, "a failed compile wrote the workdir"
    assert not list(systmp.iterdir()), "temp dirs left behind"
    assert _tree(tmp_path) == everything_before, "a failed compile left files behind"


def test_failed_export_leaves_nothing(pristine: Path, tmp_path: Path, monkeypatch):
    """A failure after compiling, while writing: no bad input reaches it, yet the
    staging dir and the missing parents made for new_model_dir must all go."""
    import fuseflow.saved_model as api

    def broken_writer(*args, **kwargs):
        raise errors.ExportError("disk full (simulated)")

    monkeypatch.setattr(api, "write_saved_model", broken_writer)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = tmp_path / "model"
    shutil.copytree(pristine, model)
    before = _tree(tmp_path)
    with pytest.raises(errors.ExportError, match="simulated"):
        api.compile(model, tmp_path / "new" / "deeper" / "out", compiler_args=XLA)
    assert _tree(tmp_path) == before


def test_pristine_model_compiles(pristine: Path, tmp_path: Path):
    """The control: every failure above comes from its one defect, not from the model."""
    result = fuseflow.saved_model.compile(pristine, tmp_path / "out", compiler_args=XLA,
                                          compiler_workdir=tmp_path / "work")
    assert result["num_segments"] == 1
    assert (tmp_path / "out" / "saved_model.pb").is_file()
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["fuseflow_segment_0"]


def test_catalog_is_large_and_unique():
    """Issue 5 asks for at least 40 distinct bad inputs."""
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    # each names a specific fuseflow.errors class, never the catch-all base
    vague = [c.id for c in CASES if c.error is errors.FuseflowError
             or not issubclass(c.error, errors.FuseflowError)]
    assert not vague, vague
