"""Big payloads of fused ops as SavedModel asset files, out of the graph.

A fused OpenVINO node carries two copies of its segment's weights: the
exported blob and, as the TF fallback, the segment's function with its
constants. As graph data, every loader parses, copies and keeps both (the
GraphDef, the Graph, the function library and its per-runtime copies), and
TF's optimizers walk them at the first call. As asset files they cost
nothing until used: the blob is mapped read-only and imported in place at the
first call, the fallback library is read only when the fallback runs (or the
blob has to be recompiled).

The op finds its files through the FuseflowAssets op, which the SavedModel's
main_op runs with every asset tensor fed the path the loader resolved (the
TF1 and TF2 Python loaders and C++ LoadSavedModel all do this). Files are
named by their content (CRC-32 and size), so two models loaded in one process
never mix theirs up.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

from tensorflow.core.framework import function_pb2

from fuseflow.graph_util import field_header, reachable_functions
from fuseflow.tf_compat import tf

FUSED_OP = "FuseflowOp"
BLOB_SUFFIX = ".ovblob"
LIBRARY_SUFFIX = ".fallback.pb"
ASSETS_OP = "fuseflow_assets"


@dataclass
class Payloads:
    """What rewrite_graph keeps out of the graph for move_to_assets to write into files as
    it is: each FuseflowOp's blob, and the weights its fallback function lacks (serialized
    NodeDefs). Copied into the graph and read back out, ResNet50's 100 MB blob and 100 MB
    of weights cost its compile 0.5 s."""

    blobs: dict[str, bytes] = field(default_factory=dict)  # by fused node
    weights: dict[str, list] = field(default_factory=dict)  # by fallback function

    def hold(self, node, blob: bytes) -> None:
        """Keep node's blob here: it goes into the graph as its CRC only."""
        node.attr["executable"].s = b""
        node.attr["executable_crc32"].s = f"{zlib.crc32(blob):08x}".encode()
        self.blobs[node.name] = blob


@dataclass(frozen=True)
class AssetFile:
    key: str  # what the op's executable_file/native_file attr names
    path: Path  # where it was written, before the SavedModel builder copies it


def file_name(key: str, suffix: str) -> str:
    """The asset's file name: Builder copies it into assets/ under this name."""
    return f"fuseflow-{key}{suffix}"


def _key(node_name: str, chunks: list, crc: int | None = None) -> str:
    """The file's key: the node and the CRC-32 and size of its content (these chunks);
    crc: theirs, where the caller has it already."""
    if crc is None:
        crc = 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
    return f"{node_name.replace('/', '_')}-{crc:08x}-{sum(map(len, chunks))}"


def _library_chunks(functions, weights: dict[str, list]) -> list:
    """A FunctionDefLibrary holding functions, serialized, in pieces: each function's
    bytes behind its field header, as protobuf writes a repeated field (never joined nor
    copied into a library first: a fallback function holds the segment's weights).
    weights: per function, serialized NodeDefs it lacks (Payloads), written after it as
    its own node_def fields."""
    chunks = []
    for function in functions:
        data = [function.SerializeToString()]
        for node in weights.get(function.signature.name, ()):
            data += [field_header(3, len(node)), node]  # FunctionDef.node_def = 3
        chunks += [field_header(1, sum(map(len, data))), *data]  # library.function = 1
    return chunks


def use_file(node, key: str, crc: str | None = None) -> None:
    """node, a FuseflowOp, maps its blob from the asset file registered under key
    (add_assets_op) instead of carrying it. crc: the blob's CRC-32 as 8 hex digits, ""
    for unchecked; None keeps the node's."""
    node.attr["executable"].s = b""
    node.attr["executable_file"].s = key.encode()
    if crc is not None:
        node.attr["executable_crc32"].s = crc.encode()


