"""ctypes bindings for the small part of libbpf (1.x) kracauer uses.

Three layers, each usable without the next:

- ``BpfObject``: open a compiled ``*.bpf.o``, size and pin its maps, load it,
  hand out program and map file descriptors (libbpf's ``bpf_object__*``).
- map operations on a raw map fd (``map_update``, ``map_lookup``...), with the
  ``Map`` wrapper that remembers key and value sizes; pinning (``obj_pin``,
  ``obj_get``) and ``map_fd_info`` to check a pinned map's layout.
- ``prog_test_run`` (BPF_PROG_TEST_RUN) to run a loaded program on a packet
  built in Python, with ``skb_ctx`` for a tc program's ``struct __sk_buff``.

libbpf's own messages go to the ``kracauer.bpf`` logger. Every failure raises
``BpfError`` (an ``OSError`` with the errno and the operation that failed), or
``BpfUnavailable`` when the box cannot do BPF at all; a program the verifier
rejects raises with the tail of the verifier's log in the message.

libbpf 1.x returns ``-errno`` from functions returning int and NULL (with
``errno`` set) from functions returning a pointer; 0.x had other conventions,
so an older library is refused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger("kracauer.bpf")

# include/uapi/linux/bpf.h: bpf_map_update_elem flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# enum bpf_map_type (the ones kracauer might meet)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE = 21
PERCPU_MAP_TYPES = frozenset(
    {
        BPF_MAP_TYPE_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        BPF_MAP_TYPE_LRU_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE,
    }
)

# tc direct-action verdicts (include/uapi/linux/pkt_cls.h)
TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_PIPE = 3
TC_ACT_REDIRECT = 7

# enum libbpf_print_level
_LIBBPF_WARN = 0
_LIBBPF_INFO = 1
_LIBBPF_DEBUG = 2
_PRINT_LEVELS = {
    _LIBBPF_WARN: logging.WARNING,
    _LIBBPF_INFO: logging.INFO,
    _LIBBPF_DEBUG: logging.DEBUG,
}

# Errors that mean "this box cannot do BPF" rather than "this request was
# wrong": no CAP_BPF/CAP_SYS_ADMIN (EPERM), no bpf() syscall (ENOSYS), a kernel
# built without the feature (EOPNOTSUPP).
_UNAVAILABLE_ERRNOS = frozenset({errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP})

# Lines of the verifier log kept in a load error's message: the reason is at
# the end; the whole log goes to the debug log.
VERIFIER_LOG_TAIL = 40
# The buffer the verifier's log is written to when a load fails, as large as
# libbpf's own (BPF_LOG_BUF_SIZE). Kernels since 6.4 keep the end of a log that
# overflows, but the load then fails with ENOSPC instead of the real reason.
# It is an anonymous mapping, so pages cost memory only once written.
_VERIFIER_LOG_SIZE = 16 << 20
# libbpf's other messages are a line or two; longer ones are cut here.
_PRINT_BUFFER_SIZE = 64 << 10

BPF_OBJ_NAME_LEN = 16


class BpfError(OSError):
    """A BPF operation failed; ``errno`` is set and the message names it."""

    def __init__(self, err: int, operation: str, detail: str = "") -> None:
        message = f"{operation}: {os.strerror(err)}"
        if detail:
            message += f"\n{detail}"
        super().__init__(err, message)
        self.operation = operation
        self.detail = detail


class BpfUnavailable(BpfError):
    """This box cannot do BPF: no libbpf, no privileges, no kernel support."""


def _error(err: int, operation: str, detail: str = "") -> BpfError:
    cls = BpfUnavailable if err in _UNAVAILABLE_ERRNOS else BpfError
    return cls(err, operation, detail)


# -- loading the library ----------------------------------------------------

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_libc: ctypes.CDLL | None = None
# Messages libbpf prints while a BpfObject loads on this thread, for the error.
_capture = threading.local()


def _print(level: int, fmt: int, args: int) -> int:
    """libbpf's print callback: format with vsnprintf, log to kracauer.bpf.

    ``args`` is a ``va_list``; on x86-64 and arm64 it reaches the callback as a
    pointer, which vsnprintf takes as is. It can be consumed only once, so
    the message is formatted into one fixed buffer.
    """
    try:
        py_level = _PRINT_LEVELS.get(level, logging.DEBUG)
        capturing = getattr(_capture, "lines", None) is not None and level == _LIBBPF_WARN
        if not capturing and not log.isEnabledFor(py_level):
            return 0
        assert _libc is not None
        buf = ctypes.create_string_buffer(_PRINT_BUFFER_SIZE)
        _libc.vsnprintf(buf, _PRINT_BUFFER_SIZE, fmt, args)
        # libbpf starts its messages with "libbpf: " itself.
        message = buf.value.decode("utf-8", "replace").rstrip("\n")
        if capturing:
            # The warning travels in the load's exception; logging it as a
            # warning too would report the failure twice.
            _capture.lines.append(message)
            py_level = logging.DEBUG
        log.log(py_level, "%s", message)
    except Exception:  # an exception must not unwind into C
        pass
    return 0


# ctypes frees a callback's trampoline when the Python object goes away, and
# libbpf keeps the pointer for good: this reference lives as long as the module.
_print_callback = _PRINT_FN(_print)


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_uint32, c_uint64 = ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64
    c_void_p, c_char_p, c_size_t = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    signatures = {
        "libbpf_set_print": (c_void_p, [_PRINT_FN]),
        "libbpf_major_version": (c_uint32, []),
        "libbpf_minor_version": (c_uint32, []),
        "libbpf_num_possible_cpus": (c_int, []),
        "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
        "bpf_object__load": (c_int, [c_void_p]),
        "bpf_object__close": (None, [c_void_p]),
        "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
        "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
        "bpf_object__next_program": (c_void_p, [c_void_p, c_void_p]),
        "bpf_object__next_map": (c_void_p, [c_void_p, c_void_p]),
        "bpf_program__fd": (c_int, [c_void_p]),
        "bpf_program__name": (c_char_p, [c_void_p]),
        "bpf_program__set_log_buf": (c_int, [c_void_p, c_void_p, c_size_t]),
        "bpf_map__fd": (c_int, [c_void_p]),
        "bpf_map__name": (c_char_p, [c_void_p]),
        "bpf_map__type": (c_int, [c_void_p]),
        "bpf_map__key_size": (c_uint32, [c_void_p]),
        "bpf_map__value_size": (c_uint32, [c_void_p]),
        "bpf_map__max_entries": (c_uint32, [c_void_p]),
        "bpf_map__map_flags": (c_uint32, [c_void_p]),
        "bpf_map__set_max_entries": (c_int, [c_void_p, c_uint32]),
        "bpf_map__set_pin_path": (c_int, [c_void_p, c_char_p]),
        "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
        "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
        "bpf_map_lookup_and_delete_elem": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_obj_pin": (c_int, [c_int, c_char_p]),
        "bpf_obj_get": (c_int, [c_char_p]),
        "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, ctypes.POINTER(c_uint32)]),
        "bpf_prog_test_run_opts": (c_int, [c_int, c_void_p]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


def library() -> ctypes.CDLL:
    """The loaded libbpf, set up on first use; BpfUnavailable if there is none."""
    global _lib, _libc
    if _lib is not None:
        return _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            _declare(lib)
        except (OSError, AttributeError) as exc:
            raise BpfUnavailable(errno.ENOENT, f"load {name}", str(exc)) from None
        if lib.libbpf_major_version() < 1:
            raise BpfUnavailable(
                errno.ENOTSUP,
                f"load {name}",
                f"libbpf {lib.libbpf_major_version()}.{lib.libbpf_minor_version()} "
                "is too old, kracauer needs 1.x",
            )
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.vsnprintf.restype = ctypes.c_int
        libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p]
        _libc = libc
        lib.libbpf_set_print(_print_callback)
        _lib = lib
        return lib


def num_possible_cpus() -> int:
    """CPUs the kernel may bring up: the number of slots in a per-CPU value."""
    n = library().libbpf_num_possible_cpus()
    if n < 0:
        raise _error(-n, "libbpf_num_possible_cpus")
    return n


def _check(ret: int, operation: str) -> int:
    """Raise for libbpf's negative-errno returns, pass anything else through."""
    if ret < 0:
        raise _error(-ret, operation)
    return ret


