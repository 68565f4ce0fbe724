"""A hostile upstream cannot stop the books, show the token or make the gateway keep too much.

Absurd usage, oversized and compressed answers, echoed tokens, odd statuses and a dripping answer
come from the scripted upstream; each test asserts what the caller gets and the row booked for it,
and that the rows after it are booked too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import auth_headers, chat
from tests.eventually import eventually
from tests.ledgers import BACKENDS, ledger_database, row_of_request
from tests.scenarios import (
    COMPLETION_BYTES,
    DRIP_INTERVAL_S,
    ERROR_BODIES,
    TRICKY_STREAM,
    USAGE,
    spliced_answer,
    spliced_stream,
)
from tests.servers import CALLER_KEY, MODEL, UPSTREAM_TOKEN, GatewayProcess, ScriptedUpstream, gateway_config

CHAT_PATH = "/v1/openai/chat/completions"
MAX_ANSWER_BYTES = 65_536  # server.max_body_bytes of these gateways
READ_TIMEOUT_S = 1.0
TOTAL_TIMEOUT_S = 2.0
PRICE_NANOS_PER_TOKEN = 49  # USD 0.049 per million tokens, in and out
ANSWER_TEXT = " Hello! It's nice to meet you."  # the plain answers' content: 30 characters, 8 tokens
STREAMED_CHUNKS = 2  # content-bearing chunks in a spliced stream: one token each when estimated


def hostile_config(upstream: ScriptedUpstream, **sections: Any) -> dict[str, Any]:
    config = gateway_config(
        upstream.base_url,
        upstream={"read_timeout_s": READ_TIMEOUT_S, "total_timeout_s": TOTAL_TIMEOUT_S},
        server={"max_body_bytes": MAX_ANSWER_BYTES},
    )
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


@pytest.fixture(scope="module")
def hostile(upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("hostile")
    process = GatewayProcess(hostile_config(upstream), tmp, {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN})
    yield process.start()
    process.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def hostile_on(
    request: pytest.FixtureRequest, upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """The same gateway on each ledger backend: for what the database itself must take."""
    tmp = tmp_path_factory.mktemp(f"hostile-{request.param}")
    with ledger_database(request.param, tmp) as url:
        config = hostile_config(upstream, ledger={"url": url})
        process = GatewayProcess(config, tmp, {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN})
        yield process.start()
        process.stop()


# --- helpers ----------------------------------------------------------------------------------------


def post(gateway: GatewayProcess, body: dict[str, Any]) -> tuple[httpx.Response, str]:
    """POST `body` as JSON with ASCII escapes (a lone surrogate has no UTF-8 of its own)."""
    request_id = str(uuid.uuid4())
    headers = {**auth_headers(request_id=request_id), "content-type": "application/json"}
    response = httpx.post(gateway.url + CHAT_PATH, content=json.dumps(body), headers=headers, timeout=20)
    return response, request_id


def assert_books_move(gateway: GatewayProcess) -> None:
    """A plain request after the hostile one is answered and booked as usual."""
    response, request_id = post(gateway, chat())
    assert response.status_code == 200
    assert row_of_request(gateway.ledger_url, request_id, within_s=2.0)["cost_nanos"] == 26_800


def sdk(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1/openai", api_key=CALLER_KEY, max_retries=0)


def with_splice(fields: str, **extra: Any) -> dict[str, Any]:
    """A request whose answer carries `fields` (raw JSON members) as upstream writes them."""
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": fields}, {"role": "user", "content": "scenario:splice"}],
        **extra,
    }


def stream_of(gateway: GatewayProcess, body: dict[str, Any]) -> tuple[httpx.Response, bytes, str]:
    request_id = str(uuid.uuid4())
    headers = auth_headers(request_id=request_id)
    with (
        httpx.Client(timeout=20) as client,
        client.stream("POST", gateway.url + CHAT_PATH, json=body, headers=headers) as response,
    ):
        return response, b"".join(response.iter_raw()), request_id


def last_event(received: bytes) -> dict[str, Any]:
    last = received.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: ")
    return orjson.loads(last[len(b"data: ") :])  # type: ignore[no-any-return]


def upstream_bad_response(response: httpx.Response) -> None:
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_bad_response" and error["type"] == "upstream_error"


# --- usage that is not to be believed ---------------------------------------------------------------

ABSURD_TOKENS = {
    "negative": '{"prompt_tokens": -5, "completion_tokens": 16, "total_tokens": 11, "estimated_cost": 1e-9}',
    "over 64 bits": '{"prompt_tokens": 1180591620717411303424, "completion_tokens": 16, "total_tokens": 31}',
    "1e308": '{"prompt_tokens": 1e308, "completion_tokens": 16, "total_tokens": 1e308}',
    "strings": '{"prompt_tokens": "12", "completion_tokens": "16", "total_tokens": "28"}',
    "not integers": '{"prompt_tokens": 5.0, "completion_tokens": true, "total_tokens": 6}',
    "over the ceiling": '{"prompt_tokens": 1000000001, "completion_tokens": 16, "estimated_cost": 0.01}',
    "not an object": '"lots"',
}
ABSURD_COSTS = {
    "10 billion USD": "1e10",
    "negative": "-0.5",
    "NaN as text": '"NaN"',
    "a number as text": '"0.0000268"',
    "1e308": "1e308",
    "infinite": "1e400",
    "just over 10 USD": "10.000001",
}


@pytest.mark.parametrize("usage", ABSURD_TOKENS.values(), ids=ABSURD_TOKENS.keys())
def test_absurd_token_counts_are_estimated_and_the_caller_told_what_is_booked(
    hostile: GatewayProcess, usage: str
) -> None:
    request_id = str(uuid.uuid4())
    body = with_splice(f'"usage": {usage}')
    with sdk(hostile) as client:
        completion = client.chat.completions.create(
            model=MODEL,
            messages=body["messages"],
            extra_headers={"x-request-id": request_id},
        )
    row = row_of_request(hostile.ledger_url, request_id, within_s=2.0)
    assert row["outcome"] == "ok" and row["status"] == 200
    assert (row["usage_source"], row["cost_source"]) == ("estimated", "price_table")
    assert row["completion_tokens"] == 8 and row["prompt_tokens"] > 0  # the gateway's own estimate
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
    assert row["cost_nanos"] == row["total_tokens"] * PRICE_NANOS_PER_TOKEN
    assert completion.usage is not None
    told = completion.usage.model_dump()
    assert (told["prompt_tokens"], told["completion_tokens"], told["total_tokens"]) == (
        row["prompt_tokens"],
        row["completion_tokens"],
        row["total_tokens"],
    )
    assert Decimal(repr(told["estimated_cost"])) * 10**9 == row["cost_nanos"]
    assert completion.choices[0].message.content == ANSWER_TEXT  # the rest of upstream's answer
    assert_books_move(hostile)


@pytest.mark.parametrize("cost", ABSURD_COSTS.values(), ids=ABSURD_COSTS.keys())
def test_an_absurd_cost_is_replaced_by_the_price_of_upstreams_tokens(
    hostile: GatewayProcess, cost: str
) -> None:
    usage = '"usage": {"prompt_tokens": 15, "completion_tokens": 16, "total_tokens": 31, "estimated_cost": '
    usage += cost + "}"
    response, request_id = post(hostile, with_splice(usage))
    assert response.status_code == 200
    assert response.json()["usage"] == {**USAGE, "estimated_cost": 1.519e-06}  # 31 tokens x 49 nanos
    row = row_of_request(hostile.ledger_url, request_id, within_s=2.0)
    assert (row["usage_source"], row["cost_source"]) == ("upstream", "price_table")
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost_nanos"]) == (15, 16, 31 * 49)
    assert_books_move(hostile)


def test_a_believable_usage_is_relayed_byte_for_byte_and_its_total_booked_as_the_sum(
    hostile: GatewayProcess,
) -> None:
    """Upstream's total_tokens is not booked: a row's total is always its prompt plus completion."""
    fields = '"usage": {"prompt_tokens": 15, "completion_tokens": 16, "total_tokens": 99999, '
    fields += '"estimated_cost": 0.0000268}'
    response, request_id = post(hostile, with_splice(fields))
    assert response.content == spliced_answer(fields.encode())
    row = row_of_request(hostile.ledger_url, request_id, within_s=2.0)
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (15, 16, 31)
    assert (row["usage_source"], row["cost_source"], row["cost_nanos"]) == ("upstream", "upstream", 26_800)


@pytest.mark.parametrize(
    "usage",
    [*ABSURD_TOKENS.values(), '{"prompt_tokens": 15, "completion_tokens": 16, "estimated_cost": 1e10}'],
    ids=[*ABSURD_TOKENS.keys(), "10 billion USD"],
)
def test_absurd_usage_in_a_streams_last_chunk_is_not_believed(hostile: GatewayProcess, usage: str) -> None:
    """The stream reaches the caller as upstream wrote it; the row is priced from the table."""
    fields = f'"usage": {usage}'
    response, received, request_id = stream_of(hostile, with_splice(fields, stream=True))
    assert response.status_code == 200
    assert received == b"".join(spliced_stream(fields.encode()))
    row = row_of_request(hostile.ledger_url, request_id, within_s=2.0)
    assert row["outcome"] == "ok" and row["cost_source"] == "price_table"
    if row["usage_source"] == "upstream":  # the tokens were believable, only the cost was not
        assert (row["prompt_tokens"], row["completion_tokens"], row["cost_nanos"]) == (15, 16, 31 * 49)
    else:
        assert row["usage_source"] == "estimated" and row["completion_tokens"] == STREAMED_CHUNKS
        assert row["cost_nanos"] == row["total_tokens"] * PRICE_NANOS_PER_TOKEN
    assert_books_move(hostile)


# --- texts the ledger must be able to hold ----------------------------------------------------------

HOSTILE_TIER = "\x00\ud800" + "p" * 10_000  # NUL, a lone surrogate, and far over the column's 64


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_long_or_unstorable_service_tier_is_clipped_to_its_column(
    hostile_on: GatewayProcess, stream: bool
) -> None:
    # A stream's tier is read from its usage chunk; \u0000 and \ud800 arrive as JSON escapes.
    fields = f'"usage": {json.dumps(USAGE)}, "service_tier": {json.dumps(HOSTILE_TIER)}'
    if stream:
        response, _, request_id = stream_of(hostile_on, with_splice(fields, stream=True))
    else:
        response, request_id = post(hostile_on, with_splice(fields))
    assert response.status_code == 200
    assert (
        row_of_request(hostile_on.ledger_url, request_id, within_s=2.0)["service_tier"]
        == "\ufffd\ufffd" + "p" * 62
    )
    assert_books_move(hostile_on)


@pytest.mark.parametrize("model", ["\ud800", "m" * 10_000, "\x00model"], ids=["surrogate", "10 kB", "NUL"])
def test_a_model_that_is_not_served_is_booked_as_unknown(hostile_on: GatewayProcess, model: str) -> None:
    response, request_id = post(hostile_on, chat(model=model))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    row = row_of_request(hostile_on.ledger_url, request_id, within_s=2.0)
    assert (row["model"], row["outcome"], row["cost_nanos"]) == ("unknown", "rejected", 0)
    assert_books_move(hostile_on)


# --- what the gateway keeps of an answer ------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["huge_json", "huge_json_chunked", "gzip_bomb", "brotli_json"])
def test_an_answer_too_large_or_coded_otherwise_is_502(hostile: GatewayProcess, scenario: str) -> None:
    """Over server.max_body_bytes as sent (with or without Content-Length) or once inflated, or in an
    encoding the gateway does not read."""
    response, request_id = post(hostile, chat(f"scenario:{scenario}"))
    upstream_bad_response(response)
    row = row_of_request(hostile.ledger_url, request_id, within_s=2.0)
    assert (row["outcome"], row["status"], row["cost_nanos"]) == ("upstream_error", 502, 0)
    assert_books_move(hostile)


@pytest.mark.parametrize("scenario", ["gzip_json", "deflate_json"])
def test_a_compressed_answer_within_the_bound_is_inflated(hostile: GatewayProcess, scenario: str) -> None:
    response, request_id = post(hostile, chat(f"scenario:{scenario}"))
    assert response.status_code == 200
    assert response.content == COMPLETION_BYTES and "content-encoding" not in response.headers
    assert row_of_request(hostile.ledger_url, request_id, within_s=2.0)["cost_nanos"] == 26_800


def test_an_sse_event_over_the_bound_ends_the_stream_with_an_error_event(hostile: GatewayProcess) -> None:
    response, received, request_id = stream_of(hostile, chat("scenario:huge_sse_event", stream=True))
    assert response.status_code == 200
    assert len(received) < MAX_ANSWER_BYTES  # the oversized event never reached the caller
    error = last_event(received)["error"]
    assert error["code"] == "upstream_bad_response" and b"[DONE]" not in received
    row = row_of_request(hostile.ledger_url, request_id, within_s=2.0)
    assert (row["outcome"], row["usage_source"], row["completion_tokens"]) == (
        "upstream_error",
        "estimated",
        1,
    )
    assert_books_move(hostile)


@pytest.mark.parametrize("scenario", ["gzip_stream", "stream_redirect", "stream_no_content"])
def test_a_compressed_redirected_or_empty_stream_is_502(hostile: GatewayProcess, scenario: str) -> None:
    response, received, request_id = stream_of(hostile, chat(f"scenario:{scenario}", stream=True))
    assert response.status_code == 502
    assert orjson.loads(received)["error"]["code"] == "upstream_bad_response"
    assert TRICKY_STREAM not in received
    row = row_of_request(hostile.ledger_url, request_id, within_s=2.0)
    assert (row["outcome"], row["status"], row["cost_nanos"]) == ("upstream_error", 502, 0)
    assert_books_move(hostile)


# --- the upstream token -----------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["echo_token", "echo_token_upper", "echo_token_escaped"])
def test_the_token_is_in_no_form_in_a_relayed_error(hostile: GatewayProcess, scenario: str) -> None:
    """Quoted as sent, in capitals, in JSON escapes, in mixed case, as a key, beside non-ASCII text,
    in headers: the caller sees *** wherever upstream put the token."""
    response, _ = post(hostile, chat(f"scenario:{scenario}"))
    assert response.status_code in (401, 429)
    seen = json.dumps(response.json()).lower() + repr(response.headers.multi_items()).lower()
    assert UPSTREAM_TOKEN.lower() not in seen
    assert "***" in response.json()["error"]["message"]
    assert "retry-after" not in response.headers or "***" in response.headers["retry-after"]


def test_the_token_is_not_in_a_streams_headers(hostile: GatewayProcess) -> None:
    response, received, _ = stream_of(hostile, chat("scenario:stream_token_header", stream=True))
    assert response.status_code == 200 and received.endswith(b"data: [DONE]\n\n")
    assert response.headers["content-type"] == "text/event-stream; x=***"


# --- error bodies in OpenAI's shape -----------------------------------------------------------------

COMPLETED = {
    "error_message_only": {"message": "Model busy, retry later", "type": "rate_limit_error"},
    "error_text": {"message": "bad things happened", "type": "invalid_request_error"},
    "error_detail": {"message": "Not Found", "type": "invalid_request_error"},
    "error_detail_list": {
        "message": '[{"loc":["body","x"],"msg":"field required"}]',
        "type": "invalid_request_error",
    },
}


@pytest.mark.parametrize("scenario", COMPLETED)
def test_an_error_not_in_openais_shape_is_completed(hostile: GatewayProcess, scenario: str) -> None:
    """Strict clients find message, type, param and code; the message and status are upstream's."""
    status, sent = ERROR_BODIES[scenario]
    response, request_id = post(hostile, chat(f"scenario:{scenario}"))
    assert response.status_code == status
    assert response.json()["error"] == {**COMPLETED[scenario], "param": None, "code": None}
    assert {key: value for key, value in response.json().items() if key != "error"} == {
        key: value for key, value in orjson.loads(sent).items() if key != "error"
    }  # what else upstream said is kept
    assert row_of_request(hostile.ledger_url, request_id, within_s=2.0)["outcome"] == "upstream_error"


