"""Turns the raw case results of one run into the table, the derived figures and the target checks.

Input: `{system: {case: result}}` as `run.py` collects it (wrk cases carry `rps`, `latency_us` and
`errors`; the SSE case carries `ttfb_ms`, `total_ms` and `failures`); a system that could not be
measured carries `{"failed": message}`. Every figure here compares systems of the same run only.
"""

from __future__ import annotations

from typing import Any

SYSTEMS = ("direct", "gateway", "minimal", "minimal_httpx")
LATENCY_KEYS = ("p50_c1", "p99_c1", "p50_c32", "p99_c32")
COLUMNS = (
    ("rps_c32", "req/s@32", "{:,.0f}"),
    ("p50_c1", "p50@1", "{:.2f}"),
    ("p99_c1", "p99@1", "{:.2f}"),
    ("p50_c32", "p50@32", "{:.2f}"),
    ("p99_c32", "p99@32", "{:.2f}"),
    ("ttfb_p50", "TTFB p50", "{:.2f}"),
    ("ttfb_p99", "TTFB p99", "{:.2f}"),
    ("stream_p50", "SSE p50", "{:.1f}"),
    ("stream_p99", "SSE p99", "{:.1f}"),
    ("errors", "errors", "{:d}"),
)
LEGEND = (
    "req/s@32: requests per second at 32 connections, 0 ms upstream.  p50/p99@N: latency in ms at N\n"
    "connections, 50 ms upstream.  TTFB / SSE: time to first byte / to the end of the stream, ms, 32\n"
    "concurrent streams of 32 events 2 ms apart.  errors: socket errors + non-2xx + failed streams."
)
Row = dict[str, Any]


def build(results: dict[str, dict[str, Any]], meta: dict[str, Any], logs: dict[str, str]) -> dict[str, Any]:
    """The whole report as plain data (what goes into the JSON file)."""
    rows = {system: row(results.get(system, {})) for system in SYSTEMS}
    errors = error_list(results)
    derived = derive(rows)
    return {
        "meta": meta,
        "valid": not errors,
        "errors": errors,
        "table": rows,
        "derived": derived,
        "targets": targets(derived),
        "cases": results,
        "process_output": logs,
    }


def row(cases: dict[str, Any]) -> Row:
    """One system's line of the table; None where a figure is missing."""
    if "failed" in cases:
        return {key: None for key, _, _ in COLUMNS}
    sse = cases.get("sse_c32", {})
    return {
        "rps_c32": cases.get("instant_c32", {}).get("rps"),
        "p50_c1": _latency_ms(cases, "slow_c1", "p50"),
        "p99_c1": _latency_ms(cases, "slow_c1", "p99"),
        "p50_c32": _latency_ms(cases, "slow_c32", "p50"),
        "p99_c32": _latency_ms(cases, "slow_c32", "p99"),
        "ttfb_p50": sse.get("ttfb_ms", {}).get("p50"),
        "ttfb_p99": sse.get("ttfb_ms", {}).get("p99"),
        "stream_p50": sse.get("total_ms", {}).get("p50"),
        "stream_p99": sse.get("total_ms", {}).get("p99"),
        "errors": sum(_error_count(result) for result in cases.values()),
    }


def _latency_ms(cases: dict[str, Any], case: str, pct: str) -> float | None:
    us = cases.get(case, {}).get("latency_us", {}).get(pct)
    return None if us is None else us / 1000


def _error_count(result: dict[str, Any]) -> int:
    if "errors" in result:  # a wrk case
        return sum(result["errors"].values())
    return sum(result.get("failures", {}).values()) + sum(result.get("warmup_failures", {}).values())


def error_list(results: dict[str, dict[str, Any]]) -> list[str]:
    """Every error of the run, one line each; a run with any is not a valid benchmark."""
    lines = []
    for system in SYSTEMS:
        cases = results.get(system)
        if cases is None or "failed" in cases:
            lines.append(f"{system}: not measured: {cases['failed'] if cases else 'no result'}")
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


