"""A stand-in for GitLab's MailRoom (the mail_room gem) watching one mailbox beside mailroom.

It does what MailRoom's IMAP connection and Redis arbitration do, in that order
(lib/mail_room/imap/connection.rb, lib/mail_room/arbitration/redis.rb):

1. ``UID SEARCH UNSEEN``;
2. for each UID, ``SET <namespace>:delivered:<uid> 1 NX EX 600``: only the UIDs it could set
   are its own;
3. ``UID FETCH <uids> RFC822`` (which sets ``\\Seen``), then the postback of each message:
   ``POST <gitlab_url>/api/v4/internal/mail_room/<type>``, ``Content-Type: text/plain``, the
   ``Gitlab-Mailroom-Api-Request`` JWT (HS256, ``iss: gitlab-mailroom``, ``iat``, ``nonce``);
4. ``UID STORE +FLAGS (\\Deleted)`` (delete_after_delivery).

It polls instead of IDLE (the order of the steps is what matters here) and takes a few UIDs per
round, so that it races mailroom message by message. It runs in a thread with blocking clients
(imaplib, redis-py, urllib), like the Ruby process it stands for.
"""

from __future__ import annotations

import imaplib
import secrets
import ssl
import threading
import time
import urllib.request

import jwt
import redis

from tests.servers.dovecot import Account, Dovecot

EXPIRATION_S = 600  # MailRoom::Arbitration::Redis::EXPIRATION
ROUND_UIDS = 5
POLL_S = 0.02


class MailRoom:
    """MailRoom watching ``account`` on ``dovecot``, claiming in ``redis_url`` under
    ``namespace``, posting to ``gitlab_url`` for the mailbox type ``kind``."""

    def __init__(
        self,
        dovecot: Dovecot,
        account: Account,
        *,
        redis_url: str,
        namespace: str,
        gitlab_url: str,
        kind: str,
        secret: bytes,
    ) -> None:
        self.dovecot = dovecot
        self.account = account
        self.redis = redis.Redis.from_url(redis_url)
        self.namespace = namespace
        self.url = f"{gitlab_url}/api/v4/internal/mail_room/{kind}"
        self.secret = secret
        self.posted: list[int] = []  # the UIDs it delivered
        self.claimed: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mail_room", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.redis.close()
        assert not self._thread.is_alive(), "the MailRoom stand-in did not stop"
        if self.errors:
            raise self.errors[0]

    def deliver(self, uid: int) -> bool:
        """``MailRoom::Arbitration::Redis#deliver?``: true when this process claimed ``uid``."""
        return bool(
            self.redis.set(f"{self.namespace}:delivered:{uid}", 1, nx=True, ex=EXPIRATION_S)
        )

    def _post(self, raw: bytes) -> None:
        token = jwt.encode(
            {"iss": "gitlab-mailroom", "iat": int(time.time()), "nonce": secrets.token_hex(12)},
            self.secret,
            algorithm="HS256",
        )
        request = urllib.request.Request(
            self.url,
            data=raw,
            headers={"Content-Type": "text/plain", "Gitlab-Mailroom-Api-Request": token},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()

    def _run(self) -> None:
        try:
            context = ssl.create_default_context(cafile=str(self.dovecot.ca_file))
            imap = imaplib.IMAP4_SSL(self.dovecot.host, self.dovecot.tls_port, ssl_context=context)
            imap.login(self.account.user, self.account.password)
            imap.select("INBOX")
            for _ in range(100_000):  # bounded: stop() ends it long before
                if self._stop.is_set():
                    break
                self._round(imap)
                time.sleep(POLL_S)
            imap.logout()
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    def _round(self, imap: imaplib.IMAP4) -> None:
        typ, data = imap.uid("SEARCH", "UNSEEN")
        assert typ == "OK", data
        unread = [int(u) for u in data[0].split()] if data and data[0] else []
        mine = [uid for uid in unread[:ROUND_UIDS] if self.deliver(uid)]
        self.claimed += mine
        if not mine:
            return
        typ, fetched = imap.uid("FETCH", ",".join(map(str, mine)), "(UID RFC822)")
        assert typ == "OK", fetched
        for item in fetched:
            if isinstance(item, tuple):
                head = item[0].decode()
                uid = int(head.split("UID ", 1)[1].split()[0].rstrip(")"))
                self._post(item[1])
                self.posted.append(uid)
                imap.uid("STORE", str(uid), "+FLAGS", "(\\Deleted)")
