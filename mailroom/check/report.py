"""The report of ``mailroom check``: one ``Result`` line per check, and the order they run in."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mailroom.errors import MailroomError

__all__ = ["Failed", "Finding", "Report", "Result", "Status", "Target"]


class Status(enum.StrEnum):
    """How a check came out. WARN: it works, but worse than it could; SKIP: not run, an
    earlier check it depends on failed."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


Finding = tuple[Status, str]  # what one check found: its status and the detail to print

SESSION_TIMEOUT_S = 15.0  # one IMAP command, one HTTP request


class Failed(Exception):
    """A check failed; the message says what and what to do."""


@dataclass(frozen=True, slots=True)
class Result:
    """One line of the report."""

    target: str  # "imap[incoming]", "webhook[https://app.internal:443]", ...
    step: str  # "tcp", "tls", "login", ...
    status: Status
    detail: str

    def line(self) -> str:
        return f"{self.status:<5}{self.target} {self.step}: {self.detail}"


class Report:
    """The results so far; ``emit`` prints each line as it is found."""

    def __init__(self, emit: Callable[[str], None] = print) -> None:
        self.results: list[Result] = []
        self._emit = emit

    def add(self, target: str, step: str, status: Status, detail: str) -> Result:
        result = Result(target, step, status, detail)
        self.results.append(result)
        self._emit(result.line())
        return result

    def count(self, status: Status) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def ok(self) -> bool:
        return self.count(Status.FAIL) == 0

    def summary(self) -> str:
        counts = [
            f"{self.count(Status.OK)} ok",
            f"{self.count(Status.WARN)} warning(s)",
            f"{self.count(Status.FAIL)} failed",
            f"{self.count(Status.SKIP)} skipped",
        ]
        verdict = "all checks passed" if self.ok else "some checks FAILED"
        return f"mailroom check: {verdict} ({', '.join(counts)})"


class Target:
    """The checks of one target, in order; a failed ``blocking`` check skips the rest."""

    def __init__(self, report: Report, name: str) -> None:
        self.report = report
        self.name = name
        self.blocked: str | None = None  # why the remaining checks are skipped

    async def run(
        self, step: str, check: Callable[[], Awaitable[Finding]], *, blocking: bool = True
    ) -> bool:
        """Run ``check`` unless an earlier blocking check failed; True when it did not fail."""
        if self.blocked is not None:
            self.report.add(self.name, step, Status.SKIP, f"skipped: {self.blocked}")
            return False
        try:
            status, detail = await check()
        except (Failed, MailroomError) as exc:
            status, detail = Status.FAIL, str(exc)
        except TimeoutError:
            status, detail = Status.FAIL, f"no answer within {SESSION_TIMEOUT_S:g}s"
        self.report.add(self.name, step, status, detail)
        if status == Status.FAIL and blocking:
            self.blocked = f"{step} failed"
        return status != Status.FAIL
