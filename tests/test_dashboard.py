"""The spend dashboard in a real browser: Debian's chromium driven by Playwright, against a real gateway.

The gateway serves from its simulator; a known set of requests is made with the OpenAI SDK, some
rows are then moved back in time in the ledger (as if made days ago) so that the periods differ.
Every figure the page shows is checked against `/admin/usage` and against what the SDK was told.
The browser may reach nothing but the gateway, and any console error fails the test.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import socket
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright
from sqlalchemy import update

from gateway.ledger.schema import requests
from gateway.ledger.store import Ledger
from tests.conftest import BOB_KEY
from tests.ledgers import rows_once_booked
from tests.servers import CALLER_KEY, MODEL, GatewayProcess, gateway_config

ADMIN_KEY = "sk-admin-dashboard-81c2"
# A caller picks `user`: the page must show it as text, and the CSV must quote it and keep a
# spreadsheet from running it.
HOSTILE_USER = '=HYPERLINK("http://x"), <img src=x onerror=alert(1)>'
ROOT = Path(__file__).parent.parent
CHROMIUM_FLAGS = [
    "--no-sandbox",  # the tests run as root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Chromium logs each 4xx answer as a console error; the tests allow only those they cause on purpose.
RESOURCE_401 = "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
RESOURCE_409 = "Failed to load resource: the server responded with a status of 409 (Conflict)"


# --- the gateway, its traffic and the browser ------------------------------------------------------


@pytest.fixture(scope="module")
def spent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, dict[str, Any]]]:
    """A simulator-backed gateway after a known set of requests; what the SDK callers were told."""
    tmp = tmp_path_factory.mktemp("dashboard")
    config = gateway_config(
        auth={"keys": [{"name": "alice", "key": CALLER_KEY}, {"name": "bob", "key": BOB_KEY}]}
    )
    process = GatewayProcess(config, tmp, {"GATEWAY_ADMIN_KEY": ADMIN_KEY}).start()
    try:
        told = make_known_requests(process)
        rows_once_booked(process.ledger_url, told["requests"], within_s=1.0)
        move_back(process, user="ben", days=3)
        move_back(process, user=None, days=10)
        yield process, told
    finally:
        process.stop()


def make_known_requests(gateway: GatewayProcess) -> dict[str, Any]:
    """Seven requests by two keys and four `user`s (one none), one of them rejected before upstream."""
    told: dict[str, Any] = {"requests": 0, "total_tokens": 0, "cost": Decimal(0)}

    def add(usage: Any) -> None:
        told["total_tokens"] += usage.total_tokens
        told["cost"] += Decimal(str(usage.model_extra["estimated_cost"]))

    alice = openai.OpenAI(base_url=gateway.url + "/v1/openai", api_key=CALLER_KEY, max_retries=0)
    bob = openai.OpenAI(base_url=gateway.url + "/v1/openai", api_key=BOB_KEY, max_retries=0)
    messages = [{"role": "user", "content": "What is in this picture?"}]
    for client, user in ((alice, "ana"), (alice, "ana"), (alice, "ben"), (bob, HOSTILE_USER), (bob, None)):
        extra = {"user": user} if user is not None else {}
        add(client.chat.completions.create(model=MODEL, messages=messages, **extra).usage)
        told["requests"] += 1
    stream = alice.chat.completions.create(
        model=MODEL, messages=messages, user="ana", stream=True, stream_options={"include_usage": True}
    )
    add(next(chunk for chunk in stream if chunk.usage is not None).usage)
    told["requests"] += 1
    with pytest.raises(openai.BadRequestError):
        alice.chat.completions.create(model=MODEL, messages=messages, user="ana", temperature=5)
    told["requests"] += 1  # booked as rejected, at zero
    return told


def move_back(gateway: GatewayProcess, user: str | None, days: int) -> None:
    """Make one user's rows look `days` old, as if they had been made then."""
    ledger = Ledger(gateway.ledger_url)
    shift_us = days * 86_400_000_000
    day = (datetime.now(UTC).date() - timedelta(days=days)).isoformat()
    match = requests.c.user.is_(None) if user is None else requests.c.user == user
    try:
        with ledger.engine.begin() as connection:
            connection.execute(
                update(requests).where(match).values(ts_us=requests.c.ts_us - shift_us, day=day)
            )
    finally:
        ledger.close()


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    assert path, "Debian's chromium is missing: scripts/test installs it (apt-get install chromium)"
    return path


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_FLAGS
        )
        yield launched
        await launched.close()


