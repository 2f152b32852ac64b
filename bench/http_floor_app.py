"""The least an ASGI app on uvicorn can do with an infer-sized request: read the whole body and
answer a fixed 4 kB body. ``serving_overhead.py --floor`` times it with the same client as the
service, to show what uvicorn and the loopback cost on their own on this machine.

    python bench/http_floor_app.py --port 18300
"""

from __future__ import annotations

import argparse

import uvicorn

REPLY = b"x" * 4096


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    headers = [(b"content-length", str(len(REPLY)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": REPLY})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=18300)
    args = p.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