def _check_pointer(ptr: int | None, operation: str) -> int:
    if not ptr:
        raise _error(ctypes.get_errno() or errno.EINVAL, operation)
    return ptr


# -- map and program information ------------------------------------------


@dataclass(frozen=True)
class MapInfo:
    """A map's layout: what a pinned map must match to be reused."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0
    name: str = ""
    id: int = 0

    @property
    def percpu(self) -> bool:
        return self.type in PERCPU_MAP_TYPES

    def same_layout(self, other: MapInfo) -> bool:
        """Type, sizes and flags agree (names and ids may differ)."""
        return (self.type, self.key_size, self.value_size, self.max_entries, self.flags) == (
            other.type,
            other.key_size,
            other.value_size,
            other.max_entries,
            other.flags,
        )


# struct bpf_map_info up to and including name[16] (the kernel accepts a
# shorter struct and fills what fits).
_MAP_INFO = struct.Struct(f"=IIIIII{BPF_OBJ_NAME_LEN}s")
# struct bpf_prog_info: type, id, tag[8] ... name[16] at offset 64.
_PROG_INFO_SIZE = 80
_PROG_INFO_HEAD = struct.Struct("=II8s")
_PROG_INFO_NAME_OFFSET = 64


def _obj_info(fd: int, size: int, operation: str) -> bytes:
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    _check(library().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(length)), operation)
    return buf.raw


def map_fd_info(fd: int) -> MapInfo:
    """The layout of the map behind ``fd`` (e.g. one found pinned at start)."""
    raw = _obj_info(fd, _MAP_INFO.size, f"bpf_obj_get_info_by_fd(map fd {fd})")
    type_, id_, key_size, value_size, max_entries, flags, name = _MAP_INFO.unpack(raw)
    return MapInfo(
        type=type_,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        flags=flags,
        name=name.split(b"\0", 1)[0].decode(),
        id=id_,
    )


@dataclass(frozen=True)
class ProgInfo:
    """What identifies a loaded program (tc reports the id of what it runs)."""

    type: int
    id: int
    tag: bytes
    name: str


def prog_fd_info(fd: int) -> ProgInfo:
    """Type, id, tag and name of the program behind ``fd``."""
    raw = _obj_info(fd, _PROG_INFO_SIZE, f"bpf_obj_get_info_by_fd(program fd {fd})")
    type_, id_, tag = _PROG_INFO_HEAD.unpack_from(raw)
    name = raw[_PROG_INFO_NAME_OFFSET : _PROG_INFO_NAME_OFFSET + BPF_OBJ_NAME_LEN]
    return ProgInfo(type=type_, id=id_, tag=tag, name=name.split(b"\0", 1)[0].decode())


# -- map operations on a raw fd --------------------------------------------
#
# The value buffer is sized by the caller: for a per-CPU map the kernel writes
# one 8-byte-aligned slot per possible CPU, so use map_lookup_percpu there (a
# buffer of value_size would be overrun).


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """Insert or replace ``key`` (``flags``: BPF_ANY, BPF_NOEXIST, BPF_EXIST)."""
    _check(library().bpf_map_update_elem(fd, key, value, flags), f"bpf_map_update_elem(fd {fd})")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under ``key``, or None if there is none."""
    value = ctypes.create_string_buffer(value_size)
    ret = library().bpf_map_lookup_elem(fd, key, value)
    if ret == -errno.ENOENT:
        return None
    _check(ret, f"bpf_map_lookup_elem(fd {fd})")
    return value.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Remove ``key``; False if it was not there."""
    ret = library().bpf_map_delete_elem(fd, key)
    if ret == -errno.ENOENT:
        return False
    _check(ret, f"bpf_map_delete_elem(fd {fd})")
    return True


def map_lookup_and_delete(fd: int, key: bytes, value_size: int) -> bytes | None:
    """Remove ``key`` and return what it held, atomically; None if absent.

    Hash maps support it since Linux 5.14 (queues and stacks before that).
    """
    value = ctypes.create_string_buffer(value_size)
    ret = library().bpf_map_lookup_and_delete_elem(fd, key, value)
    if ret == -errno.ENOENT:
        return None
    _check(ret, f"bpf_map_lookup_and_delete_elem(fd {fd})")
    return value.raw


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key in the map, in the kernel's order.

    Deleting the key just yielded is allowed: for a hash map the kernel then
    starts again from the first key, so a key may be seen twice but the walk
    still ends.
    """
    lib = library()
    current = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        ret = lib.bpf_map_get_next_key(fd, current, nxt)
        if ret == -errno.ENOENT:
            return
        _check(ret, f"bpf_map_get_next_key(fd {fd})")
        key = nxt.raw
        yield key
        current = key