class Watched:
    """A page whose console errors, uncaught errors, dialogs and off-gateway requests are recorded."""

    def __init__(self, context: BrowserContext, page: Page, origin: str) -> None:
        self.context = context
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.outside: list[str] = []
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("dialog", self._dialog)
        self._origin = origin

    async def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    async def block_the_internet(self) -> None:
        async def only_the_gateway(route: Any) -> None:
            if route.request.url.startswith(self._origin + "/"):
                await route.continue_()
            else:
                self.outside.append(route.request.url)
                await route.abort()

        await self.context.route("**/*", only_the_gateway)


# Both far from UTC (+14 h, -12 h): at any hour one of them is on another day than UTC, so a page that
# used the browser's own days instead of UTC days would show other rows.
TIME_ZONES = ["Pacific/Kiritimati", "Etc/GMT+12"]


@pytest.fixture
async def watched(
    request: pytest.FixtureRequest, browser: Browser, spent: tuple[GatewayProcess, dict[str, Any]]
) -> AsyncIterator[Watched]:
    context = await browser.new_context(
        viewport={"width": 1280, "height": 1000},
        timezone_id=getattr(request, "param", TIME_ZONES[0]),
        accept_downloads=True,
    )
    page = await context.new_page()
    watching = Watched(context, page, spent[0].url)
    await watching.block_the_internet()
    yield watching
    await context.close()


# --- what the page shows, and what the API says ----------------------------------------------------


def utc_today() -> date:
    return datetime.now(UTC).date()


