"""What every aiohttp test server shares: one catch-all handler served on 127.0.0.1."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web


async def serve(
    handle: Callable[[web.Request], Awaitable[web.StreamResponse]],
    *,
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    client_max_size: int = 1024**2,
) -> tuple[web.AppRunner, int]:
    """Serve ``handle`` for every method and path on 127.0.0.1:``port`` (0: a free one); the
    runner (``cleanup()`` stops it) and the port bound."""
    app = web.Application(client_max_size=client_max_size)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context, reuse_address=True)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    for address in runner.addresses:
        if isinstance(address, tuple):
            return runner, int(address[1])
    await runner.cleanup()
    raise RuntimeError("test server: no bound socket")
