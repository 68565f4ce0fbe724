"""Who spent what, end to end: SDK traffic through a real gateway, then its reports, on both backends."""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from collections.abc import Iterator
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.cli import main
from tests.conftest import BOB_KEY, CAROL_KEY, auth_headers, chat
from tests.eventually import eventually
from tests.ledgers import BACKENDS, ledger_database, row_count, rows_once_booked
from tests.scenarios import USAGE
from tests.servers import CALLER_KEY, MODEL, UPSTREAM_TOKEN, GatewayProcess, ScriptedUpstream, gateway_config

ADMIN_KEY = "sk-admin-test-0a9f"
REPORT_COLUMNS = ["requests", "prompt_tokens", "completion_tokens", "total_tokens", "estimated_cost"]
UPSTREAM_NANOS = 26_800  # USAGE["estimated_cost"], USD 0.0000268
PRICE_TABLE_NANOS = 31 * 49  # 15 + 16 tokens at USD 0.049 per million = 49 nano-dollars each
ODD_MODEL = "acme/odd-prices"
ODD_PRICES = (Decimal("0.0517"), Decimal("0.0833"))  # sub-nano-dollar prices per token: rounding shows


@pytest.fixture(scope="module", params=BACKENDS)
def booked(
    request: pytest.FixtureRequest, upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """A gateway with its own fresh ledger on each backend, in front of the scripted upstream."""
    tmp = tmp_path_factory.mktemp(f"booked-{request.param}")
    with ledger_database(request.param, tmp) as url:
        config = gateway_config(
            upstream.base_url,
            ledger={"url": url},
            upstream={"read_timeout_s": 1.5},
            auth={
                "keys": [
                    {"name": "alice", "key": CALLER_KEY},
                    {"name": "bob", "key": BOB_KEY},
                    {"name": "carol", "key": CAROL_KEY},
                ]
            },
        )
        config["models"] = [
            {"name": MODEL, "input_usd_per_mtok": "0.049", "output_usd_per_mtok": "0.049"},
            {
                "name": ODD_MODEL,
                "input_usd_per_mtok": str(ODD_PRICES[0]),
                "output_usd_per_mtok": str(ODD_PRICES[1]),
            },
        ]
        env = {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN, "GATEWAY_ADMIN_KEY": ADMIN_KEY}
        process = GatewayProcess(config, tmp, env).start()
        yield process
        process.stop()


def admin(gateway: GatewayProcess) -> httpx.Client:
    return httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)


def report(gateway: GatewayProcess, group_by: str, **params: str) -> dict[str, dict[str, Any]]:
    with admin(gateway) as client:
        response = client.get("/admin/usage", params={"group_by": group_by, **params})
    assert response.status_code == 200, response.text
    return {row[group_by]: row for row in response.json()["data"]}


def test_reports_equal_what_upstream_reported_to_the_nano_dollar(booked: GatewayProcess) -> None:
    """A mix of plain and streamed requests from three keys and three users."""
    before = row_count(booked.ledger_url)
    expected: dict[str, list[int]] = {}  # user -> [requests, total tokens, nanos]
    clients = {
        key: openai.OpenAI(base_url=booked.url + "/v1/openai", api_key=key, max_retries=0)
        for key in (CALLER_KEY, BOB_KEY, CAROL_KEY)
    }
    plan = [
        (CALLER_KEY, "u-ann", "plain", "hi"),
        (CALLER_KEY, "u-ann", "stream", "tricky"),
        (BOB_KEY, "u-ben", "stream", "scenario:openai_usage"),
        (BOB_KEY, "u-ann", "plain", "scenario:no_cost"),
        (CAROL_KEY, "u-cy", "stream", "hi"),
        (CAROL_KEY, "u-cy", "plain", "hi"),
    ] * 3
    for key, user, kind, content in plan:
        messages = [{"role": "user", "content": content}]
        if kind == "plain":
            clients[key].chat.completions.create(model=MODEL, messages=messages, user=user)  # type: ignore[arg-type]
        else:
            list(clients[key].chat.completions.create(model=MODEL, messages=messages, user=user, stream=True))  # type: ignore[arg-type]
        nanos = PRICE_TABLE_NANOS if content == "scenario:no_cost" else UPSTREAM_NANOS
        totals = expected.setdefault(user, [0, 0, 0])
        totals[0] += 1
        totals[1] += USAGE["total_tokens"]
        totals[2] += nanos
    all_rows = rows_once_booked(booked.ledger_url, before + len(plan), within_s=1.0)

    by_user = report(booked, "user")
    for user, (requests, tokens, nanos) in expected.items():
        assert by_user[user]["requests"] == requests
        assert by_user[user]["total_tokens"] == tokens
        assert Decimal(str(by_user[user]["estimated_cost"])) == Decimal(nanos) / 10**9

    rows = [r for r in all_rows if r["user"] in expected]
    assert {r["outcome"] for r in rows} == {"ok"}
    assert {r["key_name"] for r in rows} == {"alice", "bob", "carol"}
    assert sum(r["stream"] for r in rows) == 9
    assert {r["cost_source"] for r in rows if r["cost_nanos"] == PRICE_TABLE_NANOS} == {"price_table"}
    assert all(r["ttfb_us"] is not None and r["latency_us"] >= r["ttfb_us"] for r in rows if r["stream"])


