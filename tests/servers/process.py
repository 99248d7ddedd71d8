"""A test server as a process of its own (``python -m tests.servers.<name> ...``), so that what
it sends costs the process under test nothing but the receiving.

The server prints ``PORT <n>`` first, then any lines it likes (``lines``, read by a thread);
``with`` starts it (``port``) and kills it at the end.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["ServerProcess"]

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """One server process on 127.0.0.1: ``with`` starts it, ``port`` is where it listens."""

    def __init__(self, module: str, args: list[str]) -> None:
        self.command = [sys.executable, "-m", module, *args]
        self.host = "127.0.0.1"
        self.port = 0
        self.lines: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Self:
        self.port = self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> int:
        self._proc = subprocess.Popen(self.command, cwd=ROOT, stdout=subprocess.PIPE)
        if self._proc.stdout is None:
            raise RuntimeError("no stdout")
        first = self._proc.stdout.readline().decode()  # bounded: the server prints it first
        if not first.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"{self.command[2]} did not start: {first!r}")
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        return int(first.split()[1])

    def _collect(self) -> None:
        if self._proc is not None and self._proc.stdout is not None:
            for line in self._proc.stdout:
                self.lines.append(line.decode().rstrip("\n"))

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=10)
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