def move_to_assets(graph_def, folder: Path, copy: bool = True,
                   payloads: Payloads | None = None):
    """(graph without fused ops' blobs and fallback functions, the files now holding them).

    Functions anything else in the graph calls stay in the library. A file already in
    folder under its content's name is kept as it is. copy=False takes them out of
    graph_def itself (the caller's own: no copy of its 200 MB) and returns it.
    payloads: what rewrite_graph kept out of graph_def, written into the files here."""
    payloads = payloads or Payloads()
    if copy:
        out = tf.compat.v1.GraphDef()
        out.CopyFrom(graph_def)
    else:
        out = graph_def
    fused = [n for n in out.node if n.op == FUSED_OP
             and (n.name in payloads.blobs or n.attr["executable"].s)]
    if not fused and not payloads.blobs and not payloads.weights:
        return out, []
    folder.mkdir(parents=True, exist_ok=True)
    functions = {f.signature.name: f for f in out.library.function}
    others = [n for n in out.node if n.op != FUSED_OP]
    needed = set(reachable_functions(out, others))
    moved: set[str] = set()
    stubs = {}
    files = []
    for node in fused:
        blob = [payloads.blobs.pop(node.name, None) or node.attr["executable"].s]
        crc = node.attr["executable_crc32"].s
        key = _key(node.name, blob, int(crc, 16) if crc else None)
        path = folder / file_name(key, BLOB_SUFFIX)
        _write_once(path, blob)
        files.append(AssetFile(key, path))
        use_file(node, key)

        names = reachable_functions(out, [node])
        if not names or names[0] != node.attr["native_segment"].func.name:
            continue
        data = _library_chunks((functions[n] for n in names), payloads.weights)
        key = _key(node.name, data)
        path = folder / file_name(key, LIBRARY_SUFFIX)
        _write_once(path, data)
        files.append(AssetFile(key, path))
        node.attr["native_file"].s = key.encode()
        moved.update(names[1:])
        stubs[names[0]] = _stub(functions[names[0]])
    kept = [stubs.get(f.signature.name, f) for f in out.library.function
            if f.signature.name not in moved or f.signature.name in needed]
    incomplete = sorted(payloads.blobs) + sorted(
        {f.signature.name for f in kept} & set(payloads.weights) - set(stubs))
    if incomplete:
        raise RuntimeError(f"{incomplete}: blobs or weights held apart from the graph with "
                           "no file to go to: fuseflow bug, please report it")
    del out.library.function[:]
    out.library.function.extend(kept)
    return out, files


def _write_once(path: Path, chunks: list[bytes]) -> None:
    """Files are named by their content: one already there is not written again."""
    if not (path.is_file() and path.stat().st_size == sum(map(len, chunks))):
        with open(path, "wb") as f:
            for chunk in chunks:
                f.write(chunk)


def _stub(function):
    """The function's signature over empty constants: what the graph keeps in its place
    (loaders want every function an attr names), never run; the op runs the file's."""
    stub = function_pb2.FunctionDef()
    stub.signature.CopyFrom(function.signature)
    for k, arg in enumerate(function.signature.output_arg):
        node = stub.node_def.add(name=f"stub_{k}", op="Const")
        node.attr["dtype"].type = arg.type
        node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(
            [], dtype=tf.dtypes.as_dtype(arg.type), shape=[0]))
        stub.ret[arg.name] = f"stub_{k}:output:0"
    return stub


def add_assets_op(graph, files: list[AssetFile]):
    """In graph: one string constant per file (for the assets collection) and the op that
    registers their loaded paths. Returns (the op, the constants)."""
    from fuseflow.native import load_op_library

    ops = load_op_library()
    with graph.as_default():
        constants = [tf.constant(str(f.path), name=f"{ASSETS_OP}/file_{k}")
                     for k, f in enumerate(files)]
        op = ops.fuseflow_assets(constants, keys=[f.key for f in files], name=ASSETS_OP)
    return op, constants


def read_asset_libraries(graph_def, model_dir) -> None:
    """Put back into graph_def.library the fallback functions a compiled model keeps in
    its assets (for tools that read the graph: inspect, the graph picture)."""
    assets = Path(model_dir) / "assets"
    by_name = {f.signature.name: f for f in graph_def.library.function}
    for node in graph_def.node:
        key = node.attr["native_file"].s.decode() if node.op == FUSED_OP else ""
        path = assets / file_name(key, LIBRARY_SUFFIX)
        if not key or not path.exists():
            continue
        library = function_pb2.FunctionDefLibrary.FromString(path.read_bytes())
        stub = node.attr["native_segment"].func.name  # the segment, renamed by a loader
        for k, function in enumerate(library.function):
            name = stub if k == 0 else function.signature.name
            if name not in by_name:
                by_name[name] = graph_def.library.function.add()
            elif k > 0:
                continue
            by_name[name].CopyFrom(function)
            by_name[name].signature.name = name


def inline_assets(graph_def, model_dir) -> None:
    """Put fused ops' files back into graph_def (blobs as attrs, fallbacks in the library):
    for a graph run without its SavedModel (trace keeps one after its temp dir is gone)."""
    read_asset_libraries(graph_def, model_dir)
    for node in graph_def.node:
        if node.op != FUSED_OP:
            continue
        key = node.attr["executable_file"].s.decode()
        if key:
            path = Path(model_dir) / "assets" / file_name(key, BLOB_SUFFIX)
            node.attr["executable"].s = path.read_bytes()
        node.attr["executable_file"].s = b""
        node.attr["native_file"].s = b""


def blob_size(node, model_dir=None) -> int:
    """Bytes of a fused node's blob, in the graph or in the model's assets."""
    if node.attr["executable"].s or not model_dir:
        return len(node.attr["executable"].s)
    path = Path(model_dir) / "assets" / file_name(node.attr["executable_file"].s.decode(),
                                                  BLOB_SUFFIX)
    return path.stat().st_size if path.exists() else 0


__all__ = ["AssetFile", "Payloads", "use_file", "move_to_assets", "add_assets_op",
           "read_asset_libraries", "blob_size"]
