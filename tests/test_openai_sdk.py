"""The drop-in promise: the official OpenAI SDK works unchanged against the gateway's base URL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal

import openai
import pytest

from tests.scenarios import COMPLETION, USAGE
from tests.servers import CALLER_KEY, MODEL, GatewayProcess, ScriptedUpstream

PRICE = Decimal("0.049")
HELLO = [{"role": "user", "content": "Hello!"}]


def expected_cost(prompt_tokens: int, completion_tokens: int) -> float:
    return float((prompt_tokens + completion_tokens) * PRICE / 1_000_000)


_OPEN_CLIENTS: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_sync_clients() -> Iterator[None]:
    """Each test's clients closed when it ends: an unclosed socket would warn in a later test."""
    yield
    while _OPEN_CLIENTS:
        _OPEN_CLIENTS.pop().close()


def sync_client(gateway: GatewayProcess, key: str = CALLER_KEY, suffix: str = "/v1/openai") -> openai.OpenAI:
    client = openai.OpenAI(base_url=gateway.url + suffix, api_key=key, max_retries=0, timeout=10)
    _OPEN_CLIENTS.append(client)
    return client


def async_client(gateway: GatewayProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=gateway.url + "/v1/openai", api_key=CALLER_KEY, max_retries=0, timeout=10
    )


def test_sync_completion_from_the_simulator(sim_gateway: GatewayProcess) -> None:
    completion = sync_client(sim_gateway).chat.completions.create(model=MODEL, messages=HELLO)

    assert completion.model == MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content.startswith(" The quick brown fox")
    usage = completion.usage
    assert usage is not None and usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.model_extra is not None
    assert usage.model_extra["estimated_cost"] == expected_cost(usage.prompt_tokens, usage.completion_tokens)


def test_sync_stream_from_the_simulator_matches_the_plain_answer(sim_gateway: GatewayProcess) -> None:
    client = sync_client(sim_gateway)
    plain = client.chat.completions.create(model=MODEL, messages=HELLO)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True))

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    # DeepInfra puts usage on its last content chunk; the gateway relays it as it came.
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


async def test_async_completion_and_stream(sim_gateway: GatewayProcess) -> None:
    client = async_client(sim_gateway)
    completion = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3

    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, stream=True)
    pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert "".join(p or "" for p in pieces) == completion.choices[0].message.content
    await client.close()


def test_base_url_ending_in_v1_works_too(sim_gateway: GatewayProcess) -> None:
    client = sync_client(sim_gateway, suffix="/v1")
    assert client.chat.completions.create(model=MODEL, messages=HELLO).choices[0].message.content
    assert [model.id for model in client.models.list()] == [MODEL]


def test_models_list(sim_gateway: GatewayProcess) -> None:
    assert [model.id for model in sync_client(sim_gateway).models.list()] == [MODEL]


def test_models_retrieve(sim_gateway: GatewayProcess) -> None:
    for suffix in ("/v1/openai", "/v1"):
        client = sync_client(sim_gateway, suffix=suffix)
        assert client.models.retrieve(MODEL).id == MODEL  # the name holds a slash
        with pytest.raises(openai.NotFoundError) as refused:
            client.models.retrieve("acme/none")
        assert refused.value.code == "model_not_found"


def test_max_completion_tokens_as_langchain_sends_it(sim_gateway: GatewayProcess) -> None:
    """Current SDKs and LangChain send OpenAI's newer name for max_tokens: checked and honoured."""
    client = sync_client(sim_gateway)
    messages = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5)
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=-5)
    assert refused.value.param == "max_completion_tokens"


def test_vision_request_with_image_parts(sim_gateway: GatewayProcess) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these images?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        }
    ]
    completion = sync_client(sim_gateway).chat.completions.create(model=MODEL, messages=messages)
    assert completion.choices[0].message.content


def test_sdk_errors_are_the_sdk_exceptions(sim_gateway: GatewayProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        sync_client(sim_gateway, key="sk-wrong").chat.completions.create(model=MODEL, messages=HELLO)

    with pytest.raises(openai.BadRequestError) as bad:
        sync_client(sim_gateway).chat.completions.create(model=MODEL, messages=HELLO, temperature=2.5)
    assert bad.value.param == "temperature"
    assert bad.value.body == {
        "message": "temperature must be ≤ 2, got 2.5",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "invalid_value",
    }

    with pytest.raises(openai.NotFoundError) as missing:
        sync_client(sim_gateway).chat.completions.create(model="gpt-4o", messages=HELLO)
    assert missing.value.code == "model_not_found"


def test_upstream_bytes_and_usage_reach_the_sdk(gateway: GatewayProcess) -> None:
    completion = sync_client(gateway).chat.completions.create(model=MODEL, messages=HELLO)
    assert completion.id == COMPLETION["id"]
    assert completion.usage is not None
    assert completion.usage.model_dump(exclude_none=True) == USAGE


def test_sdk_stream_options_include_usage(gateway: GatewayProcess) -> None:
    """An OpenAI-style upstream: usage arrives on its own chunk, only for a caller that asked."""
    client = sync_client(gateway)
    messages = [{"role": "user", "content": "scenario:openai_usage"}]
    asked = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    not_asked = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))

    assert asked[-1].choices == [] and asked[-1].usage is not None
    assert asked[-1].usage.total_tokens == USAGE["total_tokens"]
    assert len(not_asked) == len(asked) - 1
    assert all(chunk.choices for chunk in not_asked)


def test_failure_mid_stream_raises_in_the_sdk(gateway: GatewayProcess) -> None:
    stream = sync_client(gateway).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "scenario:stream_stall"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError) as failure:
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 1 and received[0].choices[0].delta.content == " Hi"
    assert "sent nothing for" in failure.value.message


def test_stream_cut_mid_event_raises_an_api_error_in_the_sdk(gateway: GatewayProcess) -> None:
    stream = sync_client(gateway).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "scenario:stream_cut"}], stream=True
    )
    with pytest.raises(openai.APIError) as failure:
        list(stream)
    assert "before its answer was complete" in failure.value.message


def test_request_id_is_echoed_and_forwarded(gateway: GatewayProcess, upstream: ScriptedUpstream) -> None:
    request_id = f"trace-{uuid.uuid4()}"
    raw = sync_client(gateway).chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, extra_headers={"x-request-id": request_id}
    )
    assert raw.headers["x-request-id"] == request_id
    assert len(upstream.find(request_id)) == 1

    fresh = sync_client(gateway).chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
    new_id = fresh.headers["x-request-id"]
    assert new_id and new_id != request_id
    assert len(upstream.find(new_id)) == 1
