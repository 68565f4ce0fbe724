"""Builds the gateway's ASGI application from a `Config`.

Two parts behind one small dispatcher: the chat completions endpoint, a plain ASGI callable (the
hot path), and a FastAPI app for everything else (models, health, admin API, metrics, dashboard).
Everything with state (HTTP client, simulator) is made in the lifespan; there is no module state.
Auth is on by default: routes outside `OPEN_PATHS` need a gateway key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import SecretStr
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gateway.admin import ADMIN_PREFIX, add_admin_routes, reload_issued_keys
from gateway.asgi import (
    REQUEST_ID_HEADER,
    BodyBudget,
    ClientGone,
    Message,
    Receive,
    Scope,
    Send,
    read_headers,
    request_id_for,
    send_error,
)
from gateway.auth import (
    CALLER_STATE,
    AddressLimiter,
    Admin,
    AdminKey,
    Authenticator,
    Caller,
    FailedAuthentications,
    KeyStore,
    MetricsToken,
)
from gateway.chat import CHAT_PATHS, ChatCompletions
from gateway.config import Config, load_config, redact_url
from gateway.dashboard import ASSETS_PREFIX, PAGE_PATHS, add_dashboard_routes
from gateway.errors import (
    FrameworkHttpError,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
)
from gateway.http_guard import CONNECTIONS_CLOSED_STATE
from gateway.ledger.store import Ledger
from gateway.ledger.writer import LedgerWriter
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.simulator import RunningSimulator, start_simulator
from gateway.upstream import Upstream

logger = logging.getLogger("gateway")

# /metrics checks its own token; the dashboard's page and files carry no data (it asks the admin API).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", *PAGE_PATHS})
SIMULATOR_TOKEN = "simulator"  # not a secret: what the gateway sends its own simulator
# Issued keys are read from the ledger this often: a key revoked anywhere stops working everywhere
# within a second (the interval plus one read).
KEY_REFRESH_INTERVAL_S = 0.4
# At shutdown, requests the server cancelled at the end of its grace get this long to book their rows
# before the ledger writer is closed (booking takes microseconds: this is a bound, not a wait).
BOOKING_DRAIN_S = 5.0


class GatewayApp:
    """Authenticates every request outside OPEN_PATHS, then sends the two chat completions paths to
    the hot-path handler and the rest to FastAPI.

    The one auth site of the gateway: no route can be added without a key check. Admin paths need
    the admin key, every other path a gateway key; the chat handler gets the Caller as an argument,
    FastAPI routes find it as `request.state.caller`.
    """

    def __init__(self, chat: ChatCompletions, api: FastAPI, authenticator: Authenticator) -> None:
        self.chat = chat
        self.api = api
        self._api_with_request_id = RequestIdMiddleware(api)
        self._authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._api_with_request_id(scope, receive, send)
            return
        path = scope["path"]
        chat = path in CHAT_PATHS
        if not chat and is_open(path):
            await self._api_with_request_id(scope, receive, send)
            return
        headers = read_headers(scope)
        client = scope.get("client")
        try:
            if chat:
                caller = self._authenticator.caller(headers, "chat", client)
            elif path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
                identity: Caller | Admin = self._authenticator.admin(headers, client)
            else:
                identity = self._authenticator.caller(headers, "api", client)
        except GatewayError as error:  # 401, 429 for an address failing too often, 400 for two headers
            await send_error(send, error, request_id_for(headers.request_id))
            return
        if chat:
            await self.chat(scope, receive, send, caller, headers)
        else:
            scope.setdefault("state", {})[CALLER_STATE] = identity
            await self._api_with_request_id(scope, receive, send)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(ASSETS_PREFIX)


class RequestIdMiddleware:
    """Puts `x-request-id` (the caller's, else a new one) on every response of the wrapped app."""

    def __init__(self, app: Any) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request_id = request_id_for(read_headers(scope).request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER, request_id)]
            await send(message)

        await self._app(scope, receive, send_with_id)


def create_app(config: Config, *, multiprocess_metrics: bool = False) -> GatewayApp:
    """The whole app; `multiprocess_metrics` for a worker of `gateway serve --workers N`."""
    keys = KeyStore(config.secrets.caller_keys)
    token = config.secrets.upstream_token
    metrics = Metrics(
        models=(model.name for model in config.models),
        user_labels=config.metrics.user_labels,
        multiprocess_mode=multiprocess_metrics,
    )
    upstream = Upstream(
        config.upstream,
        token.get_secret_value() if token else SIMULATOR_TOKEN,
        metrics,
        max_answer_bytes=config.server.max_body_bytes,
    )
    failures = FailedAuthentications(
        lambda route: metrics.auth_failures.labels(route).inc(), AddressLimiter()
    )
    bodies = BodyBudget(
        config.server.max_inflight_body_bytes,
        config.server.client_timeout_s,
        metrics.overloaded.labels("body_memory").inc,
    )
    chat = ChatCompletions(config, upstream, bodies)
    ledger = Ledger(config.ledger.url)
    writer = LedgerWriter(
        ledger,
        spill_dir=config.ledger.spill_dir,
        observer=metrics,
        max_queued_rows=config.ledger.max_queued_rows,
    )

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[dict[str, Any]]:
        await asyncio.to_thread(open_ledger, ledger, config.ledger.url)
        await reload_issued_keys(ledger, keys)
        writer.start()
        chat.books = writer
        refresher = asyncio.create_task(_refresh_issued_keys(ledger, keys, KEY_REFRESH_INTERVAL_S))
        simulator: RunningSimulator | None = None
        if config.uses_simulator:
            simulator = await start_simulator(config.simulator, config.models)
            _announce_simulator(config, simulator)
        await upstream.start(simulator.base_url if simulator else None)
        try:
            # uvicorn hands this state to every connection's protocol: http_guard counts what it closes.
            yield {CONNECTIONS_CLOSED_STATE: metrics.connections_closed}
        finally:
            # Requests the server cancelled at the end of its grace period finish booking first.
            await chat.drained(timeout_s=BOOKING_DRAIN_S)
            refresher.cancel()
            await asyncio.to_thread(writer.close)
            await upstream.close()
            if simulator is not None:
                await simulator.stop()
            ledger.close()

    api = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(api)
    _add_health_routes(api, config, upstream, writer)
    _add_model_routes(api, config)
    _add_metrics_route(api, metrics, MetricsToken(_secret(config.secrets.metrics_token), failures))
    add_admin_routes(api, ledger, keys)
    add_dashboard_routes(api)
    authenticator = Authenticator(keys, AdminKey(_secret(config.secrets.admin_key)), failures)
    return GatewayApp(chat, api, authenticator)