def derive(rows: dict[str, Row]) -> dict[str, Any]:
    """Gateway and minimal proxy against direct, and the gateway against the minimal proxy."""
    direct, gateway, minimal = rows["direct"], rows["gateway"], rows["minimal"]
    gateway_added = {key: _minus(gateway[key], direct[key]) for key in LATENCY_KEYS}
    minimal_added = {key: _minus(minimal[key], direct[key]) for key in LATENCY_KEYS}
    return {
        "gateway_added_ms": gateway_added,
        "minimal_added_ms": minimal_added,
        "gateway_over_minimal_added_c32": {
            "p50": _ratio(gateway_added["p50_c32"], minimal_added["p50_c32"]),
            "p99": _ratio(gateway_added["p99_c32"], minimal_added["p99_c32"]),
        },
        "throughput_gateway_over_minimal": _ratio(gateway["rps_c32"], minimal["rps_c32"]),
        # Why the gateway's upstream client is aiohttp's: the same minimal proxy on each client.
        "throughput_minimal_aiohttp_over_httpx": _ratio(minimal["rps_c32"], rows["minimal_httpx"]["rps_c32"]),
        "sse_ttfb_over_direct_ms": {
            name: {pct: _minus(r[f"ttfb_{pct}"], direct[f"ttfb_{pct}"]) for pct in ("p50", "p99")}
            for name, r in (("gateway", gateway), ("minimal", minimal))
        },
        "sse_total_over_direct_pct": {
            name: {pct: _percent_over(r[f"stream_{pct}"], direct[f"stream_{pct}"]) for pct in ("p50", "p99")}
            for name, r in (("gateway", gateway), ("minimal", minimal))
        },
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is not positive (a ratio would mean nothing)."""
    return None if a is None or b is None or b <= 0 else a / b


def _percent_over(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None or base <= 0 else (value / base - 1) * 100


def targets(derived: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of shared/PERF.md that one run can check, each with its figure and verdict."""
    added = derived["gateway_added_ms"]
    ratio = derived["gateway_over_minimal_added_c32"]
    ttfb = derived["sse_ttfb_over_direct_ms"]["gateway"]
    total = derived["sse_total_over_direct_pct"]["gateway"]
    checks = [
        ("throughput gateway / minimal, 32 conns", derived["throughput_gateway_over_minimal"], ">=", 1.0),
        ("gateway added p50 at 1 conn (ms)", added["p50_c1"], "<=", 1.0),
        ("gateway added p99 at 1 conn (ms)", added["p99_c1"], "<=", 2.0),
        ("gateway added / minimal added, p50 at 32", ratio["p50"], "<=", 1.25),
        ("gateway added / minimal added, p99 at 32", ratio["p99"], "<=", 1.25),
        ("SSE TTFB over direct, p50 (ms)", ttfb["p50"], "<=", 1.0),
        ("SSE stream time over direct, p50 (%)", total["p50"], "<=", 2.0),
    ]
    return [_check(name, value, op, limit) for name, value, op, limit in checks]


def _check(name: str, value: float | None, op: str, limit: float) -> dict[str, Any]:
    if value is None:
        verdict = "n/a"
    else:
        verdict = "met" if (value >= limit if op == ">=" else value <= limit) else "MISSED"
    return {"target": name, "value": value, "limit": f"{op} {limit:g}", "verdict": verdict}


def format_text(report: dict[str, Any]) -> str:
    """The report as the terminal shows it: the table, the derived figures, the targets, the verdict."""
    sections = [
        [*_table_lines(report["table"]), LEGEND],
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


def _table_lines(rows: dict[str, Row]) -> list[str]:
    header = f"{'system':<9}" + "".join(f"{title:>10}" for _, title, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    for system, values in rows.items():
        cells = "".join(f"{_fmt(values[key], spec):>10}" for key, _, spec in COLUMNS)
        lines.append(f"{system:<9}{cells}")
    return lines


def _derived_lines(derived: dict[str, Any]) -> list[str]:
    def added(figures: dict[str, float | None]) -> str:
        return "  ".join(f"{key.replace('_c', '@')} {_fmt(figures[key], '{:+.2f}')}" for key in LATENCY_KEYS)

    def pair(figures: dict[str, float | None], spec: str) -> str:
        return f"p50 {_fmt(figures['p50'], spec)}  p99 {_fmt(figures['p99'], spec)}"

    ratio = derived["gateway_over_minimal_added_c32"]
    ttfb, total = derived["sse_ttfb_over_direct_ms"], derived["sse_total_over_direct_pct"]
    return [
        f"gateway added over direct, ms (50 ms upstream):  {added(derived['gateway_added_ms'])}",
        f"minimal added over direct, ms (50 ms upstream):  {added(derived['minimal_added_ms'])}",
        f"gateway added / minimal added at 32 conns:        {pair(ratio, '{:.2f}')}",
        f"throughput gateway / minimal at 32 conns, 0 ms:  "
        f"{_fmt(derived['throughput_gateway_over_minimal'], '{:.2f}')}",
        f"throughput minimal on aiohttp / on stock httpx:  "
        f"{_fmt(derived['throughput_minimal_aiohttp_over_httpx'], '{:.2f}')}",
        f"SSE TTFB over direct, ms:   gateway {pair(ttfb['gateway'], '{:+.2f}')}"
        f"   minimal {pair(ttfb['minimal'], '{:+.2f}')}",
        f"SSE stream time over direct, %:  gateway {pair(total['gateway'], '{:+.1f}')}"
        f"   minimal {pair(total['minimal'], '{:+.1f}')}",
    ]


def _target_lines(checks: list[dict[str, Any]]) -> list[str]:
    lines = ["targets (shared/PERF.md):"]
    for check in checks:
        value = _fmt(check["value"], "{:.2f}")
        lines.append(f"  {check['verdict']:<7} {check['target']:<42} {value:>8}  (target {check['limit']})")
    return lines


def _verdict_lines(report: dict[str, Any]) -> list[str]:
    if report["valid"]:
        return ["VALID: no socket errors, no non-2xx answers, every stream ended with data: [DONE]."]
    errors = report["errors"]
    return [f"NOT VALID: {len(errors)} case(s) with errors; these figures are not a benchmark:"] + [
        f"  {line}" for line in errors
    ]


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)
