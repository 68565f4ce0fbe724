"""What a caller sends is bounded before it is booked: `user`, request ids, key names, Authorization.

Each bound is checked at both sides, through a real gateway on both ledger backends, and every
refused request with a valid key is booked all the same, with the ledger moving on behind it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import auth_headers, chat
from tests.ledgers import BACKENDS, ledger_database, row_count, rows_once_booked
from tests.servers import CALLER_KEY, MODEL, UPSTREAM_TOKEN, GatewayProcess, ScriptedUpstream, gateway_config

CHAT_PATH = "/v1/openai/chat/completions"
ADMIN_KEY = "sk-admin-bounds-5c1e"

METRICS_TOKEN = "metrics-edge-51c2"


@pytest.fixture(scope="module", params=BACKENDS)
def edge(
    request: pytest.FixtureRequest, upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp(f"edge-{request.param}")
    with ledger_database(request.param, tmp) as url:
        config = gateway_config(
            upstream.base_url,
            ledger={"url": url},
            upstream={"read_timeout_s": 1.5},
            metrics={"token_env": "METRICS_TOKEN"},
        )
        env = {
            "DEEPINFRA_TOKEN": UPSTREAM_TOKEN,
            "GATEWAY_ADMIN_KEY": ADMIN_KEY,
            "METRICS_TOKEN": METRICS_TOKEN,
        }
        process = GatewayProcess(config, tmp, env).start()
        yield process
        process.stop()


def post_raw(gateway: GatewayProcess, raw: bytes, request_id: str | None = None) -> httpx.Response:
    headers = auth_headers(request_id=request_id or str(uuid.uuid4()))
    return httpx.post(gateway.url + CHAT_PATH, content=raw, headers=headers, timeout=10)


def assert_the_books_move(gateway: GatewayProcess, rows_before: int, sent: int) -> None:
    """Every request sent is booked, a normal request after them too, and /readyz says ready."""
    normal = post_raw(gateway, json.dumps(chat()).encode(), request_id=f"after-{uuid.uuid4()}")
    assert normal.status_code == 200
    rows = rows_once_booked(gateway.ledger_url, rows_before + sent + 1, within_s=5.0)
    assert normal.headers["x-request-id"] in {row["request_id"] for row in rows}
    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


# --- user --------------------------------------------------------------------------------------------

USER_ACCEPTED = ["u" * 256, "Zoë 😀", "\\ud83d\\ude00 paired", "\\tx", "bell\\u0007"]
USER_REFUSED = ["u" * 257, "Zo\\u00eb \\ud83d", "\\udc00", "a\\u0000b", "\\u0000"]


def user_body(user_json: str) -> bytes:
    """A body whose `user` is written as the JSON string text given (escapes as they stand)."""
    return b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "user": "%s"}' % (
        MODEL.encode(),
        user_json.encode(),
    )


@pytest.mark.parametrize("user", USER_ACCEPTED)
def test_a_user_of_up_to_256_characters_is_accepted_and_booked(edge: GatewayProcess, user: str) -> None:
    before = row_count(edge.ledger_url)
    response = post_raw(edge, user_body(user))
    assert response.status_code == 200, response.text
    (row,) = [
        r
        for r in rows_once_booked(edge.ledger_url, before + 1, within_s=5.0)
        if r["request_id"] == response.headers["x-request-id"]
    ]
    assert row["user"] == json.loads(f'"{user}"')


@pytest.mark.parametrize("user", USER_REFUSED)
def test_a_long_user_or_one_with_a_lone_surrogate_or_nul_is_400(
    edge: GatewayProcess, upstream: ScriptedUpstream, user: str
) -> None:
    before = row_count(edge.ledger_url)
    response = post_raw(edge, user_body(user))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "user" and error["code"] == "invalid_value"
    assert error["type"] == "invalid_request_error" and error["message"].startswith("user must")
    request_id = response.headers["x-request-id"]
    assert upstream.find(request_id) == []
    (row,) = [
        r
        for r in rows_once_booked(edge.ledger_url, before + 1, within_s=5.0)
        if r["request_id"] == request_id
    ]
    assert (row["outcome"], row["status"], row["cost_nanos"], row["user"]) == ("rejected", 400, 0, None)
    assert_the_books_move(edge, before, 1)


# --- request ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"x" * 200, True),
        (b"trace ~!@#$%^&*()", True),
        (b"x" * 201, False),
        (b"span\t7", False),
        (b"caf\xc3\xa9", False),
        (b"\xff\xfe", False),
    ],
)
def test_a_request_id_is_kept_only_when_short_printable_ascii(
    edge: GatewayProcess, upstream: ScriptedUpstream, sent: bytes, kept: bool
) -> None:
    """The id the caller sees is the one booked and sent upstream: theirs, or a new one."""
    before, sent_before = row_count(edge.ledger_url), len(upstream.find(sent.decode("latin-1")))
    headers = {b"Authorization": f"Bearer {CALLER_KEY}".encode(), b"x-request-id": sent}
    response = httpx.post(edge.url + CHAT_PATH, json=chat(), headers=headers)
    assert response.status_code == 200
    echoed = response.headers["x-request-id"]
    assert (echoed == sent.decode("latin-1")) is kept
    assert 1 <= len(echoed) <= 200 and echoed.isascii() and echoed.isprintable()
    assert len(upstream.find(echoed)) == (sent_before if kept else 0) + 1
    assert echoed in {
        row["request_id"] for row in rows_once_booked(edge.ledger_url, before + 1, within_s=5.0)
    }


# --- Authorization ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "second"),
    [
        ("POST", CHAT_PATH, CALLER_KEY),
        ("POST", CHAT_PATH, "sk-other"),
        ("GET", "/v1/models", CALLER_KEY),
        ("GET", "/admin/keys", ADMIN_KEY),
        ("GET", "/metrics", METRICS_TOKEN),
    ],
)
def test_two_authorization_headers_are_400(edge: GatewayProcess, method: str, path: str, second: str) -> None:
    """Not "the last one wins": which of the two a proxy in front would have checked is unknown."""
    first = {"/admin/keys": ADMIN_KEY, "/metrics": METRICS_TOKEN}.get(path, CALLER_KEY)
    headers = [("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")]
    response = httpx.request(method, edge.url + path, headers=headers, json=chat())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "duplicate_header" and error["type"] == "invalid_request_error"
    assert response.headers["x-request-id"]


# --- admin key names -------------------------------------------------------------------------------


@pytest.mark.parametrize("name_json", ["n" * 201, "a\\u0000b", "\\ud800", "line\\nbreak", "del\\u007f", "  "])
def test_admin_key_names_are_bounded_and_printable(edge: GatewayProcess, name_json: str) -> None:
    body = b'{"name": "%s"}' % name_json.encode()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    response = httpx.post(edge.url + "/admin/keys", content=body, headers=admin)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "name"
    revoked = httpx.delete(edge.url + "/admin/keys/a%00b", headers=admin)
    assert revoked.status_code == 400 and revoked.json()["error"]["param"] == "name"
    assert httpx.get(edge.url + "/admin/keys", headers=admin).status_code == 200  # the ledger is fine
    longest = f"k-{uuid.uuid4().hex}".ljust(200, "k")
    assert httpx.post(edge.url + "/admin/keys", json={"name": longest}, headers=admin).status_code == 201


# --- any text in any caller field --------------------------------------------------------------------

# Any code point, lone surrogates and NUL included (json.dumps writes them as \\u escapes). Header
# bytes: any a client can send (httptools refuses the other controls before the gateway sees them).
ANY_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=300)
HEADER_BYTES = st.binary(max_size=260).map(
    lambda raw: bytes(b for b in raw if b == 9 or (b >= 0x20 and b != 0x7F)).strip(b" \t") or b"x"
)


@st.composite
def hostile_requests(draw: st.DrawFn) -> tuple[bytes, bytes]:
    body: dict[str, Any] = {
        "model": draw(st.one_of(st.just(MODEL), ANY_TEXT)),
        "messages": [{"role": "user", "content": draw(ANY_TEXT)}],
    }
    if draw(st.booleans()):
        body["user"] = draw(ANY_TEXT)
    body[draw(ANY_TEXT)] = draw(st.one_of(ANY_TEXT, st.lists(ANY_TEXT, max_size=3)))
    return json.dumps(body).encode(), draw(HEADER_BYTES)


def test_any_text_in_any_caller_field_is_answered_in_the_openai_shape_and_booked(
    edge: GatewayProcess,
) -> None:
    before = row_count(edge.ledger_url)
    answered: list[str] = []

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(hostile_requests())
    def one_request(request: tuple[bytes, bytes]) -> None:
        raw, request_id = request
        headers = {b"Authorization": f"Bearer {CALLER_KEY}".encode(), b"x-request-id": request_id}
        response = httpx.post(edge.url + CHAT_PATH, content=raw, headers=headers, timeout=10)
        answered.append(response.headers["x-request-id"])
        assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
        if response.status_code != 200:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]

    one_request()
    booked = {
        row["request_id"] for row in rows_once_booked(edge.ledger_url, before + len(answered), within_s=5.0)
    }
    assert set(answered) <= booked
    assert_the_books_move(edge, before, len(answered))
