"""Relay edge cases and what is booked for each, in the test process: a function upstream answers
each request as the test says; each test asserts what the caller gets and the row booked for it
(and, for the mix of every outcome, that /metrics counts the same as the ledger).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import orjson
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import chat
from tests.eventually import eventually_async
from tests.inprocess import (
    FunctionUpstream,
    InProcessGateway,
    Message,
    answer,
    in_process_gateway,
    never_answers,
    sse,
)
from tests.scenarios import COMPLETION, DONE, FIRST, LAST_WITH_USAGE, USAGE, chunk
from tests.servers import MODEL

pytestmark = pytest.mark.asyncio(loop_scope="module")

PRICE_NANOS_PER_TOKEN = 49  # USD 0.049 per million tokens, in and out (the default model's prices)
QUICK_READ_TIMEOUT_S = 0.3


def body_sent(messages: list[Message]) -> bytes:
    return b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


def last_event(received: bytes) -> dict[str, Any]:
    last = received.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: ")
    return orjson.loads(last[len(b"data: ") :])  # type: ignore[no-any-return]


# --- usage the gateway fills in ---------------------------------------------------------------------


async def test_an_answer_without_usage_is_told_and_booked_the_gateways_estimate(
    local_gateway: InProcessGateway, local_upstream: FunctionUpstream
) -> None:
    """Four tokens a message and one per four characters of its text (text parts only), and the
    answer's text the same way; priced from the table, told to the caller as booked."""
    without_usage = {name: value for name, value in COMPLETION.items() if name != "usage"}
    request_id = local_upstream.will_answer(answer(200, orjson.dumps(without_usage)))
    picture = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    messages = [
        {"role": "system", "content": "be brief"},  # 4 + 2
        {"role": "user", "content": [{"type": "text", "text": "What is in this image?"}, picture]},  # 4 + 6
    ]
    response = await local_gateway.chat({"model": MODEL, "messages": messages}, request_id=request_id)
    assert response.status_code == 200
    nanos = (16 + 8) * PRICE_NANOS_PER_TOKEN  # " Hello! It's nice to meet you.": 30 characters, 8 tokens
    assert response.json()["usage"] == {
        "prompt_tokens": 16,
        "completion_tokens": 8,
        "total_tokens": 24,
        "estimated_cost": float(Decimal(nanos) / 10**9),
    }
    assert response.json()["choices"] == COMPLETION["choices"]  # the rest is upstream's
    row = await local_gateway.booked(request_id)
    assert (row["outcome"], row["prompt_tokens"], row["completion_tokens"]) == ("ok", 16, 8)
    assert (row["usage_source"], row["cost_source"], row["cost_nanos"]) == ("estimated", "price_table", nanos)


async def test_upstreams_tokens_without_a_cost_are_priced_from_the_table(
    local_gateway: InProcessGateway, local_upstream: FunctionUpstream
) -> None:
    usage = {name: value for name, value in USAGE.items() if name != "estimated_cost"}
    request_id = local_upstream.will_answer(answer(200, orjson.dumps({**COMPLETION, "usage": usage})))
    response = await local_gateway.chat(chat(), request_id=request_id)
    assert response.json()["usage"] == {**USAGE, "estimated_cost": 1.519e-06}  # 31 tokens x 49 nanos
    row = await local_gateway.booked(request_id)
    assert (row["usage_source"], row["cost_source"], row["cost_nanos"]) == ("upstream", "price_table", 1519)


async def test_a_stream_without_usage_is_relayed_as_it_came_and_booked_one_token_a_chunk(
    local_gateway: InProcessGateway, local_upstream: FunctionUpstream
) -> None:
    writes = [FIRST, chunk(" there"), chunk(None, finish="stop"), DONE]
    request_id = local_upstream.will_answer(sse(writes))
    response = await local_gateway.chat(chat("hi", stream=True), request_id=request_id)
    assert (response.status_code, response.content) == (200, b"".join(writes))
    row = await local_gateway.booked(request_id)
    assert (row["outcome"], row["usage_source"], row["completion_tokens"]) == ("ok", "estimated", 2)
    assert row["prompt_tokens"] == 4 + 1  # one message, "hi"
    assert row["cost_nanos"] == row["total_tokens"] * PRICE_NANOS_PER_TOKEN


async def test_a_final_done_without_its_blank_line_ends_the_stream_cleanly(
    local_gateway: InProcessGateway, local_upstream: FunctionUpstream
) -> None:
    writes = [FIRST, LAST_WITH_USAGE, DONE.rstrip(b"\n")]
    request_id = local_upstream.will_answer(sse(writes))
    response = await local_gateway.chat(chat(stream=True), request_id=request_id)
    assert response.content == b"".join(writes)
    row = await local_gateway.booked(request_id)
    assert (row["outcome"], row["usage_source"], row["cost_nanos"]) == ("ok", "upstream", 26_800)