def _percpu_stride(value_size: int) -> int:
    return (value_size + 7) & ~7


def map_lookup_percpu(fd: int, key: bytes, value_size: int) -> list[bytes] | None:
    """One value per possible CPU for a per-CPU map, or None if ``key`` is absent."""
    stride = _percpu_stride(value_size)
    ncpus = num_possible_cpus()
    buf = ctypes.create_string_buffer(stride * ncpus)
    ret = library().bpf_map_lookup_elem(fd, key, buf)
    if ret == -errno.ENOENT:
        return None
    _check(ret, f"bpf_map_lookup_elem(per-CPU fd {fd})")
    raw = buf.raw
    return [raw[i * stride : i * stride + value_size] for i in range(ncpus)]


def map_update_percpu(fd: int, key: bytes, values: list[bytes], value_size: int, flags: int = BPF_ANY) -> None:
    """Set a per-CPU map's ``key`` to one value per possible CPU."""
    ncpus = num_possible_cpus()
    if len(values) != ncpus or any(len(v) != value_size for v in values):
        raise ValueError(f"need {ncpus} values of {value_size} bytes")
    stride = _percpu_stride(value_size)
    buf = b"".join(v.ljust(stride, b"\0") for v in values)
    _check(library().bpf_map_update_elem(fd, key, buf, flags), f"bpf_map_update_elem(per-CPU fd {fd})")