def price_table_nanos(model: str) -> int:
    """15 prompt and 16 completion tokens at the model's prices, rounded half-even to the nano-dollar."""
    prompt_price, completion_price = (
        ODD_PRICES if model == ODD_MODEL else (Decimal("0.049"), Decimal("0.049"))
    )
    exact = (15 * prompt_price + 16 * completion_price) * 1000  # USD per million tokens -> nano-dollars
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


# kind -> (content, extra body fields, (tokens, nano-dollars upstream reports; None: the price table's))
KINDS: dict[str, tuple[str, dict[str, Any], tuple[int, int | None]]] = {
    "plain": ("hi", {}, (31, UPSTREAM_NANOS)),
    "stream": ("tricky", {"stream": True}, (31, UPSTREAM_NANOS)),
    "openai_stream": ("scenario:openai_usage", {"stream": True}, (31, UPSTREAM_NANOS)),
    "no_cost": ("scenario:no_cost", {}, (31, None)),
    "rejected": ("hi", {"temperature": 3}, (0, 0)),
    "upstream_429": ("scenario:rate_limited", {}, (0, 0)),
    "upstream_garbage": ("scenario:garbage", {"stream": True}, (0, 0)),
}
mixes = st.lists(
    st.tuples(
        st.sampled_from(sorted(KINDS)),
        st.sampled_from([MODEL, ODD_MODEL]),
        st.sampled_from([CALLER_KEY, BOB_KEY]),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=10, deadline=None)
@given(mix=mixes)
@example(
    mix=[
        ("no_cost", ODD_MODEL, CALLER_KEY),
        ("no_cost", ODD_MODEL, BOB_KEY),
        ("upstream_garbage", MODEL, BOB_KEY),
    ]
)
def test_any_mix_of_requests_outcomes_and_prices_adds_up_exactly(
    booked: GatewayProcess, mix: list[tuple[str, str, str]]
) -> None:
    user = f"u-{uuid.uuid4().hex[:10]}"
    before = row_count(booked.ledger_url)
    tokens = nanos = 0
    with httpx.Client(base_url=booked.url, timeout=10) as client:
        for kind, model, key in mix:
            content, extra, (kind_tokens, kind_nanos) = KINDS[kind]
            body = {**chat(content, model=model, user=user), **extra}
            client.post("/v1/openai/chat/completions", json=body, headers=auth_headers(key)).read()
            tokens += kind_tokens
            nanos += price_table_nanos(model) if kind_nanos is None else kind_nanos
    rows_once_booked(booked.ledger_url, before + len(mix), within_s=1.0)
    total = report(booked, "user")[user]
    assert (total["requests"], total["total_tokens"]) == (len(mix), tokens)
    assert Decimal(str(total["estimated_cost"])) == Decimal(nanos) / 10**9


def test_costs_callers_are_told_add_up_to_the_reports(booked: GatewayProcess) -> None:
    """Where the gateway prices a request itself (sub-nano-dollar prices), it tells the caller the
    cost it books, to the nano-dollar: what callers were told sums to the report exactly."""
    user = f"told-{uuid.uuid4().hex[:6]}"
    client = openai.OpenAI(base_url=booked.url + "/v1/openai", api_key=CALLER_KEY, max_retries=0)
    told = Decimal(0)
    before = row_count(booked.ledger_url)
    for _ in range(7):
        reply = client.chat.completions.create(
            model=ODD_MODEL, messages=[{"role": "user", "content": "scenario:no_cost"}], user=user
        )
        assert reply.usage is not None
        told += Decimal(repr(reply.usage.model_extra["estimated_cost"]))
    rows_once_booked(booked.ledger_url, before + 7, within_s=1.0)
    with admin(booked) as http:
        text = http.get("/admin/usage", params={"group_by": "user"}).text
    (mine,) = [row for row in json.loads(text, parse_float=Decimal)["data"] if row["user"] == user]
    assert mine["estimated_cost"] == told == 7 * Decimal(price_table_nanos(ODD_MODEL)) / 10**9


def test_usage_json_is_exact_decimal_text(booked: GatewayProcess) -> None:
    with admin(booked) as client:
        text = client.get("/admin/usage", params={"group_by": "model"}).text
    assert '"estimated_cost":0.' in text and "e-" not in text


def test_rejected_requests_are_booked_at_zero(booked: GatewayProcess) -> None:
    user = f"u-{uuid.uuid4().hex[:6]}"
    before = row_count(booked.ledger_url)
    for body in (chat(temperature=3, user=user), chat(model="nope", user=user)):
        assert httpx.post(
            booked.url + "/v1/openai/chat/completions", json=body, headers=auth_headers()
        ).status_code in (400, 404)
    all_rows = rows_once_booked(booked.ledger_url, before + 2, within_s=1.0)
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "estimated_cost": 0}
    assert report(booked, "user")[user] == {"user": user, "requests": 2, **zero}
    rows = [r for r in all_rows if r["user"] == user]
    assert sorted((r["outcome"], r["status"]) for r in rows) == [("rejected", 400), ("rejected", 404)]


