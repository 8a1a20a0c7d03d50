"""Ratio rows, the printed table and the PNG chart of one benchmark run.

Every figure NTONIX is judged by is a ratio against a peer measured in the same run:
nginx doing the same job (``proxy_pass`` for misses and streams, ``proxy_cache`` for
hits) and the backend reached directly. Lower is better for latency and memory,
higher for requests/s. Missing contestants yield ``None`` values, shown as
"NOT AVAILABLE", never an exception.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

NA = "NOT AVAILABLE"

# (case, NTONIX contestant, nginx peer)
THROUGHPUT_CASES: tuple[tuple[str, str, str | None], ...] = (
    ("miss, cache off", "ntonix_miss", "nginx_proxy"),
    ("miss, unique prompts", "ntonix_miss_unique", "nginx_proxy"),
    ("cache hit", "ntonix_hit", "nginx_cache"),
    ("Granian hello (ceiling)", "granian_hello", None),
)
THROUGHPUT_METRICS: tuple[tuple[str, str], ...] = (
    ("rps", "req/s"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
)
# The Rust routers NTONIX is compared with on the miss and streaming paths (bench/harness.py ROUTERS).
ROUTER_PEERS: tuple[tuple[str, str], ...] = (
    ("sglang_rr", "sglang-router round_robin"),
    ("sglang_ca", "sglang-router cache_aware"),
    ("vllm_rr", "vllm-router round_robin"),
    ("vllm_ca", "vllm-router cache_aware"),
)
ROUTER_THROUGHPUT_METRICS: tuple[tuple[str, str], ...] = (("rps", "req/s"), ("p99_ms", "p99 ms"))
ROUTER_STREAM_METRICS: tuple[tuple[str, str], ...] = (
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p99_ms", "TTFT p99 ms"),
)
STREAM_METRICS: tuple[tuple[str, str], ...] = (
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p99_ms", "TTFT p99 ms"),
    ("total_p50_ms", "stream p50 ms"),
    ("total_p99_ms", "stream p99 ms"),
)


def _num(value: Any) -> float | None:
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _get(section: dict[str, Any], key: str | None, *path: str) -> float | None:
    node: Any = section.get(key) if key else None
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return _num(node)


def ratios(
    throughput: dict[str, Any],
    streaming: dict[str, Any],
    memory: dict[str, Any],
    connections: tuple[int, ...],
    stream_load: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for conns in connections if throughput else ():
        c = str(conns)
        for case, subject, peer in THROUGHPUT_CASES:
            for metric, label in THROUGHPUT_METRICS:
                value = _get(throughput, subject, c, metric)
                nginx = _get(throughput, peer, c, metric)
                direct = _get(throughput, "direct", c, metric)
                ceiling = _get(throughput, "granian_hello", c, metric) if subject != "granian_hello" else None
                rows.append(
                    {
                        "section": "throughput",
                        "case": f"{case} @{conns}",
                        "metric": label,
                        "subject": subject,
                        "ntonix": value,
                        "nginx": nginx,
                        "direct": direct,
                        "vs_nginx": _ratio(value, nginx),
                        "vs_direct": _ratio(value, direct),
                        "vs_granian": _ratio(value, ceiling),
                    }
                )
    for metric, label in STREAM_METRICS if streaming else ():
        value = _get(streaming, "ntonix", metric)
        nginx = _get(streaming, "nginx", metric)
        direct = _get(streaming, "direct", metric)
        rows.append(
            {
                "section": "streaming",
                "case": "1 conn, sequential",
                "metric": label,
                "subject": "ntonix",
                "ntonix": value,
                "nginx": nginx,
                "direct": direct,
                "vs_nginx": _ratio(value, nginx),
                "vs_direct": _ratio(value, direct),
                "added_vs_direct": None if value is None or direct is None else value - direct,
            }
        )
    rows += stream_load_ratios(stream_load or {})
    rows += router_ratios(throughput, streaming, connections)
    rows += stream_load_router_ratios(stream_load or {})
    counts = sorted({k for entry in memory.values() for k in entry if k.isdigit()}, key=int)
    mem_rows: list[tuple[str, str, list[str]]] = [("idle", "RSS MiB", ["idle_kb"])] if memory else []
    mem_rows += [(f"{n} open streams", "RSS MiB", [n, "rss_all_open_kb"]) for n in counts]
    for case, label, path in mem_rows:
        value = _get(memory, "ntonix", *path)
        nginx = _get(memory, "nginx", *path)
        ran = _get(memory, "ntonix", path[0], "ran") if path[0].isdigit() else None
        held = memory.get("ntonix", {}).get(path[0]) if path[0].isdigit() else None
        note = None
        if isinstance(held, dict) and "skipped" not in held and not held.get("all_open"):
            note = f"INCOMPLETE: {held.get('peak_open')} open max"
        rows.append(
            {
                "section": "memory",
                "case": case if ran is None or str(int(ran)) == path[0] else f"{case} (ran {int(ran)})",
                "metric": label,
                "subject": "ntonix",
                "ntonix": None if value is None or value == 0 else value / 1024.0,
                "nginx": None if nginx is None or nginx == 0 else nginx / 1024.0,
                "direct": None,
                "vs_nginx": _ratio(value or None, nginx or None),
                "vs_direct": None,
                "note": note,
            }
        )
    return rows


# Streaming under load (bench/harness.py stream_load_phase): (entry key, label, scale).
SLOAD_METRICS: tuple[tuple[str, str, float], ...] = (
    # CPU seconds per 1,000 chunks, shown x1000: microseconds per chunk (same ratio, readable digits).
    ("cpu_s_per_1k_chunks", "CPU us/chunk", 1000.0),
    ("delay_p50_ms", "gap +p50 ms", 1.0),
    ("delay_p99_ms", "gap +p99 ms", 1.0),
    ("probe_ttft_p99_ms", "TTFT p99 ms", 1.0),
    ("rss_kb", "RSS MiB", 1 / 1024.0),
)
SLOAD_ROUTERS: tuple[tuple[str, str], ...] = (
    ("sglang_rr", "sglang-router round_robin"),
    ("vllm_rr", "vllm-router round_robin"),
)


def _positive_ratio(a: float | None, b: float | None) -> float | None:
    # Added delays can be ~0 or negative: a ratio of such figures says nothing.
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return a / b


def _sload_case(stream_load: dict[str, Any]) -> str:
    settings = stream_load.get("settings", {})
    return f"{settings.get('streams')} streams x {_fmt(settings.get('rate'), 0)}/s"


def stream_load_ratios(stream_load: dict[str, Any]) -> list[dict[str, Any]]:
    """NTONIX / nginx (and / direct for TTFT) under the many-stream load, plus capacity."""
    contestants = stream_load.get("contestants") or {}
    if not contestants:
        return []
    rows: list[dict[str, Any]] = []
    case = _sload_case(stream_load)
    for metric, label, scale in SLOAD_METRICS:
        values = {k: _get(contestants, k, metric) for k in ("ntonix", "nginx", "direct")}
        value, nginx, direct = (None if v is None else v * scale for v in values.values())
        ttft = metric == "probe_ttft_p99_ms"
        rows.append(
            {
                "section": "stream_load",
                "case": case,
                "metric": label,
                "subject": "ntonix",
                "ntonix": value,
                "nginx": nginx,
                "direct": direct if metric != "cpu_s_per_1k_chunks" and metric != "rss_kb" else None,
                # A p50 of added delay is ~0 (or negative): no ratio.
                "vs_nginx": None if metric == "delay_p50_ms" else _positive_ratio(value, nginx),
                "vs_direct": _positive_ratio(value, direct) if ttft else None,
                "added_vs_direct": None if not ttft or value is None or direct is None else value - direct,
            }
        )
    capacity = stream_load.get("capacity") or {}
    threshold = stream_load.get("settings", {}).get("cap_threshold_ms")
    if capacity:
        value = _num((capacity.get("ntonix") or {}).get("capacity"))
        nginx = _num((capacity.get("nginx") or {}).get("capacity"))
        rows.append(
            {
                "section": "stream_load",
                "case": f"capacity, gap +p99 <= {_fmt(threshold, 0)} ms",
                "metric": "streams",
                "subject": "ntonix",
                "ntonix": value,
                "nginx": nginx,
                "direct": None,
                "vs_nginx": _ratio(value, nginx),
                "vs_direct": None,
            }
        )
    return rows


def stream_load_router_ratios(stream_load: dict[str, Any]) -> list[dict[str, Any]]:
    """NTONIX / each router under the many-stream load (section "routers")."""
    contestants = stream_load.get("contestants") or {}
    rows: list[dict[str, Any]] = []
    for peer, peer_label in SLOAD_ROUTERS:
        if "skipped" in contestants.get(peer, {"skipped": True}) or "ntonix" not in contestants:
            continue
        for metric, label, scale in SLOAD_METRICS:
            value, other = _get(contestants, "ntonix", metric), _get(contestants, peer, metric)
            value = None if value is None else value * scale
            other = None if other is None else other * scale
            rows.append(
                {
                    "section": "routers",
                    "case": "stream load",
                    "metric": label,
                    "subject": "ntonix",
                    "peer": peer,
                    "peer_label": peer_label,
                    "ntonix": value,
                    "router": other,
                    "vs_router": None if metric == "delay_p50_ms" else _positive_ratio(value, other),
                    "nginx": None,
                    "direct": None,
                    "vs_nginx": None,
                    "vs_direct": None,
                }
            )
    return rows


def stream_load_lines(payload: dict[str, Any]) -> list[str]:
    """The phase's own block in the printed table."""
    sl = payload.get("stream_load") or {}
    contestants = sl.get("contestants") or {}
    if not contestants:
        return []
    st = sl.get("settings", {})
    out = [
        f"\nStreaming under load ({st.get('streams')} streams x {_fmt(st.get('rate'), 0)} tokens/s for "
        f"{_fmt(st.get('seconds'), 0)} s, {st.get('probes')} probe streams; gap = client arrival gap minus "
        "the mock's send gap, ms; CPU = proxy process tree over the steady window)",
        f"{'contestant':<32}{'CPU s/1k':>9}{'mock/1k':>8}{'gap+p50':>9}{'gap+p99':>9}{'p99.9':>8}"
        f"{'late p99':>9}{'TTFT p50':>9}{'TTFT p99':>9}{'RSS MiB':>8}{'err':>5}{'client%':>8}"
        f"{'other cpu%':>11}",
    ]
    for entry in contestants.values():
        if "skipped" in entry:
            out.append(f"{entry['label']:<32}{NA}: {str(entry['skipped'])[:80]}")
            continue
        rss = _num(entry.get("rss_kb"))
        out.append(
            f"{entry['label']:<32}{_fmt(entry.get('cpu_s_per_1k_chunks'), 3):>9}"
            f"{_fmt(entry.get('mock_cpu_s_per_1k_chunks'), 3):>8}{_fmt(entry.get('delay_p50_ms'), 3):>9}"
            f"{_fmt(entry.get('delay_p99_ms'), 3):>9}{_fmt(entry.get('delay_p999_ms'), 2):>8}"
            f"{_fmt(entry.get('mock_late_p99_ms'), 2):>9}{_fmt(entry.get('probe_ttft_p50_ms'), 3):>9}"
            f"{_fmt(entry.get('probe_ttft_p99_ms'), 3):>9}"
            f"{_fmt(None if rss is None else rss / 1024, 1):>8}{entry.get('errors', '-'):>5}"
            f"{_fmt(entry.get('client_cpu_pct'), 0):>8}{_fmt(entry.get('foreign_cpu_pct_max'), 0):>11}"
        )
    for key, cap in (sl.get("capacity") or {}).items():
        trials = ", ".join(f"{t['streams']}: {_fmt(t['p99_ms'])}" for t in cap.get("trials", []))
        bound = (
            f"< {cap['first_fail']}"
            if cap.get("first_fail")
            else "(search limit)"
            if cap.get("at_limit")
            else ""
        )
        out.append(
            f"capacity {key}: {cap.get('capacity') or 'none'} streams pass {bound} "
            f"(gap +p99 <= {_fmt(cap.get('threshold_ms'), 0)} ms; trials n: p99 ms {trials})"
        )
    for t in sl.get("targets") or []:
        state = "not measured" if t["met"] is None else "met" if t["met"] else "MISSED"
        out.append(f"target {t['target']}: {_fmt(t['value'])} (target {t['op']} {t['limit']}): {state}")
    return out


