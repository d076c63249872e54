"""Backends: one file each behind the interface in base.py."""

from __future__ import annotations

from fuseflow import errors
from fuseflow.backends.base import Backend

BACKEND_NAMES = ("openvino", "xla")


def get_backend(name: str) -> Backend:
    """The backend object for a name (imports only that backend's libraries)."""
    if name == "xla":
        from fuseflow.backends.xla import XlaBackend

        return XlaBackend()
    if name == "openvino":
        from fuseflow.backends.openvino import OpenVinoBackend

        return OpenVinoBackend()
    raise errors.CompilerArgsError(
        f"unknown backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}")
