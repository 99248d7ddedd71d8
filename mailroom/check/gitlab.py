"""``mailroom check`` in GitLab mode: what a GitLab drop-in needs beyond the usual checks.

Per mailbox type: the secret file decodes to the 32 bytes GitLab writes, and the internal API
answers an *unauthenticated* probe (an empty POST without the JWT) with 401, as GitLab's
``API::Internal::MailRoom`` does. The probe never carries a message or a valid token, so nothing
reaches GitLab; a 2xx means the URL is not GitLab's internal API, or it is open to anyone.
"""

from __future__ import annotations

import functools
from urllib.parse import urlsplit

import aiohttp

from mailroom.check.report import SESSION_TIMEOUT_S, Failed, Finding, Report, Status, Target
from mailroom.config import Config, WebhookConfig
from mailroom.redact import origin
from mailroom.trust.proxies import proxy_for
from mailroom.trust.tls import client_context

__all__ = ["SECRET_BYTES", "run"]

SECRET_BYTES = 32  # GitLab and the Linux package write SecureRandom.random_bytes(32), base64


async def run(report: Report, config: Config) -> None:
    """The GitLab checks of every mailbox's webhook, one target per mailbox."""
    for mailbox in config.mailboxes:
        target = Target(report, f"gitlab[{mailbox.id}]")
        hook = mailbox.webhook
        if hook.sidekiq is not None:  # delivery_method: sidekiq: no JWT, no internal API
            continue
        await target.run("secret", functools.partial(_secret, hook))
        await target.run("internal API", functools.partial(_probe, hook))


async def _secret(hook: WebhookConfig) -> Finding:
    jwt = hook.jwt
    if jwt is None:
        raise Failed("no JWT configured; GitLab's internal API refuses requests without it")
    where = jwt.secret_file or "the JWT secret"
    key = jwt.key()  # base64 in GitLab mode, checked at load
    if len(key) != SECRET_BYTES:
        raise Failed(
            f"{where} decodes to {len(key)} bytes, GitLab writes {SECRET_BYTES}; use the file "
            "GitLab reads (gitlab-ctl reconfigure writes it in the Linux package)"
        )
    return Status.OK, f"{where}: base64 of {SECRET_BYTES} bytes, the HS256 key of {jwt.header}"


async def _probe(hook: WebhookConfig) -> Finding:
    shown = f"{origin(hook.url)}{urlsplit(hook.url).path}"  # GitLab's path holds no secret
    ssl = client_context(ca_file=hook.ca_file, verify=hook.tls_verify)
    try:
        async with (
            aiohttp.ClientSession(trust_env=False) as http,
            http.post(
                hook.url,
                data=b"",
                headers={"Content-Type": hook.request_content_type},
                timeout=aiohttp.ClientTimeout(total=SESSION_TIMEOUT_S),
                allow_redirects=False,
                ssl=ssl if hook.url.startswith("https:") else True,
                proxy=proxy_for(hook.url, hook.proxy),  # the way deliveries go
            ) as response,
        ):
            status = response.status
    except aiohttp.ClientError as exc:
        raise Failed(f"{shown}: {type(exc).__name__}; check gitlab_url") from exc
    if status == 401:
        return Status.OK, f"{shown} answers 401 to a request without the JWT, as GitLab does"
    if status == 404:
        raise Failed(
            f"{shown}: HTTP 404; check gitlab_url (GitLab's own URL, as Workhorse serves it)"
        )
    if 200 <= status < 300:
        raise Failed(
            f"{shown} took a request without the JWT (HTTP {status}): it is not GitLab's "
            "internal mail_room API, or that API is open to anyone; check gitlab_url"
        )
    raise Failed(f"{shown}: HTTP {status} where GitLab answers 401; check gitlab_url")
