"""GitLab mode on the files GitLab's installers write, started with the documented commands.

The Linux package's tree is laid out where it lives, ``/opt/gitlab`` and ``/var/opt/gitlab``
(and ``/var/log/gitlab``), in a private mount namespace of the process under test (``unshare
-m``: tmpfs and bind mounts, an overlay of ``/var`` so that nothing of the host changes), and
mailroom is started from ``/``. The Helm chart's ConfigMap is mounted at the path the chart
mounts it, with the chart's secrets under ``/etc/gitlab``. The tests run as root.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml

from tests.helpers import message, wait_until
from tests.servers.dovecot import Account, Dovecot, free_port
from tests.servers.gitlab import GitLabInternalApi
from tests.servers.redis import RedisServer

SECRET = bytes(range(32))
MAILROOM = str(Path(sys.executable).parent / "mailroom")
pytestmark = [
    pytest.mark.slow,  # mailroom as a process in a mount namespace laid out as each install
    pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root"),
]


def namespace_script(mounts: list[tuple[str, Path]], workdir: Path) -> str:
    """Shell lines that lay ``mounts`` (target, source directory) over an overlay of /var and
    /etc and a tmpfs on /opt, in this mount namespace only."""
    lines = ["set -e"]
    for top in ("var", "etc"):
        upper, work = workdir / f"{top}-upper", workdir / f"{top}-work"
        upper.mkdir()
        work.mkdir()
        lines.append(
            f"mount -t overlay overlay -o lowerdir=/{top},upperdir={upper},workdir={work} /{top}"
        )
    lines.append("mount -t tmpfs tmpfs /opt")
    for target, source in mounts:
        lines += [f"mkdir -p {target}", f"mount --bind {source} {target}"]
    return "\n".join(lines)


@asynccontextmanager
async def started(
    mounts: list[tuple[str, Path]], workdir: Path, argv: list[str], env: dict[str, str]
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``argv`` run from / in a mount namespace with ``mounts``; SIGTERM and exit 0 at the end."""
    script = namespace_script(mounts, workdir) + '\ncd /\nexec "$@"'
    process = await asyncio.create_subprocess_exec(
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
        *argv,
        env={"PATH": os.environ["PATH"], **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 60)
        if process.returncode != 0:
            pytest.fail(f"mailroom exited {process.returncode}:\n{output.decode()[-4000:]}")


def linux_package_tree(
    root: Path, dovecot: Dovecot, account: Account, gitlab_url: str, *, with_opt: bool
) -> dict[str, Path]:
    """The Linux package's files for incoming email, as `gitlab-ctl reconfigure` writes them
    (gitlab.yml.erb, resque.yml.erb, the mailroom recipe's links), under ``root``; the
    directories to mount at /opt/gitlab, /var/opt/gitlab, /var/log/gitlab."""
    opt, var, log = root / "opt-gitlab", root / "var-opt-gitlab", root / "var-log-gitlab"
    rails_dir = var / "gitlab-rails"
    for directory in (rails_dir / "etc", rails_dir / "working", var / "redis", log / "mailroom"):
        directory.mkdir(parents=True)
    production = {
        "gitlab": {"host": "gitlab.example.com", "port": 443, "https": True},
        "shared": {"path": "/var/opt/gitlab/gitlab-rails/shared"},
        "incoming_email": {
            "enabled": True,
            "address": "incoming+%{key}@gitlab.example.com",
            "user": account.user,
            "password": account.password,
            "host": dovecot.host,
            "port": dovecot.tls_port,
            "ssl": True,
            "start_tls": False,
            "mailbox": "inbox",
            "idle_timeout": 60,
            "log_path": "/var/log/gitlab/mailroom/mail_room_json.log",
            "delete_after_delivery": True,
            "expunge_deleted": False,
            "delivery_method": "webhook",
            "gitlab_url": gitlab_url,
            "secret_file": ".gitlab_incoming_email_secret",  # relative: gitlab.rb cannot change it
        },
    }
    (rails_dir / "etc" / "gitlab.yml").write_text(yaml.safe_dump({"production": production}))
    resque = {"production": {"url": "unix:/var/opt/gitlab/redis/redis.socket"}}
    (rails_dir / "etc" / "resque.yml").write_text(yaml.safe_dump(resque))
    secret = rails_dir / "etc" / "gitlab_incoming_email_secret"
    secret.write_text(base64.b64encode(SECRET).decode() + "\n")
    rails_root = "/opt/gitlab/embedded/service/gitlab-rails"
    (rails_dir / "working" / ".gitlab_incoming_email_secret").symlink_to(
        f"{rails_root}/.gitlab_incoming_email_secret"
    )
    mounts = {"/var/opt/gitlab": var, "/var/log/gitlab": log}
    if with_opt:  # the Rails root (not there in mailroom's container beside GitLab's)
        source = opt / "embedded" / "service" / "gitlab-rails"
        (source / "config").mkdir(parents=True)
        for name in ("gitlab.yml", "resque.yml"):
            (source / "config" / name).symlink_to(f"/var/opt/gitlab/gitlab-rails/etc/{name}")
        (source / ".gitlab_incoming_email_secret").symlink_to(
            "/var/opt/gitlab/gitlab-rails/etc/gitlab_incoming_email_secret"
        )
        mounts["/opt/gitlab"] = opt
    return mounts


def log_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("layout", ["linux package", "docker image"])
async def test_the_linux_package_with_the_documented_command(
    dovecot: Dovecot, redis_factory: object, tmp_path: Path, layout: str
) -> None:
    """`mailroom run --gitlab-config /var/opt/gitlab/gitlab-rails/etc/gitlab.yml` from /: the
    relative secret_file, the queues Redis on its Unix socket (resque.yml), log_path (and its
    rotation); in GitLab's Docker image's layout, with only /var/opt/gitlab and /var/log/gitlab
    there (mailroom's container beside GitLab's)."""
    account = dovecot.add_user()
    async with GitLabInternalApi({"incoming_email": SECRET}) as api:
        mounts = linux_package_tree(
            tmp_path, dovecot, account, api.url, with_opt=layout == "linux package"
        )
        socket = mounts["/var/opt/gitlab"] / "redis" / "redis.socket"
        assert callable(redis_factory)
        redis: RedisServer = redis_factory(unixsocket=socket)
        client = aioredis.Redis(unix_socket_path=str(socket))
        argv = [MAILROOM, "run", "--gitlab-config", "/var/opt/gitlab/gitlab-rails/etc/gitlab.yml"]
        env = {"SSL_CERT_FILE": str(dovecot.ca_file)}
        log = mounts["/var/log/gitlab"] / "mailroom" / "mail_room_json.log"
        try:
            async with started(list(mounts.items()), tmp_path, argv, env):
                uid = await dovecot.aappend(account, message(1))
                await api.wait_for(1, timeout=30)
                claim = await client.get(f"mail_room:gitlab:delivered:{uid}")
                assert isinstance(claim, bytes)  # claimed through resque.yml's Unix socket
                assert claim.startswith(b"mailroom incoming_email ")
                await wait_until(lambda: log.exists() and b"delivered" in log.read_bytes())
                lines = log_lines(log)
                assert any(line.get("mailbox") == "incoming_email" for line in lines)
                # logrotate: the file is moved away; mailroom writes a new one
                log.rename(log.with_suffix(".log.1"))
                await dovecot.aappend(account, message(2))
                await api.wait_for(2, timeout=30)
                await wait_until(lambda: log.exists() and b"delivered" in log.read_bytes())
        finally:
            await client.aclose()
            del redis
    assert [r.status for r in api.requests] == [200, 200]
    assert all(line["mailbox"] == "incoming_email" for line in log_lines(log) if "mailbox" in line)


async def test_the_linux_package_missing_secret_names_every_path(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    account = dovecot.add_user()
    mounts = linux_package_tree(tmp_path, dovecot, account, "http://127.0.0.1:1", with_opt=True)
    (mounts["/var/opt/gitlab"] / "gitlab-rails" / "etc" / "gitlab_incoming_email_secret").unlink()
    script = namespace_script(list(mounts.items()), tmp_path) + '\ncd /\nexec "$@"'
    argv = [MAILROOM, "run", "--gitlab-config", "/var/opt/gitlab/gitlab-rails/etc/gitlab.yml"]
    process = await asyncio.create_subprocess_exec(
        "unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert (
        "production.incoming_email.secret_file: .gitlab_incoming_email_secret is in none of the "
        "directories GitLab and MailRoom read it from on a Linux package install (tried "
        "/opt/gitlab/embedded/service/gitlab-rails/.gitlab_incoming_email_secret, "
        "/var/opt/gitlab/gitlab-rails/working/.gitlab_incoming_email_secret, "
        "/var/opt/gitlab/gitlab-rails/etc/gitlab_incoming_email_secret)" in err.decode()
    )


CHART = Path(__file__).parent / "gitlab_chart" / "mailroom-configmap.yaml"


async def test_the_helm_charts_configmap_as_the_chart_renders_it(
    dovecot: Dovecot, redis_factory: object, tmp_path: Path
) -> None:
    """The chart's mail_room.yml (its ERB reading the secrets the chart mounts under
    /etc/gitlab, :health_check:, Redis arbitration with the password in the URL) read by
    mailroom's image's default command, where helm-values.yaml mounts it."""
    incoming, desk = dovecot.add_user(), dovecot.add_user()
    password = "p@ss:w/rd%"  # the chart url-encodes it into the Redis URL
    assert callable(redis_factory)
    redis: RedisServer = redis_factory(password=password)
    health = free_port()
    secrets = tmp_path / "etc-gitlab"
    for name, text in {
        "mailroom/password_incoming_email": incoming.password + "\n",
        "mailroom/password_service_desk": desk.password + "\n",
        "mailroom/incoming_email_webhook_secret": base64.b64encode(SECRET).decode() + "\n",
        "mailroom/service_desk_email_webhook_secret": base64.b64encode(SECRET).decode(),
        "redis/redis-password": password + "\n",
    }.items():
        (secrets / name).parent.mkdir(parents=True, exist_ok=True)
        (secrets / name).write_text(text)
    async with GitLabInternalApi({"incoming_email": SECRET, "service_desk_email": SECRET}) as api:
        rendered = yaml.safe_load(CHART.read_text())["data"]["mail_room.yml"]
        for placeholder, value in {
            "INCOMING_USER": incoming.user,
            "SERVICE_DESK_USER": desk.user,
            "IMAP_HOST": dovecot.host,
            "IMAP_PORT": str(dovecot.tls_port),
            "WORKHORSE_URL": api.url,
            "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": str(redis.port),
            ":port: 8080": f":port: {health}",
        }.items():
            rendered = rendered.replace(placeholder, value)
        config_dir = tmp_path / "etc-mailroom"
        config_dir.mkdir()
        (config_dir / "mailroom.yml").write_text(rendered)
        mounts = [("/etc/gitlab", secrets), ("/etc/mailroom", config_dir)]
        argv = [MAILROOM, "run", "-c", "/etc/mailroom/mailroom.yml"]  # the image's CMD
        client = aioredis.Redis(port=redis.port, password=password)
        try:
            async with started(mounts, tmp_path, argv, {"SSL_CERT_FILE": str(dovecot.ca_file)}):
                await dovecot.aappend(incoming, message(1))
                await dovecot.aappend(desk, message(2))
                await api.wait_for(2, timeout=30)
                reader, writer = await asyncio.open_connection("127.0.0.1", health)
                writer.write(b"GET /liveness HTTP/1.0\r\n\r\n")
                answer = await reader.read()
                writer.close()
                assert answer.split(b"\r\n")[0].endswith(b" 200 OK"), answer
                keys = {str(k) for k in await client.keys("mail_room:gitlab:*")}
                assert any("mail_room:gitlab:lease:" in k for k in keys), keys
                assert any("mail_room:gitlab:delivered:" in k for k in keys), keys
        finally:
            await client.aclose()
    assert sorted(r.mailbox_type for r in api.delivered) == ["incoming_email", "service_desk_email"]
