"""`make demo` keeps working: examples/demo.py --once delivers its sample message; a stop
signal (Ctrl-C, SIGTERM, SIGHUP) stops every process it started and removes its temp dir;
--serve writes a config that `mailroom check` passes with."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, wait_until
from tests.servers.imap import free_port

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


async def _demo(cwd: Path, *args: str) -> asyncio.subprocess.Process:
    """examples/demo.py in ``cwd``, its output (stdout and stderr) and its input piped: an
    open, silent stdin, so that it waits for Enter."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "demo.py"),
        *args,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


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
    proc = await _demo(tmp_path, *mode)
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        await _read_until(proc.stdout, "press Enter", seen)
        text = "".join(seen)
        dovecot = re.search(r"Dovecot \(pid (\d+)\).*; its files in (\S+)", text)
        assert dovecot is not None, text
        pids = [int(p) for p in re.findall(r"(?:receiver|SMTP sink|mailroom) \(pid (\d+)\)", text)]
        assert len(pids) == (2 if mode else 3), text
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

    await wait_until(cleaned_up, what="Dovecot, receiver, sink and mailroom gone, temp dir removed")


GUIDE = ROOT / "docs" / "getting-started.md"
DOCUMENTED_SENDS = {
    tuple(shlex.split(line))
    for line in re.findall(
        r"^\.venv/bin/python examples/demo\.py send (.*)$", GUIDE.read_text(), re.M
    )
}


async def _demo_send(cwd: Path, *args: str) -> str:
    send = await _demo(cwd, "send", *args)
    async with asyncio.timeout(60):
        out, _ = await send.communicate()
    assert send.returncode == 0, out.decode()
    return out.decode()


async def test_the_demo_can_be_talked_to(tmp_path: Path) -> None:
    """docs/getting-started.md's walk through `make demo-serve`: the seeded messages, then one
    delivered, one rejected with a notice the sink prints, an auto-reply dropped, a 422 from
    the receiver with a notice carrying its reason, and an .eml file as it is."""
    demo = await _demo(tmp_path, "--serve")
    assert demo.stdout is not None
    log = tmp_path / "mailroom.log"
    seen: list[str] = []
    sends: set[tuple[str, ...]] = set()
    mailroom = None

    async def send(*args: str) -> str:
        sends.add(args)
        return await _demo_send(tmp_path, *args)

    try:
        await _read_until(demo.stdout, "press Enter", seen)
        assert "send --to incoming+closed-7@demo.example" in "".join(seen)
        with log.open("wb") as out:
            mailroom = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mailroom", "-c", "mailroom-demo.yml",
                cwd=tmp_path, stdout=out, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        # The seeded three: one for the application, a reject notice to Ada, an auto-reply.
        await _read_until(demo.stdout, "subject: [Rejected] Lunch on Friday?", seen)
        await _read_until(demo.stdout, "key=ticket-42", seen)

        sent = await send("--subject", "My printer is on fire")
        assert "appended To: Support <incoming+ticket-42@demo.example>" in sent
        await _read_until(demo.stdout, "subject: My printer is on fire", seen)

        await send("--to", "nobody@demo.example", "--from", "grace@sender.example")
        await _read_until(demo.stdout, "── mail to grace@sender.example  (MAIL FROM:<>)", seen)
        await _read_until(demo.stdout, "The address you sent it to is not known here.", seen)

        await send("--auto-reply")
        await send("--to", "incoming+closed-7@demo.example")
        await _read_until(demo.stdout, 'answered 422 {"reject": "Ticket closed-7 is closed.', seen)
        await _read_until(demo.stdout, "| Ticket closed-7 is closed.", seen)

        check = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailroom", "check", "--send-test", "-c", "mailroom-demo.yml",
            cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with asyncio.timeout(60):
            assert await check.wait() == 0
        await _read_until(demo.stdout, "mailroom check's test event, signed", seen)

        eml = tmp_path / "mine.eml"
        eml.write_bytes(
            b"From: Bob <bob@sender.example>\r\nTo: incoming+from-a-file@demo.example\r\n"
            b"Subject: From a file\r\n\r\nHello.\r\n"
        )
        await send(str(eml))
        await _read_until(demo.stdout, "key=from-a-file", seen)

        def ignored() -> int:
            return log.read_text().count("auto-generated (auto_submitted); ignored")

        await wait_until(lambda: ignored() == 2, what="both auto-replies ignored")
        text = log.read_text()
        assert "the application rejected it: Ticket closed-7 is closed." in text
        assert "bad signature" not in "".join(seen)
        assert sends - {(str(eml),)} == DOCUMENTED_SENDS  # getting-started's walk, as tested
    finally:
        if mailroom is not None:
            mailroom.send_signal(signal.SIGTERM)
            async with asyncio.timeout(60):
                assert await mailroom.wait() == 0
        demo.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            await demo.communicate()


def test_demo_send_says_what_to_do_without_a_running_demo(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "send"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "is `make demo-serve` running, and is this the config it wrote?" in result.stderr


async def test_the_smtp_sink_prints_what_it_is_sent_as_its_docstring_says() -> None:
    """examples/smtp_sink.py on its own, as its docstring runs it: a UTF-8 message over SMTP is
    printed (envelope, From, Subject, the first 12 body lines), answered 250, and SIGTERM
    stops it cleanly."""
    port = free_port()
    sink = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples" / "smtp_sink.py"), "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert sink.stdout is not None
    seen: list[str] = []
    try:
        await _read_until(sink.stdout, f"SMTP sink listening on 127.0.0.1:{port}", seen)
        body = "".join(f"line {n} é\r\n" for n in range(1, 16))
        message = (
            "From: Grace <grace@sender.example>\r\nTo: x@demo.example\r\n"
            "Subject: =?utf-8?q?Caf=C3=A9?=\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: 8bit\r\n\r\n{body}"
        ).encode()

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                return smtp.sendmail("<>", ["grace@sender.example"], message)

        assert await asyncio.to_thread(send) == {}
        await _read_until(sink.stdout, "(3 more lines)", seen)
        text = "".join(seen)
        assert "── mail to grace@sender.example  (MAIL FROM:<>)" in text
        assert "   from:    Grace <grace@sender.example>" in text
        assert "   subject: Café" in text
        assert "   | line 12 é" in text and "line 13" not in text
    finally:
        sink.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            await sink.wait()
    assert sink.returncode == 0, "".join(seen)
