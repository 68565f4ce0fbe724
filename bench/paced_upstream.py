"""A second fake upstream for one case: the `/sse` stream sent on an absolute schedule.

nginx's `echo_sleep` counts each 2 ms gap from its own clock after the write before it, so the
stream's pace depends on when nginx wakes up, and that changes when a proxy, rather than the
client, reads from it: measured here, the same 32 events end about 2 ms later through either proxy
than when read directly. This server (aiohttp on uvloop) sends event i at exactly start + i x 2 ms
(or as soon after as it can), so the stream's length does not depend on who reads it and the time a
proxy adds to a stream can be told apart from the upstream's drift. It serves
`POST /paced/v1/openai/chat/completions` and `GET /healthz`.

Run: `python bench/paced_upstream.py --port 8003`
"""

from __future__ import annotations

import argparse
import asyncio

import fake_upstream
import orjson
import uvloop
from aiohttp import web

EVENTS = [b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in fake_upstream.stream_chunks()]
DONE = b"data: [DONE]\n\n"


async def stream(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for index, event in enumerate(EVENTS):
        wait = started + index * fake_upstream.STREAM_GAP_S - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        await response.write(event)
    await response.write(DONE)  # right after the last event, as nginx's location does
    await response.write_eof()
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/paced/v1/openai/chat/completions", stream)
    app.router.add_get("/healthz", healthz)
    web.run_app(
        app, host="127.0.0.1", port=args.port, print=None, access_log=None, loop=uvloop.new_event_loop()
    )


if __name__ == "__main__":
    main()
