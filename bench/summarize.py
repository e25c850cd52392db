#!/usr/bin/env python3
"""Turns the raw results of bench/run.sh into a table and a JSON file.

Inputs: a folder of loadgen JSON files (one per run, named <phase>_<run>.json)
and a file of "name value" lines (CPU ticks, memory samples). Output: the
table on stdout and the JSON at --out. Standard library only.
"""

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

# "bare" is two bare forwarding proxies (bench/src/bin/hop.rs) in the places
# of the gateway and the node: the floor under the gateway's figures. Its CPU
# figures are recorded under "gateway" and "node" (the places taken).
PHASES = ("upstream", "bare", "link", "direct")

# Targets from the issue (2-core machine).
TARGET_ADDED_P50_US = 150
TARGET_ADDED_P99_US = 500
TARGET_RPS_C64 = 10_000
TARGET_GATEWAY_CPU_US = 50
TARGET_RSS_BYTES = 100_000_000


def load_runs(folder):
    runs = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            runs[path.stem] = json.loads(path.read_text() or "{}")
        except json.JSONDecodeError:
            runs[path.stem] = {"failed": True}
    return runs


def load_values(path):
    values = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            name, value = line.split(None, 1)
            values[name] = int(value)
    return values


def pct(run, field, p):
    block = (run or {}).get(field) or {}
    return block.get(p)


def machine():
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1) if mem_kb else None,
        "kernel": platform.release(),
        # How an idle CPU waits decides what each wake-up costs at concurrency 1
        # (docs/benchmarks.md, "Idle CPUs and concurrency 1").
        "cpuidle_driver": read_text("/sys/devices/system/cpu/cpuidle/current_driver"),
        "guest_halt_poll_ns": read_int("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
    }


def read_text(path):
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def read_int(path):
    text = read_text(path)
    return int(text) if text and text.isdigit() else None


def summarize_phase(phase, runs, values, clk_tck):
    r = lambda name: runs.get(f"{phase}_{name}") or {}
    s = {
        "c1_latency_p50_us": pct(r("c1"), "latency_us", "p50"),
        "c1_latency_p99_us": pct(r("c1"), "latency_us", "p99"),
        "c1_rps": r("c1").get("ok_rps"),
        "c16_rps": r("c16").get("ok_rps"),
        "c64_rps": r("c64").get("ok_rps"),
        "c64_latency_p50_us": pct(r("c64"), "latency_us", "p50"),
        "c64_latency_p99_us": pct(r("c64"), "latency_us", "p99"),
        "stream_c1_ttfb_p50_us": pct(r("stream_c1"), "ttfb_us", "p50"),
        "stream_c1_ttfb_p99_us": pct(r("stream_c1"), "ttfb_us", "p99"),
        "stream_c16_ttfb_p50_us": pct(r("stream_c16"), "ttfb_us", "p50"),
        "stream_c16_ttfb_p99_us": pct(r("stream_c16"), "ttfb_us", "p99"),
        "stream_c16_rps": r("stream_c16").get("ok_rps"),
        "cpu_run_requests": r("cpu").get("requests"),
        "cpu_run_rps": r("cpu").get("ok_rps"),
    }
    # CPU per request of every run, by process; "other" is what the machine
    # spent beyond these processes and loadgen (other jobs, kernel threads).
    s["cpu_us_per_request"] = {}
    for run in ("c1", "c16", "c64", "stream_c1", "stream_c16", "cpu"):
        # The CPU window spans loadgen's warmup too (same requests, unmeasured).
        sent = (r(run).get("requests") or 0) + values.get(f"cpu_{phase}_{run}_warmup", 0)
        cpu = run_cpu(f"{phase}_{run}", sent, values, clk_tck)
        if cpu:
            s["cpu_us_per_request"][run] = cpu
    cpu = s["cpu_us_per_request"].get("cpu", {})
    for proc in ("gateway", "node", "upstream", "loadgen"):
        if proc in cpu:
            s[f"{proc}_cpu_us_per_request"] = cpu[proc]
    if "machine_busy_percent" in cpu:
        s["machine_busy_percent"] = cpu["machine_busy_percent"]
        s["other_cpu_us_per_request"] = cpu.get("other")
    return s


