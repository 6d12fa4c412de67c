"""scripts/build_bpf.py, imported by path for the tests (scripts/ is not a package)."""

import importlib.util
import pathlib
import sys

_PATH = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "build_bpf.py"
_spec = importlib.util.spec_from_file_location("build_bpf", _PATH)
build = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("build_bpf", build)
_spec.loader.exec_module(build)