def obj_pin(fd: int, path: str) -> None:
    """Pin a map or program at ``path`` (a new file on a bpffs)."""
    _check(library().bpf_obj_pin(fd, os.fsencode(path)), f"bpf_obj_pin({path})")


def obj_get(path: str) -> int:
    """A new fd for the object pinned at ``path``; the caller closes it."""
    return _check(library().bpf_obj_get(os.fsencode(path)), f"bpf_obj_get({path})")


class Map:
    """A map fd with its key and value sizes.

    A Map from ``BpfObject.map`` borrows the object's fd (closed with the
    object); ``Map.from_pin`` opens its own, closed by ``close``.
    """

    def __init__(self, fd: int, key_size: int, value_size: int, percpu: bool = False, owned: bool = False) -> None:
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.percpu = percpu
        self._owned = owned

    @classmethod
    def from_fd(cls, fd: int, owned: bool = False) -> Map:
        """Wrap ``fd``, reading its sizes from the kernel."""
        info = map_fd_info(fd)
        return cls(fd, info.key_size, info.value_size, info.percpu, owned)

    @classmethod
    def from_pin(cls, path: str) -> Map:
        fd = obj_get(path)
        try:
            return cls.from_fd(fd, owned=True)
        except BaseException:
            os.close(fd)
            raise

    def _key(self, key: bytes) -> bytes:
        if len(key) != self.key_size:
            raise ValueError(f"key is {len(key)} bytes, map keys are {self.key_size}")
        return key

    def _not_percpu(self, operation: str) -> None:
        # A per-CPU map reads and writes one slot per CPU: a buffer of one
        # value would be overrun.
        if self.percpu:
            raise TypeError(f"{operation} on a per-CPU map: use {operation}_percpu")

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        self._not_percpu("update")
        if len(value) != self.value_size:
            raise ValueError(f"value is {len(value)} bytes, map values are {self.value_size}")
        map_update(self.fd, self._key(key), value, flags)

    def update_percpu(self, key: bytes, values: list[bytes], flags: int = BPF_ANY) -> None:
        """Set every CPU's value (one per possible CPU) of a per-CPU map."""
        if not self.percpu:
            raise TypeError("update_percpu on a map that is not per-CPU: use update")
        map_update_percpu(self.fd, self._key(key), values, self.value_size, flags)

    def lookup(self, key: bytes) -> bytes | None:
        self._not_percpu("lookup")
        return map_lookup(self.fd, self._key(key), self.value_size)

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        if not self.percpu:
            raise TypeError("lookup_percpu on a map that is not per-CPU: use lookup")
        return map_lookup_percpu(self.fd, self._key(key), self.value_size)

    def delete(self, key: bytes) -> bool:
        return map_delete(self.fd, self._key(key))

    def lookup_and_delete(self, key: bytes) -> bytes | None:
        if self.percpu:
            raise TypeError("lookup_and_delete on a per-CPU map")
        return map_lookup_and_delete(self.fd, self._key(key), self.value_size)

    def keys(self) -> Iterator[bytes]:
        return map_keys(self.fd, self.key_size)

    def info(self) -> MapInfo:
        return map_fd_info(self.fd)

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- BPF objects ------------------------------------------------------------


