"""The admin API: usage reports and key management. The admin key is checked in the dispatcher."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError

from gateway.asgi import read_body, read_headers
from gateway.auth import KeyStore
from gateway.errors import Conflict, InvalidRequest, KeyMissing
from gateway.ledger.schema import KEY_NAME_CHARS
from gateway.ledger.store import KeyNameTaken, KeyNotFound, Ledger
from gateway.reports import as_csv, as_daily_csv, as_daily_json, as_json, daily_query, usage_query
from gateway.validate import parse_json_object

logger = logging.getLogger("gateway")

ADMIN_PREFIX = "/admin"
_BODY_LIMIT = 64 * 1024  # an admin body is a few bytes of JSON


def add_admin_routes(api: FastAPI, ledger: Ledger, keys: KeyStore) -> None:
    @api.get(f"{ADMIN_PREFIX}/usage")
    async def usage(
        group_by: str | None = None, since: str | None = None, until: str | None = None, format: str = "json"
    ) -> Response:
        _check_format(format)
        query = usage_query(group_by, since, until)
        totals = await asyncio.to_thread(ledger.usage, query.group_by, query.since_us, query.until_us)
        if format == "csv":
            return Response(as_csv(query.group_by, totals), media_type="text/csv")
        return Response(as_json(query.group_by, totals), media_type="application/json")

    @api.get(f"{ADMIN_PREFIX}/usage/daily")
    async def usage_daily(
        group_by: str | None = None, since: str | None = None, until: str | None = None, format: str = "json"
    ) -> Response:
        """Totals per UTC day and user, key or model: the dashboard's stacked chart."""
        _check_format(format)
        query = daily_query(group_by, since, until)
        series = await asyncio.to_thread(ledger.usage_by_day, query.group_by, query.since_us, query.until_us)
        if format == "csv":
            return Response(as_daily_csv(query.group_by, series), media_type="text/csv")
        return Response(as_daily_json(query.group_by, series), media_type="application/json")

    @api.post(f"{ADMIN_PREFIX}/keys", status_code=201)
    async def create_key(request: Request) -> JSONResponse:
        body = await read_body(request.receive, read_headers(request.scope).content_length, _BODY_LIMIT)
        name = valid_key_name(parse_json_object(body).get("name"))
        if name in keys.static_names:
            raise Conflict(f"A key named {name!r} is defined in the config file.", param="name")
        try:
            key = await asyncio.to_thread(ledger.create_key, name)
        except KeyNameTaken:
            raise Conflict(
                f"A key named {name!r} exists or was revoked; names are never reused.", param="name"
            ) from None
        await _apply_key_change(ledger, keys)  # usable here at once; other workers within a second
        return JSONResponse({"name": name, "key": key}, status_code=201)

    @api.get(f"{ADMIN_PREFIX}/keys")
    async def list_keys() -> dict[str, Any]:
        issued = await asyncio.to_thread(ledger.list_keys)
        data: list[dict[str, Any]] = [
            {"name": name, "source": "config", "created_at": None, "revoked_at": None}
            for name in sorted(keys.static_names)
        ]
        data += [
            {
                "name": key.name,
                "source": "issued",
                "created_at": _iso(key.created_us),
                "revoked_at": _iso(key.revoked_us),
            }
            for key in issued
        ]
        return {"data": data}

    @api.delete(f"{ADMIN_PREFIX}/keys/{{name:path}}")  # a name may hold a "/" (sent as %2F)
    async def revoke_key(name: str) -> dict[str, Any]:
        name = valid_key_name(name)  # a NUL in the URL would reach the database otherwise
        if name in keys.static_names:
            raise Conflict(f"The key {name!r} is defined in the config file; remove it there.", param="name")
        try:
            key = await asyncio.to_thread(ledger.revoke_key, name)
        except KeyNotFound:
            raise KeyMissing(f"No issued key is named {name!r}.", param="name") from None
        await _apply_key_change(ledger, keys)
        return {"name": key.name, "revoked_at": _iso(key.revoked_us)}


async def reload_issued_keys(ledger: Ledger, keys: KeyStore) -> None:
    """Read the active issued keys from the ledger into this worker's key store."""
    read = keys.begin_read()
    keys.set_issued(await asyncio.to_thread(ledger.active_keys), read)


async def _apply_key_change(ledger: Ledger, keys: KeyStore) -> None:
    """Make an issued or revoked key count here at once; if the ledger cannot be read just now, the
    change is made all the same (the caller must still get the new key) and the refresher applies it."""
    try:
        await reload_issued_keys(ledger, keys)
    except SQLAlchemyError as error:
        logger.warning("ledger: cannot re-read issued keys after a change (%s)", type(error).__name__)


def _check_format(format: str) -> None:
    if format not in ("json", "csv"):
        raise InvalidRequest(f"format must be json or csv, got {format!r}", param="format")


def valid_key_name(name: Any) -> str:
    """An issued key's name, checked (the admin API and `gateway keys create`): InvalidRequest if it
    is not a non-blank, printable string that fits the ledger's column."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest("name must be a non-empty string", param="name")
    if len(name) > KEY_NAME_CHARS or not name.isprintable():
        raise InvalidRequest(f"name must be printable and at most {KEY_NAME_CHARS} characters", param="name")
    return name


def _iso(microseconds: int | None) -> str | None:
    if microseconds is None:
        return None
    return datetime.fromtimestamp(microseconds / 1_000_000, UTC).isoformat().replace("+00:00", "Z")