def test_an_abandoned_stream_is_booked_with_estimated_tokens(
    booked: GatewayProcess, upstream: ScriptedUpstream
) -> None:
    request_id = str(uuid.uuid4())
    before = row_count(booked.ledger_url)
    with (
        httpx.Client(base_url=booked.url, headers=auth_headers(request_id=request_id), timeout=10) as caller,
        caller.stream(
            "POST",
            "/v1/openai/chat/completions",
            json=chat("scenario:stream_hold", stream=True, user="u-gone"),
        ) as response,
    ):
        next(response.iter_raw())
    assert upstream.closed(request_id).wait(1.0)
    (row,) = [
        r
        for r in rows_once_booked(booked.ledger_url, before + 1, within_s=1.0)
        if r["request_id"] == request_id
    ]
    assert row["outcome"] == "client_disconnected"
    assert row["usage_source"] == "estimated" and row["completion_tokens"] == 1  # one content chunk was sent
    assert row["prompt_tokens"] > 0 and row["cost_nanos"] == row["total_tokens"] * 49


def test_upstream_failures_are_booked(booked: GatewayProcess) -> None:
    user = f"u-{uuid.uuid4().hex[:6]}"
    before = row_count(booked.ledger_url)
    for scenario in ("rate_limited", "garbage", "stall"):
        httpx.post(
            booked.url + "/v1/openai/chat/completions",
            json=chat(f"scenario:{scenario}", user=user),
            headers=auth_headers(),
            timeout=10,
        )
    rows = sorted(
        (r["outcome"], r["status"], r["cost_nanos"])
        for r in rows_once_booked(booked.ledger_url, before + 3, within_s=1.0)
        if r["user"] == user
    )
    assert rows == [("timeout", 504, 0), ("upstream_error", 429, 0), ("upstream_error", 502, 0)]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"group_by": "team"}, "group_by"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-13-01"}, "until"),
        ({"since": "2026-11-26", "until": "2026-11-25"}, "since"),
        ({"format": "xml"}, "format"),
    ],
)
def test_bad_report_parameters_are_400_naming_them(
    booked: GatewayProcess, params: dict[str, str], param: str
) -> None:
    with admin(booked) as client:
        response = client.get("/admin/usage", params=params)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_the_daily_series_adds_up_to_the_totals(booked: GatewayProcess) -> None:
    """The dashboard's chart (per day, stacked) and its table (per group) come from one ledger."""
    before = row_count(booked.ledger_url)
    for user in ("u-day-1", "u-day-2", "u-day-2"):
        httpx.post(booked.url + "/v1/openai/chat/completions", json=chat(user=user), headers=auth_headers())
    rows_once_booked(booked.ledger_url, before + 3, within_s=1.0)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    with admin(booked) as client:
        for group_by in ("user", "key", "model"):
            series = client.get("/admin/usage/daily", params={"group_by": group_by}).json()["data"]
            totals = report(booked, group_by)
            assert {point[group_by] for point in series} == set(totals)
            for group, row in totals.items():
                points = [point for point in series if point[group_by] == group]
                assert sum(point["requests"] for point in points) == row["requests"]
                assert sum(point["total_tokens"] for point in points) == row["total_tokens"]
                cost = sum(Decimal(str(point["estimated_cost"])) for point in points)
                assert cost == Decimal(str(row["estimated_cost"]))
        mine = client.get("/admin/usage/daily", params={"group_by": "user", "since": today}).json()["data"]
        assert {(point["day"], point["user"], point["requests"]) for point in mine} >= {
            (today, "u-day-1", 1),
            (today, "u-day-2", 2),
        }
        csv_text = client.get("/admin/usage/daily", params={"group_by": "key", "format": "csv"}).text
        assert csv_text.splitlines()[0].split(",") == ["day", "key", *REPORT_COLUMNS]


