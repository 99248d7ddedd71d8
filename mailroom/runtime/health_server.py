"""``/healthz``, ``/readyz`` and ``/metrics`` over HTTP (aiohttp), for ``Health``.

``/liveness`` answers like ``/healthz``: it is the path MailRoom serves, which GitLab's Helm
chart probes. The server also evaluates readiness every few seconds (so that its changes are
logged when nobody asks) and measures the event loop's lag.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mailroom.config import HealthConfig
from mailroom.observe.health import Health

__all__ = ["CHECK_INTERVAL_S", "HealthServer"]

log = logging.getLogger("mailroom.health")

CHECK_INTERVAL_S = 5.0  # readiness is also evaluated (and its changes logged) this often


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` over HTTP (aiohttp)."""

    def __init__(self, health: Health, config: HealthConfig) -> None:
        self.health = health
        self.config = config
        self.port = config.port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve; an ``OSError`` (address in use) is raised as it is."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/liveness", self._healthz)  # MailRoom's, probed by GitLab's chart
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.config.host, self.config.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple):
                self.port = int(address[1])
        log.info(
            "health: serving /healthz, /readyz and /metrics on http://%s:%d",
            self.config.host,
            self.port,
        )

    async def serve(self, done: asyncio.Event) -> None:
        """The ``health`` task: check readiness and measure the loop's lag until ``done``,
        then stop serving."""
        try:
            await asyncio.gather(self._check(done), self.health.metrics.measure_lag(done))
        finally:
            await self.close()

    async def _check(self, done: asyncio.Event) -> None:
        """Evaluate readiness every few seconds until ``done``, so that changes nobody asks
        about (a stalled webhook, an overdue Graph poll) are logged too."""
        while not done.is_set():
            self.health.readiness()
            try:
                async with asyncio.timeout(CHECK_INTERVAL_S):
                    await done.wait()
            except TimeoutError:
                continue

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        # Answering at all shows that the process and its event loop are alive.
        uptime = self.health.clock() - self.health.started
        return web.json_response({"status": "ok", "uptime_s": round(uptime, 3)})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, body = self.health.readiness()
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=await self.health.metrics.exposition(),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )
