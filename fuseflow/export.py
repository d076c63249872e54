"""Stage 7: graph -> new SavedModel, written atomically.

The model is written into a hidden sibling of new_model_dir and renamed at
the very end, so a failure at any stage leaves nothing at new_model_dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fuseflow import errors
from fuseflow.assets import AssetFile, add_assets_op, move_to_assets
from fuseflow.graph_util import node_name
from fuseflow.load import LoadedModel
from fuseflow.shapes import TensorInfo
from fuseflow.tf_compat import tf

REPORT_DIR = "assets.extra"


def check_output_dir(model_dir: str, new_model_dir) -> Path:
    """Refuse, before any work, an output that exists, can't be written or nests in the input."""
    if not isinstance(new_model_dir, (str, os.PathLike)) or not os.fspath(new_model_dir):
        raise errors.OptionError(f"new_model_dir must be a path, got {new_model_dir!r}")
    out = Path(os.fspath(new_model_dir)).absolute()
    if out.is_file():
        raise errors.OutputDirError(f"new_model_dir {str(out)!r} is an existing file: "
                                    "choose a path that does not exist yet")
    if out.exists():
        raise errors.OutputDirError(
            f"new_model_dir {str(out)!r} already exists: fuseflow never overwrites; remove "
            "it or choose another path")
    if _inside(out, model_dir):
        raise errors.OutputDirError(
            f"new_model_dir {str(out)!r} is inside the input model {model_dir!r}: write the "
            "compiled model somewhere else")
    parent = _existing_ancestor(out.parent)
    if not parent.is_dir():
        raise errors.OutputDirError(
            f"cannot create {str(out)!r}: {str(parent)!r} is a file, not a directory; "
            "choose a new_model_dir under a directory")
    _probe_writable(out, parent)
    return out


def _inside(path: Path, model_dir: str) -> bool:
    src = Path(model_dir).resolve()
    return path.resolve() == src or src in path.resolve().parents


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_workdir(model_dir: str, workdir) -> Path | None:
    """compiler_workdir: a directory (created if missing), writable, outside the input."""
    if workdir is None:
        return None
    if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
        raise errors.OptionError(f"compiler_workdir must be a path, got {workdir!r}")
    path = Path(os.fspath(workdir)).absolute()
    if path.exists() and not path.is_dir():
        raise errors.OutputDirError(f"compiler_workdir {str(path)!r} is a file: give a "
                                    "directory (it is created if missing)")
    if _inside(path, model_dir):
        raise errors.OutputDirError(
            f"compiler_workdir {str(path)!r} is inside the input model "
            f"{str(Path(model_dir).resolve())!r}, which fuseflow never modifies: choose a "
            "workdir somewhere else")
    parent = _existing_ancestor(path)
    if not parent.is_dir():
        raise errors.OutputDirError(
            f"cannot create compiler_workdir {str(path)!r}: {str(parent)!r} is a file, not a "
            "directory")
    _probe_writable(path, parent, "compiler_workdir")
    return path