_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)  # anything a URL can carry


@settings(max_examples=60, deadline=None)
@given(
    group_by=st.one_of(st.none(), st.sampled_from(["user", "key", "model", "day", "USER", ""]), _TEXT),
    since=st.one_of(
        st.none(),
        st.sampled_from(["2026-11-25", "2026-13-01", "2026-11-25T10:00:00+02:00"]),
        _TEXT,
    ),
    until=st.one_of(st.none(), st.sampled_from(["2026-11-24", "2026-11-26", "yesterday"]), _TEXT),
)
def test_dashboard_endpoints_answer_any_parameters_with_data_or_a_clear_400(
    booked: GatewayProcess, group_by: str | None, since: str | None, until: str | None
) -> None:
    params = {
        name: value
        for name, value in (("group_by", group_by), ("since", since), ("until", until))
        if value is not None
    }
    with admin(booked) as client:
        for path in ("/admin/usage", "/admin/usage/daily"):
            response = client.get(path, params=params)
            assert response.status_code in (200, 400), (path, params, response.text)
            if response.status_code == 400:
                error = response.json()["error"]
                assert error["param"] in ("group_by", "since", "until") and error["message"]
                assert error["type"] == "invalid_request_error"
            else:
                assert isinstance(response.json()["data"], list)


def test_time_ranges_and_csv(booked: GatewayProcess) -> None:
    before = row_count(booked.ledger_url)
    httpx.post(booked.url + "/v1/openai/chat/completions", json=chat(user="u-range"), headers=auth_headers())
    rows_once_booked(booked.ledger_url, before + 1, within_s=1.0)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert today in report(booked, "day")
    assert report(booked, "day", since="2000-01-01", until="2000-01-02") == {}
    assert "u-range" in report(booked, "user", since=today + "T00:00:00+00:00")
    with admin(booked) as client:
        text = client.get("/admin/usage", params={"group_by": "key", "format": "csv"}).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert set(rows[0]) == {"key", *REPORT_COLUMNS}
    assert {row["key"] for row in rows} >= {"alice"}


def test_csv_keeps_spreadsheets_from_running_user_names(booked: GatewayProcess) -> None:
    """Callers choose `user`: in CSV a name a spreadsheet would run as a formula starts with ', in JSON
    it is exact."""
    names = ["=cmd|' /C calc'!A0", "+1", "-2", "@SUM(A1)", "\tx", "a=b"]
    before = row_count(booked.ledger_url)
    for name in names:
        response = httpx.post(
            booked.url + "/v1/openai/chat/completions", json=chat(user=name), headers=auth_headers()
        )
        assert response.status_code == 200
    rows_once_booked(booked.ledger_url, before + len(names), within_s=1.0)
    assert set(names) <= set(report(booked, "user"))
    with admin(booked) as client:
        for path in ("/admin/usage", "/admin/usage/daily"):
            text = client.get(path, params={"group_by": "user", "format": "csv"}).text
            written = {row["user"] for row in csv.DictReader(io.StringIO(text))}
            assert {"'" + name for name in names[:-1]} | {"a=b"} <= written
            assert not written & set(names[:-1])


def test_admin_routes_need_the_admin_key(booked: GatewayProcess) -> None:
    for headers in ({}, auth_headers(), {"Authorization": f"Bearer {ADMIN_KEY}x"}):
        for method, path in (
            ("GET", "/admin/usage"),
            ("GET", "/admin/keys"),
            ("POST", "/admin/keys"),
            ("DELETE", "/admin/keys/x"),
        ):
            assert httpx.request(method, booked.url + path, headers=headers).status_code == 401


