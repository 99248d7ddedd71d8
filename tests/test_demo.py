"""`make demo` keeps working: examples/demo.py --once delivers its sample message; a stop
signal (Ctrl-C, SIGTERM, SIGHUP) stops every process it started and removes its temp dir;
--serve writes a config that `mailroom check` passes with."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, wait_until

pytestmark = pytest.mark.slow  # the demo as a real process


def test_demo_delivers_the_sample_message() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "subject: Hello from the mailroom demo (1)" in result.stdout
    assert "from:    Ada Lovelace <ada@sender.example>" in result.stdout
    assert "key=ticket-42" in result.stdout
    assert "bad signature" not in result.stdout


async def _read_until(stream: asyncio.StreamReader, text: str, seen: list[str]) -> None:
    async with asyncio.timeout(60):
        while not any(text in line for line in seen):
            line = await stream.readline()
            if not line:
                raise AssertionError(f"the demo ended before {text!r}:\n{''.join(seen)}")
            seen.append(line.decode())


def _removed(path: Path) -> bool:
    return not path.exists()


def _gone(pid: int, *, group: bool = False) -> bool:
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize(
    ("mode", "sig"),
    [([], signal.SIGTERM), (["--serve"], signal.SIGHUP), ([], signal.SIGINT)],
)
async def test_demo_stops_everything_it_started_on_a_signal(
    tmp_path: Path, mode: list[str], sig: signal.Signals
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "demo.py"),
        *mode,
        cwd=tmp_path,
        stdin=asyncio.subprocess.PIPE,  # open and silent: the demo waits for Enter
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        await _read_until(proc.stdout, "press Enter", seen)
        text = "".join(seen)
        dovecot = re.search(r"Dovecot \(pid (\d+)\).*; its files in (\S+)", text)
        assert dovecot is not None, text
        pids = [int(p) for p in re.findall(r"(?:receiver|mailroom) \(pid (\d+)\)", text)]
        assert len(pids) == (1 if mode else 2), text
        if mode:  # --serve: the config it wrote works, and check counts the seeded messages
            config = tmp_path / "mailroom-demo.yml"
            assert config.stat().st_mode & 0o777 == 0o600
            check = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mailroom",
                "check",
                "-c",
                str(config),
                stdout=asyncio.subprocess.PIPE,
                cwd=ROOT,
            )
            async with asyncio.timeout(60):
                out, _ = await check.communicate()
            assert check.returncode == 0, out.decode()
            assert (
                "WARN imap[demo] unseen: 3 messages match search_command UNSEEN; the first "
                "start takes them on: 1 posted to the webhook, 1 rejected (1 unknown incoming "
                "email), 1 ignored as auto-generated (1 auto_submitted)" in out.decode()
            )
        proc.send_signal(sig)
        async with asyncio.timeout(60):
            rest, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, text + rest.decode()
    assert f"demo: {sig.name}: stopping everything it started" in rest.decode()
    root, group = Path(dovecot.group(2)), int(dovecot.group(1))

    async def cleaned_up() -> bool:  # SIGKILLed Dovecot children take a moment to be reaped
        return _gone(group, group=True) and all(_gone(pid) for pid in pids) and _removed(root)

    await wait_until(cleaned_up, what="Dovecot, the receiver and mailroom gone, temp dir removed")