def app_from_environment() -> GatewayApp:
    """The app factory for worker processes (`gateway serve --workers N`): config from $GATEWAY_CONFIG,
    metrics shared through the directory `gateway serve` made for them."""
    return create_app(load_config(None), multiprocess_metrics=True)


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


class LedgerUnreachable(Exception):
    """The ledger database cannot be opened at start."""


def open_ledger(ledger: Ledger, url: str) -> None:
    """Create or migrate the schema; a clear error (naming no password) if the database is not there."""
    try:
        ledger.migrate()
    except SQLAlchemyError as error:
        raise LedgerUnreachable(
            f"ledger.url: cannot open the ledger at {redact_url(url)} ({type(error).__name__})"
        ) from None


async def _refresh_issued_keys(ledger: Ledger, keys: KeyStore, interval_s: float) -> None:
    """Keep issued keys current: read them from the ledger every `interval_s`."""
    failing = False
    while True:
        await asyncio.sleep(interval_s)
        try:
            await reload_issued_keys(ledger, keys)
        except SQLAlchemyError as error:
            if not failing:
                logger.error(
                    "ledger: cannot refresh issued keys (%s); keeping the last known set",
                    type(error).__name__,
                )
            failing = True
        else:
            failing = False


def _announce_simulator(config: Config, simulator: RunningSimulator) -> None:
    line = "!" * 78
    logger.warning(
        "\n%s\n!! NO UPSTREAM TOKEN: $%s is not set.\n"
        "!! Serving every request from the BUILT-IN SIMULATOR at %s: replies are FAKE.\n"
        "!! Set %s (and upstream.require_token: true in production) to use DeepInfra.\n%s",
        line,
        config.upstream.token_env,
        simulator.base_url,
        config.upstream.token_env,
        line,
    )


def _add_health_routes(api: FastAPI, config: Config, upstream: Upstream, writer: LedgerWriter) -> None:
    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        ledger = writer.state  # ok, failing, file_replaced (rows spill meanwhile) or stopped
        ready = upstream.started and ledger == "ok"
        body = {
            "status": "ready" if ready else "not_ready",
            "upstream": "simulator" if config.uses_simulator else "configured",
            "ledger": ledger,
            "ledger_queue": writer.depth,  # rows in memory, not yet written or spilled
            "ledger_spilled": writer.spilled_rows,  # rows in this worker's spill file, to replay
            "ledger_spill": "failing" if writer.spill_failing else "ok",
        }
        return JSONResponse(body, status_code=200 if ready else 503)


def _add_metrics_route(api: FastAPI, metrics: Metrics, token: MetricsToken) -> None:
    @api.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if token.required:  # one Authorization header, as on every route that takes a key
            token.check(read_headers(request.scope).the_authorization(), request.client)
        body = await asyncio.to_thread(metrics.exposition)  # with workers, it reads their files
        return Response(body, media_type=CONTENT_TYPE)


def _add_model_routes(api: FastAPI, config: Config) -> None:
    by_name: dict[str, dict[str, Any]] = {
        model.name: {"id": model.name, "object": "model", "created": 0, "owned_by": "deepinfra"}
        for model in config.models
    }
    models = {"object": "list", "data": list(by_name.values())}

    @api.get("/v1/openai/models")
    @api.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return models

    # `client.models.retrieve(...)`: a model's name holds a slash, sent as it is.
    @api.get("/v1/openai/models/{name:path}")
    @api.get("/v1/models/{name:path}")
    async def retrieve_model(name: str) -> dict[str, Any]:
        if name not in by_name:
            raise ModelNotFound(f"The model {name!r} does not exist or is not served by this gateway.")
        return by_name[name]


def _add_error_handlers(api: FastAPI) -> None:
    """Every error the gateway answers itself is in OpenAI's error shape."""

    def render(error: GatewayError) -> JSONResponse:
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in error.headers()}
        return JSONResponse(error.to_dict(), status_code=error.status, headers=headers)

    @api.exception_handler(GatewayError)
    async def gateway_error(request: Request, error: GatewayError) -> JSONResponse:
        return render(error)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 405:
            allow = (error.headers or {}).get("Allow", "GET")
            message = f"Method {request.method} is not allowed on {request.url.path}."
            return render(MethodNotAllowed(message, allow=allow))
        if error.status_code == 404:
            return render(NotFound(f"No route {request.method} {request.url.path}."))
        return render(FrameworkHttpError(error.status_code, str(error.detail)))

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return render(InvalidRequest(f"{param}: {first.get('msg', 'invalid')}", param=param))

    @api.exception_handler(ClientGone)
    @api.exception_handler(ClientDisconnect)
    async def caller_left(request: Request, error: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it; not an error of the gateway's

    @api.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.error("unexpected %s on %s %s", type(error).__name__, request.method, request.url.path)
        return render(GatewayError("The gateway failed to handle this request."))
