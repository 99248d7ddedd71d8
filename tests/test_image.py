"""The container image, built and run with podman: what a user of the image relies on.

`make test-image` runs this (and `.ci/run` after the suite): it installs podman, runc and
debootstrap, makes a base image from Debian's packages (tests/image_base.sh) and sets

    MAILROOM_TEST_IMAGE_BASE=localhost/debian-python:bookworm

Without that variable the tests are skipped. The base must have Python >= 3.11 as `python3`
with the venv module (docs/operations.md, Docker, "without a registry"). MAILROOM_TEST_PODMAN
overrides the podman command (for example "podman --runtime runc --cgroup-manager cgroupfs"
where crun cannot run), and MAILROOM_TEST_PODMAN_ARGS adds arguments to `build` and `run` (for
example "--ulimit nofile=20000:20000 --ulimit nproc=1000:1000" where the default limits cannot
be set). The compose example runs with podman-compose (a test dependency), every service on
the host's network so that all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.helpers import ROOT, WHSEC, config_dict, mailbox_dict, message, wait_until
from tests.servers.dovecot import Account, Dovecot, free_port
from tests.servers.webhook import WebhookReceiver

BASE = os.environ.get("MAILROOM_TEST_IMAGE_BASE")
PODMAN = shlex.split(os.environ.get("MAILROOM_TEST_PODMAN", "podman"))
EXTRA = shlex.split(os.environ.get("MAILROOM_TEST_PODMAN_ARGS", ""))
IMAGE = "localhost/mailroom:test"
COMPOSE_IMAGE = "localhost/mailroom:latest"  # what examples/docker-compose.yml names
UID = "10001"

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
        "-t",
        COMPOSE_IMAGE,
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
    assert (user, stop_signal, licences) == (f"{UID}:{UID}", "SIGTERM", "GPL-3.0-or-later")
    assert "MAILROOM_HEALTH_URL" in healthcheck
    tools = podman(
        "run", "--rm", *EXTRA, "--entrypoint", "sh", image, "-c",
        "for c in gcc cc c++ clang make ld; do command -v $c; done; id -u; "
        "stat -c '%a %u' /scripts/healthcheck",
    )  # fmt: skip
    assert tools.returncode == 0, tools.stderr
    assert tools.stdout.split() == [UID, "755", "0"]


def write_config(directory: Path, dovecot: Dovecot, account: Account, url: str, port: int) -> None:
    """mailroom.yml and the password file, readable by the container's user."""
    (directory / "imap-password").write_text(account.password + "\n")
    box = mailbox_dict(dovecot, account, ca_file="/etc/mailroom/ca.pem")
    del box["password"]
    box["password_file"] = "/run/secrets/imap-password"
    config = config_dict([box], url)
    config["health"] = {"listen": f"127.0.0.1:{port}"}
    config["shutdown_timeout"] = 30  # the drain below takes as long as the test holds it
    (directory / "mailroom.yml").write_text(yaml.safe_dump(config))
    for file in directory.iterdir():
        file.chmod(0o644)


async def ready(port: int) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

        async def answered() -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(answered, timeout=60, what="the container's /readyz")


async def logs_show(container: str, text: str) -> None:
    def found() -> bool:
        logs = podman("logs", container)
        return text in logs.stdout + logs.stderr

    await wait_until(lambda: asyncio.to_thread(found), timeout=60, what=repr(text))