def router_ratios(
    throughput: dict[str, Any], streaming: dict[str, Any], connections: tuple[int, ...]
) -> list[dict[str, Any]]:
    """NTONIX / each router (section "routers"): miss req/s and p99 per connection count, stream TTFT."""
    rows: list[dict[str, Any]] = []

    def row(
        case: str, label: str, value: float | None, peer: str, peer_label: str, other: float | None
    ) -> None:
        rows.append(
            {
                "section": "routers",
                "case": case,
                "metric": label,
                "subject": "ntonix_miss" if case.startswith("miss") else "ntonix",
                "peer": peer,
                "peer_label": peer_label,
                "ntonix": value,
                "router": other,
                "vs_router": _ratio(value, other),
                "nginx": None,
                "direct": None,
                "vs_nginx": None,
                "vs_direct": None,
            }
        )

    for conns in connections if throughput else ():
        c = str(conns)
        for peer, peer_label in ROUTER_PEERS:
            if peer not in throughput:
                continue
            for metric, label in ROUTER_THROUGHPUT_METRICS:
                value = _get(throughput, "ntonix_miss", c, metric)
                row(f"miss @{conns}", label, value, peer, peer_label, _get(throughput, peer, c, metric))
    for peer, peer_label in ROUTER_PEERS if streaming else ():
        if peer not in streaming:
            continue
        for metric, label in ROUTER_STREAM_METRICS:
            value = _get(streaming, "ntonix", metric)
            row("stream, 1 conn", label, value, peer, peer_label, _get(streaming, peer, metric))
    return rows


