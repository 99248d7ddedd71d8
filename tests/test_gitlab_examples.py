"""examples/gitlab/: gitlab.yml excerpt, systemd unit and Helm snippet load and agree."""

from __future__ import annotations

import base64
import shlex
from pathlib import Path
from typing import Any

import yaml

from mailroom import cli
from mailroom.config import GraphMailboxConfig, ImapMailboxConfig, parse_config
from mailroom.gitlab import load_gitlab
from mailroom.mail import routing
from tests.helpers import ROOT

EXAMPLES = ROOT / "examples" / "gitlab"
SECRET = base64.b64encode(bytes(32)).decode() + "\n"


def test_the_gitlab_yml_excerpt_with_its_mailroom_yaml(tmp_path: Path) -> None:
    document = yaml.safe_load((EXAMPLES / "gitlab.yml").read_text())
    production = document["production"]
    production["shared"]["path"] = str(tmp_path / "shared")
    for kind in ("incoming_email", "service_desk_email"):
        secret = tmp_path / Path(production[kind]["secret_file"]).name
        secret.write_text(SECRET)
        production[kind]["secret_file"] = str(secret)
    gitlab_yml = tmp_path / "etc" / "gitlab.yml"
    gitlab_yml.parent.mkdir()
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


def test_the_systemd_unit_runs_with_gitlab() -> None:
    service = unit(EXAMPLES / "mailroom-gitlab.service")
    assert service["PartOf"] == ["gitlab.target"] and service["WantedBy"] == ["gitlab.target"]
    assert service["User"] == ["git"] and service["RestartPreventExitStatus"] == ["2"]
    argv = shlex.split(service["ExecStart"][0])
    assert argv[0].endswith("/mailroom")
    args = cli._parser().parse_args(argv[1:])
    assert args.command == "run" and args.gitlab_config.endswith("/config/gitlab.yml")
    assert args.config == "/etc/mailroom/gitlab.yml"


def test_the_helm_snippet_swaps_the_image_and_reads_the_charts_secrets(tmp_path: Path) -> None:
    values = yaml.safe_load((EXAMPLES / "helm-values.yaml").read_text())
    mailroom = values["gitlab"]["mailroom"]
    assert mailroom["image"]["repository"] and mailroom["hpa"]["maxReplicas"] == 2
    (volume,) = yaml.safe_load(mailroom["extraVolumes"])
    (mount,) = yaml.safe_load(mailroom["extraVolumeMounts"])
    configmap = yaml.safe_load((EXAMPLES / "helm-configmap.yaml").read_text())
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert mount["name"] == volume["name"] and mount["mountPath"] == "/etc/mailroom"
    assert 'CMD ["run", "-c", "/etc/mailroom/mailroom.yml"]' in (ROOT / "Dockerfile").read_text()
    # The files the chart mounts (charts/gitlab/templates/_mailroom.tpl and the mailroom chart)
    text = configmap["data"]["mailroom.yml"]
    charts_files = {
        "mailroom/password_incoming_email",
        "mailroom/incoming_email_webhook_secret",
        "redis/redis-password",
    }
    replaced = text
    for name in charts_files:
        assert f"/etc/gitlab/{name}" in text
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(SECRET if "webhook" in name else "password\n")
        replaced = replaced.replace(f"/etc/gitlab/{name}", str(tmp_path / name))
    data: Any = yaml.safe_load(replaced)
    config = parse_config(data, env={})
    (box,) = config.mailboxes
    assert box.webhook.request_content_type == "text/plain"
    assert box.webhook.jwt is not None and box.webhook.jwt.key() == bytes(32)
    assert box.routing.mode is routing.RoutingMode.FORWARD_ALL
    assert config.arbitration.enabled and config.arbitration.namespace == "mail_room:gitlab"
    assert config.health is not None and (config.health.host, config.health.port) == (
        "0.0.0.0",
        8080,
    )
