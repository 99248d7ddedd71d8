"""The container image, built and run with podman (opt-in: it needs a base image and minutes).

    MAILROOM_TEST_IMAGE_BASE=localhost/debian-python:bookworm pytest tests/test_image.py

The base must have Python >= 3.11 as `python3` with the venv module (docs/operations.md,
Docker, "without a registry"). MAILROOM_TEST_PODMAN overrides the podman command (for example
"podman --runtime runc --cgroup-manager cgroupfs" where crun cannot run), and
MAILROOM_TEST_PODMAN_ARGS adds arguments to `build` and `run` (for example
"--ulimit nofile=20000:20000 --ulimit nproc=1000:1000" where the default limits cannot be set).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.helpers import ROOT, config_dict, mailbox_dict, message, wait_until
from tests.servers.dovecot import Account, Dovecot, free_port
from tests.servers.webhook import WebhookReceiver

BASE = os.environ.get("MAILROOM_TEST_IMAGE_BASE")
PODMAN = shlex.split(os.environ.get("MAILROOM_TEST_PODMAN", "podman"))
EXTRA = shlex.split(os.environ.get("MAILROOM_TEST_PODMAN_ARGS", ""))
IMAGE = "localhost/mailroom:test"

pytestmark = [
    pytest.mark.slow,  # builds and runs the image: minutes
    pytest.mark.skipif(not BASE, reason="set MAILROOM_TEST_IMAGE_BASE to build the image"),
    pytest.mark.skipif(shutil.which(PODMAN[0]) is None, reason=f"{PODMAN[0]} is not installed"),
]


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def image() -> str:
    assert BASE is not None
    build = podman(
        "build",
        "--format",
        "docker",  # OCI images have no HEALTHCHECK
        "--network",
        "host",
        *EXTRA,
        "--build-arg",
        f"BASE_IMAGE={BASE}",
        "-t",
        IMAGE,
        str(ROOT),
        timeout=900,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return IMAGE


@pytest.fixture
def container() -> Iterator[str]:
    name = f"mailroom-test-{os.getpid()}"
    yield name
    podman("rm", "--force", "--time", "0", name)


def test_image_is_non_root_without_compilers(image: str) -> None:
    inspect = podman(
        "image",
        "inspect",
        image,
        "--format",
        "{{.Config.User}}|{{.Config.StopSignal}}|{{index .Config.Labels "
        '"org.opencontainers.image.licenses"}}|{{json .Config.Healthcheck.Test}}',
    )
    assert inspect.returncode == 0, inspect.stderr
    user, stop_signal, licences, healthcheck = inspect.stdout.strip().split("|")
    assert (user, stop_signal, licences) == ("10001:10001", "SIGTERM", "GPL-3.0-or-later")
    assert "MAILROOM_HEALTH_URL" in healthcheck
    tools = podman(
        "run", "--rm", *EXTRA, "--entrypoint", "sh", image, "-c",
        "for c in gcc cc c++ clang make ld; do command -v $c; done; id -u",
    )  # fmt: skip
    assert tools.returncode == 0, tools.stderr
    assert tools.stdout.split() == ["10001"]


def write_config(directory: Path, dovecot: Dovecot, account: Account, url: str, port: int) -> None:
    """mailroom.yml and the password file, readable by the container's user."""
    (directory / "imap-password").write_text(account.password + "\n")
    box = mailbox_dict(dovecot, account, ca_file="/etc/mailroom/ca.pem")
    del box["password"]
    box["password_file"] = "/run/secrets/imap-password"
    config = config_dict([box], url)
    config["health"] = {"listen": f"127.0.0.1:{port}"}
    (directory / "mailroom.yml").write_text(yaml.safe_dump(config))
    for file in directory.iterdir():
        file.chmod(0o644)


@pytest.mark.timeout(180)
async def test_container_delivers_reports_health_and_stops_cleanly(  # noqa: PLR0917
    image: str,
    container: str,
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    tmp_path: Path,
) -> None:
    port = free_port()
    await asyncio.to_thread(write_config, tmp_path, dovecot, account, webhook.url, port)
    run = podman(
        "run", "--detach", "--name", container, *EXTRA,
        "--network", "host", "--read-only", "--cap-drop", "ALL",
        "-e", f"MAILROOM_HEALTH_URL=http://127.0.0.1:{port}/healthz",
        "-v", f"{tmp_path / 'mailroom.yml'}:/etc/mailroom/mailroom.yml:ro",
        "-v", f"{dovecot.ca_file}:/etc/mailroom/ca.pem:ro",
        "-v", f"{tmp_path / 'imap-password'}:/run/secrets/imap-password:ro",
        image,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

        async def ready() -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(ready, timeout=60, what="the container's /readyz")
    await dovecot.aappend(account, message(1))
    (request,) = await webhook.wait_for(1, timeout=20)
    assert request.json()["subject"] == "test 1"
    check = await asyncio.to_thread(podman, "healthcheck", "run", container)
    assert check.returncode == 0, check.stdout + check.stderr
    stop = await asyncio.to_thread(podman, "stop", "--time", "40", container)
    assert stop.returncode == 0, stop.stderr
    state = podman("inspect", container, "--format", "{{.State.ExitCode}}")
    assert state.stdout.strip() == "0"
    logs = podman("logs", container)
    assert '"msg": "stopped (0 deliveries abandoned)"' in logs.stdout + logs.stderr
