"""Clients that send too much, too slowly, or not HTTP at all: bounded answers in OpenAI's error shape,
connections that do not pile up, and a stream that is never cut for being long.

Raw sockets, since an HTTP client would not send such requests. Each test waits on the socket for
the gateway's answer or close (an event), never on a clock of its own.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.http_guard import MAX_HEAD_BYTES
from tests.conftest import auth_headers, chat
from tests.ledgers import row_of_request
from tests.servers import CALLER_KEY, GatewayProcess, gateway_config

CLIENT_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """On its simulator, with a short client timeout and a stream that outlasts it (1 s)."""
    config = gateway_config(
        server={"client_timeout_s": CLIENT_TIMEOUT_S},
        simulator={"latency_ms": 0, "tokens_per_s": 20, "reply_tokens": 20},
    )
    process = GatewayProcess(config, tmp_path_factory.mktemp("guarded")).start()
    yield process
    process.stop()


def exchange(gateway: GatewayProcess, data: bytes) -> bytes:
    """Send `data`, then read until the gateway closes (or resets) the connection (at most 10 s)."""
    host, port = gateway.url.removeprefix("http://").split(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        try:
            connection.sendall(data)
            while chunk := connection.recv(65536):
                answer += chunk
        except (ConnectionResetError, BrokenPipeError):  # closed with our bytes unread: ended all the same
            pass
    return answer


def error_of(answer: bytes) -> tuple[int, dict[str, str]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nx-request-id: " in head
    return int(head.split()[1]), json.loads(body)["error"]


def test_an_oversized_request_head_is_431_and_others_are_served(guarded: GatewayProcess) -> None:
    status, error = error_of(
        exchange(
            guarded, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4 * MAX_HEAD_BYTES + b"\r\n\r\n"
        )
    )
    assert status == 431 and error["code"] == "request_header_fields_too_large"
    assert error["type"] == "invalid_request_error"
    many = b"".join(b"X-H%d: v\r\n" % n for n in range(20_000))
    assert error_of(exchange(guarded, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"))[0] == 431
    assert httpx.get(guarded.url + "/healthz").status_code == 200


def test_a_head_within_the_limit_is_served(guarded: GatewayProcess) -> None:
    headers = {**auth_headers(), "x-padding": "p" * (MAX_HEAD_BYTES // 2)}
    assert httpx.get(guarded.url + "/v1/models", headers=headers).status_code == 200


def test_a_head_that_stops_halfway_is_408(guarded: GatewayProcess) -> None:
    status, error = error_of(exchange(guarded, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"))
    assert status == 408 and error["code"] == "request_timeout"


def test_a_connection_that_sends_nothing_is_closed(guarded: GatewayProcess) -> None:
    assert exchange(guarded, b"") == b""


def test_what_is_not_http_gets_400_in_the_openai_shape(guarded: GatewayProcess) -> None:
    status, error = error_of(exchange(guarded, b"NOT HTTP AT ALL\r\n\r\n"))
    assert status == 400 and error["code"] == "invalid_http"


def test_a_body_that_stops_is_cut_and_booked(guarded: GatewayProcess) -> None:
    request_id = f"stalled-{time.monotonic_ns()}"
    head = (
        b"POST /v1/openai/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
        b"x-request-id: %s\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        % (CALLER_KEY.encode(), request_id.encode())
    )
    assert exchange(guarded, head + b'{"model": ') == b""  # closed, as the caller left
    row = row_of_request(guarded.ledger_url, request_id, within_s=2.0)
    assert (row["outcome"], row["status"]) == ("client_disconnected", 499)


def test_a_stream_longer_than_the_client_timeout_is_not_cut(guarded: GatewayProcess) -> None:
    response = httpx.post(
        guarded.url + "/v1/openai/chat/completions",
        json=chat(stream=True),
        headers=auth_headers(),
        timeout=10,
    )
    assert response.status_code == 200
    assert response.content.endswith(b"data: [DONE]\n\n")
    assert response.content.count(b'"content":') >= 20  # 20 tokens at 20 a second: a second long


def test_a_huge_trailer_is_431_and_booked_as_the_caller_leaving(guarded: GatewayProcess) -> None:
    """Trailers come after the body: the caller gets 431, and the app sees the caller leave."""
    request_id = f"trailer-{time.monotonic_ns()}"
    trailer = b"0\r\nX-T: " + b"a" * 16 * MAX_HEAD_BYTES + b"\r\n\r\n"
    status, error = error_of(exchange(guarded, chunked_chat_head(request_id) + b"2\r\n{}\r\n" + trailer))
    assert status == 431 and error["code"] == "request_header_fields_too_large"
    assert row_of_request(guarded.ledger_url, request_id, within_s=2.0)["outcome"] == "client_disconnected"
    assert httpx.get(guarded.url + "/healthz").status_code == 200


def chunked_chat_head(request_id: str) -> bytes:
    return (
        b"POST /v1/openai/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
        b"x-request-id: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % (CALLER_KEY.encode(), request_id.encode())
    )


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param(b"zz\r\n{}\r\n0\r\n\r\n", id="a chunk size that is not hex"),
        pytest.param(b"2\r\n{}  \r\n0\r\n\r\n", id="a chunk longer than its size"),
        pytest.param(b"2\r\n{}\r\ngarbage\r\n", id="garbage after a chunk"),
    ],
)
def test_broken_chunked_framing_is_400_and_booked_as_the_caller_leaving(
    guarded: GatewayProcess, framing: bytes
) -> None:
    request_id = f"chunks-{time.monotonic_ns()}"
    status, error = error_of(exchange(guarded, chunked_chat_head(request_id) + framing))
    assert status == 400 and error["code"] == "invalid_http" and error["type"] == "invalid_request_error"
    assert row_of_request(guarded.ledger_url, request_id, within_s=2.0)["outcome"] == "client_disconnected"


def test_a_head_over_the_limit_in_one_read_is_431(guarded: GatewayProcess) -> None:
    """One send of 100 KB: the whole head is parsed in one read (uvloop reads up to 256 KiB)."""
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 30_000) + b"\r\n\r\n"
    assert error_of(exchange(guarded, big))[0] == 431
    many = b"".join(b"X-H%05d: %s\r\n" % (n, b"v" * 50) for n in range(1_500))  # 90 KB of short headers
    assert error_of(exchange(guarded, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"))[0] == 431


def test_a_pipelined_head_over_the_limit_is_431_after_the_answer_before_it(guarded: GatewayProcess) -> None:
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    second = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 30_000) + b"\r\n\r\n"
    answer = exchange(guarded, first + second)
    assert answer.startswith(b"HTTP/1.1 200")
    assert error_of(answer[answer.index(b"HTTP/1.1 431") :])[1]["code"] == "request_header_fields_too_large"


def test_a_pipelined_head_over_the_limit_across_two_reads_is_431(guarded: GatewayProcess) -> None:
    """The head begins behind another request in one read and ends in the next: neither read holds
    64 KiB of it, the head does."""
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    half = b"a" * (MAX_HEAD_BYTES * 5 // 8)
    host, port = guarded.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(first + b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + half)
        answer = connection.recv(65536)  # the first answer: the gateway has read what came before it
        assert answer.startswith(b"HTTP/1.1 200")
        connection.sendall(half + b"\r\n\r\n")
        while chunk := connection.recv(65536):
            answer += chunk
    assert b"HTTP/1.1 431" in answer


def test_bytes_that_are_not_http_after_a_request_are_400_after_its_answer(guarded: GatewayProcess) -> None:
    body = json.dumps(chat()).encode()
    request = (
        b"POST /v1/openai/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (CALLER_KEY.encode(), len(body), body)
    )
    answer = exchange(guarded, request + b"NOT HTTP AT ALL\r\n\r\n")  # returns once the gateway closes
    assert answer.startswith(b"HTTP/1.1 200") and b'"chat.completion"' in answer
    assert error_of(answer[answer.index(b"HTTP/1.1 400") :])[1]["code"] == "invalid_http"


def test_a_pipelined_request_whose_body_stops_is_cut_too(guarded: GatewayProcess) -> None:
    """The end of one request and the start of the next in one packet: the second is still timed."""
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    second = (
        b"POST /v1/openai/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
        b"Content-Length: 1000000\r\n\r\nab" % CALLER_KEY.encode()
    )
    answer = exchange(guarded, first + second)  # returns once the gateway closes the connection
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1


def test_bytes_sent_during_a_stream_never_cut_it(guarded: GatewayProcess) -> None:
    """A stray line end after the request, while the answer streams for longer than the timeout."""
    body = json.dumps(chat(stream=True)).encode()
    request = (
        b"POST /v1/openai/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (CALLER_KEY.encode(), len(body), body)
    )
    host, port = guarded.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request)
        answer = connection.recv(65536)
        connection.sendall(b"\r\n")
        while b"data: [DONE]" not in answer:
            chunk = connection.recv(65536)
            assert chunk, "the stream was cut"
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" not in answer


def test_a_refusal_is_answered_once_and_logs_no_traceback(guarded: GatewayProcess) -> None:
    status, _ = error_of(exchange(guarded, b"NOT HTTP " + b"x" * 4 * MAX_HEAD_BYTES + b"\r\n\r\n"))
    assert status in (400, 431)
    assert httpx.get(guarded.url + "/healthz").status_code == 200
    assert "Traceback" not in guarded.logs() and "Fatal error" not in guarded.logs()