def _fmt(value: Any, digits: int = 2) -> str:
    num = _num(value)
    if num is None:
        return "-"
    if abs(num) >= 1000:
        return f"{num:,.0f}"
    return f"{num:.{digits}f}"


def table(payload: dict[str, Any]) -> str:
    meta = payload["meta"]
    out: list[str] = []
    out.append(
        f"\nNTONIX benchmark ({meta.get('mode')}: median of {meta.get('reps')} runs, "
        f"{meta.get('duration_s')} s each; {meta.get('pinning')})"
    )
    out.append(
        "'other cpu%': worst CPU use by processes outside the benchmark during a run, % of one core"
        " (0 on a quiet machine)"
    )
    out.append(f"load average at start {meta.get('loadavg_start')}, at end {meta.get('loadavg_end')}")
    out.append("\nThroughput and latency (wrk -t1 --latency, POST /v1/chat/completions)")
    out.append(
        f"{'contestant':<32}{'conns':>6}{'req/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'other cpu%':>12}"
    )
    for key, entry in payload["throughput"].items():
        for conns in meta.get("connections", []):
            row = entry.get(str(conns), {})
            out.append(
                f"{entry['label']:<32}{conns:>6}{_fmt(row.get('rps'), 0):>11}{_fmt(row.get('p50_ms')):>9}"
                f"{_fmt(row.get('p99_ms')):>9}{row.get('errors', '-'):>8}"
                f"{_fmt(row.get('foreign_cpu_pct_max'), 0):>12}"
            )
        del key
    if payload["streaming"]:
        out.append(
            f"\nStreaming ({meta.get('stream_requests')} sequential requests on 1 connection, per run)"
        )
        out.append(
            f"{'contestant':<32}{'TTFT p50':>10}{'TTFT p99':>10}{'total p50':>11}{'total p99':>11}{'err':>5}"
            f"{'other cpu%':>12}"
        )
        for entry in payload["streaming"].values():
            out.append(
                f"{entry['label']:<32}{_fmt(entry['ttft_p50_ms'], 3):>10}{_fmt(entry['ttft_p99_ms'], 3):>10}"
                f"{_fmt(entry['total_p50_ms'], 3):>11}{_fmt(entry['total_p99_ms'], 3):>11}"
                f"{entry['errors']:>5}{_fmt(entry.get('foreign_cpu_pct_max'), 0):>12}"
            )
    if payload["memory"]:
        out.append("\nMemory (RSS of the proxy process tree, MiB)")
        for key, entry in payload["memory"].items():
            parts = [f"idle {_fmt((entry.get('idle_kb') or 0) / 1024, 1)}"]
            for n, res in entry.items():
                if n.isdigit() and isinstance(res, dict):
                    if "skipped" in res:
                        parts.append(f"{n}: {NA}")
                        continue
                    if not res.get("all_open"):
                        parts.append(
                            f"{res['ran']} streams: INCOMPLETE, at most {res['peak_open']} open at once "
                            f"(RSS peak {_fmt(res['rss_peak_kb'] / 1024, 1)}), {res['completed']} [DONE]"
                        )
                        continue
                    state = "ok" if res.get("ok") else "INCOMPLETE"
                    parts.append(
                        f"{res['ran']} streams {_fmt(res['rss_all_open_kb'] / 1024, 1)} "
                        f"({_fmt(res.get('per_stream_kb'), 1)} KiB/stream, "
                        f"{res['completed']} [DONE], {state})"
                    )
            out.append(f"{entry.get('label', key):<32}" + "; ".join(parts))
    out += stream_load_lines(payload)
    out.append("\nRatios (NTONIX / peer; req/s: higher is better; ms and MiB: lower is better)")
    out.append(
        f"{'section':<13}{'case':<34}{'metric':<15}{'NTONIX':>10}{'nginx':>10}{'direct':>10}"
        f"{'/nginx':>8}{'/direct':>9}{'/granian':>9}"
    )
    for row in payload["ratios"]:
        if row["section"] == "routers":
            continue
        shown = _fmt(row["ntonix"]) if row["ntonix"] is not None else (row.get("note") or NA)
        out.append(
            f"{row['section']:<13}{row['case']:<34}{row['metric']:<15}{shown:>10}{_fmt(row['nginx']):>10}"
            f"{_fmt(row['direct']):>10}{_fmt(row['vs_nginx']):>8}{_fmt(row['vs_direct']):>9}"
            f"{_fmt(row.get('vs_granian')):>9}"
        )
    routers = [row for row in payload["ratios"] if row["section"] == "routers"]
    if routers:
        out.append("\nRatios vs the Rust routers (NTONIX / router, same backend, same pinning)")
        out.append(f"{'case':<18}{'metric':<16}{'router':<28}{'NTONIX':>10}{'router':>10}{'/router':>9}")
        for row in routers:
            shown = _fmt(row["router"]) if row["router"] is not None else NA
            out.append(
                f"{row['case']:<18}{row['metric']:<16}{row['peer_label']:<28}{_fmt(row['ntonix']):>10}"
                f"{shown:>10}{_fmt(row['vs_router']):>9}"
            )
    failed = failures(payload)
    if payload["unavailable"]:
        out.append(
            "\nNot available: " + "; ".join(f"{k}: {v[:160]}" for k, v in payload["unavailable"].items())
        )
    out.append("\nChecks: " + ("all passed" if not failed else "FAILED: " + "; ".join(failed)))
    return "\n".join(out)


