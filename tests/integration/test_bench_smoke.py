"""scripts/bench.py end to end, small: the memory part with a few hundred connections.

Builds the benchmark's lab (client, box with two kracauers, one with the
kernel path and one without, and nginx; host1 with a connection holder), holds
connections through each proxy, runs the in-process tracker measurement, and
checks the JSON it writes. The output (table, Markdown, chart) of the bulk and
rate parts is checked on made-up results, without a lab. The full benchmark is
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

LAB = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(MISSING), reason="the benchmark needs " + ", ".join(MISSING)),
]


def lab(test):
    for mark in LAB:
        test = mark(test)
    return test


COUNTS = (200, 1000)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    argv = [sys.executable, str(BENCH), "--quick", "--only", "memory", "--memory-counts",
            ",".join(map(str, COUNTS)), "--tracker-connections", "500", "--no-chart", "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=str(REPO))
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text()), proc.stdout


@lab
def test_bench_memory_reports_machine_and_settings(results):
    data, _ = results
    meta = data["meta"]
    assert meta["nproc"] > 0
    assert meta["kernel"] and meta["python"] and meta["date"]
    assert data["settings"]["parts"] == ["memory"]
    assert data["settings"]["memory_counts"] == list(COUNTS)


@lab
def test_bench_memory_holds_every_connection_through_every_proxy(results):
    data, _ = results
    assert set(data["memory"]) == {"kracauer", "kracauer-python", "nginx"}
    for proxy in ("kracauer", "kracauer-python", "nginx"):
        for count in COUNTS:
            m = data["memory"][proxy][str(count)]
            assert m["connections"] >= 0.99 * count, (proxy, count, m)
            assert m["rss_before_kib"] > 0 and m["rss_after_kib"] > 0, (proxy, count, m)
    # nginx holds two sockets per connection on the box; kracauer none.
    assert data["memory"]["nginx"]["1000"]["box_tcp_sockets"] >= 2000
    assert data["memory"]["kracauer"]["1000"]["box_tcp_sockets"] < 1000
    assert data["memory"]["kracauer-python"]["1000"]["box_tcp_sockets"] < 1000
    assert data["memory"]["nginx"]["1000"]["rss_growth_kib"] > 0


@lab
def test_bench_memory_counts_the_kernel_paths_bpf_maps(results):
    data, stdout = results
    for count in COUNTS:
        k = data["memory"]["kracauer"][str(count)]
        # The flow map, sized for the count, is in the kernel path's figure.
        flow = k["bpf_flow_map"]
        assert flow is not None and flow["max_entries"] == max(2 * count * 5 // 4, 1024), k
        assert flow["memlock"] > 0 and k["bpf_map_bytes"] >= flow["memlock"]
        assert k["total_growth_kib"] == pytest.approx(k["rss_growth_kib"] + k["bpf_map_bytes"] / 1024)
        assert k["total_bytes_per_connection"] > k["rss_growth_bytes_per_connection"]
        # No kernel path, no maps: all told is the RSS growth.
        for proxy in ("kracauer-python", "nginx"):
            m = data["memory"][proxy][str(count)]
            assert m["bpf_map_bytes"] == 0 and m["bpf_flow_map"] is None, (proxy, m)
            assert m["total_growth_kib"] == pytest.approx(m["rss_growth_kib"])
    assert "BPF maps" in stdout and "kracauer-python" in stdout


def test_bench_memory_reports_the_tracker_and_the_targets(results):
    data, stdout = results
    assert data["tracker"]["connections"] == 500
    assert data["tracker"]["bytes_per_connection"] > 0
    assert data["tracker"]["top_allocations"]
    for k in ("kracauer", "kracauer-python"):
        for what in ("", " all told"):
            ratio = data["ratios"]["memory"]["1000"][f"{k}/nginx{what}"]
            assert ratio is not None and ratio >= 0, (k, what)
    assert data["tracker"]["state_file"]["connections"] >= 500  # with the warm-up ones
    assert 0 < data["tracker"]["state_file"]["load_seconds"] < 5
    names = [t["target"] for t in data["targets"]]
    assert any("tracker" in n for n in names)
    assert any("RSS growth" in n and "kracauer/nginx" in n for n in names)
    assert any("RSS growth" in n and "kracauer-python/nginx" in n for n in names)
    assert "targets:" in stdout


# -- the output, on made-up results (no lab) ---------------------------------------


def _made_up_results() -> dict:
    """Two rounds of every bulk and rate workload on every path, as run() builds them."""
    paths = bench.PATHS
    factor = {"kernel": 4.0, "nginx": 1.0, "kracauer": 3.0, "kracauer-python": 1.5}
    results = {
        "meta": {"date": "2000-01-01 00:00 UTC", "commit": "abc", "dirty": False, "nproc": 2, "cpu": "test",
                 "memory_gib": 1, "kernel": "6.x", "python": "3.x", "nginx": "nginx/1", "iperf3": "iperf 3",
                 "wrk": "wrk 4", "busy_cores_before": 0, "busy_cores_between_rounds": [0, 0],
                 "busy_cores_after": 0},
        "settings": {"rounds": 2, "parts": ["bulk", "rate"], "quick": True},
        "runs": {}, "medians": {}, "proxy_cpu": {}, "machine_cpu": {}, "cpu_per_gbit": {}, "retransmits": {},
        "seconds": 60.0,
    }
    for key, part, _, _, higher in bench.WORKLOADS:
        runs = {p: [factor[p] * r if higher else 1 / (factor[p] * r) for r in (1.0, 1.2)] for p in paths}
        results["runs"][key] = runs
        results["medians"][key] = {p: bench.median(v) for p, v in runs.items()}
        if part == "bulk" or key == "conn_rate":
            results["proxy_cpu"][key] = {p: 0.5 for p in paths if p != "kernel"}
            results["machine_cpu"][key] = {p: 1.5 for p in paths}
        if part == "bulk":
            results["cpu_per_gbit"][key] = {p: {"proxy": None if p == "kernel" else 0.1, "machine": 0.3,
                                                "softirq": 0.2} for p in paths}
            results["retransmits"][key] = {p: 0 for p in paths}
    results["ratios"] = bench.ratios(results)
    results["targets"] = bench.targets(results)
    return results


def test_bench_reports_both_kracauer_paths_against_nginx_and_the_kernel():
    results = _made_up_results()
    assert "kracauer-python" in bench.PATHS and "kracauer" in bench.PATHS
    r = results["ratios"]["download_1"]
    assert r["kracauer/nginx"] == pytest.approx(3.0) and r["kracauer/kernel"] == pytest.approx(0.75)
    assert r["kracauer-python/nginx"] == pytest.approx(1.5) and r["kracauer-python/kernel"] == pytest.approx(0.375)
    assert r["kracauer/kracauer-python"] == pytest.approx(2.0)
    names = [t["target"] for t in results["targets"]]
    assert "download_1: kracauer/nginx" in names and "download_1: kracauer-python/nginx" in names

    text = bench.table(results)
    head = text.splitlines()[0]
    for column in ("kracauer", "kr-python", "k/nginx", "k/kernel", "py/nginx", "py/kernel"):
        assert column in head.split(), column
    assert "CPU-seconds per Gbit" in text

    md = bench.markdown(results)
    head = next(line for line in md.splitlines() if line.startswith("| workload | unit |"))
    for column in ("kracauer-python", "kracauer/nginx", "kracauer/kernel", "kracauer-python/nginx",
                   "kracauer-python/kernel"):
        assert f"| {column} |" in head, column
    assert "CPU-s/Gbit" in md
    json.dumps(results)  # what main() writes


def test_bench_chart_draws_every_path(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "chart.png"
    bench.chart(_made_up_results(), out)
    assert out.stat().st_size > 10_000