def api_usage(gateway: GatewayProcess, group_by: str, first: date, last: date) -> list[dict[str, Any]]:
    params = {
        "group_by": group_by,
        "since": first.isoformat(),
        "until": (last + timedelta(days=1)).isoformat(),
    }
    response = httpx.get(
        gateway.url + "/admin/usage", params=params, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert response.status_code == 200, response.text
    return list(json.loads(response.text, parse_float=str)["data"])  # costs as the exact text sent


def as_table(group_by: str, rows: list[dict[str, Any]]) -> list[list[str]]:
    """The rows as the page should print them: numbers grouped by thousands, costs as sent."""
    return [
        [
            "(none)" if row[group_by] is None else row[group_by],
            *(
                f"{row[column]:,}"
                for column in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
            ),
            f"${row['estimated_cost']}",
        ]
        for row in rows
    ]


def usd_text(amount: Decimal) -> str:
    text = format(amount, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def expected_totals(rows: list[dict[str, Any]]) -> dict[str, str]:
    def total(column: str) -> str:
        return f"{sum(row[column] for row in rows):,}"

    return {
        "cost": "$" + usd_text(sum((Decimal(row["estimated_cost"]) for row in rows), Decimal(0))),
        "requests": total("requests"),
        "tokens": total("total_tokens"),
        "prompt": total("prompt_tokens"),
        "completion": total("completion_tokens"),
    }


async def shown_after_load(page: Page, first: date, last: date, group_by: str) -> dict[str, Any]:
    """Wait until the page shows this period and grouping, then read its totals and table."""
    label = first.isoformat() if first == last else f"{first.isoformat()} → {last.isoformat()}"
    await page.wait_for_function(
        """([label, group]) => document.getElementById("app").getAttribute("aria-busy") === "false"
            && document.getElementById("period-label").textContent === label
            && document.querySelector("#usage-table th button").textContent === group""",
        arg=[label, group_by],
    )
    return await read_page(page)


async def read_page(page: Page) -> dict[str, Any]:
    text = page.locator
    return {
        "totals": {
            "cost": await text("#total-cost").inner_text(),
            "requests": await text("#total-requests").inner_text(),
            "tokens": await text("#total-tokens").inner_text(),
            "prompt": await text("#total-prompt-tokens").inner_text(),
            "completion": await text("#total-completion-tokens").inner_text(),
        },
        "table": await page.eval_on_selector_all(
            "#usage-table tbody tr", "rows => rows.map(row => [...row.cells].map(cell => cell.textContent))"
        ),
        "legend": await page.eval_on_selector_all(
            ".u-legend .u-series",
            "rows => Object.fromEntries(rows.slice(1).map(row => "
            "[row.querySelector('.u-label').textContent, row.querySelector('.u-value').textContent]))",
        ),
    }


async def sign_in(page: Page, gateway: GatewayProcess, key: str) -> None:
    await page.goto(gateway.url + "/dashboard")
    await page.fill("#admin-key", key)
    await page.click("#login-form button[type=submit]")


async def sort_by(page: Page, column: str) -> list[list[str]]:
    await page.click(f"#usage-table th button[data-sort={column}]")
    rows: list[list[str]] = (await read_page(page))["table"]
    return rows


def number(text: str) -> int:
    return int(text.replace(",", ""))


# --- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("watched", TIME_ZONES, indirect=True)
async def test_dashboard_shows_what_the_ledger_says(
    spent: tuple[GatewayProcess, dict[str, Any]], watched: Watched, tmp_path: Path
) -> None:
    gateway, told = spent
    page = watched.page
    today = utc_today()
    await sign_in(page, gateway, ADMIN_KEY)

    # 7 days by user (the default): ben's rows (3 days old) are in, the no-user row (10 days) is not.
    shown = await shown_after_load(page, today - timedelta(days=6), today, "user")
    rows = api_usage(gateway, "user", today - timedelta(days=6), today)
    assert {row["user"] for row in rows} == {"ana", "ben", HOSTILE_USER}
    assert shown["table"] == as_table("user", rows)  # sorted by cost, as the API sorts
    assert shown["totals"] == expected_totals(rows)
    assert set(shown["legend"]) == {"ana", "ben", HOSTILE_USER}
    assert await page.locator("#usage-table img").count() == 0  # the hostile name stayed text

    # 30 days: everything, equal to what the SDK callers were told, request by request.
    await page.click("button[data-period='30d']")
    shown = await shown_after_load(page, today - timedelta(days=29), today, "user")
    rows = api_usage(gateway, "user", today - timedelta(days=29), today)
    assert shown["table"] == as_table("user", rows)
    assert shown["totals"] == expected_totals(rows)
    assert number(shown["totals"]["requests"]) == told["requests"]
    assert number(shown["totals"]["tokens"]) == told["total_tokens"]
    assert shown["totals"]["cost"] == "$" + usd_text(told["cost"])

    # Today: only the rows made today.
    await page.click("button[data-period='today']")
    shown = await shown_after_load(page, today, today, "user")
    rows = api_usage(gateway, "user", today, today)
    assert {row["user"] for row in rows} == {"ana", HOSTILE_USER}
    assert shown["table"] == as_table("user", rows) and shown["totals"] == expected_totals(rows)

    # A custom range of the one day ten days ago: the row without a user.
    ten_days_ago = today - timedelta(days=10)
    await page.click("button[data-period='custom']")
    await page.fill("#range-from", ten_days_ago.isoformat())
    await page.fill("#range-to", ten_days_ago.isoformat())
    await page.click("#custom-range button[type=submit]")
    shown = await shown_after_load(page, ten_days_ago, ten_days_ago, "user")
    assert shown["table"] == as_table("user", api_usage(gateway, "user", ten_days_ago, ten_days_ago))
    assert [row[0] for row in shown["table"]] == ["(none)"]

    # Grouped by key, over 30 days; the chart's legend shows each key's tokens for the period.
    await page.click("button[data-period='30d']")
    await page.select_option("#group-by", "key")
    await page.select_option("#chart-measure", "tokens")
    shown = await shown_after_load(page, today - timedelta(days=29), today, "key")
    rows = api_usage(gateway, "key", today - timedelta(days=29), today)
    assert shown["table"] == as_table("key", rows) and shown["totals"] == expected_totals(rows)
    assert shown["legend"] == {row["key"]: f"{row['total_tokens']:,}" for row in rows}

    # Sorting: by requests (largest first, then smallest first), by name.
    by_requests = await sort_by(page, "requests")
    assert [number(row[1]) for row in by_requests] == sorted((row["requests"] for row in rows), reverse=True)
    by_requests = await sort_by(page, "requests")
    assert [number(row[1]) for row in by_requests] == sorted(row["requests"] for row in rows)
    assert [row[0] for row in await sort_by(page, "group")] == ["alice", "bob"]
    costs = sorted(Decimal(row["estimated_cost"]) for row in rows)
    assert [Decimal(row[5].removeprefix("$")) for row in await sort_by(page, "estimated_cost")] == costs[::-1]
    assert [Decimal(row[5].removeprefix("$")) for row in await sort_by(page, "estimated_cost")] == costs

    # Grouped by model.
    await page.select_option("#group-by", "model")
    shown = await shown_after_load(page, today - timedelta(days=29), today, "model")
    assert shown["table"] == as_table("model", api_usage(gateway, "model", today - timedelta(days=29), today))
    assert list(shown["legend"]) == [MODEL]

    # The CSV download: what is shown, in the table's order, as the API's CSV writes it.
    await page.select_option("#group-by", "user")
    shown = await shown_after_load(page, today - timedelta(days=29), today, "user")
    async with page.expect_download() as download_info:
        await page.click("#download-csv")
    download = await download_info.value
    first = today - timedelta(days=29)
    assert download.suggested_filename == f"usage-by-user-{first.isoformat()}-to-{today.isoformat()}.csv"
    until = (today + timedelta(days=1)).isoformat()
    csv_api = httpx.get(
        gateway.url + "/admin/usage",
        params={"group_by": "user", "since": first.isoformat(), "until": until, "format": "csv"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ).text
    downloaded = Path(await download.path()).read_text()
    header = "user,requests,prompt_tokens,completion_tokens,total_tokens,estimated_cost"
    assert downloaded.splitlines()[0] == csv_api.splitlines()[0] == header
    assert sorted(downloaded.splitlines()) == sorted(csv_api.splitlines())
    names = [row[0] or "(none)" for row in csv.reader(io.StringIO(downloaded))][1:]
    assert names == [("'" if name == HOSTILE_USER else "") + name for name in (r[0] for r in shown["table"])]

    screenshot = tmp_path / "dashboard.png"
    await page.screenshot(path=screenshot, full_page=True)
    assert screenshot.read_bytes().startswith(b"\x89PNG") and screenshot.stat().st_size > 20_000

    assert page.url == gateway.url + "/dashboard"  # the key never went into a URL
    assert watched.errors == [] and watched.dialogs == [] and watched.outside == []


async def test_keys_issued_and_revoked_from_the_page_work_and_stop_working(
    spent: tuple[GatewayProcess, dict[str, Any]], watched: Watched
) -> None:
    gateway, _ = spent
    page = watched.page
    await sign_in(page, gateway, ADMIN_KEY)
    await page.wait_for_selector("#keys-table tbody tr")

    await page.fill("#issue-name", "dana")
    await page.click("#issue-form button[type=submit]")
    await page.wait_for_selector("#new-key", state="visible")
    key = await page.locator("#new-key-value").inner_text()
    assert key.startswith("sk-gw-")
    dana = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    dana.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])  # works at once

    row = page.locator("#keys-table tbody tr", has_text="dana")
    assert await row.locator("td").nth(3).inner_text() == "active"
    await page.click("#new-key-hide")
    assert await page.locator("#new-key-value").inner_text() == ""  # shown once, then gone

    # A name in use is refused with the API's message.
    await page.fill("#issue-name", "dana")
    await page.click("#issue-form button[type=submit]")
    await page.wait_for_selector("#keys-error:has-text('names are never reused')")

    await row.get_by_role("button", name="Revoke dana").click()  # asks first
    await row.get_by_role("button", name="Revoke dana").click()  # then revokes
    await page.wait_for_function(
        """() => [...document.querySelectorAll("#keys-table tbody tr")].some(row =>
            row.cells[0].textContent === "dana" && row.cells[3].textContent.startsWith("revoked"))"""
    )
    with pytest.raises(openai.AuthenticationError):  # at once: one worker, which did the revoking
        dana.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])

    # The key stays in the tab's session: a reload keeps you in; signing out forgets it.
    assert await page.evaluate("sessionStorage.getItem('gateway.adminKey')") == ADMIN_KEY
    await page.reload()
    await page.wait_for_selector("#app[aria-busy=false]")
    await page.click("#sign-out")
    assert await page.evaluate("sessionStorage.getItem('gateway.adminKey')") is None
    assert await page.locator("#login").is_visible()

    logs = gateway.logs()
    assert ADMIN_KEY not in logs and key not in logs
    assert watched.errors == [RESOURCE_409] and watched.dialogs == [] and watched.outside == []