def test_the_sdk_reads_a_completed_error(hostile: GatewayProcess) -> None:
    with sdk(hostile) as client, pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "scenario:error_message_only"}]
        )
    assert raised.value.type == "rate_limit_error" and raised.value.code is None
    assert "Model busy, retry later" in raised.value.message


def test_an_error_in_openais_shape_is_relayed_byte_for_byte(hostile: GatewayProcess) -> None:
    status, sent = ERROR_BODIES["error_in_shape"]
    response, _ = post(hostile, chat("scenario:error_in_shape"))
    assert (response.status_code, response.content) == (status, sent)


# --- a deadline for the whole answer ----------------------------------------------------------------


def test_an_answer_dripping_a_byte_at_a_time_is_cut_at_the_total_deadline(hostile: GatewayProcess) -> None:
    assert DRIP_INTERVAL_S < READ_TIMEOUT_S / 2  # the read timeout alone would never end it
    response, request_id = post(hostile, chat("scenario:drip_json"))
    assert response.status_code == 504
    assert response.json()["error"] == {
        "message": f"The upstream did not finish its answer within {TOTAL_TIMEOUT_S:g} s.",
        "type": "upstream_error",
        "param": None,
        "code": "upstream_timeout",
    }
    assert row_of_request(hostile.ledger_url, request_id, within_s=2.0)["outcome"] == "timeout"


