"""scripts/bench.py end to end, small: the memory part with a few hundred connections.

Builds the benchmark's lab (client, box with kracauer and nginx, host1 with a
connection holder), holds connections through each proxy, runs the in-process
tracker measurement, and checks the JSON it writes. The full benchmark is
``scripts/bench`` (docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
BENCH = REPO / "scripts" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("kracauer_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
MISSING = bench.missing_requirements({"memory"})

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(MISSING), reason="the benchmark needs " + ", ".join(MISSING)),
]

COUNTS = (200, 1000)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    argv = [sys.executable, str(BENCH), "--quick", "--only", "memory", "--memory-counts",
            ",".join(map(str, COUNTS)), "--tracker-connections", "500", "--no-chart", "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text()), proc.stdout


def test_bench_memory_reports_machine_and_settings(results):
    data, _ = results
    meta = data["meta"]
    assert meta["nproc"] > 0
    assert meta["kernel"] and meta["python"] and meta["date"]
    assert data["settings"]["parts"] == ["memory"]
    assert data["settings"]["memory_counts"] == list(COUNTS)


def test_bench_memory_holds_every_connection_through_both_proxies(results):
    data, _ = results
    for proxy in ("kracauer", "nginx"):
        for count in COUNTS:
            m = data["memory"][proxy][str(count)]
            assert m["connections"] >= 0.99 * count, (proxy, count, m)
            assert m["rss_before_kib"] > 0 and m["rss_after_kib"] > 0, (proxy, count, m)
    # nginx holds two sockets per connection on the box; kracauer none.
    assert data["memory"]["nginx"]["1000"]["box_tcp_sockets"] >= 2000
    assert data["memory"]["kracauer"]["1000"]["box_tcp_sockets"] < 1000
    assert data["memory"]["nginx"]["1000"]["rss_growth_kib"] > 0


def test_bench_memory_reports_the_tracker_and_the_targets(results):
    data, stdout = results
    assert data["tracker"]["connections"] == 500
    assert data["tracker"]["bytes_per_connection"] > 0
    assert data["tracker"]["top_allocations"]
    assert data["tracker"]["state_file"]["connections"] >= 500  # with the warm-up ones
    assert 0 < data["tracker"]["state_file"]["load_seconds"] < 5
    ratio = data["ratios"]["memory"]["1000"]["kracauer/nginx"]
    assert ratio is not None and ratio >= 0
    names = [t["target"] for t in data["targets"]]
    assert any("tracker" in n for n in names) and any("RSS growth" in n for n in names)
    assert "targets:" in stdout
