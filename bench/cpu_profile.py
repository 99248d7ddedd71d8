"""A CPU-time sampling profiler for a process the benchmarks start: what each step costs.

``python -m bench.cpu_profile -m mailroom -c FILE`` runs mailroom as ``python -m mailroom``
would, with a ``SIGPROF`` timer that fires after every ``INTERVAL_S`` of CPU the process uses
(``ITIMER_PROF``: user and system time, the kernel's work in its syscalls included) and counts
the Python stack it interrupted, from the start. ``SIGUSR1`` starts a fresh count,
``SIGUSR2`` writes the count since then (or since the start) to ``$MAILROOM_BENCH_PROFILE``
(collapsed stacks, ``frame;frame;... count`` a line, as py-spy's ``--format raw`` and
flamegraph.pl read them), numbered per phase.

Why not only py-spy: it samples wall time, and counts a thread that is runnable but waits
for a CPU as busy. On a shared 2-core machine whose load average is above 2, a send to
Dovecot on loopback wakes Dovecot, which then often runs before the sender gets its CPU back:
py-spy put 40 % of a burst "in" ``socket.send``; CPU-time samples do not see that wait.
``bench/many_mailboxes.py --profile DIR`` writes both and prints this one's summary.
"""

from __future__ import annotations

import collections
import os
import runpy
import signal
import sys
from pathlib import Path
from types import FrameType

INTERVAL_S = 0.001

_counts: collections.Counter[str] = collections.Counter()
_state = {"on": True, "phase": 0}  # counting now (from the start); profiles written so far


def _frame_name(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1].removeprefix(".11/")
            break
    else:
        path = path.rsplit("/mailroom/", 1)[-1] if "/mailroom/" in path else path
    return f"{code.co_qualname} ({path}:{frame.f_lineno})"


def _sample(signum: int, frame: FrameType | None) -> None:
    if not _state["on"] or frame is None:
        return
    names = []
    for _ in range(200):  # bounded: a deep stack is cut at its 200 innermost frames
        if frame is None:
            break
        names.append(_frame_name(frame))
        frame = frame.f_back
    _counts[";".join(reversed(names))] += 1


def _start(signum: int, frame: FrameType | None) -> None:
    _counts.clear()
    _state["on"] = True


def _write(signum: int, frame: FrameType | None) -> None:
    _state["on"] = False
    _state["phase"] += 1
    out = Path(os.environ["MAILROOM_BENCH_PROFILE"] + f".{_state['phase']}")
    text = "".join(f"{stack} {count}\n" for stack, count in _counts.items())
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(out)


def summary(path: Path, top: int = 25) -> list[str]:
    """Lines saying where the CPU went in a collapsed-stacks file: by step (the innermost
    frame of mailroom's own, or the library it called), then the busiest lines."""
    total = 0
    steps: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaves[frames[-1]] += count
        steps[_step(frames)] += count
    if not total:
        return ["  (no samples)"]
    # The kernel checks the timer once a tick (4 ms at HZ=250): a sample per tick of CPU.
    lines = [f"  {total} CPU-time samples; by step:"]
    lines += [f"    {n / total:6.1%}  {step}" for step, n in steps.most_common(top)]
    lines.append("  busiest lines:")
    lines += [f"    {n / total:6.1%}  {leaf}" for leaf, n in leaves.most_common(top // 2)]
    return lines


# The step a sample belongs to: the first of these found from the innermost frame outwards.
STEPS = (
    ("JSON log line", ("logging/", "mailroom/logs.py")),
    ("metrics", ("prometheus_client/",)),
    ("parse (mail/)", ("mail/message.py", "mail/mime.py", "email/")),
    ("webhook payload (json, base64, signature)", ("delivery/webhook.py",)),
    ("aiohttp client (POST)", ("aiohttp/",)),
    ("IMAP parsing (aioimaplib, imap_wire)", ("aioimaplib/", "sources/imap_wire.py")),
    ("IMAP adapter (imap_session)", ("sources/imap_session.py",)),
    ("IMAP watcher (sources/imap.py)", ("sources/imap.py",)),
    ("dispatcher", ("delivery/dispatch.py", "delivery/posting.py", "delivery/circuit.py")),
    ("health, monitor", ("observe/",)),
    ("source lifecycle, budget", ("sources/lifecycle.py", "sources/budget.py")),
    ("health server", ("runtime/health_server.py",)),
    ("event loop: socket I/O", ("selector_events.py", "selectors.py")),
    ("event loop: other", ("asyncio/",)),
)


def _step(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, markers in STEPS:
            if any(marker in frame for marker in markers):
                return name
    return "other"


def main() -> None:
    """``python -m bench.cpu_profile -m MODULE ARGS...``."""
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        raise SystemExit("usage: python -m bench.cpu_profile -m MODULE [ARGS...]")
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    signal.signal(signal.SIGPROF, _sample)
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _write)
    signal.setitimer(signal.ITIMER_PROF, INTERVAL_S, INTERVAL_S)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
