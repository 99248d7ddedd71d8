"""``/healthz``, ``/readyz`` and ``/metrics`` over HTTP (aiohttp), for ``Health``.

``/liveness`` answers like ``/healthz``: it is the path MailRoom serves, which GitLab's Helm
chart probes. The server also evaluates readiness every few seconds (so that its changes are
logged when nobody asks) and measures the event loop's lag.

Whoever can reach the port is a stranger too (issue 18: 1,124 half-open connections dripping a
header byte every 2 s once took every file descriptor, and no mail moved). So the server holds
at most ``MAX_CONNECTIONS`` connections, and no more than an eighth of the open-file limit (a
new one closes the oldest: a probe, which asks and is answered within milliseconds, is never
the oldest for long; the listen backlog is short, so a flood waits in the kernel), each for at
most
``CONNECTION_MAX_S`` (headers, body and answer; a slow sender or reader is cut off), and reads
requests of bounded size (``MAX_LINE_BYTES`` a line, ``MAX_HEADERS`` headers,
``MAX_BODY_BYTES`` of body). It serves only GET and HEAD on its four paths.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mailroom.config import HealthConfig, MetricsConfig
from mailroom.observe.health import Health

__all__ = ["CHECK_INTERVAL_S", "CONNECTION_MAX_S", "MAX_CONNECTIONS", "HealthServer"]

log = logging.getLogger("mailroom.health")

CHECK_INTERVAL_S = 5.0  # readiness is also evaluated (and its changes logged) this often
MAX_CONNECTIONS = 64  # probes and scrapes need a few at a time (fewer under a low file limit)
ACCEPT_BACKLOG = 16  # connections accepted per turn of the loop; the rest wait in the kernel
CONNECTION_MAX_S = 10.0  # a connection's whole life: a probe takes milliseconds
KEEPALIVE_S = 5.0  # an idle keep-alive connection (Prometheus keeps them between scrapes)
MAX_LINE_BYTES = 4096  # the request line, and each header
MAX_HEADERS = 32
MAX_BODY_BYTES = 1024  # GET has none; a body beyond this is refused (413)


class _Closed(asyncio.Protocol):
    """A connection accepted over the cap while none could be closed for it: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Server(web.Server):
    """aiohttp's low-level server with a cap on its connections and on their lifetime."""

    def __init__(
        self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], cap: int
    ) -> None:
        super().__init__(
            handler,
            keepalive_timeout=KEEPALIVE_S,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
            max_headers=MAX_HEADERS,
            lingering_time=1.0,
            access_log=None,
        )
        self.cap = cap
        self.opening = 0  # made by the factory, not yet connected
        self.closed_oldest = 0  # connections closed to make room: an attack, or a leak
        self._deadlines: dict[RequestHandler, asyncio.TimerHandle] = {}

    def __call__(self) -> Any:
        if self.opening + len(self._deadlines) >= self.cap:
            oldest = next(iter(self._deadlines), None)
            if oldest is None:
                return _Closed()
            self._close(oldest)
            self.closed_oldest += 1
        self.opening += 1
        return super().__call__()

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.opening = max(0, self.opening - 1)
        self._deadlines[handler] = self._loop.call_later(CONNECTION_MAX_S, self._close, handler)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        deadline = self._deadlines.pop(handler, None)
        if deadline is not None:
            deadline.cancel()

    def _close(self, handler: RequestHandler) -> None:
        deadline = self._deadlines.pop(handler, None)
        if deadline is not None:
            deadline.cancel()
        handler.force_close()


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` over HTTP (aiohttp)."""

    def __init__(
        self, health: Health, config: HealthConfig, metrics: MetricsConfig | None = None
    ) -> None:
        self.health = health
        self.config = config
        self.labels = metrics or MetricsConfig()
        self.port = config.port
        self._server: _Server | None = None
        self._listener: asyncio.Server | None = None
        self._routes: dict[str, Callable[[], web.Response | Awaitable[web.Response]]] = {
            "/healthz": self._healthz,
            "/liveness": self._healthz,  # MailRoom's, probed by GitLab's chart
            "/readyz": self._readyz,
            "/metrics": self._metrics,  # written off the loop (Metrics.exposition)
        }

    @property
    def closed_oldest(self) -> int:
        """Connections closed to make room for new ones (a slow client, or many)."""
        return self._server.closed_oldest if self._server is not None else 0

    async def start(self) -> None:
        """Bind and serve; an ``OSError`` (address in use) is raised as it is."""
        # A few descriptors in eight at most: the mailboxes and webhooks need the rest.
        open_files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        server = _Server(self._handle, min(MAX_CONNECTIONS, max(4, open_files // 8)))
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            server,
            self.config.host,
            self.config.port,
            reuse_address=True,
            backlog=ACCEPT_BACKLOG,  # also how many asyncio accepts at once
        )
        self._server = server
        self.port = int(self._listener.sockets[0].getsockname()[1])
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
        listener, self._listener = self._listener, None
        server, self._server = self._server, None
        if listener is not None:
            listener.close()
        if server is not None:
            server.pre_shutdown()
            await server.shutdown(1.0)
        if listener is not None:
            await listener.wait_closed()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        route = self._routes.get(request.path)
        if route is None:
            return web.Response(status=404, text="not found\n")
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, headers={"Allow": "GET, HEAD"})
        if (request.content_length or 0) > MAX_BODY_BYTES or (
            request.body_exists and (request.content_length is None)
        ):
            return web.Response(status=413)
        response = route()
        return response if isinstance(response, web.Response) else await response

    def _healthz(self) -> web.Response:
        # Answering at all shows that the process and its event loop are alive.
        uptime = self.health.clock() - self.health.started
        return web.json_response({"status": "ok", "uptime_s": round(uptime, 3)})

    def _readyz(self) -> web.Response:
        ready, body = self.health.readiness()
        if self.labels.mailbox_label == "hash":  # no ids, no error texts (they name hosts)
            body["mailboxes"] = {
                self.labels.label(mailbox): {**state, "reason": None}
                for mailbox, state in body["mailboxes"].items()
            }
            body.pop("arbitration", None)
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self) -> web.Response:
        label = self.labels.label
        hashed = self.labels.mailbox_label == "hash"
        view = (lambda registry: _Relabelled(registry, label)) if hashed else None
        body = await self.health.metrics.exposition(view)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class _Relabelled:
    """A registry whose ``mailbox`` label values are shown as ``label`` makes them (the
    ``metrics.mailbox_label: hash`` view), computed at each scrape."""

    def __init__(self, registry: Any, label: Callable[[str], str]) -> None:
        self._registry = registry
        self._label = label

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [
                sample._replace(
                    labels={
                        name: self._label(value) if name == "mailbox" else value
                        for name, value in sample.labels.items()
                    }
                )
                for sample in family.samples
            ]
            yield family
