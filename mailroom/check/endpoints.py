"""``mailroom check`` of the webhook (DNS, TCP, TLS, a signed test event) and of SMTP."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import socket
import ssl
import time
from urllib.parse import urlsplit

import aiohttp

from mailroom.check.net import (
    CONNECT_TIMEOUT_S,
    certificate,
    close,
    is_loopback,
    open_connection,
    tcp,
)
from mailroom.check.report import Failed, Finding, Report, Status, Target
from mailroom.config import Config, WebhookConfig
from mailroom.delivery import reject
from mailroom.delivery.webhook import request_headers
from mailroom.redact import origin
from mailroom.trust.proxies import proxy_for
from mailroom.trust.tls import client_context

__all__ = ["TEST_EVENT", "smtp", "webhook"]

TEST_EVENT = {"type": "mailroom.check"}


def _webhook_tls(config: WebhookConfig) -> ssl.SSLContext:
    return client_context(ca_file=config.ca_file, verify=config.tls_verify)


def _test_headers(config: WebhookConfig, body: bytes) -> dict[str, str]:
    """The headers a delivery carries, for a test event (Standard Webhooks, JWT, auth)."""
    return request_headers(
        config,
        webhook_id=f"check_{secrets.token_hex(16)}",
        body=body,
        content_type="application/json",
    )


_STATUS_HINTS = {
    401: "the receiver refused the request: check token/basic/jwt and the signing secret on "
    "both sides",
    403: "the receiver refused the request: check the signing secret and credentials",
    404: "check the path of webhook.url",
    422: 'answer 2xx to {"type": "mailroom.check"} events',
}


async def webhook(
    report: Report, config: WebhookConfig, *, send_test: bool, label: str | None = None
) -> None:
    """``label``: the webhook's name (its origin, and a digest where two share one)."""
    target = Target(report, f"webhook[{label or origin(config.url)}]")
    steps = _WebhookSteps(config, send_test=send_test)
    if steps.proxy is not None:  # checked the way deliveries go: through the proxy
        where = origin(steps.proxy)
        target.report.add(target.name, "proxy", Status.OK, f"deliveries go through {where}")
    await target.run("dns", steps.dns)
    await target.run("tcp", lambda: tcp(steps.host, steps.port))
    await target.run("tls", steps.tls)
    await target.run("test event", steps.test_event)


class _WebhookSteps:
    """One webhook's checks, against the host deliveries connect to: the webhook's, or its
    proxy's. ``dns`` keeps the addresses it found for ``tls``."""

    def __init__(self, config: WebhookConfig, *, send_test: bool) -> None:
        self.config, self.send_test = config, send_test
        self.parts = urlsplit(config.url)
        self.proxy = proxy_for(config.url, config.proxy)
        through = urlsplit(self.proxy or config.url)
        self.host = through.hostname or ""
        self.port = through.port or (443 if through.scheme == "https" else 80)
        self.resolved: list[str] = []

    async def dns(self) -> Finding:
        host = self.host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            self.resolved.append(host)
            return Status.OK, f"{host} is an IP address (no lookup)"
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                infos = await loop.getaddrinfo(host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            setting = (
                "webhook.url" if self.proxy is None else "the proxy (webhook.proxy, HTTPS_PROXY)"
            )
            raise Failed(f"cannot resolve {host}: {exc.strerror}; check {setting}") from exc
        self.resolved.extend(dict.fromkeys(str(info[4][0]) for info in infos))
        return Status.OK, f"{host} resolves to {', '.join(self.resolved)}"

    async def tls(self) -> Finding:
        if self.proxy is not None:
            return Status.OK, "end to end through the proxy's tunnel (checked by the test event)"
        if self.parts.scheme != "https":
            if all(is_loopback(a) for a in self.resolved or [self.host]):
                return Status.OK, "not used (http:// to this machine)"
            return Status.WARN, (
                "not used: messages cross the network in clear text; use an https:// URL"
            )
        context = _webhook_tls(self.config)
        _, writer = await open_connection(self.host, self.port, context, "webhook.")
        try:
            return certificate(
                writer.get_extra_info("ssl_object"), verified=self.config.tls_verify, how="https"
            )
        finally:
            await close(writer)

    async def test_event(self) -> Finding:
        if not self.send_test:
            return (
                Status.SKIP,
                'skipped: add --send-test to POST a signed {"type": "mailroom.check"}',
            )
        config = self.config
        body = json.dumps(TEST_EVENT).encode()
        started = time.monotonic()
        try:
            async with (
                aiohttp.ClientSession(trust_env=False) as http,
                http.post(
                    config.url,
                    data=body,
                    headers=_test_headers(config, body),
                    timeout=aiohttp.ClientTimeout(total=config.timeout_s),
                    allow_redirects=False,
                    ssl=_webhook_tls(config) if self.parts.scheme == "https" else True,
                    proxy=self.proxy,
                ) as response,
            ):
                status = response.status
        except TimeoutError as exc:
            raise Failed(f"no answer within {config.timeout_s:g}s (webhook.timeout)") from exc
        except aiohttp.ClientError as exc:
            raise Failed(f"{type(exc).__name__}: the POST did not get an answer") from exc
        return _answered(status, (time.monotonic() - started) * 1000)


def _answered(status: int, elapsed_ms: float) -> Finding:
    """What the receiver's answer to the test event says."""
    if 200 <= status < 300:
        return Status.OK, f"signed test event answered HTTP {status} in {elapsed_ms:.0f} ms"
    hint = _STATUS_HINTS.get(status)
    if hint is None:
        hint = (
            "redirects are not followed; set webhook.url to the final URL"
            if 300 <= status < 400
            else "the receiver failed; see its logs"
        )
    return Status.FAIL, f"HTTP {status} to the signed test event (2xx expected); {hint}"


# -- SMTP ------------------------------------------------------------------------------------


async def smtp(report: Report, config: Config) -> None:
    notices = config.reject_notices
    if notices is None:
        report.add(
            "smtp", "reject notices", Status.OK, "not configured: rejected mail gets no notice"
        )
        return
    smtp = notices.smtp
    target = f"smtp[{smtp.host}:{smtp.port}]"
    steps = await reject.check_connection(smtp)
    statuses: dict[str, Status] = {"ok": Status.OK, "warn": Status.WARN, "fail": Status.FAIL}
    for step in steps:
        report.add(target, step.step, statuses[step.status], step.detail)
    done = {step.step for step in steps}
    failed = next((step.step for step in steps if step.status == "fail"), None)
    for name in ("connect", "tls", "ehlo", "auth"):
        if name not in done and failed is not None:
            report.add(target, name, Status.SKIP, f"skipped: {failed} failed")