def failures(payload: dict[str, Any]) -> list[str]:
    """Lost or wrong answers: wrk errors, non-identical bodies, missing [DONE], streams not all open."""
    failed = []
    for key, entry in payload["throughput"].items():
        for conns, row in entry.items():
            if isinstance(row, dict) and row.get("errors"):
                failed.append(f"{key} c={conns}: {row['errors']} wrk errors")
    for key, check in payload["checks"].items():
        if isinstance(check, dict) and check.get("ok") is False:
            failed.append(f"{key}: bodies not byte-identical to the backend's (or no cache HIT)")
    for key, entry in payload["streaming"].items():
        if entry.get("errors"):
            failed.append(f"stream {key}: {entry['errors']} errors")
        if entry.get("min_events", 0) < 20:
            failed.append(f"stream {key}: only {entry.get('min_events')} chunks")
    for key, entry in payload["memory"].items():
        for n, res in entry.items():
            if n.isdigit() and isinstance(res, dict) and "skipped" not in res and not res.get("ok"):
                failed.append(f"memory {key} N={n}: {res.get('error_samples')}")
    for key, entry in (payload.get("stream_load") or {}).get("contestants", {}).items():
        if "skipped" not in entry and entry.get("errors"):
            failed.append(f"stream_load {key}: {entry['errors']} errors {entry.get('error_samples', [])[:2]}")
    return failed