async def test_a_wrong_admin_key_is_refused(
    spent: tuple[GatewayProcess, dict[str, Any]], watched: Watched
) -> None:
    gateway, _ = spent
    page = watched.page
    await sign_in(page, gateway, "sk-not-the-admin-key")
    await page.wait_for_selector("#login-error:has-text('refused')")
    assert not await page.locator("#app").is_visible()
    assert await page.evaluate("sessionStorage.getItem('gateway.adminKey')") is None
    assert await page.locator("#usage-table tbody tr").count() == 0
    # The browser reports the refused call itself; nothing else may go wrong.
    assert watched.errors == [RESOURCE_401] and watched.outside == []


# --- the page's files -------------------------------------------------------------------------------


def test_the_page_and_its_files_need_no_key_but_its_data_does(
    spent: tuple[GatewayProcess, dict[str, Any]],
) -> None:
    gateway, _ = spent
    page = httpx.get(gateway.url + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for asset in ("dashboard.js", "dashboard.css", "favicon.svg", "vendor/uplot/uPlot.iife.min.js"):
        assert f"/dashboard/static/{asset}" in page.text
        assert httpx.get(f"{gateway.url}/dashboard/static/{asset}").status_code == 200
    # The page is served only with its Content-Security-Policy, never as a plain static file.
    assert httpx.get(f"{gateway.url}/dashboard/static/index.html").status_code == 404
    assert httpx.get(gateway.url + "/admin/usage").status_code == 401


@pytest.mark.parametrize("path", ["/dashboard/static/../../admin/usage", "/dashboard/static/../__init__.py"])
def test_the_files_route_reaches_nothing_else(
    spent: tuple[GatewayProcess, dict[str, Any]], path: str
) -> None:
    """A raw path with dot segments (httpx would tidy it) gets no file and no admin data."""
    gateway, _ = spent
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    assert b'"error"' in answer


def test_the_wheel_ships_the_dashboard(tmp_path: Path) -> None:
    """`pip install .` (the README's run command) on a clone must carry the page, its files and uPlot."""
    source = tmp_path / "clone"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file():  # as a clone has them: a file git ignores is missing
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(source)],
        check=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("gateway-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = "gateway/dashboard/static/"
    assert "gateway/dashboard/index.html" in names
    for name in ("dashboard.js", "dashboard.css", "favicon.svg"):
        assert static + name in names
    for name in ("uPlot.iife.min.js", "uPlot.min.css", "LICENSE", "VERSION"):
        assert static + "vendor/uplot/" + name in names
