"""The BPF filesystem, where maps are pinned to outlive the process.

A pin is a file on a bpffs; the map lives while a pin or an fd holds it. The
usual mount is ``/sys/fs/bpf``, but ``ip netns exec`` remounts ``/sys`` and a
lab namespace has none, so kracauer mounts one where it pins when it must.
Only libc calls (statfs, mount, umount2) through ctypes: nothing is run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

# include/uapi/linux/magic.h
BPF_FS_MAGIC = 0xCAFE4A11
MNT_DETACH = 2
# A new bpffs mount holds these two iterators (kernel/bpf/preload, with
# CONFIG_BPF_PRELOAD); they are the kernel's and cannot be unlinked.
KERNEL_PRELOADED = frozenset({"maps.debug", "progs.debug"})

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        libc.statfs.restype = ctypes.c_int
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        libc.mount.restype = ctypes.c_int
        libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        libc.umount2.restype = ctypes.c_int
        _libc = libc
    return _libc


def _raise(operation: str, path: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{operation}: {os.strerror(err)}", path)


# struct statfs on 64-bit Linux (x86-64, arm64) starts with a long f_type; the
# whole struct is 120 bytes, the buffer leaves room. os.statvfs has no f_type.
_STATFS_SIZE = 256


def fs_type(path: str) -> int:
    """The filesystem magic number (statfs f_type) of the mount holding ``path``."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _c().statfs(os.fsencode(path), buf) != 0:
        _raise("statfs", path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def is_bpffs(path: str) -> bool:
    """True if ``path`` exists and lies on a BPF filesystem."""
    try:
        return fs_type(path) == BPF_FS_MAGIC
    except FileNotFoundError:
        return False


def _nearest_existing(path: str) -> str:
    current = os.path.abspath(path)
    while not os.path.exists(current):
        current = os.path.dirname(current)
    return current


def ensure_bpffs(path: str, mode: int = 0o700) -> bool:
    """Make ``path`` a directory on a bpffs; True if a bpffs had to be mounted.

    When ``path`` or its nearest existing parent is on a bpffs already (say
    ``/sys/fs/bpf/kracauer``), the missing directories are created there.
    Otherwise ``path`` is created and a new bpffs mounted on it, private to
    root (``mode=0700``). The mount lasts until unmounted or the mount
    namespace goes; pins in it vanish with it.
    """
    path = os.path.abspath(path)
    if is_bpffs(_nearest_existing(path)):
        os.makedirs(path, mode=mode, exist_ok=True)
        return False
    os.makedirs(path, mode=mode, exist_ok=True)
    options = f"mode={mode:04o}".encode()
    if _c().mount(b"bpf", os.fsencode(path), b"bpf", 0, options) != 0:
        _raise("mount bpffs", path)
    return True


def unmount(path: str, lazy: bool = False) -> None:
    """Unmount the bpffs on ``path`` (``lazy``: even while in use, MNT_DETACH).

    Refuses a path that is not a bpffs, so a wrong argument cannot unmount
    something else.
    """
    if not is_bpffs(path):
        raise OSError(errno.EINVAL, "not a bpffs", path)
    if _c().umount2(os.fsencode(path), MNT_DETACH if lazy else 0) != 0:
        _raise("umount bpffs", path)


def remove_pins(directory: str) -> int:
    """Unlink every pin under ``directory`` and the emptied subdirectories;
    returns how many pins went.

    ``directory`` itself stays (it may be a mount point), and so do the
    kernel's own ``maps.debug``/``progs.debug`` at a mount's root. Refuses a
    directory that is not on a bpffs: there, the files are not pins.
    """
    if not os.path.isdir(directory):
        return 0
    if not is_bpffs(directory):
        raise OSError(errno.EINVAL, "not on a bpffs, refusing to remove files", directory)
    return _remove_below(directory)


def _remove_below(directory: str) -> int:
    removed = 0
    mount_root = os.path.ismount(directory)
    with os.scandir(directory) as entries:
        for entry in entries:
            if mount_root and entry.name in KERNEL_PRELOADED:
                continue
            if entry.is_dir(follow_symlinks=False):
                # Another mount below is not ours to empty.
                if os.path.ismount(entry.path):
                    continue
                removed += _remove_below(entry.path)
                try:
                    os.rmdir(entry.path)
                except OSError as exc:
                    if exc.errno != errno.ENOTEMPTY:
                        raise
            else:
                os.unlink(entry.path)
                removed += 1
    return removed
