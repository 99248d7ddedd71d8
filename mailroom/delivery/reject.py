"""Sending reject notices: the I/O half of ``notices`` (the only module importing aiosmtplib).

One ``Notifier`` per process holds the rate limit and the SMTP settings. ``notify`` decides
whether a notice may go (``notices.configured_recipient``, then the rate limit), builds it, and
sends it; the dispatcher settles the message only after ``notify`` returns:

- ``SENT``, ``REFUSED`` and ``DISABLED``: settle as the caller meant to. Refused: the policy
  or the rate limit forbade it, no safe notice could be written (``NoticeError``), or it needs
  SMTPUTF8 (a non-ASCII recipient, RFC 6531) and the server does not offer it;
- ``FAILED``: the SMTP server refused the notice for good (5xx), or it could not be sent within
  ``retry.give_up_after``: the caller dead-letters the message, so nothing is dropped silently.

Transient failures (connection errors, timeouts, 4xx answers, and authentication or TLS
problems that a config fix cures) are retried with capped, jittered backoff; the message stays
unsettled meanwhile. The envelope sender is empty (``MAIL FROM:<>``, RFC 3834 §3.3 and RFC 5321
§4.5.5: nobody should answer a notice); a server that refuses that gets the ``from`` address
from then on.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from mailroom.backoff import Retry
from mailroom.config import RejectNoticesConfig, SmtpConfig
from mailroom.delivery import notices
from mailroom.delivery.markers import Shared
from mailroom.errors import ArbitrationError, NoticeError
from mailroom.mail import routing
from mailroom.mail.message import ParsedMessage
from mailroom.observe.monitor import NoticeResult
from mailroom.trust.tls import client_context

if TYPE_CHECKING:  # imported by the first notice or check (2 MiB at start otherwise)
    import aiosmtplib

__all__ = ["Notifier", "SmtpStep", "check_connection"]

log = logging.getLogger("mailroom.reject")

# Notices open one SMTP connection each; a flood of rejected mail must not open hundreds.
MAX_CONNECTIONS = 4
# RFC 4954 §6 and RFC 3207 §4: 530 authentication required, 534/535 credentials refused,
# 538 encryption required: a config fix cures these, so they are retried like a 4xx.
MISCONFIGURED_CODES = frozenset({530, 534, 535, 538})


class _SendError(Exception):
    """One failed attempt, classified. ``refused``: a policy refusal, not a failure."""

    def __init__(
        self, message: str, *, transient: bool, misconfigured: bool = False, refused: bool = False
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.misconfigured = misconfigured
        self.refused = refused


def _tls_context(config: SmtpConfig) -> ssl.SSLContext | None:
    if not (config.ssl or config.start_tls):
        return None
    return client_context(ca_file=config.ca_file, verify=config.tls_verify)


def _classify(exc: Exception) -> _SendError:
    """Transient (retry) or permanent (give up), with a message fit for a log line."""
    import aiosmtplib  # noqa: PLC0415  # imported by _submit already

    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        exc = exc.recipients[0]
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        text = f"{type(exc).__name__}: {exc.code} {exc.message}"
        if exc.code in MISCONFIGURED_CODES:
            hint = "check reject_notices.smtp.user, its password and start_tls/ssl"
            return _SendError(f"{text} ({hint})", transient=True, misconfigured=True)
        return _SendError(text, transient=exc.code < 500)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):  # no STARTTLS, no AUTH on this server
        return _SendError(f"{type(exc).__name__}: {exc}", transient=True, misconfigured=True)
    if isinstance(exc, aiosmtplib.SMTPException | OSError | TimeoutError):
        text = f"{type(exc).__name__}: {exc}"
        if "CERTIFICATE_VERIFY_FAILED" in text:
            text += " (set reject_notices.smtp.ca_file to the CA that signed it)"
            return _SendError(text, transient=True, misconfigured=True)
        return _SendError(text, transient=True)
    # ValueError: an address that aiosmtplib will not put on a command line.
    return _SendError(f"{type(exc).__name__}: {exc}", transient=False)


class Notifier:
    """Sends the reject notices of every mailbox of one process (one rate limit for all)."""

    def __init__(
        self,
        config: RejectNoticesConfig | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        shared: Shared | None = None,
    ) -> None:
        self.config = config
        self.limiter = notices.RateLimiter()
        self._shared = shared  # replicas: the rate limit lives in Redis, for all of them
        self._clock = clock
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._tls = _tls_context(config.smtp) if config is not None else None
        self._envelope_sender = ""  # MAIL FROM:<> until a server refuses it
        self.sent = 0
        self.failed = 0

    async def notify(
        self,
        parsed: ParsedMessage,
        reason: str,
        *,
        mailbox: str,
        ref: str,
        rules: routing.RoutingRules,
        max_message_bytes: int,
        fields: dict[str, Any],
    ) -> NoticeResult:
        """Send the notice for ``reason`` if the policy allows; return once that is settled."""
        config = self.config
        if config is None:
            log.info(
                "%s: %s: no reject notice (reject_notices is not configured)",
                mailbox,
                ref,
                extra=fields,
            )
            return NoticeResult.DISABLED
        recipient = notices.configured_recipient(parsed, rules, config)
        if recipient.address is None:
            log.info("%s: %s: no reject notice: %s", mailbox, ref, recipient.refused, extra=fields)
            return NoticeResult.REFUSED
        try:
            notice = notices.build_notice(
                parsed,
                recipient=recipient.address,
                reason=reason,
                sender=config.sender,
                now=datetime.now(UTC),
                footer=config.footer,
                max_message_bytes=max_message_bytes,
            )
        except NoticeError as exc:  # hostile mail: no notice, and say why
            log.warning(
                "%s: %s: no reject notice: cannot build it: %s", mailbox, ref, exc, extra=fields
            )
            return NoticeResult.REFUSED
        if not await self._allowed(recipient.address, reason, mailbox):
            log.info(
                "%s: %s: no reject notice: one went to %s for %r within the last %.0f hours",
                mailbox,
                ref,
                recipient.address,
                reason,
                self.limiter.window_s / 3600,
                extra=fields,
            )
            return NoticeResult.REFUSED
        return await self._send_with_retries(config, notice, mailbox, ref, fields)

    async def _allowed(self, recipient: str, reason: str, mailbox: str) -> bool:
        """The rate limit: shared by the replicas when there are any; this process's own
        while their store cannot be reached (one notice per replica beats none at all)."""
        if self._shared is not None:
            try:
                sender = self.config.sender_address if self.config is not None else ""
                return await self._shared.allow_notice(
                    recipient, reason, self.limiter.window_s, sender=sender
                )
            except ArbitrationError as exc:
                log.warning("%s: the shared notice rate limit is out of reach (%s)", mailbox, exc)
        return self.limiter.allow(recipient, reason, self._clock())

    async def _send_with_retries(
        self,
        config: RejectNoticesConfig,
        notice: notices.Notice,
        mailbox: str,
        ref: str,
        fields: dict[str, Any],
    ) -> NoticeResult:
        settings = config.retry
        give_up_after_s = settings.give_up_after_s or notices.DAY_S
        retry = Retry(replace(settings.backoff, give_up_after_s=give_up_after_s))
        where = f"{mailbox}: {ref}"
        while True:
            fields["attempt"] = retry.begin()
            try:
                await self._send(config, notice, mailbox)
            except _SendError as exc:
                delay = None if exc.refused or not exc.transient else retry.delay()
                if delay is None:
                    return self._not_sent(exc, notice, where, retry, fields)
                await retry.wait(
                    log,
                    logging.ERROR if exc.misconfigured else logging.WARNING,
                    f"{where}: reject notice",
                    exc,
                    delay_s=delay,
                    fields=fields,
                )
            else:
                log.info(
                    "%s: reject notice sent to %s (%s)",
                    where,
                    notice.recipient,
                    notice.message_id,
                    extra=fields,
                )
                self.sent += 1
                return NoticeResult.SENT

    def _not_sent(
        self,
        exc: _SendError,
        notice: notices.Notice,
        where: str,
        retry: Retry,
        fields: dict[str, Any],
    ) -> NoticeResult:
        """A notice that will not go: refused by policy, refused for good by the server, or
        not sent within ``give_up_after``."""
        recipient = notice.recipient
        if exc.refused:
            log.warning("%s: no reject notice to %s: %s", where, recipient, exc, extra=fields)
            return NoticeResult.REFUSED
        if not exc.transient:
            log.error(
                "%s: the SMTP server refused the reject notice to %s for good: %s; dead-lettering",
                where,
                recipient,
                exc,
                extra=fields,
            )
        else:
            log.error(
                "%s: reject notice to %s failed for %.0fs (%d attempts, last: %s); giving up "
                "(reject_notices.retry.give_up_after) and dead-lettering",
                where,
                recipient,
                retry.elapsed_s,
                retry.attempt,
                exc,
                extra={**fields, **retry.extra(exc, None)},
            )
        self.failed += 1
        return NoticeResult.FAILED

    async def _send(
        self, config: RejectNoticesConfig, notice: notices.Notice, mailbox: str
    ) -> None:
        """One attempt; raises ``_SendError``. Falls back from ``MAIL FROM:<>`` to the ``from``
        address, for good, when a server refuses the null sender."""
        import aiosmtplib  # noqa: PLC0415  # here: 2 MiB at start where no notice is sent

        while True:
            sender = self._envelope_sender
            try:
                async with self._slots:
                    await self._submit(config, notice, sender)
                return
            except aiosmtplib.SMTPSenderRefused as exc:
                if sender or exc.code < 500 or exc.code in MISCONFIGURED_CODES:
                    raise _classify(exc) from exc
                if self._envelope_sender:  # another notice found out meanwhile
                    continue
                self._envelope_sender = config.sender_address
                log.warning(
                    "%s: the SMTP server refused the null envelope sender (MAIL FROM:<>): "
                    "%d %s; using %s from now on",
                    mailbox,
                    exc.code,
                    exc.message,
                    self._envelope_sender,
                )
            except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as exc:
                raise _classify(exc) from exc

    async def _submit(
        self, config: RejectNoticesConfig, notice: notices.Notice, sender: str
    ) -> None:
        """Connect (TLS, AUTH as configured) and send ``notice.data`` exactly as built."""
        import aiosmtplib  # noqa: PLC0415  # imported by _send already

        smtp = config.smtp
        client = aiosmtplib.SMTP(
            hostname=smtp.host,
            port=smtp.port,
            username=smtp.user,
            password=smtp.password.reveal() if smtp.password is not None else None,
            timeout=smtp.timeout_s,
            use_tls=smtp.ssl,
            start_tls=smtp.start_tls,  # False: never upgrade unasked (None would be "if offered")
            tls_context=self._tls,
        )
        async with client:
            options = []
            if notice.smtputf8:
                if client.is_ehlo_or_helo_needed:
                    await client.ehlo()
                if not client.supports_extension("smtputf8"):
                    # RFC 6531: a non-ASCII address goes only to a server that offers SMTPUTF8.
                    # Not a failure to retry for a day (issue 13): this relay never takes it.
                    raise _SendError(
                        "its address is not ASCII and the SMTP server does not offer SMTPUTF8 "
                        "(RFC 6531)",
                        transient=False,
                        refused=True,
                    )
                options.append("SMTPUTF8")
            await client.sendmail(sender, [notice.recipient], notice.data, mail_options=options)


@dataclass(frozen=True, slots=True)
class SmtpStep:
    """One step of ``check_connection``."""

    step: Literal["connect", "tls", "ehlo", "auth"]
    status: Literal["ok", "warn", "fail"]
    detail: str


def _tls_detail(smtp: aiosmtplib.SMTP, config: SmtpConfig) -> SmtpStep:
    layer = smtp.get_transport_info("ssl_object")
    version = layer.version() if isinstance(layer, ssl.SSLObject) else "TLS"
    how = "implicit TLS" if config.ssl else "STARTTLS"
    if not config.tls_verify:
        return SmtpStep("tls", "warn", f"{how}, {version}; certificate NOT verified (tls_verify)")
    return SmtpStep("tls", "ok", f"{how}, {version}; certificate verified")


def _tls_failure(exc: BaseException) -> bool:
    """Whether a failed connect failed in the TLS handshake (aiosmtplib wraps ``SSLError``)."""
    seen: BaseException | None = exc
    for _ in range(8):  # a short, bounded walk down the cause chain
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def check_connection(config: SmtpConfig) -> list[SmtpStep]:
    """Connect, TLS, EHLO and AUTH as a notice would, and send nothing (``mailroom check``).

    One result per step, up to and including the first failure; never raises for the server's
    sake. Details never contain the password.
    """
    import aiosmtplib  # noqa: PLC0415  # here: 2 MiB at start where no notice is sent

    where = f"{config.host}:{config.port}"
    smtp = aiosmtplib.SMTP(
        hostname=config.host,
        port=config.port,
        use_tls=config.ssl,
        start_tls=False,  # each step on its own below
        tls_context=_tls_context(config),
        timeout=config.timeout_s,
    )
    steps: list[SmtpStep] = []
    step: Literal["connect", "tls", "ehlo", "auth"] = "connect"
    try:
        greeting = await smtp.connect()
        if config.ssl:
            steps.append(SmtpStep("connect", "ok", f"{where} answered over TLS"))
            steps.append(_tls_detail(smtp, config))
        else:
            steps.append(SmtpStep("connect", "ok", f"{where} greets: {greeting.code}"))
        if config.start_tls:
            step = "tls"
            await smtp.starttls()
            steps.append(_tls_detail(smtp, config))
        elif not config.ssl:
            steps.append(
                SmtpStep("tls", "warn", "none: the password would cross the network in clear text")
                if config.user
                else SmtpStep("tls", "ok", "not used (ssl and start_tls are off)")
            )
        step = "ehlo"
        answer = await smtp.ehlo()
        extensions = ", ".join(sorted(name.upper() for name in smtp.esmtp_extensions)) or "none"
        steps.append(SmtpStep("ehlo", "ok", f"{answer.code}; extensions: {extensions}"))
        step = "auth"
        if config.user is None or config.password is None:
            steps.append(SmtpStep("auth", "ok", "not configured (no user)"))
        else:
            await smtp.login(config.user, config.password.reveal())
            steps.append(SmtpStep("auth", "ok", f"logged in as {config.user}"))
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        if step == "connect" and config.ssl and _tls_failure(exc):
            steps.append(SmtpStep("connect", "ok", f"{where} accepted the connection"))
            step = "tls"
        text = str(_classify(exc))
        if step == "connect":
            text = f"{where}: {text}; is the SMTP server running, and are host and port right?"
        steps.append(SmtpStep(step, "fail", text))
    finally:
        if smtp.is_connected:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                smtp.close()
    return steps
