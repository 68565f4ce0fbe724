"""Every documented range, at both sides of every bound, and wrong types, checked before upstream.

An accepted request reaches upstream as the caller's exact bytes; a rejected one never leaves the
gateway and is answered 400 (404 for an unknown model, 413 for an oversized body) naming the field.
In-process (tests/inprocess.py): the gateway's app in front of a function upstream that records
what reached it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import MAX_BODY_BYTES, chat
from tests.inprocess import FunctionUpstream, InProcessGateway
from tests.servers import MODEL

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT_PATH = "/v1/openai/chat/completions"

# field, accepted values, rejected values (each with the error code expected)
RANGES: list[tuple[str, list[Any], list[tuple[Any, str]]]] = [
    (
        "temperature",
        [0, 0.0, 1, 2, 2.0],
        [(-0.0001, "invalid_value"), (2.0001, "invalid_value"), (3, "invalid_value")],
    ),
    ("top_p", [0.0001, 1, 1.0], [(0, "invalid_value"), (0.0, "invalid_value"), (1.0001, "invalid_value")]),
    ("min_p", [0, 1, 0.5], [(-0.01, "invalid_value"), (1.01, "invalid_value")]),
    ("top_k", [0, 999], [(-1, "invalid_value"), (1000, "invalid_value"), (5.0, "invalid_type")]),
    (
        "max_tokens",
        [0, 1_000_000],
        [(-1, "invalid_value"), (1_000_001, "invalid_value"), (10.0, "invalid_type")],
    ),
    (
        "max_completion_tokens",
        [0, 1_000_000],
        [(-1, "invalid_value"), (1_000_001, "invalid_value"), (10.0, "invalid_type")],
    ),
    ("presence_penalty", [-2, 2, 0], [(-2.01, "invalid_value"), (2.01, "invalid_value")]),
    ("frequency_penalty", [-2, 2.0], [(-2.5, "invalid_value"), (2.5, "invalid_value")]),
    (
        "repetition_penalty",
        [0.01, 5, 1],
        [(0.0099, "invalid_value"), (5.01, "invalid_value"), (0, "invalid_value")],
    ),
    ("seed", [0, 2**63 - 1], [(-1, "invalid_value"), (2**63, "invalid_value"), (1.0, "invalid_type")]),
    ("tool_choice", ["none", "auto"], [("required", "invalid_value"), (3, "invalid_value")]),
    ("user", ["", "a1b2c3"], [(5, "invalid_type"), (["bob"], "invalid_type")]),
    ("stream", [False], [("true", "invalid_type"), (1, "invalid_type")]),
]
NUMBER_FIELDS = [
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
]
INTEGER_FIELDS = ["top_k", "max_tokens", "max_completion_tokens", "seed"]

ACCEPTED = [(field, value) for field, good, _ in RANGES for value in good]
REJECTED = [(field, value, code) for field, _, bad in RANGES for value, code in bad]
REJECTED += [
    (field, value, "invalid_type") for field in NUMBER_FIELDS for value in (True, "1", [1], {"a": 1})
]
REJECTED += [(field, value, "invalid_type") for field in INTEGER_FIELDS for value in (True, "1", 1.5)]


async def send(gateway: InProcessGateway, body: bytes | dict[str, Any]) -> tuple[httpx.Response, str]:
    request_id = str(uuid.uuid4())
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await gateway.client.post(CHAT_PATH, content=content, headers={"x-request-id": request_id})
    return response, request_id


@pytest.mark.parametrize(("field", "value"), ACCEPTED)
async def test_values_in_range_reach_upstream_unchanged(
    local_gateway: InProcessGateway, local_upstream: FunctionUpstream, field: str, value: Any
) -> None:
    raw = json.dumps(chat(**{field: value})).encode()
    response, request_id = await send(local_gateway, raw)
    assert response.status_code == 200, response.text
    (sent,) = local_upstream.find(request_id)
    assert sent.body == raw


@pytest.mark.parametrize(("field", "value", "code"), REJECTED)
async def test_values_out_of_range_or_of_the_wrong_type_are_400(
    local_gateway: InProcessGateway, local_upstream: FunctionUpstream, field: str, value: Any, code: str
) -> None:
    response, request_id = await send(local_gateway, chat(**{field: value}))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(field)
    assert local_upstream.find(request_id) == []


async def test_the_error_message_names_the_bound_and_the_value(local_gateway: InProcessGateway) -> None:
    assert (await send(local_gateway, chat(temperature=2.5)))[0].json() == {
        "error": {
            "message": "temperature must be ≤ 2, got 2.5",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "invalid_value",
        }
    }
    assert (await send(local_gateway, chat(top_p=0)))[0].json()["error"][
        "message"
    ] == "top_p must be > 0, got 0"
    assert (await send(local_gateway, chat(top_k=5.0)))[0].json()["error"][
        "message"
    ] == "top_k must be an integer, got number 5.0"
    too_big = await send(
        local_gateway,
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}'
        % MODEL.encode(),
    )
    assert too_big[0].json()["error"]["message"].startswith("seed must be < 9223372036854775808, got ")
    huge = await send(
        local_gateway,
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}'
        % MODEL.encode(),
    )
    assert (
        huge[0].json()["error"]["message"]
        == "temperature must be a number, got a number too large for a double"
    )
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}
    missing = (await send(local_gateway, {"model": MODEL, "messages": [image]}))[0].json()["error"]["message"]
    assert missing == "messages[0].content[0].image_url.url must be a string, got null"


async def test_null_means_not_sent_and_is_passed_through(
    local_gateway: InProcessGateway, local_upstream: FunctionUpstream
) -> None:
    raw = json.dumps(chat(temperature=None, seed=None, user=None, tool_choice=None, stream=None)).encode()
    response, request_id = await send(local_gateway, raw)
    assert response.status_code == 200
    assert local_upstream.find(request_id)[0].body == raw


async def test_unknown_fields_pass_through_and_no_defaults_are_added(
    local_gateway: InProcessGateway, local_upstream: FunctionUpstream
) -> None:
    raw = (
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"50256": -100},\n'
        % (MODEL.encode())
        + b' "response_format": {"type": "json_object"}, "n": 1, "x_vendor": [1, 2.50, "\\u00e9"]}'
    )
    response, request_id = await send(local_gateway, raw)
    assert response.status_code == 200
    assert local_upstream.find(request_id)[0].body == raw


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (
            b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], '
            b'"temperature": 5, "temperature": 1}',
            "temperature",
        ),
        (
            b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "seed": 1, "se\\u0065d": -1}',
            "seed",
        ),
        (b'{"model": "%s", "messages": [{"role": "system", "role": "user", "content": "hi"}]}', "role"),
    ],
)
async def test_a_key_given_twice_is_refused(
    local_gateway: InProcessGateway, local_upstream: FunctionUpstream, raw: bytes, param: str
) -> None:
    """The gateway checks one of the two values; upstream might use the other: neither is sent."""
    response, request_id = await send(local_gateway, raw % MODEL.encode())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "duplicate_key" and error["param"] == param and "twice" in error["message"]
    assert local_upstream.find(request_id) == []


async def test_a_quoted_colon_in_a_string_is_not_a_key(
    local_gateway: InProcessGateway, local_upstream: FunctionUpstream
) -> None:
    raw = b'{"model": "%s", "messages": [{"role": "user", "content": "say \\"hi\\": ok"}]}' % MODEL.encode()
    response, request_id = await send(local_gateway, raw)
    assert response.status_code == 200
    assert local_upstream.find(request_id)[0].body == raw


@pytest.mark.parametrize(
    "options",
    [
        b'{"include_usage": false, "x": 1}',
        b"null",
        b"{}",
        b'{"include_usage": null}',
        b'{"include_usage": false, "n": 123456789012345678901234567890}',  # exact, not a float
    ],
)
async def test_only_stream_options_changes_when_the_gateway_asks_for_usage(
    local_gateway: InProcessGateway, local_upstream: FunctionUpstream, options: bytes
) -> None:
    """Every other byte stays as the caller wrote it: number forms, escapes, spacing, key order."""
    head = (
        b'{ "model" : "%s", "messages": [{"role": "user", "content": "h\\u00e9 \xc3\xa9"}],\n'
        b' "x_f": 1.50, "x_e": 1E2, "x_big": 123456789012345678901234567890, "stream": true,' % MODEL.encode()
    )
    tail = b' , "z": [1, {"a": "}"}] }'
    response, request_id = await send(local_gateway, head + b' "stream_options" :  ' + options + tail)
    assert response.status_code == 200
    sent = local_upstream.find(request_id)[0].body
    ours = {**(json.loads(options) or {}), "include_usage": True}
    assert sent == head + b' "stream_options" :  ' + json.dumps(ours, separators=(",", ":")).encode() + tail


async def test_deeply_nested_stream_options_are_a_400_not_a_crash(local_gateway: InProcessGateway) -> None:
    deep = b"[" * 990 + b"]" * 990
    raw = (
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "stream": true, ' % MODEL.encode()
    )
    for options in (b'{"x": ' + deep + b"}", b'{"x": 1e400}'):
        response, _ = await send(local_gateway, raw + b'"stream_options": ' + options + b"}")
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "stream_options"


async def test_specific_function_tool_choice_is_unsupported(local_gateway: InProcessGateway) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    error = (await send(local_gateway, chat(tool_choice=choice)))[0].json()["error"]
    assert error["param"] == "tool_choice" and error["code"] == "unsupported_value"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (None, "messages"),
        ([], "messages"),
        ("hello", "messages"),
        ([{"role": "user", "content": "a"}, "b"], "messages[1]"),
        ([{"role": "robot", "content": "a"}], "messages[0].role"),
        ([{"role": ["user"], "content": "a"}], "messages[0].role"),
        ([{"role": {"user": 1}, "content": "a"}], "messages[0].role"),
        ([{"content": "a"}], "messages[0].role"),
        ([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}], "messages[1].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text"),
        ([{"role": "user", "content": ["hi"]}], "messages[0].content[0]"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": "https://x/y.png"}]}],
            "messages[0].content[0].image_url",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}],
            "messages[0].content[0].image_url.url",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}],
                }
            ],
            "messages[0].content[0].image_url.url",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}],
                }
            ],
            "messages[0].content[0].image_url.url",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://"}}]}],
            "messages[0].content[0].image_url.url",
        ),
    ],
)
async def test_message_grammar(
    local_gateway: InProcessGateway, local_upstream: FunctionUpstream, messages: Any, param: str
) -> None:
    response, request_id = await send(local_gateway, {"model": MODEL, "messages": messages})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert local_upstream.find(request_id) == []


async def test_valid_conversations_pass(local_gateway: InProcessGateway) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ", "detail": "low"}}
    shouted = {"type": "image_url", "image_url": {"url": "HTTPS://example.com/a.png"}}  # schemes ignore case
    messages = [
        {"role": "user", "content": "first"},
        {"role": "system", "content": "be brief"},  # one system message, anywhere
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
        {"role": "user", "content": [{"type": "text", "text": "and this?"}, image, shouted]},
    ]
    assert (await send(local_gateway, {"model": MODEL, "messages": messages}))[0].status_code == 200


@pytest.mark.parametrize(
    ("model", "status", "code"), [("gpt-4o", 404, "model_not_found"), (None, 400, None), (7, 400, None)]
)
async def test_model_must_be_one_the_gateway_serves(
    local_gateway: InProcessGateway,
    local_upstream: FunctionUpstream,
    model: Any,
    status: int,
    code: str | None,
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    if model is not None:
        body["model"] = model
    response, request_id = await send(local_gateway, body)
    assert response.status_code == status
    assert response.json()["error"]["param"] == "model"
    if code:
        assert response.json()["error"]["code"] == code
    assert local_upstream.find(request_id) == []


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"not json", b"[1, 2]", b'"text"', b"null", b'{"a": NaN}', b"\xff\xfe"]
)
async def test_bodies_that_are_not_a_json_object_are_400(local_gateway: InProcessGateway, raw: bytes) -> None:
    response, _ = await send(local_gateway, raw)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_bodies_over_the_limit_are_413(
    local_gateway: InProcessGateway, local_upstream: FunctionUpstream
) -> None:
    padding = "x" * MAX_BODY_BYTES
    response, request_id = await send(local_gateway, chat(padding))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert local_upstream.find(request_id) == []

    async def chunked() -> Any:  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "%s", "messages": [{"role": "user", "content": "' % MODEL.encode()
        for _ in range(MAX_BODY_BYTES // 65536 + 1):
            yield b"x" * 65536
        yield b'"}]}'

    response = await local_gateway.client.post(CHAT_PATH, content=chunked())
    assert response.status_code == 413


async def test_a_body_just_under_the_limit_is_accepted(local_gateway: InProcessGateway) -> None:
    body = chat("")
    overhead = len(json.dumps(body).encode())
    response, _ = await send(local_gateway, chat("y" * (MAX_BODY_BYTES - overhead)))
    assert response.status_code == 200
