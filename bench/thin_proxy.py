"""The reference thin proxy: the least an aiohttp program can do to forward LLM traffic.

One web.Application with a catch-all route, one shared ClientSession, the reply
streamed back with resp.content.iter_any(), on uvloop. No auth, no limits, no
metering, no logging: it is the floor the gateway's full path is compared with,
so it must stay this plain. It is a benchmark target, never a product component.

    python -m bench.thin_proxy --port 8081 --upstream http://127.0.0.1:8090
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones aiohttp recomputes itself.
_SESSION = web.AppKey("session", aiohttp.ClientSession)
_DROP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
        "upgrade", "host", "content-length",
    }
)


def make_app(upstream: str, pool: int = 1024) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    base = upstream.rstrip("/")

    async def start(app: web.Application) -> None:
        app[_SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=pool, limit_per_host=pool),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def stop(app: web.Application) -> None:
        await app[_SESSION].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        session = request.app[_SESSION]
        async with session.request(
            request.method, base + request.path_qs, data=body, headers=headers
        ) as up:
            out = web.StreamResponse(
                status=up.status,
                headers={k: v for k, v in up.headers.items() if k.lower() not in _DROP},
            )
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app.router.add_route("*", "/{tail:.*}", forward)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="reference thin aiohttp proxy (benchmark only)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8090")
    args = ap.parse_args(argv)
    import uvloop

    print(f"thin proxy listening on http://{args.host}:{args.port}", flush=True)
    web.run_app(
        make_app(args.upstream), host=args.host, port=args.port, print=None, access_log=None,
        backlog=4096, shutdown_timeout=1.0, loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
