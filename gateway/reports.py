"""Usage reports: the query parameters, checked, and the answer as JSON, CSV or a table.

Shared by the admin API and `gateway usage`, so both say exactly the same. Totals are exact: the
ledger sums integer nano-dollars and the cost is written as a decimal literal, never via a float.
In CSV, a name that a spreadsheet would run as a formula (callers choose their `user`) is written
with a leading `'`, which spreadsheets show as text (OWASP's advice on CSV injection).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

import orjson

from gateway.errors import InvalidRequest
from gateway.ledger.store import GROUPS, UsageTotal

FORMATS = ("json", "csv", "table")
# A report's columns after the group, in every format: these counts of UsageTotal, then the cost.
_COUNTS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
_COLUMNS = (*_COUNTS, "estimated_cost")


@dataclass(frozen=True)
class UsageQuery:
    group_by: str
    since_us: int | None
    until_us: int | None


def usage_query(group_by: str | None, since: str | None, until: str | None) -> UsageQuery:
    """Check the parameters of a usage report; InvalidRequest names the one that is wrong."""
    group_by = group_by or "user"
    if group_by not in GROUPS:
        raise InvalidRequest(
            f"group_by must be one of {', '.join(GROUPS)}; got {group_by!r}", param="group_by"
        )
    since_us = parse_time(since, "since")
    until_us = parse_time(until, "until")
    if since_us is not None and until_us is not None and since_us > until_us:
        raise InvalidRequest("since must not be after until", param="since")
    return UsageQuery(group_by, since_us, until_us)


SERIES_GROUPS = ("user", "key", "model")


def daily_query(group_by: str | None, since: str | None, until: str | None) -> UsageQuery:
    """Check the parameters of a per-day series (stacked by user, key or model)."""
    group_by = group_by or "user"
    if group_by not in SERIES_GROUPS:
        raise InvalidRequest(
            f"group_by must be one of {', '.join(SERIES_GROUPS)} for a daily series; got {group_by!r}",
            param="group_by",
        )
    return usage_query(group_by, since, until)


def parse_time(value: str | None, param: str) -> int | None:
    """An ISO 8601 date or time as epoch microseconds; UTC when no offset is given; a date is 00:00."""
    if value is None or value == "":
        return None
    try:
        if len(value) == 10:
            moment = datetime.combine(date.fromisoformat(value), datetime.min.time())
        else:
            moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"{param} must be an ISO 8601 date or time (2026-11-25, 2026-11-25T13:00:00Z), got {value!r}",
            param=param,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


def decimal_text(total: UsageTotal) -> str:
    return format(total.estimated_cost, "f")


def as_json(group_by: str, totals: Sequence[UsageTotal]) -> bytes:
    return b'{"data":[' + b",".join(_total_json(group_by, total) for total in totals) + b"]}"


def _total_json(group_by: str, total: UsageTotal) -> bytes:
    """One group's totals as a JSON object; the cost is an exact decimal literal."""
    head = orjson.dumps({group_by: total.group, **{name: getattr(total, name) for name in _COUNTS}})
    return head[:-1] + b',"estimated_cost":' + decimal_text(total).encode() + b"}"


def as_daily_json(group_by: str, series: Sequence[tuple[str, UsageTotal]]) -> bytes:
    """`{"data": [{"day": ..., <group_by>: ..., "requests": ..., ..., "estimated_cost": ...}]}`."""
    items = [
        b'{"day":' + orjson.dumps(day) + b"," + _total_json(group_by, total)[1:] for day, total in series
    ]
    return b'{"data":[' + b",".join(items) + b"]}"


def as_daily_csv(group_by: str, series: Sequence[tuple[str, UsageTotal]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("day", group_by, *_COLUMNS))
    for day, total in series:
        writer.writerow((day, spreadsheet_safe(total.group or ""), *_numbers(total)))
    return out.getvalue()


def as_csv(group_by: str, totals: Sequence[UsageTotal]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((group_by, *_COLUMNS))
    for total in totals:
        writer.writerow((spreadsheet_safe(total.group or ""), *_numbers(total)))
    return out.getvalue()


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(name: str) -> str:
    """A CSV cell a spreadsheet shows as text: `=cmd|...`, `+1`, `-x`, `@SUM(...)` get a leading `'`."""
    return "'" + name if name.startswith(_FORMULA_STARTS) else name


def as_table(group_by: str, totals: Sequence[UsageTotal]) -> str:
    rows: list[tuple[str, ...]] = [(group_by, *_COLUMNS)]
    rows += [(total.group or "(none)", *_numbers(total)) for total in totals]
    if totals:
        rows.append(("TOTAL", *_numbers(_sum(totals))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0 or (totals and index == len(rows) - 2):
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines) + "\n"


def _numbers(total: UsageTotal) -> tuple[str, ...]:
    return (*(str(getattr(total, name)) for name in _COUNTS), decimal_text(total))


def _sum(totals: Sequence[UsageTotal]) -> UsageTotal:
    sums = {name: sum(getattr(total, name) for total in totals) for name in (*_COUNTS, "cost_nanos")}
    return UsageTotal(group="TOTAL", **sums)
