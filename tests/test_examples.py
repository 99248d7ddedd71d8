"""Every example config loads with mailroom's own loader, and the deployment files agree."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailroom import cli
from mailroom.config import (
    Config,
    GoogleOAuthConfig,
    GraphMailboxConfig,
    ImapMailboxConfig,
    parse_config,
)
from mailroom.config.sample import SAMPLE
from tests.helpers import ROOT, WHSEC
from tests.servers import tls

EXAMPLES = ROOT / "examples"
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def example_configs() -> dict[str, str]:
    """name → YAML text of every mailroom config among the examples."""
    found = {}
    for path in sorted(EXAMPLES.glob("*.yml")):
        text = path.read_text()
        if isinstance(data := yaml.safe_load(text), dict) and "mailboxes" in data:
            found[path.name] = text
    configmap = yaml.safe_load((EXAMPLES / "kubernetes" / "configmap.yaml").read_text())
    found["kubernetes/configmap.yaml"] = configmap["data"]["mailroom.yml"]
    replicas = yaml.safe_load_all((EXAMPLES / "kubernetes" / "replicas.yaml").read_text())
    found["kubernetes/replicas.yaml"] = next(d for d in replicas if d["kind"] == "ConfigMap")[
        "data"
    ]["mailroom.yml"]
    return found


CONFIGS = example_configs()


def environment(tmp_path: Path) -> dict[str, str]:
    """Values for the ${...} the examples use."""
    return {
        "AZURE_TENANT_ID": "contoso.onmicrosoft.com",
        "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000000",
        "DEMO_IMAP_PORT": "993",
        "DEMO_CA_FILE": str(tls.ca_file()),
        "DEMO_IMAP_USER": "demo",
        "DEMO_IMAP_PASSWORD": "demo-password",
        "DEMO_WEBHOOK_URL": "http://127.0.0.1:8025/",
        "DEMO_WEBHOOK_SECRET": WHSEC,
        "DEMO_SMTP_PORT": "8026",
    }


def with_secret_files(node: Any, directory: Path) -> Any:
    """The config with each absolute ``*_file`` path (a Docker/Kubernetes/systemd secret or a CA
    bundle) replaced by a file in ``directory`` holding a value of the right kind."""
    if isinstance(node, list):
        return [with_secret_files(item, directory) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if isinstance(key, str) and key.endswith("_file") and isinstance(value, str):
            if value.startswith("${"):  # the environment gives the path
                out[key] = value
                continue
            assert value.startswith("/"), f"{key}: {value} should be an absolute path"
            file = directory / value.strip("/").replace("/", "_")
            if key == "ca_file":
                file.write_bytes(tls.ca_file().read_bytes())
            else:
                # 32 bytes and more: a JWT key (RFC 7518 §3.2) gets no load warning.
                secret = WHSEC if key == "signing_secret_file" else f"secret for {key:<21}"
                file.write_text(secret + "\n")
            out[key] = str(file)
        else:
            out[key] = with_secret_files(value, directory)
    return out


def env_used(node: Any) -> set[str]:
    """The ${...} names in the values (comments may show others)."""
    if isinstance(node, dict):
        return set().union(*(env_used(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(env_used(v) for v in node))
    return set(_ENV_RE.findall(node)) if isinstance(node, str) else set()


def load(name: str, tmp_path: Path) -> Config:
    env = environment(tmp_path)
    data = yaml.safe_load(CONFIGS[name])
    missing = env_used(data) - set(env)
    assert not missing, f"{name} uses ${{...}} that this test does not provide: {missing}"
    data = with_secret_files(data, tmp_path)
    return parse_config(data, env=env, base_dir=tmp_path)


def test_the_examples_are_found() -> None:
    assert {
        "mailroom.yml",
        "docker-compose.mailroom.yml",
        "demo.yml",
        "kubernetes/configmap.yaml",
        "docker-compose.replicas.mailroom.yml",
        "kubernetes/replicas.yaml",
    } <= set(CONFIGS)


def test_the_replica_examples_share_through_redis() -> None:
    compose = yaml.safe_load((EXAMPLES / "docker-compose.replicas.yml").read_text())
    replicas = [name for name in compose["services"] if name.startswith("mailroom-")]
    assert len(replicas) == 2 and "redis" in compose["services"]
    for name in replicas:
        volumes = compose["services"][name]["volumes"]
        assert "./docker-compose.replicas.mailroom.yml:/etc/mailroom/mailroom.yml:ro" in volumes
    k8s = list(yaml.safe_load_all((EXAMPLES / "kubernetes" / "replicas.yaml").read_text()))
    deployment = next(d for d in k8s if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    for name in ("docker-compose.replicas.mailroom.yml", "kubernetes/replicas.yaml"):
        assert yaml.safe_load(CONFIGS[name])["arbitration"]["method"] == "redis"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_example_config_loads(name: str, tmp_path: Path) -> None:
    config = load(name, tmp_path)
    assert config.mailboxes
    assert config.warnings == ()


def test_the_commented_example_shows_every_option(tmp_path: Path) -> None:
    config = load("mailroom.yml", tmp_path)
    imap, graph, xoauth2, gmail = config.mailboxes
    assert isinstance(imap, ImapMailboxConfig) and imap.id == "incoming"
    assert isinstance(graph, GraphMailboxConfig) and graph.inbox_options.poll_interval_s == 60
    assert isinstance(xoauth2, ImapMailboxConfig) and xoauth2.auth == "xoauth2"
    assert isinstance(gmail, ImapMailboxConfig) and isinstance(gmail.oauth, GoogleOAuthConfig)
    assert imap.webhook.url == "https://app.internal/api/service_desk_email"
    assert config.webhook.jwt is not None and config.reject_notices is not None
    assert config.health is not None and (config.health.host, config.health.port) == (
        "127.0.0.1",
        8080,
    )
    # Every key the loader reads is shown (set or in a comment), so a new option cannot be
    # added without documenting it here.
    source = "".join(p.read_text() for p in (ROOT / "mailroom" / "config").glob("*.py"))
    getters = r"\.(?:text|number|flag|secret|choice|raw|section|path_value)\(\s*\"([a-z_]+)\""
    keys = set(re.findall(getters, source))
    assert len(keys) > 40
    text = CONFIGS["mailroom.yml"]
    undocumented = {k for k in keys if not re.search(rf"\b{k}(_file)?:", text)}
    assert undocumented == set()


def test_the_deployment_files_agree_with_the_configs() -> None:
    compose = yaml.safe_load((EXAMPLES / "docker-compose.yml").read_text())
    volumes = compose["services"]["mailroom"]["volumes"]
    assert "./docker-compose.mailroom.yml:/etc/mailroom/mailroom.yml:ro" in volumes
    compose_secrets = set(compose["secrets"])
    used = re.findall(r"/run/secrets/([a-z-]+)", CONFIGS["docker-compose.mailroom.yml"])
    assert set(used) <= compose_secrets

    k8s = yaml.safe_load((EXAMPLES / "kubernetes" / "deployment.yaml").read_text())
    pod = k8s["spec"]["template"]["spec"]
    (mailroom,) = (c for c in pod["containers"] if c["name"] == "mailroom")
    assert mailroom["args"] == ["run", "-c", "/etc/mailroom/mailroom.yml"]
    assert mailroom["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert mailroom["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert mailroom["securityContext"]["readOnlyRootFilesystem"] is True
    assert mailroom["securityContext"]["runAsNonRoot"] is True
    assert mailroom["resources"]["requests"]
    secret = yaml.safe_load((EXAMPLES / "kubernetes" / "secret.yaml").read_text())
    used = re.findall(r"/run/secrets/mailroom/([a-z-]+)", CONFIGS["kubernetes/configmap.yaml"])
    assert set(used) == set(secret["stringData"])
    env = {e["name"] for e in mailroom["env"]}
    assert env_used(yaml.safe_load(CONFIGS["kubernetes/configmap.yaml"])) <= env

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["run", "-c", "/etc/mailroom/mailroom.yml"]' in dockerfile
    assert re.search(r"^STOPSIGNAL SIGTERM$", dockerfile, re.M)
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    assert mailroom["securityContext"]["runAsUser"] == 10001


# -- the first hour (issue 14): the minimal config, the CLI's pointers, honest examples ---------


def test_the_readme_first_config_is_the_sample_config_and_loads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    guide = (ROOT / "docs" / "getting-started.md").read_text()
    block = guide.split("## First config", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert block == SAMPLE
    assert len(SAMPLE.splitlines()) <= 16
    config = parse_config(yaml.safe_load(SAMPLE), env={"IMAP_PASSWORD": "pw"})
    (box,) = config.mailboxes
    assert isinstance(box, ImapMailboxConfig) and not box.delete_after_delivery
    assert config.warnings == ()
    assert cli.main(["sample-config"]) == 0
    assert capsys.readouterr().out == SAMPLE


@pytest.mark.parametrize("command", [[], ["run"], ["check"]])
def test_without_a_config_the_cli_says_how_to_get_one(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(command) == 2
    assert capsys.readouterr().err == (
        "mailroom: -c FILE is required: the YAML config file; "
        "`mailroom sample-config > mailroom.yml` writes a minimal one to start from "
        "(or --gitlab-config gitlab.yml, or --mail-room-config mail_room.yml)\n"
    )


def test_the_commented_example_marks_every_value_that_is_not_the_default(tmp_path: Path) -> None:
    imap = load("mailroom.yml", tmp_path).mailboxes[0]
    box = {"address": "a+%{key}@example.com", "host": "h", "user": "u", "password": "p"}
    default = parse_config({"mailboxes": [box], "webhook": {"url": "https://a/x"}}, env={})
    plain = default.mailboxes[0]
    text = CONFIGS["mailroom.yml"].split("  - id: graph", 1)[0]  # the IMAP mailbox
    fields = {"idle_timeout": "idle_timeout_s"}
    for key in [
        "ssl",
        "start_tls",
        "tls_verify",
        "auth",
        "mailbox",
        "idle_timeout",
        "search_command",
        "delete_after_delivery",
        "expunge_deleted",
        "failed_folder",
        "max_message_bytes",
    ]:
        (line,) = re.findall(rf"^    {key}:.*$", text, re.M)
        name = fields.get(key, key)
        if getattr(imap, name) != getattr(plain, name):
            assert "default: " in line, f"{line!r} shows a value that is not the default"
    assert "with its default" not in CONFIGS["mailroom.yml"]


def test_the_examples_install_from_a_clone_and_link_only_files_that_exist() -> None:
    service = (EXAMPLES / "mailroom.service").read_text()
    assert "pip install mailroom-incoming" not in service
    # The lock file, as CI installs (docs/getting-started.md says the same).
    assert "/opt/mailroom/bin/pip install -c constraints.txt ." in service
    guide = (ROOT / "docs" / "getting-started.md").read_text()
    assert "pip install -c constraints.txt ." in guide
    assert "pip install .`" not in guide and "pip install . " not in guide
    # No placeholder URL: the documentation the header installs.
    (documentation,) = re.findall(r"^Documentation=(.*)$", service, re.M)
    assert documentation == "file:/usr/local/share/doc/mailroom/operations.md"
    assert "cp -r docs/. /usr/local/share/doc/mailroom/" in service
    assert "github.com/mailroom" not in service
    texts = [p.read_text() for p in (*EXAMPLES.rglob("*.y*ml"), *(ROOT / "mailroom").rglob("*.py"))]
    assert not any("ARCHITECTURE.md" in text for text in texts)
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    docs = [page.read_text() for page in pages]
    assert not any("ARCHITECTURE.md" in text for text in docs)


def test_every_repository_file_the_docs_name_exists() -> None:
    """The site is built from docs/ alone, so repository files are named, not linked: each
    one named must exist."""
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    path = re.compile(r"`((?:examples|bench|tests|mailroom|docker)/[^`\s*]+)`")
    named = {match for page in pages for match in path.findall(page.read_text())}
    assert len(named) > 20
    missing = sorted(n for n in named if not (ROOT / n.rstrip("/")).exists())
    assert not missing, missing
