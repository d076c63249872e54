"""The compiler worker process: compiles the segments its parent sends it.

Run as `python -m fuseflow.compile_worker BACKEND READ_FD WRITE_FD`; every
request gets exactly one ("ok", Artifact) or ("error", (line, traceback)).
"""

from __future__ import annotations

import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path


def main(backend_name: str, read_fd: int, write_fd: int) -> None:
    from fuseflow.backends import get_backend

    reader = Connection(read_fd, writable=False)
    writer = Connection(write_fd, readable=False)
    backend = get_backend(backend_name)
    while True:
        try:
            segment, options, seg_dir = reader.recv()
        except EOFError:
            return
        try:
            writer.send(("ok", backend.compile(segment, options, Path(seg_dir))))
        except Exception as e:  # every failure goes back to the parent, which decides
            text = str(e).strip()
            first = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
            writer.send(("error", (first, traceback.format_exc())))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
