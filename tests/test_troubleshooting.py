"""docs/troubleshooting.md explains every drop reason, outcome and event the code can count (issue #13).

The names are read from the code itself (netstack/tracker.py, netstack/state.py,
kracauer/daemon.py), so a new reason without a line in the doc fails here.
"""

from __future__ import annotations

import ast
import pathlib
import re

from netstack import quic
from netstack.tracker import LISTENER_PROTOCOLS, REFUSALS

# What a quic listener counts for a datagram the Initial reader drops (netstack.udptracker._reason).
QUIC_READER_DROPS = {"not_quic"} | {"quic_" + r for r in (quic.NOT_INITIAL, quic.UNSUPPORTED_VERSION, quic.TOO_SMALL,
                                                          quic.BAD_HEADER, quic.UNDECRYPTABLE, quic.OTHER_CONNECTION)}

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "troubleshooting.md").read_text()
# Calls whose string arguments are a drop or absorb reason, or an outcome.
NAMING_CALLS = {"_drop", "_absorb", "_finish", "_host_failed", "_rst_pending", "_refuse"}
# Counters whose subscripts are reasons or kinds.
COUNTERS = {"drops", "absorbed", "events"}


def strings_in(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def counted_names(path: pathlib.Path) -> set[str]:
    """Every reason, outcome and event kind `path` counts or records."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in NAMING_CALLS:
            for arg in node.args:
                if isinstance(arg, ast.BinOp):  # "not_" + conn.listener.protocol
                    prefix = arg.left.value if isinstance(arg.left, ast.Constant) else None
                    assert prefix == "not_", ast.dump(arg)
                    names.update(f"not_{p}" for p in LISTENER_PROTOCOLS if p != "tcp")  # tcp never peeks
                else:
                    names |= strings_in(arg)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                and node.value.attr in COUNTERS:
            if isinstance(node.slice, ast.BinOp):  # "write_" + errno name
                names.add(node.slice.left.value + "<errno>")
            else:
                names |= strings_in(node.slice)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "outcome"
                                                  for t in node.targets):
            names |= strings_in(node.value)
    return names - {""}


def documented(name: str) -> bool:
    return f"`{name}`" in DOC or (name == "write_<errno>" and "`write_<errno>`" in DOC)


def test_the_code_scan_finds_the_names_it_should():
    names = counted_names(ROOT / "netstack" / "tracker.py")
    # One of each kind of place a name comes from, so that the scan itself cannot silently miss them all.
    assert {"no_listener", "hello_buffered", "idle_timeout", "host_refused", "reset_by_host", "refused_table_full",
            "not_tls", "not_http", "handshake_timeout", "closed"} <= names
    assert "not_tcp" in names  # a drop reason, also spelt so
    assert len(names) > 45


def test_every_name_the_tracker_counts_is_explained():
    names = counted_names(ROOT / "netstack" / "tracker.py") | {outcome for _, outcome in REFUSALS}
    names |= counted_names(ROOT / "netstack" / "udptracker.py") | QUIC_READER_DROPS
    missing = sorted(n for n in names if not documented(n))
    assert not missing, f"docs/troubleshooting.md does not explain: {missing}"


def test_the_daemon_and_the_state_restore_names_are_explained_too():
    names = counted_names(ROOT / "kracauer" / "daemon.py") | counted_names(ROOT / "netstack" / "state.py")
    assert {"internal_error", "write_<errno>", "state_skipped"} <= names
    missing = sorted(n for n in names if not documented(n))
    assert not missing, f"docs/troubleshooting.md does not explain: {missing}"


def test_the_doc_covers_the_problems_a_newcomer_meets_with_the_commands_to_check():
    for heading in ("host_unreachable", "host_refused", "the MTU", "SNI missing", "refused_bad_request"):
        assert re.search(rf"^### .*{re.escape(heading)}", DOC, re.M), heading
    for command in ("ip -6 route get 64:ff9b:1::", "ip -6 route add 64:ff9b:1::/96 via", "sysctl net.ipv4.ip_forward",
                    "nft list ruleset", "tracepath", "ping -M do", "-noservername", "kracauer status"):
        assert command in DOC, command


def test_the_readme_links_the_doc():
    assert "(docs/troubleshooting.md)" in (ROOT / "README.md").read_text()
