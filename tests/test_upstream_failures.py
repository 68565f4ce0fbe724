"""Upstream failures reach the caller as clear OpenAI-shaped errors, and never with a secret."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import CAROL_KEY, auth_headers, chat
from tests.scenarios import COMPLETION_BYTES, USAGE
from tests.servers import CALLER_KEY, UPSTREAM_TOKEN, GatewayProcess, ScriptedUpstream, gateway_config

CHAT_PATH = "/v1/openai/chat/completions"


def test_success_body_is_relayed_byte_for_byte(client: httpx.Client) -> None:
    response = client.post(CHAT_PATH, json=chat())
    assert response.status_code == 200
    assert response.content == COMPLETION_BYTES


def test_estimated_cost_is_added_when_upstream_gave_none(client: httpx.Client) -> None:
    usage = client.post(CHAT_PATH, json=chat("scenario:no_cost")).json()["usage"]
    # 15 prompt + 16 completion tokens at USD 0.049 per million each: exactly 1.519e-06.
    assert usage == {**USAGE, "estimated_cost": 1.519e-06}


@pytest.mark.parametrize(
    ("scenario", "status", "error_type"),
    [("rate_limited", 429, "rate_limit_error"), ("server_error_json", 500, "server_error")],
)
def test_upstream_json_errors_are_relayed_with_their_status(
    client: httpx.Client, scenario: str, status: int, error_type: str
) -> None:
    response = client.post(CHAT_PATH, json=chat(f"scenario:{scenario}"))
    assert response.status_code == status
    assert response.json()["error"]["type"] == error_type


def test_an_error_body_orjson_refuses_is_still_relayed(client: httpx.Client) -> None:
    """Valid JSON is relayed as JSON, even the kind orjson refuses (a lone surrogate escape), and
    completed to OpenAI's shape like any other error that lacks `param` and `code`."""
    response = client.post(CHAT_PATH, json=chat("scenario:error_only_stdlib_reads"))
    assert response.status_code == 400
    assert response.content == (
        b'{"error":{"message":"bad \\ud800","type":"invalid_request_error","param":null,"code":null}}'
    )


def test_an_upstream_error_quoting_the_token_does_not_show_it(client: httpx.Client) -> None:
    response = client.post(CHAT_PATH, json=chat("scenario:echo_token"))
    assert response.status_code == 401
    assert UPSTREAM_TOKEN not in response.text
    assert response.json()["error"]["message"] == "Incorrect API key: Bearer ***"


def test_retry_after_is_passed_on(client: httpx.Client) -> None:
    assert client.post(CHAT_PATH, json=chat("scenario:rate_limited")).headers["retry-after"] == "7"


@pytest.mark.parametrize(
    ("scenario", "status", "code"),
    [
        ("server_error_html", 502, "upstream_bad_response"),
        ("garbage", 502, "upstream_bad_response"),
        ("drop", 502, "upstream_bad_response"),
        ("stall", 504, "upstream_timeout"),
        ("redirect", 502, "upstream_bad_response"),
    ],
)
def test_garbage_drops_and_silence_become_502_and_504(
    client: httpx.Client, scenario: str, status: int, code: str
) -> None:
    response = client.post(CHAT_PATH, json=chat(f"scenario:{scenario}"))
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "upstream_error" and error["message"]
    assert response.headers["x-request-id"]


@pytest.fixture(scope="module")
def unreachable_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = gateway_config(f"http://127.0.0.1:{port}/v1/openai")
    process = GatewayProcess(
        config, tmp_path_factory.mktemp("unreachable"), {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN}
    )
    yield process.start()
    process.stop()


def test_unreachable_upstream_is_502(unreachable_gateway: GatewayProcess) -> None:
    for body in (chat(), chat(stream=True)):
        response = httpx.post(unreachable_gateway.url + CHAT_PATH, json=body, headers=auth_headers())
        assert response.status_code == 502
        assert response.json()["error"] == {
            "message": "The upstream could not be reached.",
            "type": "upstream_error",
            "param": None,
            "code": "upstream_unavailable",
        }


def test_a_tls_handshake_that_never_ends_is_a_connect_timeout(tmp_path: Path) -> None:
    """An https upstream that takes the TCP connection but never answers the TLS hello: 502 once
    connect_timeout_s is over (the handshake is part of connecting), not 504 after read_timeout_s."""
    with socket.socket() as silent:  # the kernel completes TCP handshakes; nothing ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        config = gateway_config(
            f"https://127.0.0.1:{silent.getsockname()[1]}/v1/openai",
            upstream={"connect_timeout_s": 0.5, "read_timeout_s": 30},
        )
        gateway = GatewayProcess(config, tmp_path, {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN}).start()
        try:
            response = httpx.post(gateway.url + CHAT_PATH, json=chat(), headers=auth_headers(), timeout=60)
        finally:
            gateway.stop()
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"


def test_upstream_gets_the_upstream_token_and_never_the_callers_key(
    client: httpx.Client, upstream: ScriptedUpstream
) -> None:
    client.post(CHAT_PATH, json=chat())
    client.post(CHAT_PATH, json=chat(stream=True))
    assert upstream.requests
    for request in upstream.requests:
        assert request.headers["authorization"] == f"Bearer {UPSTREAM_TOKEN}"
        everything = repr(request.headers).encode() + request.body
        assert CALLER_KEY.encode() not in everything and CAROL_KEY.encode() not in everything


def test_no_secret_in_any_error_response_or_log_line(
    gateway: GatewayProcess, unreachable_gateway: GatewayProcess, tmp_path: Path
) -> None:
    seen: list[bytes] = []
    bodies = [
        chat(f"scenario:{name}") for name in ("rate_limited", "server_error_html", "garbage", "drop", "stall")
    ]
    bodies += [chat(f"scenario:{name}", stream=True) for name in ("stream_cut", "stream_stall")]
    bodies += [chat(temperature=9), {"model": "x"}, chat(model="nope")]
    for url in (gateway.url, unreachable_gateway.url):
        for body in bodies:
            response = httpx.post(url + CHAT_PATH, json=body, headers=auth_headers(), timeout=10)
            seen.append(repr(response.headers).encode() + response.content)
        for headers in ({"Authorization": f"Bearer {CALLER_KEY}x"}, {"Authorization": CALLER_KEY}, {}):
            response = httpx.post(url + CHAT_PATH, json=chat(), headers=headers)
            assert response.status_code == 401
            seen.append(repr(response.headers).encode() + response.content)
    logs = (gateway.logs() + unreachable_gateway.logs()).encode()
    assert b"upstream request failed" in logs  # the failures above were logged...
    for secret in (UPSTREAM_TOKEN, CALLER_KEY, CAROL_KEY):
        assert secret.encode() not in logs  # ...without any secret
        for response in seen:
            assert secret.encode() not in response
