"""The ledger itself, on both backends: exact sums, groups, time ranges, idempotent writes, keys."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import fields
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.ids import new_id
from gateway.ledger.schema import requests
from gateway.ledger.store import ROW_FIELDS, KeyNameTaken, KeyNotFound, Ledger, LedgerRow, usd
from gateway.ledger.writer import LedgerWriter
from tests.ledgers import BACKENDS, booked_rows, count_rows, ledger_database

DAY_US = 86_400_000_000
NOV_25 = 1_795_564_800_000_000  # 2026-11-25T00:00:00Z in microseconds


@pytest.fixture(params=BACKENDS)
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    with ledger_database(request.param, tmp_path) as url:
        store = Ledger(url)
        store.migrate()
        store.migrate()  # a second start finds the schema current
        yield store
        store.close()


def row(**fields: object) -> LedgerRow:
    values: dict[str, object] = {
        "row_id": uuid.uuid4().hex,
        "request_id": uuid.uuid4().hex,
        "ts_us": NOV_25,
        "day": "2026-11-25",
        "key_name": "alice",
        "user": None,
        "model": "m",
        "stream": False,
        "outcome": "ok",
        "status": 200,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "cost_nanos": 0,
        "usage_source": "upstream",
        "cost_source": "upstream",
        "latency_us": 1,
        "ttfb_us": None,
        "service_tier": None,
    }
    values.update(fields)
    return LedgerRow(**values)  # type: ignore[arg-type]


def test_a_ledger_row_has_the_requests_tables_columns_in_order() -> None:
    # The table (schema.py) is the one list of columns; LedgerRow mirrors it, and the INSERT, the
    # spill file and the dead letters take their column names from LedgerRow's fields.
    assert tuple(requests.columns.keys()) == ROW_FIELDS
    nullable = {column.name for column in requests.columns if column.nullable}
    optional = {field.name for field in fields(LedgerRow) if "None" in str(field.type)}
    assert optional == nullable


def test_totals_per_group_are_exact_and_ordered_by_spend(ledger: Ledger) -> None:
    ledger.insert(
        [
            row(user="bob", prompt_tokens=15, completion_tokens=16, total_tokens=31, cost_nanos=26_800),
            row(user="bob", prompt_tokens=1, completion_tokens=2, total_tokens=3, cost_nanos=1),
            row(user="ann", cost_nanos=99_999_999_999),
            row(user=None, outcome="rejected", status=400),
        ]
    )
    totals = ledger.usage("user")
    assert [(t.group, t.requests, t.total_tokens, t.cost_nanos) for t in totals] == [
        ("ann", 1, 0, 99_999_999_999),
        ("bob", 2, 34, 26_801),
        (None, 1, 0, 0),
    ]
    assert totals[1].estimated_cost == Decimal("0.000026801")
    assert totals[0].estimated_cost == Decimal("99.999999999")


def test_since_is_inclusive_until_exclusive_and_days_group(ledger: Ledger) -> None:
    ledger.insert(
        [
            row(ts_us=NOV_25 - 1, day="2026-11-24"),
            row(ts_us=NOV_25),
            row(ts_us=NOV_25 + DAY_US, day="2026-11-26"),
        ]
    )
    assert [t.requests for t in ledger.usage("key", NOV_25, NOV_25 + DAY_US)] == [1]
    assert [t.group for t in ledger.usage("day")] == ["2026-11-24", "2026-11-25", "2026-11-26"]
    assert ledger.usage("model", NOV_25 + 2 * DAY_US) == []


def test_a_retried_batch_is_written_once(ledger: Ledger) -> None:
    batch = [row(cost_nanos=5), row(cost_nanos=7)]
    ledger.insert(batch)
    ledger.insert(batch)
    assert count_rows(ledger) == 2
    assert ledger.usage("key")[0].cost_nanos == 12


@pytest.mark.parametrize("size", [1, 5, 339, 1000])
def test_a_batch_of_any_size_is_written_whole(ledger: Ledger, size: int) -> None:
    """Batches go in as INSERTs of a few fixed sizes (339 = 256 + 64 + 16 + 3 x 1)."""
    rows = [row(cost_nanos=index) for index in range(size)]
    ledger.insert(rows)
    ledger.insert(rows)  # retried: nothing twice
    assert count_rows(ledger) == size
    assert ledger.usage("key")[0].cost_nanos == size * (size - 1) // 2


def test_the_writer_books_everything_queued_before_close(ledger: Ledger, tmp_path: Path) -> None:
    writer = LedgerWriter(ledger, spill_dir=tmp_path / "spill", batch_size=7)
    writer.start()
    for cost in range(100):
        writer.book(row(cost_nanos=cost))
    writer.close()
    assert writer.depth == 0
    assert ledger.usage("key")[0].cost_nanos == sum(range(100))


def test_issued_keys(ledger: Ledger) -> None:
    key = ledger.create_key("dave")
    assert key.startswith("sk-gw-") and len(key) > 40
    assert [k.name for k in ledger.active_keys()] == ["dave"]
    with pytest.raises(KeyNameTaken):
        ledger.create_key("dave")
    revoked = ledger.revoke_key("dave")
    assert revoked.revoked_us is not None
    assert ledger.active_keys() == []
    with pytest.raises(KeyNameTaken):  # a revoked name is never reused
        ledger.create_key("dave")
    with pytest.raises(KeyNotFound):
        ledger.revoke_key("nobody")
    assert key.encode() not in repr(ledger.list_keys()).encode()


def test_usd_is_exact_decimal_text() -> None:
    assert str(usd(26_800)) == "0.0000268"
    assert str(usd(1_519)) == "0.000001519"
    assert str(usd(3_000_000_000)) == "3"
    assert format(usd(10), "f") == "0.00000001"


costs = st.integers(min_value=0, max_value=10**12)
bookings = st.lists(
    st.tuples(
        st.sampled_from(["ann", "bob", None]), st.sampled_from(["alice", "bob"]), costs, st.integers(0, 10**6)
    ),
    max_size=30,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mix=bookings)
def test_totals_always_equal_the_sums(ledger: Ledger, mix: list[tuple[str | None, str, int, int]]) -> None:
    model = uuid.uuid4().hex  # this example's rows only
    ledger.insert([row(user=u, key_name=k, model=model, cost_nanos=c, total_tokens=t) for u, k, c, t in mix])
    rows = [r for r in booked_rows(ledger) if r["model"] == model]
    assert len(rows) == len(mix)
    totals = {t.group: t for t in ledger.usage("model")}
    if mix:
        assert totals[model].cost_nanos == sum(c for *_, c, _ in mix)
        assert totals[model].total_tokens == sum(t for *_, t in mix)
        assert totals[model].estimated_cost == Decimal(sum(c for *_, c, _ in mix)) / Decimal(10**9)


def test_row_ids_are_unique_time_ordered_and_new_in_a_forked_worker() -> None:
    """Row ids keep retried batches idempotent: two processes must never make the same one."""
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids) and all(len(row_id) == 32 for row_id in ids)
    assert new_id(NOV_25 + DAY_US) > new_id(NOV_25)  # later rows sort later: the key grows at its end
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the forked child reports one id and leaves at once
        os.write(writer, new_id().encode())
        os._exit(0)
    os.close(writer)
    child_id = os.read(reader, 64).decode()
    os.close(reader)
    os.waitpid(child, 0)
    tag = slice(13, 24)  # after the 13 hex digits of the time
    assert child_id[tag] != ids[0][tag]
