"""Turns the raw case results of one run into the tables, the derived figures and the target checks.

Input: `{system: {case: result}}` as `run.py` collects it (wrk cases carry `rps`, `latency_us` and
`errors`, the throughput case also `cpu_s`; SSE cases carry `ttfb_ms`, `total_ms` and `failures`); a
system that could not be measured carries `{"failed": message}` or `{"skipped": reason}`. Every
figure here compares systems of the same run only.
"""

from __future__ import annotations

from typing import Any

SYSTEMS = ("direct", "gateway", "gateway_workers", "minimal", "minimal_httpx", "litellm")
# Errors of these do not make the run invalid: they are references from outside, reported as they are.
OUTSIDE_SYSTEMS = frozenset({"litellm"})
LATENCY_KEYS = ("p50_c1", "p99_c1", "p50_c32", "p99_c32")
PLAIN_COLUMNS = (
    ("rps_c32", "req/s@32", "{:,.0f}"),
    ("cpu_us", "CPU us/req", "{:,.0f}"),
    ("p50_c1", "p50@1", "{:.2f}"),
    ("p99_c1", "p99@1", "{:.2f}"),
    ("p50_c32", "p50@32", "{:.2f}"),
    ("p99_c32", "p99@32", "{:.2f}"),
    ("errors", "errors", "{:d}"),
)
STREAM_COLUMNS = (
    ("ttfb_c1", "TTFB@1", "{:.2f}"),
    ("stream_c1", "SSE@1", "{:.1f}"),
    ("ttfb_p50", "TTFB p50", "{:.2f}"),
    ("ttfb_p99", "TTFB p99", "{:.2f}"),
    ("stream_p50", "SSE p50", "{:.1f}"),
    ("stream_p99", "SSE p99", "{:.1f}"),
    ("paced_ttfb_c1", "paced TTFB", "{:.2f}"),
    ("paced_stream_c1", "paced SSE", "{:.1f}"),
)
COLUMNS = PLAIN_COLUMNS + STREAM_COLUMNS
LEGEND = (
    "req/s@32: requests per second at 32 connections, 0 ms upstream; CPU us/req: CPU time of the\n"
    "system's processes per request in that case.  p50/p99@N: latency in ms at N connections, 50 ms\n"
    "upstream.  TTFB / SSE: time to first byte / to the end of a stream of 32 events 2 ms apart, ms:\n"
    "@1 one stream at a time (p50), p50/p99 32 concurrent streams; paced: one stream at a time (p50)\n"
    "from paced_upstream.py, which sends on an absolute schedule (nginx's echo_sleep drifts).  errors:\n"
    "socket errors + non-2xx + failed streams.  The gateway with N workers: throughput only (scaling)."
)
Row = dict[str, Any]


def build(results: dict[str, dict[str, Any]], meta: dict[str, Any], logs: dict[str, str]) -> dict[str, Any]:
    """The whole report as plain data (what goes into the JSON file)."""
    rows = {system: row(results.get(system, {})) for system in SYSTEMS}
    errors = error_list(results, SYSTEMS)
    own_errors = [line for line in errors if line.split(" ", 1)[0].rstrip(":") not in OUTSIDE_SYSTEMS]
    derived = derive(rows, meta.get("gateway_workers", 1))
    return {
        "meta": meta,
        "valid": not own_errors,
        "errors": own_errors,
        "notes": [line for line in errors if line not in own_errors],
        "table": rows,
        "derived": derived,
        "targets": targets(derived),
        "cases": results,
        "process_output": logs,
    }


def row(cases: dict[str, Any]) -> Row:
    """One system's line of the tables; None where a figure is missing."""
    if "failed" in cases or "skipped" in cases:
        return {key: None for key, _, _ in COLUMNS}
    instant = cases.get("instant_c32", {})
    sse, sse_c1, paced = cases.get("sse_c32", {}), cases.get("sse_c1", {}), cases.get("sse_paced_c1", {})
    cpu_s = instant.get("cpu_s")
    return {
        "rps_c32": instant.get("rps"),
        "cpu_us": None if cpu_s is None or not instant.get("requests") else cpu_s * 1e6 / instant["requests"],
        "p50_c1": _latency_ms(cases, "slow_c1", "p50"),
        "p99_c1": _latency_ms(cases, "slow_c1", "p99"),
        "p50_c32": _latency_ms(cases, "slow_c32", "p50"),
        "p99_c32": _latency_ms(cases, "slow_c32", "p99"),
        "ttfb_c1": sse_c1.get("ttfb_ms", {}).get("p50"),
        "stream_c1": sse_c1.get("total_ms", {}).get("p50"),
        "ttfb_p50": sse.get("ttfb_ms", {}).get("p50"),
        "ttfb_p99": sse.get("ttfb_ms", {}).get("p99"),
        "stream_p50": sse.get("total_ms", {}).get("p50"),
        "stream_p99": sse.get("total_ms", {}).get("p99"),
        "paced_ttfb_c1": paced.get("ttfb_ms", {}).get("p50"),
        "paced_stream_c1": paced.get("total_ms", {}).get("p50"),
        "errors": sum(_error_count(result) for result in cases.values()),
    }


