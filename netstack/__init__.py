"""Pure, sans-I/O packet code for kracauer.

Parsing, building, checksums, peekers and the connection tracker. Nothing here
imports socket, os, time, select, fcntl or asyncio: the clock and randomness
are passed in by the caller (see tests/test_purity.py).
"""