# --- error bodies completed to OpenAI's shape -------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "sent", "error"),
    [
        (400, b"[1, 2]", {"message": "The upstream answered HTTP 400.", "type": "invalid_request_error"}),
        (503, b'"overloaded"', {"message": "overloaded", "type": "server_error"}),
        (
            429,
            b'{"error": {"message": {"text": "slow down"}, "code": "busy"}}',
            {"message": '{"text":"slow down"}', "type": "rate_limit_error", "code": "busy"},
        ),
        (
            500,
            b'{"message": "boom", "error": null, "trace": 7}',
            {"message": "boom", "type": "server_error"},
        ),
    ],
    ids=["a list", "a string", "a message that is an object", "a top-level message"],
)
async def test_an_error_of_any_json_shape_reaches_the_caller_in_openais(
    local_gateway: InProcessGateway,
    local_upstream: FunctionUpstream,
    status: int,
    sent: bytes,
    error: dict[str, Any],
) -> None:
    request_id = local_upstream.will_answer(answer(status, sent))
    response = await local_gateway.chat(chat(), request_id=request_id)
    assert response.status_code == status
    assert response.json()["error"] == {"param": None, "code": None, **error}
    row = await local_gateway.booked(request_id)
    assert (row["outcome"], row["status"], row["cost_nanos"]) == ("upstream_error", status, 0)


# --- every outcome, booked once, and counted alike in /metrics --------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def quick(
    local_upstream: FunctionUpstream, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[InProcessGateway]:
    """A gateway of its own (its ledger and metrics hold only the requests of the test using it) that
    gives up on a silent upstream quickly."""
    async with in_process_gateway(
        local_upstream,
        tmp_path_factory.mktemp("quick"),
        upstream={"read_timeout_s": QUICK_READ_TIMEOUT_S},
    ) as gateway:
        yield gateway


def metric_samples(text: str, name: str) -> Counter[tuple[str, str]]:
    counted: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                counted[(sample.labels["outcome"], sample.labels["status"])] += int(sample.value)
    return counted


async def test_each_outcome_is_booked_once_and_counted_in_metrics(
    quick: InProcessGateway, local_upstream: FunctionUpstream
) -> None:
    expected: dict[str, tuple[str, int]] = {}

    async def send(body: dict[str, Any], handler: Any, outcome: str, status: int) -> bytes:
        request_id = local_upstream.will_answer(handler)
        response = await quick.chat(body, request_id=request_id)
        assert response.status_code == status, response.text
        expected[request_id] = (outcome, status)
        return response.content

    await send(chat(), answer(200, orjson.dumps(COMPLETION)), "ok", 200)
    await send(chat(stream=True), sse([FIRST, LAST_WITH_USAGE, DONE]), "ok", 200)
    await send(chat(temperature=3), never_answers, "rejected", 400)
    await send(chat(model="acme/not-served"), never_answers, "rejected", 404)
    await send(
        chat(), answer(429, b'{"error": {"message": "busy"}}', {"Retry-After": "3"}), "upstream_error", 429
    )
    await send(chat(), answer(200, b"not json {"), "upstream_error", 502)
    await send(chat(), never_answers, "timeout", 504)
    stalled = await send(chat(stream=True), sse([FIRST], end=False), "timeout", 200)
    assert last_event(stalled)["error"]["code"] == "upstream_timeout"

    # Callers who hang up: before upstream answers a plain request, and after a stream's first event.
    gone_waiting = local_upstream.will_answer(never_answers)
    await quick.hang_up(chat(), gone_waiting, after=lambda sent: True)
    gone_midstream = local_upstream.will_answer(sse([FIRST], end=False))
    await quick.hang_up(chat(stream=True), gone_midstream, after=lambda sent: FIRST in body_sent(sent))
    expected[gone_waiting] = expected[gone_midstream] = ("client_disconnected", 499)
    await eventually_async(
        lambda: {gone_waiting, gone_midstream} - local_upstream.closed,
        until=lambda still_open: not still_open,
        waiting_for="the gateway to close the upstream requests of the callers who left",
    )

    for request_id, (outcome, status) in expected.items():
        row = await quick.booked(request_id)
        assert (row["outcome"], row["status"]) == (outcome, status), request_id
        assert row["key_name"] == "alice" and row["request_id"] == request_id
    left_midstream = await quick.booked(gone_midstream)  # one content chunk had been sent
    assert (left_midstream["usage_source"], left_midstream["completion_tokens"]) == ("estimated", 1)

    booked = Counter((outcome, str(status)) for outcome, status in expected.values())

    async def counted() -> Counter[tuple[str, str]]:
        return metric_samples(await quick.metrics(), "gateway_requests_total")

    await eventually_async(counted, until=lambda seen: seen == booked, waiting_for="every row in /metrics")


# --- answers too deep to write again ----------------------------------------------------------------


def nested(depth: int) -> bytes:
    """JSON nested `depth` lists deep. orjson reads 1,000 levels but writes at most 254; the standard
    writer, which the gateway falls back on, stops short of 1,000."""
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    "status, body",
    [
        (400, b'{"error": ' + nested(1000) + b"}"),  # an error body to complete in OpenAI's shape
        (200, b'{"choices": ' + nested(1000) + b"}"),  # no usage: rewritten with the gateway's own
    ],
    ids=["error_body", "answer_without_usage"],
)
async def test_an_answer_nested_too_deeply_to_relay_is_a_502_and_booked(
    local_gateway: InProcessGateway, local_upstream: FunctionUpstream, status: int, body: bytes
) -> None:
    request_id = local_upstream.will_answer(answer(status, body))
    response = await local_gateway.chat(chat(), request_id=request_id)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_bad_response" and "nested too deeply" in error["message"]
    row = await local_gateway.booked(request_id)
    assert (row["outcome"], row["status"]) == ("upstream_error", 502)
