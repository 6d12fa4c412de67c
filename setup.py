"""Packaging hook: compile kracauer's BPF programs into the build.

Everything else is in pyproject.toml. When clang is on PATH, ``build_py``
compiles ``kracauer/bpf/*.bpf.c`` into the build directory, so a wheel carries
the ``*.bpf.o`` objects as package data; without clang it warns and builds
without them (the kernel data path then stays off). Editable installs do not
run this: ``scripts/setup-env`` runs ``scripts/build_bpf.py`` instead (it lives
outside the package: the daemon never compiles, and never runs a program).
"""

import importlib.util
import os
import warnings
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import CompileError

HERE = Path(__file__).resolve().parent
BPF_DIR = HERE / "kracauer" / "bpf"


def _load_build_module():
    # Loaded by path: importing the kracauer package at build time would need
    # its dependencies in the build environment.
    spec = importlib.util.spec_from_file_location("_kracauer_bpf_build", HERE / "scripts" / "build_bpf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class build_py_with_bpf(build_py):
    """build_py, plus the BPF objects when clang is available."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        build = _load_build_module()
        try:
            clang = build.find_clang(os.environ.get("CLANG", "clang"))
        except build.BuildError as exc:
            warnings.warn(f"building without the BPF programs: {exc}", stacklevel=1)
            return
        out_dir = Path(self.build_lib) / "kracauer" / "bpf"
        try:
            objects = build.compile_all(BPF_DIR, out_dir, clang)
        except build.BuildError as exc:
            raise CompileError(str(exc)) from None
        for obj in objects:
            self.announce(f"compiled {obj}", level=2)


setup(cmdclass={"build_py": build_py_with_bpf})
