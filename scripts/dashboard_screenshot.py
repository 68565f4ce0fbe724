"""Makes the dashboard screenshot of docs/dashboard-and-metrics.md from simulator traffic.

Starts `gateway serve` on its built-in simulator with a fresh SQLite ledger, sends a few hundred
requests from four keys and six `user`s with the OpenAI SDK, then spreads the booked rows over the
last two weeks (by moving their timestamps: the simulator answers now), and photographs the
dashboard in Debian's chromium. Usage: .venv/bin/python scripts/dashboard_screenshot.py [out.png]
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import yaml
from playwright.async_api import async_playwright
from sqlalchemy import bindparam, func, select, update

from gateway.ledger.schema import requests
from gateway.ledger.store import Ledger

MODEL = "meta-llama/Llama-3.2-11B-Vision-Instruct"
ADMIN_KEY = "sk-admin-screenshot"
KEYS = {
    "platform": "sk-gw-platform",
    "research": "sk-gw-research",
    "support-bot": "sk-gw-support",
    "ci": "sk-gw-ci",
}
# user -> (key, requests, completion tokens asked for): a team's uneven mix.
USERS = {
    "maria": ("research", 90, 380),
    "tom": ("platform", 70, 220),
    "support-bot": ("support-bot", 120, 90),
    "lena": ("research", 45, 300),
    "ci-nightly": ("ci", 40, 60),
    "ahmed": ("platform", 30, 160),
}
DAYS = 14


def start_gateway(tmp: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    ledger_url = f"sqlite:///{tmp}/ledger.db"
    config = {
        "auth": {"keys": [{"name": name, "key": key} for name, key in KEYS.items()]},
        "simulator": {"latency_ms": 0, "tokens_per_s": 0, "reply_tokens": 400},
        "ledger": {"url": ledger_url},
    }
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
    log = (tmp / "gateway.log").open("wb")
    env = {**os.environ, "GATEWAY_ADMIN_KEY": ADMIN_KEY}
    env.pop("DEEPINFRA_TOKEN", None)
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(tmp / "gateway.yaml"), "--port", "0"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.search(r"Uvicorn running on (http://\S+)", (tmp / "gateway.log").read_text())
        if found:
            return process, found.group(1), ledger_url
        time.sleep(0.05)  # following a log file: there is no event to await
    raise SystemExit("the gateway did not start:\n" + (tmp / "gateway.log").read_text())


def send_traffic(url: str, rng: random.Random) -> int:
    sent = 0
    for user, (key_name, count, completion) in USERS.items():
        client = openai.OpenAI(base_url=url + "/v1/openai", api_key=KEYS[key_name], max_retries=0)
        for _ in range(count):
            words = " ".join(
                rng.choice(["describe", "the", "chart", "invoice", "photo", "please"]) for _ in range(40)
            )
            stream = rng.random() < 0.4
            reply = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": words * rng.randint(1, 6)}],
                max_tokens=rng.randint(completion // 2, completion),
                user=user,
                stream=stream,
            )
            if stream:
                for _chunk in reply:  # type: ignore[union-attr]
                    pass
            sent += 1
    return sent


def manage_keys(url: str) -> None:
    """Keys issued from the admin API show in the page's list: one in use, one revoked."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        for name in ("intern-2026", "old-laptop"):
            admin.post("/admin/keys", json={"name": name}).raise_for_status()
        admin.delete("/admin/keys/old-laptop").raise_for_status()


def spread_over_days(ledger_url: str, sent: int, rng: random.Random) -> None:
    """Move each row back by 0-13 days (busier on weekdays), as if the traffic had come over two weeks."""
    ledger = Ledger(ledger_url)
    try:
        deadline = time.monotonic() + 5
        while _count_rows(ledger) < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        today = datetime.now(UTC).date()
        weights = [0.4 if (today - timedelta(days=d)).weekday() >= 5 else 1.0 for d in range(DAYS)]
        moves = []
        for row in _rows(ledger):
            back = rng.choices(range(DAYS), weights)[0]
            moves.append(
                {
                    "id": row["row_id"],
                    "ts": row["ts_us"] - back * 86_400_000_000,
                    "day": (today - timedelta(days=back)).isoformat(),
                }
            )
        statement = (
            update(requests)
            .where(requests.c.row_id == bindparam("id"))
            .values(ts_us=bindparam("ts"), day=bindparam("day"))
        )
        with ledger.engine.begin() as connection:
            connection.execute(statement, moves)
    finally:
        ledger.close()


async def photograph(url: str, out: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("Debian's chromium is needed: apt-get install chromium")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu"]
        )
        page = await browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
        await page.goto(url + "/dashboard")
        await page.fill("#admin-key", ADMIN_KEY)
        await page.click("#login-form button[type=submit]")
        await page.wait_for_selector("#app[aria-busy=false]")
        await page.click("button[data-period='30d']")
        first = (datetime.now(UTC).date() - timedelta(days=29)).isoformat()
        await page.wait_for_function(
            "first => document.getElementById('period-label').textContent.startsWith(first)"
            " && document.getElementById('app').getAttribute('aria-busy') === 'false'",
            arg=first,
        )
        await page.screenshot(path=str(out), full_page=True)
        await browser.close()


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(2026)
    with tempfile.TemporaryDirectory() as tmp:
        process, url, ledger_url = start_gateway(Path(tmp))
        try:
            sent = send_traffic(url, rng)
            manage_keys(url)
            spread_over_days(ledger_url, sent, rng)
            asyncio.run(photograph(url, out))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=15)
    print(f"{sent} requests through the simulator; screenshot in {out}")


def _count_rows(ledger: Ledger) -> int:
    with ledger.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(requests)).scalar_one())


def _rows(ledger: Ledger) -> list[dict[str, object]]:
    with ledger.engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(select(requests).order_by(requests.c.ts_us))]


if __name__ == "__main__":
    main()
