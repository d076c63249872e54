"""Builds the native FuseflowOp into the wheel, so `pip install .` ships a ready op.

pip builds the wheel in an isolated environment that has the build requirements of
pyproject.toml (the pinned tensorflow-cpu and openvino) but not fuseflow itself, so the
build module is loaded from its file rather than imported through the package.
"""

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

BUILD_MODULE = Path(__file__).resolve().parent / "fuseflow" / "native" / "build.py"


def _native_build():
    spec = importlib.util.spec_from_file_location("_fuseflow_native_build", BUILD_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithNativeOp(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install builds the op in place on first import
        build = _native_build()
        library = build.build()
        target = Path(self.build_lib) / "fuseflow" / "native"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(library, target / library.name)
        shutil.copy2(build.STAMP, target / build.STAMP.name)


class NativeDistribution(Distribution):
    """The wheel holds a compiled library: tag it for this Python and platform, not `any`."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildWithNativeOp}, distclass=NativeDistribution)