def _verifier_tail(log_text: str, lines: int = VERIFIER_LOG_TAIL) -> str:
    kept = log_text.rstrip("\n").splitlines()
    if len(kept) > lines:
        return "\n".join(["...", *kept[-lines:]])
    return "\n".join(kept)


class BpfObject:
    """A ``*.bpf.o`` opened with libbpf: maps sized and pinned, then loaded.

    ``open`` parses the ELF; ``set_max_entries`` and the pins apply until
    ``load`` creates the maps and verifies the programs. The fds handed out
    belong to the object and close with it.
    """

    def __init__(self, handle: int, path: str) -> None:
        self._handle: int | None = handle
        self.path = path
        self.loaded = False

    @classmethod
    def open(cls, path: str, pin_maps: dict[str, str] | None = None) -> BpfObject:
        """Open ``path``; each map named in ``pin_maps`` is pinned at its path.

        At load libbpf reuses a map already pinned there if its layout matches
        (and fails if it does not), or creates the map and pins it. The pin's
        directory must exist on a bpffs (see ``bpffs.ensure_bpffs``).
        """
        lib = library()
        handle = _check_pointer(lib.bpf_object__open_file(os.fsencode(path), None), f"bpf_object__open_file({path})")
        obj = cls(handle, path)
        try:
            for name, pin_path in (pin_maps or {}).items():
                ret = lib.bpf_map__set_pin_path(obj._map(name), os.fsencode(pin_path))
                _check(ret, f"bpf_map__set_pin_path({name})")
        except BaseException:
            obj.close()
            raise
        return obj

    def _require_open(self) -> int:
        if self._handle is None:
            raise ValueError(f"BPF object {self.path} is closed")
        return self._handle

    def _map(self, name: str) -> int:
        ptr = library().bpf_object__find_map_by_name(self._require_open(), name.encode())
        if not ptr:
            raise KeyError(f"no map {name!r} in {self.path}")
        return ptr

    def _program(self, name: str) -> int:
        ptr = library().bpf_object__find_program_by_name(self._require_open(), name.encode())
        if not ptr:
            raise KeyError(f"no program {name!r} in {self.path}")
        return ptr

    def _programs(self) -> Iterator[int]:
        lib, handle = library(), self._require_open()
        prog = lib.bpf_object__next_program(handle, None)
        while prog:
            yield prog
            prog = lib.bpf_object__next_program(handle, prog)

    def _maps(self) -> Iterator[int]:
        lib, handle = library(), self._require_open()
        m = lib.bpf_object__next_map(handle, None)
        while m:
            yield m
            m = lib.bpf_object__next_map(handle, m)

    def program_names(self) -> list[str]:
        return [library().bpf_program__name(p).decode() for p in self._programs()]

    def map_names(self) -> list[str]:
        """Every map, including libbpf's internal ones (``.rodata``, ``.bss``)."""
        return [library().bpf_map__name(m).decode() for m in self._maps()]

    def set_max_entries(self, map_name: str, max_entries: int) -> None:
        """Resize a map before ``load`` (the flow map's size comes from config)."""
        if self.loaded:
            raise ValueError("set_max_entries after load")
        ret = library().bpf_map__set_max_entries(self._map(map_name), max_entries)
        _check(ret, f"bpf_map__set_max_entries({map_name})")

    def load(self) -> None:
        """Create (or reuse pinned) maps and load every program.

        A program the verifier refuses raises BpfError whose message ends with
        the last lines of the verifier's log; libbpf's warnings from the load
        (e.g. a pinned map that does not match) come before it.
        """
        lib = library()
        handle = self._require_open()
        # One buffer serves every program: libbpf asks the kernel for a log
        # only when a load fails, and the first failure ends the whole load.
        # libbpf reads the pointer only inside bpf_object__load (a 1.x object
        # loads once), so the buffer may go when this returns.
        log_map = mmap.mmap(-1, _VERIFIER_LOG_SIZE)
        log_buf = (ctypes.c_char * _VERIFIER_LOG_SIZE).from_buffer(log_map)
        for prog in self._programs():
            _check(lib.bpf_program__set_log_buf(prog, log_buf, _VERIFIER_LOG_SIZE), "bpf_program__set_log_buf")
        _capture.lines = []
        try:
            ret = lib.bpf_object__load(handle)
            warnings = _capture.lines
        finally:
            _capture.lines = None
        if ret < 0:
            verifier_log = log_buf.value.decode("utf-8", "replace")
            if verifier_log:
                log.debug("verifier log for %s:\n%s", self.path, verifier_log)
            parts = list(warnings)
            if verifier_log:
                parts.append("verifier log (tail):\n" + _verifier_tail(verifier_log))
            raise _error(-ret, f"bpf_object__load({self.path})", "\n".join(parts))
        self.loaded = True

    def program_fd(self, name: str) -> int:
        fd = library().bpf_program__fd(self._program(name))
        return _check(fd, f"bpf_program__fd({name})")

    def map_fd(self, name: str) -> int:
        fd = library().bpf_map__fd(self._map(name))
        return _check(fd, f"bpf_map__fd({name})")

    def map_info(self, name: str) -> MapInfo:
        """The layout libbpf will create (before load) or created (after)."""
        lib = library()
        m = self._map(name)
        return MapInfo(
            type=lib.bpf_map__type(m),
            key_size=lib.bpf_map__key_size(m),
            value_size=lib.bpf_map__value_size(m),
            max_entries=lib.bpf_map__max_entries(m),
            flags=lib.bpf_map__map_flags(m),
            name=lib.bpf_map__name(m).decode(),
        )

    def map(self, name: str) -> Map:
        """A Map on the loaded map ``name`` (borrowing the object's fd)."""
        info = self.map_info(name)
        return Map(self.map_fd(name), info.key_size, info.value_size, info.percpu)

    def close(self) -> None:
        """Close every fd of the object; pinned maps and attached programs stay."""
        if self._handle is not None:
            library().bpf_object__close(self._handle)
            self._handle = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- BPF_PROG_TEST_RUN ------------------------------------------------------


