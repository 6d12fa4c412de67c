"""User-space plumbing for kracauer's kernel data path (eBPF).

``libbpf`` loads BPF objects and works on maps through ctypes over the
system's libbpf; ``bpffs`` mounts and cleans the BPF filesystem where maps are
pinned; ``tc`` attaches programs to an interface with netlink (pyroute2);
``build`` compiles the ``*.bpf.c`` sources next to this file with clang. None
of it runs a program: the daemon never shells out.
"""
