"""The listening socket of an LMTP listener: bound once, and kept while a config names it.

``bind`` makes it: TCP on a host and port, or a unix socket whose file gets ``socket_mode``
(and ``socket_owner``/``socket_group``) before it listens, so no one ever connects through
wider permissions. A socket file left by a run that died is replaced; a file that is not a
socket, or a socket something still listens on, is not. The shared resources keep the bound
socket across a source's restarts (a reload that changed only ``max_recipients`` keeps it: the
MTA's connections queue in its backlog meanwhile), and close it (removing the socket file) when
no config names it any more.

An address that cannot be bound is a ``ConfigError``: at start, mailroom exits 2 and says why;
on a reload, the reload is refused and the running config stays.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import stat
from collections.abc import Callable

from mailroom.config import Listen
from mailroom.errors import ConfigError

__all__ = ["BACKLOG", "BoundSocket", "bind"]

BACKLOG = 512  # connections the kernel queues while a reload restarts the listener


class BoundSocket:
    """A bound socket (listening) and the unix socket file it made, if any."""

    def __init__(self, sock: socket.socket, listen: Listen) -> None:
        self.sock = sock
        self.listen = listen
        self._inode: tuple[int, int] | None = None
        if listen.path is not None:
            info = os.stat(listen.path)
            self._inode = (info.st_dev, info.st_ino)

    @property
    def address(self) -> str:
        """Where it listens (the port the kernel chose for ``port: 0``)."""
        if self.listen.path is not None:
            return str(self.listen)
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def permit(self, listen: Listen) -> None:
        """Give the socket file ``listen``'s mode, owner and group again (a reload may have
        changed them; the socket stays). ``OSError`` when that is not allowed."""
        if listen.path is not None:
            _permit(listen.path, listen)

    def close(self) -> None:
        """Close it, and remove its socket file (unless another process replaced it)."""
        self.sock.close()
        path = self.listen.path
        if path is None or self._inode is None:
            return
        with contextlib.suppress(OSError):
            info = os.stat(path)
            if (info.st_dev, info.st_ino) == self._inode:
                os.unlink(path)


def bind(listen: Listen, where: str) -> BoundSocket:
    """Bind and listen on ``listen``; ``where`` names the setting in errors
    (``mailboxes[postfix].listen``)."""
    try:
        if listen.path is not None:
            return BoundSocket(_unix(listen, listen.path, where), listen)
        return BoundSocket(_tcp(listen), listen)
    except OSError as exc:
        raise ConfigError.cannot_listen(where, str(listen), listen.host, exc) from exc


def _tcp(listen: Listen) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)

    def bind() -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT after a restart
        sock.bind(address)

    return _listening(sock, bind)


def _unix(listen: Listen, path: str, where: str) -> socket.socket:
    _clear_stale(path, where)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def bind() -> None:  # the file gets its permissions before the socket listens
        sock.bind(path)
        try:
            _permit(path, listen)
        except OSError as exc:
            os.unlink(path)
            raise ConfigError(
                where,
                f"cannot give {path} its socket_mode, socket_owner or socket_group: "
                f"{os.strerror(exc.errno or 0)} (changing the owner takes root)",
            ) from exc

    return _listening(sock, bind)


def _listening(sock: socket.socket, bind: Callable[[], None]) -> socket.socket:
    """``sock`` bound by ``bind``, listening, non-blocking; closed if any of that fails."""
    try:
        bind()
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _permit(path: str, listen: Listen) -> None:
    os.chmod(path, listen.mode)
    if listen.owner is not None or listen.group is not None:
        os.chown(path, _uid(listen.owner), _gid(listen.group))


def _clear_stale(path: str, where: str) -> None:
    """Remove a socket file nothing listens on (a run that died left it); refuse anything
    else that is in the way."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(
            where, f"{path} exists and is not a socket; remove it, or choose another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise ConfigError(
        where,
        f"something already listens on unix:{path} (another mailroom?); stop it, or choose "
        "another path",
    )


def _uid(owner: str | None) -> int:
    if owner is None:
        return -1
    return int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid


def _gid(group: str | None) -> int:
    if group is None:
        return -1
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