class _TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.1, bpf/bpf.h); ``sz`` tells libbpf
    which fields this caller knows."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class TestRun:
    """What one BPF_PROG_TEST_RUN returned."""

    __test__ = False  # not a pytest test class, whatever its name says

    retval: int
    data_out: bytes
    ctx_out: bytes | None
    duration_ns: int


def prog_test_run(
    prog_fd: int,
    data: bytes,
    ctx: bytes | None = None,
    repeat: int = 1,
    data_out_size: int | None = None,
) -> TestRun:
    """Run a loaded program on ``data`` in the kernel and return what it did.

    For a tc program ``data`` starts with an Ethernet header (at least 14
    bytes) and ``ctx`` is a ``struct __sk_buff`` (see ``skb_ctx``); the kernel
    runs it on a fresh skb of the loopback device (or ``ctx``'s ifindex).
    ``data_out`` is the packet after the program, ``duration_ns`` the mean
    time of one of ``repeat`` runs. A packet growing past ``data_out_size``
    (default ``len(data) + 256``) fails with ENOSPC.
    """
    if data_out_size is None:
        data_out_size = len(data) + 256
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(data_out_size)
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts))
    opts.data_in = ctypes.cast(data_in, ctypes.c_void_p)
    opts.data_size_in = len(data)
    opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
    opts.data_size_out = data_out_size
    opts.repeat = repeat
    ctx_out = None
    if ctx is not None:
        ctx_in = ctypes.create_string_buffer(ctx, len(ctx))
        ctx_out = ctypes.create_string_buffer(len(ctx))
        opts.ctx_in = ctypes.cast(ctx_in, ctypes.c_void_p)
        opts.ctx_size_in = len(ctx)
        opts.ctx_out = ctypes.cast(ctx_out, ctypes.c_void_p)
        opts.ctx_size_out = len(ctx)
    ret = library().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    _check(ret, f"bpf_prog_test_run_opts(program fd {prog_fd})")
    return TestRun(
        retval=opts.retval,
        data_out=data_out.raw[: opts.data_size_out],
        ctx_out=None if ctx_out is None else ctx_out.raw[: opts.ctx_size_out],
        duration_ns=opts.duration,
    )