def test_a_stream_dripping_a_byte_at_a_time_ends_with_an_error_event(hostile: GatewayProcess) -> None:
    response, received, request_id = stream_of(hostile, chat("scenario:drip_stream", stream=True))
    assert response.status_code == 200
    assert last_event(received)["error"]["code"] == "upstream_timeout" and b"[DONE]" not in received
    row = row_of_request(hostile.ledger_url, request_id, within_s=2.0)
    assert (row["outcome"], row["usage_source"], row["completion_tokens"]) == ("timeout", "estimated", 1)


# --- no file descriptor left ------------------------------------------------------------------------


def test_no_file_descriptor_for_an_upstream_socket_is_503_overloaded(
    upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    """Every upstream answer closes its connection, so each request needs a new socket; each caller
    keeps its connection open, one descriptor each. One request finds a descriptor for the caller's
    connection but none left for upstream's: 503 overloaded, never 502 "unreachable"."""
    config = hostile_config(upstream, server={"max_connections": 10_000})  # no cap of the gateway's own
    gateway = GatewayProcess(config, tmp_path, {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN})
    gateway.start(open_files_hard_limit=64)
    callers: list[httpx.Client] = []
    try:
        assert_books_move(gateway)  # the ledger's files are open before descriptors run out
        refused = None
        for _ in range(64):
            caller = httpx.Client(base_url=gateway.url, headers=auth_headers(), timeout=20)
            callers.append(caller)
            response = caller.post(CHAT_PATH, json=chat("scenario:close_after"))
            if response.status_code != 200:
                refused = response
                break
        assert refused is not None, "the open-files limit was never reached"
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "overloaded"
        request_id = refused.headers["x-request-id"]
    finally:
        for caller in callers:
            caller.close()
    try:
        row = row_of_request(gateway.ledger_url, request_id, within_s=2.0)
        assert (row["outcome"], row["status"], row["cost_nanos"]) == ("rejected", 503, 0)
        _wait_for_a_free_descriptor(gateway)
        assert_books_move(gateway)
        metrics = httpx.get(gateway.url + "/metrics").text
        assert 'gateway_overloaded_total{resource="file_descriptors"} 1.0' in metrics
    finally:
        gateway.stop()


def _wait_for_a_free_descriptor(gateway: GatewayProcess) -> None:
    """The gateway closes the callers' connections as it notices them gone: poll until it serves."""
    eventually(
        lambda: httpx.get(gateway.url + "/healthz", timeout=2).status_code,
        until=lambda status: status == 200,
        ignoring=(httpx.TransportError,),
        within_s=10,
        waiting_for="the gateway to get its descriptors back and serve /healthz",
    )
