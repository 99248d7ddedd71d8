"""The command line where the first hour meets it: a busy health.listen is one line, exit 2."""

from __future__ import annotations

import socket
from importlib.metadata import version
from pathlib import Path

import pytest

from mailroom import USER_AGENT, cli
from tests.helpers import Process, config_dict, mailbox_dict
from tests.servers.dovecot import Account, Dovecot
from tests.servers.webhook import WebhookReceiver


@pytest.mark.slow
async def test_a_busy_health_listen_is_one_line_and_exit_2(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = config_dict([mailbox_dict(dovecot, account)], webhook.url)
        config["health"] = {"listen": f"127.0.0.1:{port}"}
        process = Process(config, tmp_path)
        process.start()
        try:
            assert await process.wait() == 2
        finally:
            process.kill()
    assert process.output() == (
        f"mailroom: config error: health.listen: cannot listen on 127.0.0.1:{port}: Address "
        "already in use; stop what uses it, or choose another\n"
    )


def test_the_version_is_the_installed_package_s(capsys: pytest.CaptureFixture[str]) -> None:
    installed = version("mailroom-incoming")
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out == f"mailroom {installed}\n"
    assert f"mailroom/{installed}" == USER_AGENT  # what every HTTP request says
