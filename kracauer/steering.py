"""The TUN's queue-steering program (kracauer/bpf/steer.bpf.c) for ``[tun] workers`` > 1.

Loaded with libbpf and attached with TUNSETSTEERINGEBPF on one of the TUN's
queue descriptors; from then on the kernel hands each packet to the queue
(the worker) the program names: the client's, both ways (netstack/steer.py
is the same choice in Python). The program belongs to the device: it stays
attached while the device exists and goes with it.
"""

from __future__ import annotations

from pathlib import Path

from kracauer.tun import Tun

OBJECT = Path(__file__).parent / "bpf" / "steer.bpf.o"
PROGRAM = "kracauer_steer"


class SteeringError(RuntimeError):
    """The steering program cannot be used (the reason is for the operator)."""


class Steering:
    """The loaded steering program."""

    def __init__(self, obj: object, prog_fd: int) -> None:
        self.obj = obj
        self.prog_fd = prog_fd

    @classmethod
    def load(cls, path: Path | None = None) -> Steering:
        from kracauer.bpf.libbpf import BpfError, BpfObject

        path = path or OBJECT
        if not path.is_file():
            raise SteeringError(f"{path} is missing (kracauer was installed without its BPF programs: "
                                f"they need clang; see docs/kernel-path.md)")
        try:
            obj = BpfObject.open(str(path))
            try:
                obj.load()
                return cls(obj, obj.program_fd(PROGRAM))
            except BaseException:
                obj.close()
                raise
        except (BpfError, OSError) as exc:
            raise SteeringError(f"cannot load the queue-steering program: {exc}") from None

    def attach(self, tun: Tun) -> None:
        tun.set_steering(self.prog_fd)

    def close(self) -> None:
        self.obj.close()
