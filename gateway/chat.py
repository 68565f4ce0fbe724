"""The chat completions endpoint, as a pipeline: authenticate, validate, forward and relay.

It is a plain ASGI callable rather than a FastAPI route: this is the hot path, and FastAPI's
routing and dependency machinery would cost more than everything else the gateway does here.
"""

from __future__ import annotations

import logging

from gateway.asgi import ClientGone, Receive, Scope, Send, read_body, read_headers, request_id_for, send_error
from gateway.auth import KeyStore
from gateway.config import Config, ModelConfig
from gateway.errors import GatewayError, MethodNotAllowed
from gateway.relay import Upstream, relay_completion, relay_stream
from gateway.validate import validate_chat_request

logger = logging.getLogger("gateway.chat")

CHAT_PATHS = frozenset({"/v1/openai/chat/completions", "/v1/chat/completions"})


class ChatCompletions:
    def __init__(self, config: Config, keys: KeyStore, upstream: Upstream) -> None:
        self._keys = keys
        self._upstream = upstream
        self._models: dict[str, ModelConfig] = {model.name: model for model in config.models}
        self._max_body_bytes = config.server.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = read_headers(scope)
        request_id = request_id_for(headers.request_id)
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"Method {scope['method']} is not allowed here; use POST.")
            self._keys.authenticate(headers.authorization)
            raw = await read_body(receive, headers.content_length, self._max_body_bytes)
            request = validate_chat_request(raw, self._models)
            if request.stream:
                await relay_stream(self._upstream, request, request_id, receive, send)
            else:
                await relay_completion(self._upstream, request, request_id, send)
        except GatewayError as error:
            await send_error(send, error, request_id)
        except ClientGone:
            return
        except Exception:
            # A bug, not a request problem: log it, and answer in OpenAI's shape if nothing was sent yet
            # (if a response had started, send_error raises and the server closes the connection).
            logger.exception("unexpected error in chat completions (request %s)", request_id.decode())
            await send_error(send, GatewayError("The gateway failed to handle this request."), request_id)