def test_issue_use_and_revoke_a_key(booked: GatewayProcess) -> None:
    name = f"dev-{uuid.uuid4().hex[:6]}"
    with admin(booked) as client:
        created = client.post("/admin/keys", json={"name": name})
        assert created.status_code == 201
        key = created.json()["key"]
        assert client.post("/admin/keys", json={"name": name}).status_code == 409
        assert client.post("/admin/keys", json={"name": "alice"}).status_code == 409
        assert client.post("/admin/keys", json={"name": ""}).status_code == 400
        listed = client.get("/admin/keys").json()["data"]
        assert {"name": name, "source": "issued"}.items() <= next(
            k for k in listed if k["name"] == name
        ).items()
        assert key not in str(listed)

        url = booked.url + "/v1/openai/chat/completions"
        before = row_count(booked.ledger_url)
        statuses: list[int] = []

        def call() -> int:
            statuses.append(httpx.post(url, json=chat(), headers=auth_headers(key)).status_code)
            return statuses[-1]

        # Another process's state (every worker's view of the keys): polled, for at most a second.
        eventually(call, until=lambda status: status == 200, within_s=1.0, waiting_for="the new key to work")
        assert client.delete(f"/admin/keys/{name}").status_code == 200
        eventually(
            call, until=lambda status: status == 401, within_s=1.0, waiting_for="the key to be revoked"
        )
        # Calls made before every worker saw the revocation were served, and are booked.
        booked_rows = [
            row
            for row in rows_once_booked(booked.ledger_url, before + statuses.count(200), within_s=1.0)
            if row["key_name"] == name
        ]
        assert len(booked_rows) == statuses.count(200)
        assert client.delete("/admin/keys/nobody").status_code == 404
        slashed = f"team/{name}"  # a name with a slash is revoked by its URL-encoded form
        assert client.post("/admin/keys", json={"name": slashed}).status_code == 201
        assert client.delete(f"/admin/keys/{quote(slashed, safe='')}").json()["name"] == slashed
        assert client.delete("/admin/keys/alice").status_code == 409
        assert client.post("/admin/keys", json={"name": name}).status_code == 409  # never reused


def test_cli_usage_and_keys(booked: GatewayProcess, tmp_path: Path) -> None:
    config = tmp_path / "cli.yaml"
    config.write_text(f"ledger:\n  url: {booked.ledger_url}\n")
    runner = CliRunner()
    table = runner.invoke(main, ["usage", "--config", str(config), "--group-by", "key"])
    assert table.exit_code == 0, table.output
    assert table.output.splitlines()[0].split() == ["key", *REPORT_COLUMNS]
    assert "TOTAL" in table.output and "alice" in table.output
    as_json = runner.invoke(main, ["usage", "--config", str(config), "--group-by", "key", "--format", "json"])
    with admin(booked) as client:
        assert as_json.output.strip() == client.get("/admin/usage", params={"group_by": "key"}).text
    bad = runner.invoke(
        main, ["usage", "--config", str(config), "--since", "2026-11-26", "--until", "2026-11-25"]
    )
    assert bad.exit_code == 2 and "since" in bad.output

    created = runner.invoke(main, ["keys", "create", "--config", str(config), "cli-made"])
    assert created.exit_code == 0 and created.output.startswith("sk-gw-")
    assert "cli-made\tissued\tactive" in runner.invoke(main, ["keys", "list", "--config", str(config)]).output
    assert runner.invoke(main, ["keys", "create", "--config", str(config), "cli-made"]).exit_code == 1
    assert runner.invoke(main, ["keys", "revoke", "--config", str(config), "cli-made"]).exit_code == 0
    assert (
        "cli-made\tissued\trevoked" in runner.invoke(main, ["keys", "list", "--config", str(config)]).output
    )


@pytest.mark.parametrize("password", ["hunter2", "p@ss-hunter2"])  # a raw "@" in a password too
def test_an_unreachable_ledger_stops_serve_with_a_clear_message(tmp_path: Path, password: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"ledger:\n  url: postgresql://postgres:{password}@127.0.0.1:1/nowhere\n")
    result = CliRunner().invoke(main, ["serve", "--config", str(config)])
    assert result.exit_code == 4
    assert "ledger.url: cannot open the ledger" in result.output and "hunter2" not in result.output
    assert "postgresql://postgres:***@127.0.0.1:1/nowhere" in result.output


def test_admin_bodies_are_small(booked: GatewayProcess) -> None:
    with admin(booked) as client:
        response = client.post("/admin/keys", content=b'{"name": "' + b"x" * 100_000 + b'"}')
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
