"""Gateway keys: every route but the open ones needs one; keys come from the file, a hash or the env."""

from __future__ import annotations

import hashlib

import httpx
import pytest
from fastapi.routing import APIRoute

from gateway.app import OPEN_PATHS, create_app
from gateway.auth import KeyStore
from gateway.chat import CHAT_PATHS
from gateway.config import CallerKey, parse_config
from gateway.errors import Unauthorized
from tests.conftest import BOB_KEY, CAROL_KEY, auth_headers, chat
from tests.servers import CALLER_KEY, GatewayProcess


def all_routes() -> list[tuple[str, str]]:
    app = create_app(parse_config("{}", {}))
    routes = [
        (method, route.path)
        for route in app.api.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    ]
    return routes + [("POST", path) for path in CHAT_PATHS]


def test_the_route_table_is_known() -> None:
    paths = {path for _, path in all_routes()}
    assert paths >= OPEN_PATHS
    assert {"/v1/models", "/v1/openai/models", *CHAT_PATHS} <= paths


@pytest.mark.parametrize(("method", "path"), [r for r in all_routes() if r[1] not in OPEN_PATHS])
@pytest.mark.parametrize(
    "authorization", [None, "Bearer sk-unknown", f"Basic {CALLER_KEY}", "Bearer", f"{CALLER_KEY}"]
)
def test_every_route_but_the_open_ones_needs_a_key(
    gateway: GatewayProcess, method: str, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.request(method, gateway.url + path, headers=headers, json=chat())
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("path", sorted(OPEN_PATHS))
def test_open_routes_need_no_key(gateway: GatewayProcess, path: str) -> None:
    response = httpx.get(gateway.url + path)
    assert response.status_code == 200
    assert response.headers["x-request-id"]


def test_readyz_says_which_upstream(gateway: GatewayProcess, sim_gateway: GatewayProcess) -> None:
    ready = {"status": "ready", "ledger": "ok", "ledger_queue": 0, "ledger_spilled": 0, "ledger_spill": "ok"}
    assert httpx.get(gateway.url + "/readyz").json() == {**ready, "upstream": "configured"}
    assert httpx.get(sim_gateway.url + "/readyz").json() == {**ready, "upstream": "simulator"}


@pytest.mark.parametrize("key", [CALLER_KEY, BOB_KEY, CAROL_KEY], ids=["key", "key_sha256", "key_env"])
def test_keys_from_each_source_are_accepted(gateway: GatewayProcess, key: str) -> None:
    response = httpx.post(gateway.url + "/v1/openai/chat/completions", json=chat(), headers=auth_headers(key))
    assert response.status_code == 200
    assert httpx.get(gateway.url + "/v1/models", headers=auth_headers(key)).status_code == 200


def test_bearer_scheme_is_case_insensitive(gateway: GatewayProcess) -> None:
    headers = {"Authorization": f"bearer {CALLER_KEY}"}
    assert httpx.post(gateway.url + "/v1/chat/completions", json=chat(), headers=headers).status_code == 200


@pytest.mark.parametrize("request_id", ["my trace 42", "~!{}", "x" * 200])
def test_request_ids_are_kept(gateway: GatewayProcess, request_id: str) -> None:
    response = httpx.get(gateway.url + "/v1/models", headers=auth_headers(request_id=request_id))
    assert response.headers["x-request-id"] == request_id


@pytest.mark.parametrize("request_id", ["span\t7", "x" * 201, "caf\xe9", "a\x7fb"])
def test_request_ids_that_are_long_or_not_printable_ascii_are_replaced(
    gateway: GatewayProcess, request_id: str
) -> None:
    headers = {
        b"Authorization": f"Bearer {CALLER_KEY}".encode(),
        b"x-request-id": request_id.encode("latin-1"),
    }
    response = httpx.get(gateway.url + "/v1/models", headers=headers)
    assert response.headers["x-request-id"] not in ("", request_id)


def test_unknown_routes_and_methods_answer_in_the_openai_shape(gateway: GatewayProcess) -> None:
    assert httpx.get(gateway.url + "/v1/openai/chat/completions").status_code == 401  # no key: 401 first
    missing = httpx.get(gateway.url + "/v2/nothing", headers=auth_headers())
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(gateway.url + "/v1/openai/chat/completions", headers=auth_headers())
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert wrong.headers["allow"] == "POST"
    wrong = httpx.post(gateway.url + "/v1/models", headers=auth_headers())
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert wrong.headers["allow"] == "GET"


def _issued(*names: str) -> list[CallerKey]:
    return [CallerKey(name=name, sha256=hashlib.sha256(f"sk-{name}".encode()).digest()) for name in names]


def _accepts(keys: KeyStore, name: str) -> bool:
    try:
        return keys.authenticate(f"Bearer sk-{name}".encode()).key_name == name
    except Unauthorized:
        return False


@pytest.mark.parametrize("stale_finishes_first", [True, False])
def test_a_key_read_that_began_before_a_revocation_cannot_undo_it(stale_finishes_first: bool) -> None:
    """The 0.4 s refresher reads the ledger, the admin API revokes `dana` and reads it again; whichever
    read finishes last, the key store ends with the read that began last: `dana` revoked."""
    keys = KeyStore([])
    keys.set_issued(_issued("dana", "eve"), keys.begin_read())
    stale = keys.begin_read()  # the refresher's read, begun before the revocation committed
    fresh = keys.begin_read()  # the admin API's read, after it
    reads = [(stale, _issued("dana", "eve")), (fresh, _issued("eve"))]
    for read, snapshot in reads if stale_finishes_first else reversed(reads):
        keys.set_issued(snapshot, read)
    assert not _accepts(keys, "dana") and _accepts(keys, "eve")