@pytest.mark.timeout(240)
async def test_container_delivers_reports_health_and_drains_on_sigterm(  # noqa: PLR0917
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
        "--security-opt", "no-new-privileges",
        "-e", f"MAILROOM_HEALTH_URL=http://127.0.0.1:{port}/healthz",
        "-v", f"{tmp_path / 'mailroom.yml'}:/etc/mailroom/mailroom.yml:ro",
        "-v", f"{dovecot.ca_file}:/etc/mailroom/ca.pem:ro",
        "-v", f"{tmp_path / 'imap-password'}:/run/secrets/imap-password:ro",
        image,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    await ready(port)

    # uid 10001 runs mailroom (PID 1), on a root file system it cannot write to.
    status = podman("exec", container, "sh", "-c", "grep -E '^(Uid|Gid):' /proc/1/status")
    assert status.returncode == 0, status.stderr
    assert [line.split()[1:] for line in status.stdout.splitlines()] == [[UID] * 4, [UID] * 4]
    write = podman("exec", container, "sh", "-c", "touch /etc/mailroom/x || touch /x")
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr

    # A delivery, then both health checks: the image's HEALTHCHECK and /scripts/healthcheck.
    await dovecot.aappend(account, message(1))
    (first,) = await webhook.wait_for(1, timeout=30)
    assert first.json()["subject"] == "test 1"
    check = await asyncio.to_thread(podman, "healthcheck", "run", container)
    assert check.returncode == 0, check.stdout + check.stderr
    script = await asyncio.to_thread(podman, "exec", container, "/scripts/healthcheck")
    assert script.returncode == 0, script.stdout + script.stderr

    # SIGTERM while a delivery is held by the receiver: mailroom waits for it, settles it and
    # exits 0; nothing is abandoned.
    webhook.stall()
    await dovecot.aappend(account, message(2))
    await webhook.wait_for(2, timeout=30)
    kill = await asyncio.to_thread(podman, "kill", "--signal", "TERM", container)
    assert kill.returncode == 0, kill.stderr
    await logs_show(container, "SIGTERM received: stopping")
    webhook.release()
    waited = await asyncio.to_thread(podman, "wait", container, timeout=90)
    assert waited.stdout.strip() == "0", waited.stdout + waited.stderr
    logs = podman("logs", container)
    assert '"msg": "stopped (0 deliveries abandoned)"' in logs.stdout + logs.stderr
    assert len(webhook.delivered()) == 2
    stored = await dovecot.amessages(account)
    assert [("\\Seen" in m.flags) for m in stored] == [True, True]


# -- the compose examples ------------------------------------------------------------------


@dataclass
class Project:
    """A compose example copied into a directory, with what this machine needs changed."""

    directory: Path
    compose: dict[str, Any]
    config: dict[str, Any]  # the mailroom config the example mounts
    config_name: str
    app_port: int = field(default_factory=free_port)

    @property
    def path(self) -> Path:
        return self.directory / "docker-compose.yml"

    def write(self, secrets: dict[str, str]) -> Path:
        (self.directory / self.config_name).write_text(yaml.safe_dump(self.config))
        (self.directory / "secrets").mkdir()
        for name, value in secrets.items():
            (self.directory / "secrets" / name).write_text(value + "\n")
        for file in self.directory.rglob("*"):
            if file.is_file():
                file.chmod(0o644)  # what the compose files' headers tell users to make them
        self.path.write_text(yaml.safe_dump(self.compose))
        return self.path


def compose_project(
    directory: Path, name: str, config_name: str, dovecot: Dovecot, account: Account
) -> Project:
    """examples/<name> as it is, but for what this machine needs: every service on the host's
    network (the test servers are on 127.0.0.1, and no traffic may leave loopback), so the app
    listens on a free port instead of 3000 and the webhook URL names 127.0.0.1 instead of the
    service; the image is the one built here; the mailboxes are on the test Dovecot. The rest
    (the secrets as files, read_only, cap_drop, no-new-privileges, the receiver, the commands)
    is the example's."""
    examples = ROOT / "examples"
    shutil.copy(examples / "receiver.py", directory / "receiver.py")
    project = Project(
        directory,
        yaml.safe_load((examples / name).read_text()),
        yaml.safe_load((examples / config_name).read_text()),
        config_name,
    )
    services = project.compose["services"]
    for service in services.values():
        service["network_mode"] = "host"
        service.pop("ports", None)  # published ports mean nothing on the host network
        service.pop("build", None)  # the image fixture built it
        if any(config_name in volume for volume in service.get("volumes", [])):
            service["volumes"].append(f"{dovecot.ca_file}:/etc/mailroom/ca.pem:ro")
    app = services["app"]
    port = f"--port {project.app_port}"
    app["command"] = [part.replace("--port 3000", port) for part in app["command"]]
    assert port in app["command"][0]
    webhook = project.config["webhook"]
    webhook["url"] = webhook["url"].replace("app:3000", f"127.0.0.1:{project.app_port}")
    box = mailbox_dict(dovecot, account, ca_file="/etc/mailroom/ca.pem")
    for mailbox in project.config["mailboxes"]:
        mailbox.update({k: box[k] for k in ("host", "port", "user", "ca_file")})
    return project


def compose(path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """podman-compose with this test's podman command and arguments."""
    command = [
        sys.executable, "-m", "podman_compose", "--project-name", path.parent.name, "-f",
        str(path), "--podman-path", shutil.which(PODMAN[0]) or PODMAN[0],
    ]  # fmt: skip
    if PODMAN[1:]:
        command += ["--podman-args", shlex.join(PODMAN[1:])]
    if EXTRA:
        command += ["--podman-run-args", shlex.join(EXTRA)]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@contextlib.asynccontextmanager
async def stack(path: Path) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """The compose project up; yields what its app printed so far; down at the end."""

    async def printed() -> str:
        logs = await asyncio.to_thread(compose, path, "logs", "app")
        return logs.stdout + logs.stderr

    up = await asyncio.to_thread(compose, path, "up", "--detach", "--no-build")
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield printed
    finally:
        down = await asyncio.to_thread(compose, path, "down", "--timeout", "40")
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]


@pytest.mark.timeout(240)
async def test_the_compose_example_delivers_a_signed_message(
    image: str, dovecot: Dovecot, account: Account, tmp_path_factory: pytest.TempPathFactory
) -> None:
    project = compose_project(
        tmp_path_factory.mktemp("compose"),
        "docker-compose.yml",
        "docker-compose.mailroom.yml",
        dovecot,
        account,
    )
    health_port = free_port()
    project.config["health"]["listen"] = f"127.0.0.1:{health_port}"
    path = project.write({"imap-password": account.password, "webhook-signing-secret": WHSEC})
    async with stack(path) as printed:
        await ready(health_port)
        await dovecot.aappend(account, message(1, to="incoming+ticket-7@incoming.example.com"))

        async def arrived() -> bool:
            return "key=ticket-7" in await printed()

        await wait_until(arrived, timeout=60, what="the app printing the message")
        text = await printed()
        assert "subject: test 1" in text and "bad signature" not in text, text
    stored = await dovecot.amessages(account)
    assert [("\\Seen" in m.flags) for m in stored] == [True]


@pytest.fixture(scope="module")
def redis_image(image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Redis from Debian's package on the same base, for the replicas example (which names
    docker.io's redis image; this machine reaches no image registry)."""
    assert BASE is not None
    context = tmp_path_factory.mktemp("redis-image")
    (context / "Containerfile").write_text(
        f"FROM {BASE}\n"
        "RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
        "--no-install-recommends redis-server && rm -rf /var/lib/apt/lists/*\n"
    )
    name = "localhost/mailroom-test-redis:bookworm"
    build = podman("build", "--network", "host", *EXTRA, "-t", name, str(context), timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return name


@pytest.mark.timeout(240)
async def test_the_replicas_compose_example_shares_the_mailboxes_through_redis(
    image: str,
    redis_image: str,
    dovecot: Dovecot,
    account: Account,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """docker-compose.replicas.yml: Redis asks for the password from its secret file, both
    replicas read the same config and the same secrets, and each message is delivered once."""
    project = compose_project(
        tmp_path_factory.mktemp("replicas"),
        "docker-compose.replicas.yml",
        "docker-compose.replicas.mailroom.yml",
        dovecot,
        account,
    )
    redis, redis_port = project.compose["services"]["redis"], free_port()
    redis["image"] = redis_image
    (command,) = [part for part in redis["command"] if "redis-server" in part]
    redis["command"] = [
        part.replace("--save", f"--port {redis_port} --bind 127.0.0.1 --save")
        for part in redis["command"]
    ]
    assert '--requirepass "$$(cat /run/secrets/redis-password)"' in command
    config = project.config
    config["arbitration"]["url"] = f"redis://127.0.0.1:{redis_port}/0"
    config["health"]["listen"] = "127.0.0.1:0"  # two replicas on one network: any free port
    support = config["mailboxes"][1]
    assert support["id"] == "support"
    support["mailbox"] = "Support"  # the same test account, another folder
    await asyncio.to_thread(dovecot.create_mailbox, account, "Support")
    path = project.write(
        {
            "imap-password": account.password,
            "webhook-signing-secret": WHSEC,
            "redis-password": "a-long-random-string-for-the-test",
        }
    )
    async with stack(path) as printed:
        await dovecot.aappend(account, message(1, to="incoming+one@example.com"))
        await dovecot.aappend(account, message(2, to="support+two@example.com"), "Support")

        async def arrived() -> bool:
            text = await printed()
            return "key=one" in text and "key=two" in text

        await wait_until(arrived, timeout=90, what="the app printing both messages")
        text = await printed()
        assert text.count("key=one") == text.count("key=two") == 1, text
        assert "bad signature" not in text
        logs = [
            await asyncio.to_thread(compose, path, "logs", name)
            for name in ("mailroom-1", "mailroom-2")
        ]
        leases = "".join(log.stdout + log.stderr for log in logs)
        assert "NOAUTH" not in leases and "WRONGPASS" not in leases
    for folder in ("INBOX", "Support"):
        stored = await dovecot.amessages(account, folder)
        assert [("\\Seen" in m.flags) for m in stored] == [True], folder
