"""A private redis-server (and redis-sentinel) on 127.0.0.1 for the replica tests.

Debian's ``redis-server`` with its own config in a temp dir (not the system service): a free
port, no persistence unless asked, optionally a password and TLS (a certificate from the test
CA). ``stop()``/``start()`` keep the port, so clients see a Redis restart; ``kill()`` is a crash.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.servers import tls
from tests.servers.dovecot import free_port

REDIS_SERVER = os.environ.get("MAILROOM_TEST_REDIS", "/usr/bin/redis-server")
REDIS_SENTINEL = os.environ.get("MAILROOM_TEST_REDIS_SENTINEL", "/usr/bin/redis-sentinel")
START_TIMEOUT_S = 10.0


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    for _ in range(10_000):
        if proc.poll() is not None:
            raise RuntimeError(f"redis exited at start:\n{log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"redis did not listen on {port}:\n{log.read_text(errors='replace')}")


class RedisServer:
    """One redis-server; ``url`` is what mailroom's config names."""

    def __init__(
        self, *, password: str | None = None, use_tls: bool = False, unixsocket: Path | None = None
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailroom-redis-"))
        self.port = free_port()
        self.password = password
        self.use_tls = use_tls
        self.log = self.root / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        lines = [
            "bind 127.0.0.1",
            f"dir {self.root}",
            f"logfile {self.log}",
            'save ""',
            "appendonly no",
            "protected-mode no",
        ]
        if password is not None:
            lines.append(f"requirepass {password}")
        if unixsocket is not None:  # as the Linux package's Redis listens
            lines += [f"unixsocket {unixsocket}", "unixsocketperm 777"]
        if use_tls:
            certs = tls.write_server_cert(self.root)
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {certs.cert}",
                f"tls-key-file {certs.key}",
                f"tls-ca-cert-file {tls.write_ca(self.root)}",
                "tls-auth-clients no",
            ]
        else:
            lines.append(f"port {self.port}")
        self.config = self.root / "redis.conf"
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"{'rediss' if self.use_tls else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        if not os.path.exists(REDIS_SERVER):
            raise RuntimeError(f"{REDIS_SERVER} not found: `make test` installs redis-server")
        self._proc = subprocess.Popen(
            [REDIS_SERVER, str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_for_port(self.port, self._proc, self.log)  # TLS or not, a connect tells

    def stop(self) -> None:
        """A clean shutdown (SIGTERM); the port stays reserved for ``start``."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open and commands hang, as through a partition."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
        self._proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Sentinel:
    """One redis-sentinel watching ``master`` under ``name``."""

    def __init__(self, master: RedisServer, name: str = "mailroom-master") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailroom-sentinel-"))
        self.port = free_port()
        self.name = name
        self.log = self.root / "sentinel.log"
        self.config = self.root / "sentinel.conf"
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f"dir {self.root}",
            f"logfile {self.log}",
            "protected-mode no",
            f"sentinel monitor {name} 127.0.0.1 {master.port} 1",
        ]
        if master.password is not None:
            lines.append(f"sentinel auth-pass {name} {master.password}")
        self.config.write_text("\n".join(lines) + "\n")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [REDIS_SENTINEL, str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_for_port(self.port, self._proc, self.log)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)
