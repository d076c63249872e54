"""Builds the native FuseflowOp into the wheel, so `pip install .` ships a ready op."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithNativeOp(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install builds the op in place on first import
        from fuseflow.native import build

        library = build.build()
        target = Path(self.build_lib) / "fuseflow" / "native"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(library, target / library.name)
        shutil.copy2(build.STAMP, target / build.STAMP.name)


setup(cmdclass={"build_py": BuildWithNativeOp})