def all_checks_pass(payload: dict[str, Any]) -> bool:
    return not failures(payload)


def chart(payload: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    meta = payload["meta"]
    conns = [str(c) for c in meta.get("connections", [])]
    tp = payload["throughput"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    labels = [entry["label"] for entry in tp.values()]
    ypos = list(range(len(labels)))

    ax = axes[0][0]
    height = 0.8 / max(1, len(conns))
    for i, c in enumerate(conns):
        values = [(_num(entry.get(c, {}).get("rps")) or 0.0) for entry in tp.values()]
        bars = ax.barh(
            [y + i * height for y in ypos], values, height, label=f"{c} conns", color=colors[i % 4]
        )
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    ax.set_yticks([y + height * (len(conns) - 1) / 2 for y in ypos], labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("requests/s (higher is better)")
    ax.set_title("Throughput")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    series = [(c, p) for c in conns for p in ("p50_ms", "p99_ms")]
    height = 0.8 / max(1, len(series))
    for i, (c, p) in enumerate(series):
        values = [(_num(entry.get(c, {}).get(p)) or 0.0) for entry in tp.values()]
        ax.barh([y + i * height for y in ypos], values, height, label=f"{p[:3]} @{c}", color=colors[i % 4])
    ax.set_yticks([y + height * (len(series) - 1) / 2 for y in ypos], labels, fontsize=8)
    ax.invert_yaxis()
    if any(
        (_num(entry.get(c, {}).get(p)) or 0.0) > 0
        for entry in tp.values()
        for c in conns
        for p in ("p50_ms",)
    ):
        ax.set_xscale("log")
    longest = max(
        [(_num(entry.get(c, {}).get(p)) or 0.0) for entry in tp.values() for c, p in series], default=0.0
    )
    if longest > 0:
        ax.set_xlim(right=longest * 6)  # room for the legend on the right
    ax.set_xlabel("latency ms, log scale (lower is better)")
    ax.set_title("Latency percentiles")
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[1][0]
    st = payload["streaming"]
    if st:
        names = [entry["label"] for entry in st.values()]
        sy = list(range(len(names)))
        metrics = [m for m, _ in STREAM_METRICS]
        height = 0.8 / len(metrics)
        for i, (m, label) in enumerate(STREAM_METRICS):
            values = [(_num(entry.get(m)) or 0.0) for entry in st.values()]
            bars = ax.barh([y + i * height for y in sy], values, height, label=label, color=colors[i % 4])
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax.set_yticks([y + height * (len(metrics) - 1) / 2 for y in sy], names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms (lower is better)")
        ax.set_title(f"Streaming, 1 connection, {meta.get('stream_requests')} sequential requests")
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()

    ax = axes[1][1]
    mem = {k: v for k, v in payload["memory"].items() if v.get("idle_kb")}
    if mem:
        counts = sorted({k for entry in mem.values() for k in entry if k.isdigit()}, key=int)
        groups = ["idle", *counts]
        width = 0.8 / max(1, len(mem))
        for i, entry in enumerate(mem.values()):
            values = [(entry.get("idle_kb") or 0) / 1024.0]
            notes = [""]
            for n in counts:
                res = entry.get(n, {})
                res = res if isinstance(res, dict) else {}
                values.append((res.get("rss_all_open_kb") or 0) / 1024.0)
                if "skipped" in res:
                    notes.append("n/a")
                elif res and not res.get("all_open"):
                    notes.append(f"failed:\nmax {res.get('peak_open')}\nopen")
                else:
                    notes.append(f"{values[-1]:.1f}")
            xs = [x + i * width for x in range(len(groups))]
            bars = ax.bar(xs, values, width, label=entry.get("label", "?"), color=colors[i % 4])
            notes[0] = f"{values[0]:.1f}"
            ax.bar_label(bars, labels=notes, fontsize=7, padding=2)
        ax.set_xticks([x + width * (len(mem) - 1) / 2 for x in range(len(groups))])
        ran = {
            n: max(
                (e.get(n, {}).get("ran", int(n)) for e in mem.values() if isinstance(e.get(n), dict)),
                default=n,
            )
            for n in counts
        }
        ax.set_xticklabels(
            [
                g
                if g == "idle"
                else f"{ran[g]} open streams" + ("" if str(ran[g]) == g else f"\n(of {g}: fd limit)")
                for g in groups
            ],
            fontsize=8,
        )
        ax.set_ylabel("RSS MiB (lower is better)")
        ax.set_title("Proxy memory with concurrent open streams")
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()

    noise = max(
        [
            float(row.get("foreign_cpu_pct_max", 0.0))
            for e in tp.values()
            for row in e.values()
            if isinstance(row, dict)
        ]
        + [float(e.get("foreign_cpu_pct_max", 0.0)) for e in st.values()],
        default=0.0,
    )
    title = (
        f"NTONIX vs nginx vs direct - {meta.get('mode')} run {meta.get('date', '')[:10]}, "
        f"median of {meta.get('reps')}, {meta.get('pinning')}"
    )
    if noise > 20:
        title += f"\nshared machine: other processes used up to {noise:.0f}% of a core during runs"
    fig.suptitle(title, fontsize=11)
    routers = [row for row in payload.get("ratios", []) if row["section"] == "routers"]
    lines = []
    if routers:
        parts = [
            f"{row['peer_label']} {row['case']} {row['metric']}: {_fmt(row['vs_router'])}x" for row in routers
        ]
        lines = ["NTONIX / router: " + "; ".join(parts[i : i + 3]) for i in range(0, len(parts), 3)]
    sload = [row for row in payload.get("ratios", []) if row["section"] == "stream_load"]
    if sload:
        parts = [
            f"{row['metric']} {_fmt(row['ntonix'], 3)} vs {_fmt(row['nginx'], 3)} ({_fmt(row['vs_nginx'])}x)"
            for row in sload
        ]
        head = f"Streaming under load, {sload[0]['case']}, NTONIX vs nginx: "
        lines += [head + "; ".join(parts[i : i + 3]) for i in range(0, len(parts), 3)]
    if lines:
        fig.text(0.5, 0.005, "\n".join(lines), ha="center", va="bottom", fontsize=7)
        fig.tight_layout(rect=(0, 0.011 * (len(lines) + 1), 1, 1))
    else:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(payload: dict[str, Any]) -> str:
    """The figures of a run as Markdown tables, for docs/benchmarks.md."""
    meta = payload["meta"]
    out = [
        f"Run: {meta.get('date')}, `{meta.get('command')}` ({meta.get('mode')}: median of {meta.get('reps')} "
        f"runs of {meta.get('duration_s')} s), git {meta.get('git_rev')}, {meta.get('cpu')}, "
        f"{meta.get('nproc')} cores, {meta.get('pinning')}; {meta.get('nginx')}, {meta.get('wrk')}, "
        f"{meta.get('granian')}; streams from {meta.get('stream_backend')}.",
        "",
        "| contestant | conns | req/s | p50 ms | p99 ms | errors | other cpu % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in payload["throughput"].values():
        for conns in meta.get("connections", []):
            row = entry.get(str(conns), {})
            out.append(
                f"| {entry['label']} | {conns} | {_fmt(row.get('rps'), 0)} | {_fmt(row.get('p50_ms'))} | "
                f"{_fmt(row.get('p99_ms'))} | {row.get('errors', '-')} | "
                f"{_fmt(row.get('foreign_cpu_pct_max'), 0)} |"
            )
    if payload["streaming"]:
        out += [
            "",
            "| streaming, ms | TTFT p50 | TTFT p99 | stream p50 | stream p99 | errors | other cpu % |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for entry in payload["streaming"].values():
            out.append(
                f"| {entry['label']} | {_fmt(entry['ttft_p50_ms'], 3)} | {_fmt(entry['ttft_p99_ms'], 3)} | "
                f"{_fmt(entry['total_p50_ms'], 3)} | {_fmt(entry['total_p99_ms'], 3)} | {entry['errors']} | "
                f"{_fmt(entry.get('foreign_cpu_pct_max'), 0)} |"
            )
    if payload["memory"]:
        out += [
            "",
            "| RSS, MiB | idle | open streams | RSS | KiB/stream | [DONE] |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for entry in payload["memory"].values():
            for n, res in entry.items():
                if not (n.isdigit() and isinstance(res, dict)):
                    continue
                if "skipped" in res:
                    out.append(f"| {entry['label']} | - | {n} | {NA} | - | - |")
                elif not res.get("all_open"):
                    out.append(
                        f"| {entry['label']} | {_fmt(res['idle_kb'] / 1024, 1)} | {res['ran']} | "
                        f"failed: at most {res['peak_open']} open at once | - | {res['completed']} |"
                    )
                else:
                    out.append(
                        f"| {entry['label']} | {_fmt(res['idle_kb'] / 1024, 1)} | {res['ran']} | "
                        f"{_fmt(res['rss_all_open_kb'] / 1024, 1)} | {_fmt(res.get('per_stream_kb'), 1)} | "
                        f"{res['completed']} |"
                    )
    sl = payload.get("stream_load") or {}
    if sl.get("contestants"):
        out += [
            "",
            "| streaming under load | CPU s/1k chunks | mock CPU s/1k | gap +p50 ms | gap +p99 ms | "
            "gap +p99.9 ms | mock late p99 ms | TTFT p50 ms | TTFT p99 ms | RSS MiB | errors | other cpu % |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for entry in sl["contestants"].values():
            if "skipped" in entry:
                out.append(f"| {entry['label']} | {NA} | | | | | | | | | | |")
                continue
            rss = _num(entry.get("rss_kb"))
            out.append(
                f"| {entry['label']} | {_fmt(entry.get('cpu_s_per_1k_chunks'), 3)} | "
                f"{_fmt(entry.get('mock_cpu_s_per_1k_chunks'), 3)} | {_fmt(entry.get('delay_p50_ms'), 3)} | "
                f"{_fmt(entry.get('delay_p99_ms'), 3)} | {_fmt(entry.get('delay_p999_ms'), 3)} | "
                f"{_fmt(entry.get('mock_late_p99_ms'), 2)} | "
                f"{_fmt(entry.get('probe_ttft_p50_ms'), 3)} | {_fmt(entry.get('probe_ttft_p99_ms'), 3)} | "
                f"{_fmt(None if rss is None else rss / 1024, 1)} | {entry.get('errors')} | "
                f"{_fmt(entry.get('foreign_cpu_pct_max'), 0)} |"
            )
        out.append("")
        for key, cap in (sl.get("capacity") or {}).items():
            trials = ", ".join(f"{t['streams']}: {_fmt(t['p99_ms'])}" for t in cap.get("trials", []))
            out.append(
                f"- capacity {key}: {cap.get('capacity')} streams pass, {cap.get('first_fail')} fail "
                f"(trials, streams: gap +p99 ms: {trials})"
            )
        for t in sl.get("targets") or []:
            state = "not measured" if t["met"] is None else "met" if t["met"] else "**missed**"
            out.append(f"- target {t['target']}: {_fmt(t['value'])} (target {t['op']} {t['limit']}): {state}")
    out += [
        "",
        "| ratio | case | metric | NTONIX | nginx | direct | NTONIX/nginx | NTONIX/direct | NTONIX/Granian |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in payload["ratios"]:
        if row.get("subject") == "granian_hello" or row["section"] == "routers":
            continue
        shown = _fmt(row["ntonix"]) if row["ntonix"] is not None else (row.get("note") or NA)
        out.append(
            f"| {row['section']} | {row['case']} | {row['metric']} | {shown} | {_fmt(row['nginx'])} | "
            f"{_fmt(row['direct'])} | {_fmt(row['vs_nginx'])} | {_fmt(row['vs_direct'])} | "
            f"{_fmt(row.get('vs_granian'))} |"
        )
    routers = [row for row in payload["ratios"] if row["section"] == "routers"]
    if routers:
        out += [
            "",
            "| vs router | case | metric | NTONIX | router | NTONIX/router |",
            "| --- | --- | --- | ---: | ---: | ---: |",
        ]
        for row in routers:
            shown = _fmt(row["router"]) if row["router"] is not None else NA
            out.append(
                f"| {row['peer_label']} | {row['case']} | {row['metric']} | {_fmt(row['ntonix'])} | "
                f"{shown} | {_fmt(row['vs_router'])} |"
            )
    failed = failures(payload)
    out += ["", "Checks: " + ("all passed." if not failed else "FAILED: " + "; ".join(failed))]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Re-print the table and redraw the chart of a saved run (``--markdown``: tables for the docs)."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    as_markdown = "--markdown" in args
    args = [a for a in args if a != "--markdown"]
    if len(args) != 1:
        print("usage: python bench/report.py [--markdown] bench/results/latest.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    payload = json.loads(path.read_text())
    connections = tuple(int(c) for c in payload["meta"].get("connections", []))
    payload["ratios"] = ratios(
        payload["throughput"],
        payload["streaming"],
        payload["memory"],
        connections,
        stream_load=payload.get("stream_load"),
    )
    if as_markdown:
        print(markdown(payload))
        return 0
    print(table(payload))
    drawn = chart(payload, path.with_suffix(".png"))
    print(f"chart: {drawn}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