def _latency_ms(cases: dict[str, Any], case: str, pct: str) -> float | None:
    us = cases.get(case, {}).get("latency_us", {}).get(pct)
    return None if us is None else us / 1000


def _error_count(result: dict[str, Any]) -> int:
    counts: dict[str, int] = result["errors"] if "errors" in result else result.get("failures", {})
    warmup: dict[str, int] = result.get("warmup_failures", {})
    return sum(counts.values()) + sum(warmup.values())


def error_list(results: dict[str, dict[str, Any]], systems: tuple[str, ...]) -> list[str]:
    """Every error of the run, one line each, starting with the system's name."""
    lines = []
    for system in systems:
        cases = results.get(system)
        if cases is None or "failed" in cases or "skipped" in cases:
            why = "no result" if cases is None else cases.get("failed") or cases.get("skipped")
            lines.append(f"{system}: not measured: {why}")
            continue
        for case, result in cases.items():
            counts = {**result.get("errors", {}), **result.get("failures", {})}
            counts.update({f"warm-up {k}": v for k, v in result.get("warmup_failures", {}).items()})
            if result.get("requests", result.get("ok", 0)) == 0:
                counts["no successful request at all"] = 1
            found = ", ".join(f"{name} {count}" for name, count in counts.items() if count)
            if found:
                lines.append(f"{system} {case}: {found}")
    return lines