def run_cpu(label, requests, values, clk_tck):
    if not requests:
        return {}
    us = lambda ticks: ticks * 1e6 / clk_tck / requests
    out, ours = {}, 0.0
    for proc in ("gateway", "node", "upstream"):
        ticks = values.get(f"cpu_{label}_{proc}_ticks")
        if ticks is not None:
            out[proc] = round(us(ticks), 1)
            ours += us(ticks)
    ms = values.get(f"cpu_{label}_loadgen_ms")
    if ms is not None:
        out["loadgen"] = round(ms * 1000 / requests, 1)
        ours += ms * 1000 / requests
    busy = values.get(f"cpu_{label}_machine_busy_ticks")
    total = values.get(f"cpu_{label}_machine_total_ticks")
    if busy is not None and total:
        out["machine_busy_percent"] = round(100 * busy / total, 1)
        out["other"] = round(max(0.0, us(busy) - ours), 1)
    return out


def ratio(a, b, digits=3):
    if a is None or not b:
        return None
    return round(a / b, digits)


def diff(a, b):
    if a is None or b is None:
        return None
    return a - b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True)
    ap.add_argument("--values", required=True)
    ap.add_argument("--clk-tck", type=int, required=True)
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--node-max-concurrency", type=int, default=1024)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--dirty", default="0")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    runs = load_runs(a.runs)
    values = load_values(a.values)
    phases = {p: summarize_phase(p, runs, values, a.clk_tck) for p in PHASES}
    up = phases["upstream"]
    for p in ("bare", "link", "direct"):
        s = phases[p]
        s["added_latency_p50_us"] = diff(s["c1_latency_p50_us"], up["c1_latency_p50_us"])
        s["added_latency_p99_us"] = diff(s["c1_latency_p99_us"], up["c1_latency_p99_us"])
        s["added_ttfb_c1_p50_us"] = diff(s["stream_c1_ttfb_p50_us"], up["stream_c1_ttfb_p50_us"])
        s["added_ttfb_c16_p50_us"] = diff(s["stream_c16_ttfb_p50_us"], up["stream_c16_ttfb_p50_us"])
        s["c16_rps_vs_upstream"] = ratio(s["c16_rps"], up["c16_rps"])
        s["c64_rps_vs_upstream"] = ratio(s["c64_rps"], up["c64_rps"])
        s["c1_p50_vs_upstream"] = ratio(s["c1_latency_p50_us"], up["c1_latency_p50_us"], 2)
    bare = phases["bare"]
    for p in ("link", "direct"):
        s = phases[p]
        # What the gateway and node add beyond two bare hops.
        s["beyond_bare_p50_us"] = diff(s["c1_latency_p50_us"], bare["c1_latency_p50_us"])
        s["beyond_bare_p99_us"] = diff(s["c1_latency_p99_us"], bare["c1_latency_p99_us"])
        s["c64_rps_vs_bare"] = ratio(s["c64_rps"], bare["c64_rps"])
        s["gateway_cpu_vs_bare"] = ratio(s.get("gateway_cpu_us_per_request"), bare.get("gateway_cpu_us_per_request"))

    streams = runs.get("link_streams") or {}
    memory = {
        "streams": a.streams,
        "streams_ok": streams.get("ok"),
        "streams_errors": streams.get("errors"),
        "streams_statuses": streams.get("statuses"),
        "streams_first_error": streams.get("first_error"),
        "stream_latency_p50_ms": round(pct(streams, "latency_us", "p50") / 1000, 1)
        if pct(streams, "latency_us", "p50") is not None
        else None,
        "stream_latency_max_ms": round(pct(streams, "latency_us", "max") / 1000, 1)
        if pct(streams, "latency_us", "max") is not None
        else None,
        "client_connections_open_at_3s": values.get("mem_open_conns_3s"),
        "gateway_rss_idle_mib": round(values.get("mem_rss_idle_kb", 0) / 1024, 1),
        "gateway_rss_at_3s_mib": round(values.get("mem_rss_3s_kb", 0) / 1024, 1),
        "gateway_rss_peak_mib": round(values.get("mem_rss_peak_kb", 0) / 1024, 1),
        "gateway_rss_after_mib": round(values.get("mem_rss_after_kb", 0) / 1024, 1),
        "wall_s": values.get("mem_streams_wall_s"),
        "hung": bool(values.get("mem_streams_hung")),
    }

    link = phases["link"]
    rss_peak_bytes = values.get("mem_rss_peak_kb", 0) * 1024

    def target(name, value, goal, ok):
        return {"name": name, "value": value, "target": goal, "pass": None if value is None else ok}

    def added_target(name, value, goal_us):
        # Below zero the baseline, one process fewer per hop, measured slower
        # than the path through the gateway: the machine was too noisy for the
        # figure to say anything, so it is neither a pass nor a fail.
        t = target(name, value, f"<= {goal_us}", value is not None and value <= goal_us)
        if value is not None and value < 0:
            t["pass"] = None
            t["note"] = "inconclusive: the upstream alone measured slower than through the gateway (noisy machine)"
        return t

    targets = [
        added_target("added latency p50 at concurrency 1 (link), us", link["added_latency_p50_us"],
                     TARGET_ADDED_P50_US),
        added_target("added latency p99 at concurrency 1 (link), us", link["added_latency_p99_us"],
                     TARGET_ADDED_P99_US),
        target("requests/s at concurrency 64 (link)", round(link["c64_rps"]) if link["c64_rps"] else None,
               f">= {TARGET_RPS_C64}", (link["c64_rps"] or 0) >= TARGET_RPS_C64),
        target("gateway CPU per request (link), us", link.get("gateway_cpu_us_per_request"),
               f"<= {TARGET_GATEWAY_CPU_US}",
               link.get("gateway_cpu_us_per_request") is not None
               and link["gateway_cpu_us_per_request"] <= TARGET_GATEWAY_CPU_US),
        target(f"gateway RSS peak with {a.streams} open streams, MB (10^6 B)",
               round(rss_peak_bytes / 1e6, 1) if rss_peak_bytes else None,
               f"< {TARGET_RSS_BYTES // 1_000_000}",
               0 < rss_peak_bytes < TARGET_RSS_BYTES and not memory["hung"]
               and (memory["streams_ok"] or 0) == a.streams),
    ]

    errors = {
        name: {"errors": run.get("errors"), "statuses": run.get("statuses"), "first_error": run.get("first_error")}
        for name, run in runs.items()
        if run.get("failed") or run.get("errors")
    }

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        # CPU already in use (other jobs) in the 2 s before the benchmark
        # started anything: every figure is skewed by this much competition.
        "background": {
            "busy_percent": values.get("background_busy_permille", 0) / 10,
            "loadavg_1m": values.get("background_loadavg_x100", 0) / 100,
        },
        "commit": a.commit,
        "uncommitted_files": int(a.dirty or 0),
        "settings": {
            "scale": a.scale,
            "throughput_run_s": a.duration,
            "node_max_concurrency": a.node_max_concurrency,
            "clk_tck": a.clk_tck,
            "body": {"model": "fake-chat", "max_tokens": 4,
                     "messages": [{"role": "user", "content": "hello there"}]},
        },
        "summary": phases,
        "memory": memory,
        "targets": targets,
        "errors": errors,
        "runs": runs,
    }
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwritten: {a.out}")


def fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        v = round(v) if abs(v) >= 100 else round(v, 2)
    return f"{v:,}{unit}" if isinstance(v, int) else f"{v}{unit}"


def print_table(res):
    s = res["summary"]
    up, bare, link, direct = s["upstream"], s["bare"], s["link"], s["direct"]
    rows = [
        ("latency c1 p50 (us)", "c1_latency_p50_us"),
        ("latency c1 p99 (us)", "c1_latency_p99_us"),
        ("added latency c1 p50 (us)", "added_latency_p50_us"),
        ("added latency c1 p99 (us)", "added_latency_p99_us"),
        ("  beyond bare hops p50 (us)", "beyond_bare_p50_us"),
        ("  beyond bare hops p99 (us)", "beyond_bare_p99_us"),
        ("requests/s c1", "c1_rps"),
        ("requests/s c16", "c16_rps"),
        ("requests/s c64", "c64_rps"),
        ("  vs upstream (c64)", "c64_rps_vs_upstream"),
        ("  vs bare hops (c64)", "c64_rps_vs_bare"),
        ("latency c64 p50 (us)", "c64_latency_p50_us"),
        ("latency c64 p99 (us)", "c64_latency_p99_us"),
        ("stream TTFB c1 p50 (us)", "stream_c1_ttfb_p50_us"),
        ("stream TTFB c1 p99 (us)", "stream_c1_ttfb_p99_us"),
        ("stream TTFB c16 p50 (us)", "stream_c16_ttfb_p50_us"),
        ("stream TTFB c16 p99 (us)", "stream_c16_ttfb_p99_us"),
        ("gateway CPU/request (us)", "gateway_cpu_us_per_request"),
        ("  vs bare hop", "gateway_cpu_vs_bare"),
        ("node CPU/request (us)", "node_cpu_us_per_request"),
        ("upstream CPU/request (us)", "upstream_cpu_us_per_request"),
        ("loadgen CPU/request (us)", "loadgen_cpu_us_per_request"),
        ("other CPU/request (us)", "other_cpu_us_per_request"),
        ("machine busy in CPU run (%)", "machine_busy_percent"),
    ]
    w = max(len(r[0]) for r in rows)
    bg = res["background"]
    print(f"\nbackground before the run: {bg['busy_percent']}% CPU busy, load average {bg['loadavg_1m']}")
    print(f"\n{'':<{w}}  {'upstream':>10}  {'bare':>10}  {'link':>10}  {'direct':>10}")
    for label, key in rows:
        cells = "  ".join(f"{fmt(p.get(key)):>10}" for p in (up, bare, link, direct))
        print(f"{label:<{w}}  {cells}")
    print("(bare: two bare forwarding proxies in the gateway's and the node's places; its")
    print(" 'gateway' and 'node' CPU rows are those proxies)")
    print("(CPU figures: the fixed-count run at concurrency 64; 'other' is CPU the machine spent")
    print(" outside these processes and loadgen. Gateway CPU/request by run, link / direct:")
    for run in ("c1", "c16", "c64", "stream_c1", "stream_c16", "cpu"):
        g = [s[p].get("cpu_us_per_request", {}).get(run, {}).get("gateway") for p in ("link", "direct")]
        print(f"   {run}: {fmt(g[0])} / {fmt(g[1])} us)" if run == "cpu" else f"   {run}: {fmt(g[0])} / {fmt(g[1])} us")
    m = res["memory"]
    print(
        f"\ngateway RSS with {m['streams']} slow streams (link): idle {m['gateway_rss_idle_mib']} MiB, "
        f"~3 s {m['gateway_rss_at_3s_mib']} MiB, peak {m['gateway_rss_peak_mib']} MiB, "
        f"after {m['gateway_rss_after_mib']} MiB; {fmt(m['client_connections_open_at_3s'])} connections open at ~3 s; "
        f"{fmt(m['streams_ok'])} ok, {fmt(m['streams_errors'])} errors, stream p50 {fmt(m['stream_latency_p50_ms'])} ms, "
        f"max {fmt(m['stream_latency_max_ms'])} ms"
    )
    print("\ntargets (2-core machine):")
    for t in res["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        note = f"; {t['note']}" if t.get("note") else ""
        print(f"  {verdict:<4}  {t['name']}: {fmt(t['value'])} (target {t['target']}{note})")
    print(
        f"  floor (two bare hops, same run): added p50 {fmt(bare.get('added_latency_p50_us'))} us, "
        f"p99 {fmt(bare.get('added_latency_p99_us'))} us; {fmt(bare.get('c64_rps'))} requests/s at c64; "
        f"first hop's CPU {fmt(bare.get('gateway_cpu_us_per_request'))} us/request"
    )
    if res["errors"]:
        print("\nruns with errors:")
        for name, e in res["errors"].items():
            print(f"  {name}: {e}")


if __name__ == "__main__":
    main()