# struct __sk_buff in include/uapi/linux/bpf.h (192 bytes since Linux 5.16).
# BPF_PROG_TEST_RUN refuses (EINVAL) a context with any other field set
# (net/bpf/test_run.c, convert___skb_to_skb).
SKB_CTX_SIZE = 192
_SKB_FIELDS = {
    "mark": (8, "I"),
    "priority": (32, "I"),
    "ingress_ifindex": (36, "I"),
    "ifindex": (40, "I"),
    "cb": (48, "5I"),
    "tstamp": (152, "Q"),
    "wire_len": (160, "I"),
    "gso_segs": (164, "I"),
    "gso_size": (176, "I"),
    "hwtstamp": (184, "Q"),
}


def skb_ctx(
    gso_size: int = 0,
    gso_segs: int = 0,
    ifindex: int = 0,
    mark: int = 0,
    priority: int = 0,
    ingress_ifindex: int = 0,
    cb: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0),
    tstamp: int = 0,
    wire_len: int = 0,
    hwtstamp: int = 0,
) -> bytes:
    """A ``struct __sk_buff`` for ``prog_test_run`` with the fields it accepts.

    ``gso_size``/``gso_segs`` make the test skb look like a GSO packet;
    ``ifindex`` (> 1) runs on that device instead of loopback and must exist in
    the current network namespace; ``wire_len`` is 0 or at least the packet's
    length.
    """
    buf = bytearray(SKB_CTX_SIZE)
    values = {
        "mark": (mark,),
        "priority": (priority,),
        "ingress_ifindex": (ingress_ifindex,),
        "ifindex": (ifindex,),
        "cb": tuple(cb),
        "tstamp": (tstamp,),
        "wire_len": (wire_len,),
        "gso_segs": (gso_segs,),
        "gso_size": (gso_size,),
        "hwtstamp": (hwtstamp,),
    }
    for field, (offset, fmt) in _SKB_FIELDS.items():
        struct.pack_into("=" + fmt, buf, offset, *values[field])
    return bytes(buf)


def skb_ctx_fields(ctx: bytes) -> dict[str, int | tuple[int, ...]]:
    """The fields ``skb_ctx`` sets, read back (e.g. from ``TestRun.ctx_out``)."""
    out: dict[str, int | tuple[int, ...]] = {}
    for field, (offset, fmt) in _SKB_FIELDS.items():
        values = struct.unpack_from("=" + fmt, ctx, offset)
        out[field] = values if len(values) > 1 else values[0]
    return out