def _probe_writable(out: Path, parent: Path, what: str = "new_model_dir") -> None:
    """Create and remove a folder where the output will go: os.access says yes to root
    on places no one can write (/proc, read-only mounts), and a compile that fails
    only at the final rename wastes all its work."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fuseflow-probe-", dir=parent))
    except OSError as e:
        raise errors.OutputDirError(
            f"cannot write {str(out)!r}: {str(parent)!r} is not writable ({e.strerror}); "
            f"choose a {what} in a writable directory") from None


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A temp dir beside out, renamed to out on success and removed on any failure,
    with the parent folders this created for it."""
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.fuseflow-", dir=out.parent))
    except OSError as e:
        raise errors.OutputDirError(
            f"cannot create {str(out)!r}: {e.strerror} ({e.filename}); choose a "
            "new_model_dir in a writable directory") from None
    try:
        yield tmp / "model"
        if out.exists():
            raise errors.OutputDirError(f"{str(out)!r} appeared while compiling: not "
                                        "overwriting it")
        os.rename(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # after a success the first one holds out: nothing goes
            try:
                folder.rmdir()
            except OSError:
                break


def _tensor_info(name: str, info: TensorInfo, shape):
    from tensorflow.core.protobuf import meta_graph_pb2

    proto = meta_graph_pb2.TensorInfo(name=name, dtype=info.dtype.as_datatype_enum)
    proto.tensor_shape.CopyFrom(tf.TensorShape(shape).as_proto())
    return proto


def assets_folder(path: Path) -> Path:
    """Where the fused ops' files wait for the SavedModel builder writing path to copy
    them (beside it, in the staging dir)."""
    return path.parent / "fuseflow_assets"


def write_saved_model(graph_def, model: LoadedModel, input_shapes: dict[str, tuple],
                      infos: dict[str, TensorInfo], path: Path,
                      files: list[AssetFile] | None = None) -> None:
    """One MetaGraphDef, one signature (same key and tensor names), tables kept; fused ops'
    blobs and fallback functions go to assets (see assets.py). files: where
    move_to_assets(graph_def, assets_folder(path)) has put them already."""
    from tensorflow.core.protobuf import meta_graph_pb2

    if files is None:
        graph_def, files = move_to_assets(graph_def, assets_folder(path))

    signature = meta_graph_pb2.SignatureDef(method_name=model.method_name)
    for spec in model.inputs:
        signature.inputs[spec.key].CopyFrom(_tensor_info(
            spec.tensor_name, infos.get(spec.tensor_name, TensorInfo(spec.dtype, None)),
            input_shapes[spec.key]))
    dynamic_batch = any(s and s[0] is None for s in input_shapes.values())
    for spec in model.outputs:
        info = infos.get(spec.tensor_name, TensorInfo(spec.dtype, spec.shape))
        shape = info.shape
        if dynamic_batch and shape:  # outputs follow the inputs' free batch dim
            shape = (None, *shape[1:])
        signature.outputs[spec.key].CopyFrom(_tensor_info(spec.tensor_name, info, shape))
    graph = tf.Graph()
    with graph.as_default():
        try:
            tf.graph_util.import_graph_def(graph_def, name="")
        except Exception as e:
            raise errors.ExportError(f"the compiled graph does not import: {e}") from None
        init = [graph.get_operation_by_name(n) for n in model.init_nodes]
        assets = _asset_tensors(graph, model)
        if files:
            register, constants = add_assets_op(graph, files)
            init.append(register)
            assets += constants
        main_op = tf.group(*init, name="fuseflow_main_op") if init else None
        with tf.compat.v1.Session(graph=graph) as sess:
            saver = _variable_saver(sess, graph, model.variables)
            builder = tf.compat.v1.saved_model.Builder(str(path))
            builder.add_meta_graph_and_variables(
                sess, model.tags, signature_def_map={model.signature_key: signature},
                main_op=main_op, assets_collection=assets or None, strip_default_attrs=True,
                clear_devices=True, saver=saver)
            builder.save()


def _variable_saver(sess, graph, values: dict):
    """Set the unfrozen variables to their values and save them in variables/."""
    if not values:
        return None
    saveables = {}
    for name, value in values.items():
        op = graph.get_operation_by_name(name)
        feed = tf.compat.v1.placeholder(op.get_attr("dtype"), value.shape)
        if op.type == "VarHandleOp":
            sess.run(tf.raw_ops.AssignVariableOp(resource=op.outputs[0], value=feed),
                     {feed: value})
            saveables[name] = tf.raw_ops.ReadVariableOp(resource=op.outputs[0],
                                                        dtype=op.get_attr("dtype"))
        else:
            sess.run(tf.compat.v1.assign(op.outputs[0], feed), {feed: value})
            saveables[name] = op.outputs[0]
    return tf.compat.v1.train.Saver(var_list=saveables, sharded=True)


def _asset_tensors(graph, model: LoadedModel) -> list:
    """Asset path constants, pointed at the input model's files so Builder copies them."""
    tensors = []
    for name, source in model.assets.items():
        if node_name(name) not in {op.name for op in graph.get_operations()}:
            continue
        tensor = graph.get_tensor_by_name(name)
        tensor.op._set_attr("value", tf.compat.v1.AttrValue(
            tensor=tf.make_tensor_proto(source.encode())))
        tensors.append(tensor)
    return tensors