def derive(rows: dict[str, Row], workers: int) -> dict[str, Any]:
    """Gateway and minimal proxy against direct, the gateway against the minimal proxy and LiteLLM,
    and the gateway with N workers against one."""
    direct, gateway, minimal = rows["direct"], rows["gateway"], rows["minimal"]
    gateway_added = {key: _minus(gateway[key], direct[key]) for key in LATENCY_KEYS}
    minimal_added = {key: _minus(minimal[key], direct[key]) for key in LATENCY_KEYS}
    proxies = (("gateway", gateway), ("minimal", minimal))
    scaled = rows["gateway_workers"]
    return {
        "gateway_added_ms": gateway_added,
        "minimal_added_ms": minimal_added,
        "gateway_over_minimal_added_c32": {
            "p50": _ratio(gateway_added["p50_c32"], minimal_added["p50_c32"]),
            "p99": _ratio(gateway_added["p99_c32"], minimal_added["p99_c32"]),
        },
        "throughput_gateway_over_minimal": _ratio(gateway["rps_c32"], minimal["rps_c32"]),
        "cpu_per_request_gateway_over_minimal": _ratio(gateway["cpu_us"], minimal["cpu_us"]),
        "throughput_gateway_over_litellm": _ratio(gateway["rps_c32"], rows["litellm"]["rps_c32"]),
        # Why the gateway's upstream client is aiohttp's: the same minimal proxy on each client.
        "throughput_minimal_aiohttp_over_httpx": _ratio(minimal["rps_c32"], rows["minimal_httpx"]["rps_c32"]),
        "scaling": {
            "workers": workers,
            "throughput_over_one_worker": _ratio(scaled["rps_c32"], gateway["rps_c32"]),
            "per_worker_efficiency": _ratio(scaled["rps_c32"], _times(gateway["rps_c32"], workers)),
            # Requests per CPU-second of N workers against one: how linear the gateway itself scales,
            # whatever CPU the load generator and the upstream leave it on this machine.
            "cpu_efficiency": _ratio(gateway["cpu_us"], scaled["cpu_us"]),
        },
        "sse_ttfb_over_direct_ms": {
            "c1": {name: _minus(r["ttfb_c1"], direct["ttfb_c1"]) for name, r in proxies},
            "paced_c1": {name: _minus(r["paced_ttfb_c1"], direct["paced_ttfb_c1"]) for name, r in proxies},
            "c32": {
                name: {pct: _minus(r[f"ttfb_{pct}"], direct[f"ttfb_{pct}"]) for pct in ("p50", "p99")}
                for name, r in proxies
            },
        },
        "sse_total_over_direct_pct": {
            "c1": {name: _percent_over(r["stream_c1"], direct["stream_c1"]) for name, r in proxies},
            "paced_c1": {
                name: _percent_over(r["paced_stream_c1"], direct["paced_stream_c1"]) for name, r in proxies
            },
            "c32": {
                name: {
                    pct: _percent_over(r[f"stream_{pct}"], direct[f"stream_{pct}"]) for pct in ("p50", "p99")
                }
                for name, r in proxies
            },
        },
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _times(a: float | None, factor: int) -> float | None:
    return None if a is None else a * factor


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is not positive (a ratio would mean nothing)."""
    return None if a is None or b is None or b <= 0 else a / b


def _percent_over(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None or base <= 0 else (value / base - 1) * 100


def targets(derived: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets (docs/performance.md) that one run can check, each with its figure and verdict."""
    added = derived["gateway_added_ms"]
    ratio = derived["gateway_over_minimal_added_c32"]
    ttfb, total = derived["sse_ttfb_over_direct_ms"], derived["sse_total_over_direct_pct"]
    workers = derived["scaling"]["workers"]
    checks = [
        ("throughput gateway / minimal, 32 conns", derived["throughput_gateway_over_minimal"], ">=", 1.0),
        ("throughput gateway / LiteLLM, 32 conns", derived["throughput_gateway_over_litellm"], ">=", 40.0),
        ("gateway added p50 at 1 conn (ms)", added["p50_c1"], "<=", 1.0),
        ("gateway added p99 at 1 conn (ms)", added["p99_c1"], "<=", 2.0),
        ("gateway added / minimal added, p50 at 32", ratio["p50"], "<=", 1.25),
        ("gateway added / minimal added, p99 at 32", ratio["p99"], "<=", 1.25),
        ("SSE TTFB over direct, 1 stream, p50 (ms)", ttfb["c1"]["gateway"], "<=", 1.0),
        ("SSE stream time over direct, 1 stream (%)", total["c1"]["gateway"], "<=", 2.0),
        ("SSE TTFB over direct, 1 paced stream (ms)", ttfb["paced_c1"]["gateway"], "<=", 1.0),
        ("SSE stream time over direct, 1 paced stream (%)", total["paced_c1"]["gateway"], "<=", 2.0),
        ("SSE TTFB over direct, 32 streams, p50 (ms)", ttfb["c32"]["gateway"]["p50"], "<=", 1.0),
        ("SSE stream time over direct, 32 streams (%)", total["c32"]["gateway"]["p50"], "<=", 2.0),
        (
            f"scaling: {workers} workers / ({workers} x 1 worker)",
            derived["scaling"]["per_worker_efficiency"],
            ">=",
            0.9,
        ),
        # With the load generator and the upstream on the same cores, N workers cannot get N cores:
        # requests per CPU-second show whether the gateway itself scales (no contention between workers).
        (
            f"scaling: requests per CPU-second, {workers} workers / 1",
            derived["scaling"]["cpu_efficiency"],
            ">=",
            0.9,
        ),
    ]
    return [_check(name, value, op, limit) for name, value, op, limit in checks]


def _check(name: str, value: float | None, op: str, limit: float) -> dict[str, Any]:
    if value is None:
        verdict = "n/a"
    else:
        verdict = "met" if (value >= limit if op == ">=" else value <= limit) else "MISSED"
    return {"target": name, "value": value, "limit": f"{op} {limit:g}", "verdict": verdict}


def format_text(report: dict[str, Any]) -> str:
    """The report as the terminal shows it: the tables, the derived figures, the targets, the verdict."""
    workers = report["meta"].get("gateway_workers", 1)
    sections = [
        _table_lines(report["table"], PLAIN_COLUMNS, workers),
        _table_lines(report["table"], STREAM_COLUMNS, workers),
        [LEGEND],
        _derived_lines(report["derived"]),
        _target_lines(report["targets"]),
        _verdict_lines(report),
    ]
    if report["process_output"]:
        names = ", ".join(report["process_output"])
        sections.append(
            [f"the servers wrote output (warnings, errors; see process_output in the JSON): {names}"]
        )
    return "\n\n".join("\n".join(lines) for lines in sections)


def label(system: str, workers: int) -> str:
    return f"gateway x{workers}" if system == "gateway_workers" else system


def _table_lines(rows: dict[str, Row], columns: tuple[tuple[str, str, str], ...], workers: int) -> list[str]:
    header = f"{'system':<14}" + "".join(f"{title:>11}" for _, title, _ in columns)
    lines = [header, "-" * len(header)]
    for system, values in rows.items():
        if all(values[key] is None for key, _, _ in columns):
            continue
        cells = "".join(f"{_fmt(values[key], spec):>11}" for key, _, spec in columns)
        lines.append(f"{label(system, workers):<14}{cells}")
    return lines


def _derived_lines(derived: dict[str, Any]) -> list[str]:
    def added(figures: dict[str, float | None]) -> str:
        return "  ".join(f"{key.replace('_c', '@')} {_fmt(figures[key], '{:+.2f}')}" for key in LATENCY_KEYS)

    def pair(figures: dict[str, float | None], spec: str) -> str:
        return f"p50 {_fmt(figures['p50'], spec)}  p99 {_fmt(figures['p99'], spec)}"

    ratio = derived["gateway_over_minimal_added_c32"]
    ttfb, total = derived["sse_ttfb_over_direct_ms"], derived["sse_total_over_direct_pct"]
    scaling = derived["scaling"]
    return [
        f"gateway added over direct, ms (50 ms upstream):  {added(derived['gateway_added_ms'])}",
        f"minimal added over direct, ms (50 ms upstream):  {added(derived['minimal_added_ms'])}",
        f"gateway added / minimal added at 32 conns:        {pair(ratio, '{:.2f}')}",
        f"throughput gateway / minimal at 32 conns, 0 ms:  "
        f"{_fmt(derived['throughput_gateway_over_minimal'], '{:.2f}')}"
        f"   (CPU per request: {_fmt(derived['cpu_per_request_gateway_over_minimal'], '{:.2f}')})",
        f"throughput gateway / LiteLLM at 32 conns, 0 ms:  "
        f"{_fmt(derived['throughput_gateway_over_litellm'], '{:.1f}')}",
        f"throughput minimal on aiohttp / on stock httpx:  "
        f"{_fmt(derived['throughput_minimal_aiohttp_over_httpx'], '{:.2f}')}",
        f"gateway x{scaling['workers']} / x1: "
        f"throughput {_fmt(scaling['throughput_over_one_worker'], '{:.2f}')}"
        f"  per worker {_fmt(scaling['per_worker_efficiency'], '{:.2f}')}"
        f"  requests per CPU-second {_fmt(scaling['cpu_efficiency'], '{:.2f}')}",
        f"SSE TTFB over direct, ms:   1 stream: gateway {_fmt(ttfb['c1']['gateway'], '{:+.2f}')}"
        f"  minimal {_fmt(ttfb['c1']['minimal'], '{:+.2f}')};   32 streams: gateway "
        f"{pair(ttfb['c32']['gateway'], '{:+.2f}')}   minimal {pair(ttfb['c32']['minimal'], '{:+.2f}')}",
        f"SSE over direct, 1 paced stream: TTFB ms gateway {_fmt(ttfb['paced_c1']['gateway'], '{:+.2f}')}"
        f"  minimal {_fmt(ttfb['paced_c1']['minimal'], '{:+.2f}')};   stream time % gateway "
        f"{_fmt(total['paced_c1']['gateway'], '{:+.1f}')}"
        f"  minimal {_fmt(total['paced_c1']['minimal'], '{:+.1f}')}",
        f"SSE stream time over direct, %:  1 stream: gateway {_fmt(total['c1']['gateway'], '{:+.1f}')}"
        f"  minimal {_fmt(total['c1']['minimal'], '{:+.1f}')};   32 streams: gateway "
        f"{pair(total['c32']['gateway'], '{:+.1f}')}   minimal {pair(total['c32']['minimal'], '{:+.1f}')}",
    ]


def _target_lines(checks: list[dict[str, Any]]) -> list[str]:
    lines = ["targets (docs/performance.md):"]
    for check in checks:
        value = _fmt(check["value"], "{:.2f}")
        lines.append(f"  {check['verdict']:<7} {check['target']:<44} {value:>8}  (target {check['limit']})")
    return lines


def _verdict_lines(report: dict[str, Any]) -> list[str]:
    notes = [f"  note: {line}" for line in report["notes"]]
    if report["valid"]:
        return [
            "VALID: no socket errors, no non-2xx answers, every stream ended with data: [DONE].",
            *notes,
        ]
    errors = report["errors"]
    return (
        [f"NOT VALID: {len(errors)} case(s) with errors; these figures are not a benchmark:"]
        + [f"  {line}" for line in errors]
        + notes
    )


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)
