"""Compile kracauer's BPF programs (``*.bpf.c`` → ``*.bpf.o``) with clang.

A build-time tool, run by packaging (setup.py) and ``scripts/setup-env`` or by
hand (``scripts/build_bpf.py``); the daemon never imports it, it only
loads the objects. The flags are the kernel selftests' usual ones: ``-g`` for
the BTF that libbpf needs for ``.maps`` definitions, ``-mcpu=v3`` for the
32-bit jumps and ALU ops every kernel kracauer supports has, and Debian's
multiarch include directory, where ``asm/`` headers live.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent.parent / "kracauer" / "bpf"
SOURCE_SUFFIX = ".bpf.c"
OBJECT_SUFFIX = ".bpf.o"
CFLAGS = ["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror"]


class BuildError(RuntimeError):
    """clang is missing or a program does not compile."""


def find_clang(clang: str = "clang") -> str:
    """The clang executable's path, or BuildError saying how to get it."""
    path = shutil.which(clang)
    if path is None:
        raise BuildError(
            f"{clang} not found: the BPF programs need clang "
            "(Debian: apt-get install clang llvm libbpf-dev)"
        )
    return path


def _multiarch(clang: str) -> str | None:
    """The target triple Debian names its include directory after."""
    for command in ([clang, "-print-multiarch"], ["gcc", "-dumpmachine"]):
        try:
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            continue
        if out:
            return out
    return None


def include_flags(clang: str) -> list[str]:
    """``-I/usr/include/<triple>`` when it exists (for ``asm/types.h``)."""
    triple = _multiarch(clang)
    if triple and os.path.isdir(f"/usr/include/{triple}"):
        return [f"-I/usr/include/{triple}"]
    return []


def sources(src_dir: str | os.PathLike[str]) -> list[Path]:
    """The ``*.bpf.c`` files directly in ``src_dir``, sorted."""
    return sorted(Path(src_dir).glob("*" + SOURCE_SUFFIX))


def object_name(source: Path) -> str:
    return source.name[: -len(SOURCE_SUFFIX)] + OBJECT_SUFFIX


def compile_one(source: Path, output: Path, clang: str, extra_flags: list[str]) -> Path:
    """Compile ``source`` to ``output``; BuildError with clang's messages."""
    command = [clang, *CFLAGS, *extra_flags, "-I", str(source.parent), "-c", str(source), "-o", str(output)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"{source.name} does not compile:\n{result.stderr.rstrip()}")
    return output


def compile_all(
    src_dir: str | os.PathLike[str] = SOURCE_DIR,
    out_dir: str | os.PathLike[str] | None = None,
    clang: str = "clang",
) -> list[Path]:
    """Compile every ``*.bpf.c`` in ``src_dir`` into ``out_dir`` (default:
    next to the sources); returns the objects' paths."""
    clang_path = find_clang(clang)
    out = Path(out_dir) if out_dir is not None else Path(src_dir)
    out.mkdir(parents=True, exist_ok=True)
    flags = include_flags(clang_path)
    return [compile_one(src, out / object_name(src), clang_path, flags) for src in sources(src_dir)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/build_bpf.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "src_dir", nargs="?", default=str(SOURCE_DIR), help="directory of *.bpf.c (default: %(default)s)"
    )
    parser.add_argument("-o", "--out-dir", help="where the *.bpf.o go (default: next to the sources)")
    parser.add_argument(
        "--clang", default=os.environ.get("CLANG", "clang"), help="clang to use (default: $CLANG or clang)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    try:
        objects = compile_all(args.src_dir, args.out_dir, args.clang)
    except BuildError as exc:
        print(f"build_bpf: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        for obj in objects:
            print(obj)
    return 0


if __name__ == "__main__":
    sys.exit(main())
