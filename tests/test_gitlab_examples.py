"""examples/gitlab/: gitlab.yml excerpt, systemd unit and Helm snippet load and agree."""

from __future__ import annotations

import base64
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from mailroom import cli
from mailroom.config import GraphMailboxConfig, ImapMailboxConfig
from mailroom.config.sample import SAMPLE
from mailroom.gitlab import load_gitlab
from mailroom.mail import routing
from tests.helpers import ROOT

EXAMPLES = ROOT / "examples" / "gitlab"
SECRET = base64.b64encode(bytes(32)).decode() + "\n"


def test_the_gitlab_yml_excerpt_with_its_mailroom_yaml(tmp_path: Path) -> None:
    document = yaml.safe_load((EXAMPLES / "gitlab.yml").read_text())
    production = document["production"]
    production["shared"]["path"] = str(tmp_path / "shared")
    etc = tmp_path / "gitlab-rails" / "etc"  # the Linux package's layout, without /opt/gitlab
    etc.mkdir(parents=True)
    (etc.parent / "working").mkdir()
    for kind in ("incoming_email", "service_desk_email"):
        assert production[kind]["secret_file"] == f".gitlab_{kind}_secret"
        (etc / f"gitlab_{kind}_secret").write_text(SECRET)  # where the package's links point
    gitlab_yml = etc / "gitlab.yml"
    gitlab_yml.write_text(yaml.safe_dump(document))
    config = load_gitlab(gitlab_yml, mailroom_config=EXAMPLES / "mailroom.yml", env={})
    incoming, desk = config.mailboxes
    assert isinstance(incoming, ImapMailboxConfig) and isinstance(desk, GraphMailboxConfig)
    assert incoming.routing.reply_domain == "gitlab.example.com"
    assert desk.webhook.url == (
        "https://gitlab.example.com/api/v4/internal/mail_room/service_desk_email"
    )
    assert incoming.routing.mode is routing.RoutingMode.FORWARD_ALL
    assert config.health is not None and config.health.port == 8091
    assert config.reject_notices is None
    assert config.warnings == ()


def unit(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a systemd unit (keys may repeat)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_the_linux_packages_systemd_unit() -> None:
    service = unit(EXAMPLES / "mailroom-gitlab.service")
    assert service["After"] == ["network-online.target gitlab-runsvdir.service"]
    assert service["User"] == ["git"] and service["RestartPreventExitStatus"] == ["2"]
    assert service["ReadWritePaths"] == ["/var/log/gitlab/mailroom"]
    argv = shlex.split(service["ExecStart"][0])
    assert argv[0].endswith("/mailroom")
    args = cli._parser().parse_args(argv[1:])
    assert args.command == "run"
    assert args.gitlab_config == "/var/opt/gitlab/gitlab-rails/etc/gitlab.yml"


def test_the_self_compiled_unit_passes_gitlabs_incoming_email_check(tmp_path: Path) -> None:
    """``gitlab-rake gitlab:incoming_email:check`` on a self-compiled GitLab
    (lib/system_check/incoming_email/*.rb): "Mailroom enabled?" wants
    /usr/local/lib/systemd/system/gitlab-mailroom.service wanted by gitlab.target; "MailRoom
    running?" wants ``ps uxww`` of user git to show "mail_room". The unit takes GitLab's unit's
    name and place; its command is the documented link named mail_room, run here as a process
    as ps shows it."""
    service = unit(EXAMPLES / "gitlab-mailroom.service")
    assert service["PartOf"] == ["gitlab.target"] and service["WantedBy"] == ["gitlab.target"]
    assert service["User"] == ["git"] and service["WorkingDirectory"] == ["/home/git/gitlab"]
    text = (EXAMPLES / "gitlab-mailroom.service").read_text()
    assert "install -m 0644 gitlab-mailroom.service /usr/local/lib/systemd/system/" in text
    assert "ln -s mailroom /opt/mailroom/bin/mail_room" in text
    argv = shlex.split(service["ExecStart"][0])
    assert argv[0] == "/opt/mailroom/bin/mail_room"
    args = cli._parser().parse_args(argv[1:])
    assert args.command == "run" and args.gitlab_config == "/home/git/gitlab/config/gitlab.yml"
    # The link, as documented, beside this venv's mailroom; a command that waits (route reads
    # the message from stdin) stands for run.
    link = tmp_path / "mail_room"
    link.symlink_to(Path(sys.executable).parent / "mailroom")
    config = tmp_path / "mailroom.yml"
    config.write_text(SAMPLE)
    process = subprocess.Popen(
        [str(link), "route", "-c", str(config), "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ps = subprocess.run(["ps", "uxww"], capture_output=True, text=True, check=True).stdout
        mine = [line for line in ps.splitlines() if str(process.pid) in line.split()[1:2]]
        assert mine and "mail_room" in mine[0]  # MailRoomRunningCheck: ps_ux.include?("mail_room")
    finally:
        process.communicate(b"", timeout=60)


def test_the_helm_values_mount_the_charts_own_configmap_for_the_images_command() -> None:
    """tests/test_gitlab_installs.py runs the chart's ConfigMap where these values mount it."""
    values = yaml.safe_load((EXAMPLES / "helm-values.yaml").read_text())
    mailroom = values["gitlab"]["mailroom"]
    assert mailroom["image"]["repository"] and mailroom["hpa"]["maxReplicas"] == 2
    (volume,) = yaml.safe_load(mailroom["extraVolumes"])
    (mount,) = yaml.safe_load(mailroom["extraVolumeMounts"])
    chart = yaml.safe_load(
        (ROOT / "tests" / "gitlab_chart" / "mailroom-configmap.yaml").read_text()
    )
    assert volume["configMap"]["name"] == chart["metadata"]["name"]
    assert volume["configMap"]["items"] == [{"key": "mail_room.yml", "path": "mailroom.yml"}]
    assert mount["name"] == volume["name"] and mount["mountPath"] == "/etc/mailroom"
    assert 'CMD ["run", "-c", "/etc/mailroom/mailroom.yml"]' in (ROOT / "Dockerfile").read_text()
