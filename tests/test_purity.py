"""netstack/ is sans-I/O: it must never import an I/O module (STYLE.md)."""

import ast
import pathlib

import pytest

FORBIDDEN = {"socket", "os", "time", "select", "fcntl", "asyncio", "subprocess", "threading", "random"}
NETSTACK = pathlib.Path(__file__).resolve().parent.parent / "netstack"


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(NETSTACK.rglob("*.py")), ids=lambda p: p.name)
def test_netstack_module_imports_no_io(path):
    assert not imported_modules(path) & FORBIDDEN


def test_the_purity_check_sees_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom time import monotonic\n")
    assert imported_modules(sample) >= {"os", "time"}
