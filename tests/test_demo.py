"""`make demo` keeps working: examples/demo.py --once delivers its sample message."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


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
