"""GitLab mode's reading of gitlab.yml, secrets.yml and encrypted settings (files written by
Debian's ruby-activesupport the way GitLab writes them), and GitLab's queues Redis."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mailroom import cli
from mailroom.config import Config, ConfigError, GraphMailboxConfig, ImapMailboxConfig
from mailroom.gitlab import encrypted, find_queues_redis, load_gitlab
from mailroom.gitlab.marshal import MarshalError, load_string
from mailroom.gitlab.redis import parse_entry
from mailroom.mail import routing

FIXTURES = Path(__file__).parent / "gitlab_yml"
SECRET = base64.b64encode(bytes(range(32))).decode()
KEY_BASE = "4d1b0f8d8a2c" * 11  # GitLab writes 128 hex digits; any string of 16+ works
PASSWORD = "enc-password-not-for-output"

# Exactly what Gitlab::EncryptedConfiguration#write does (lib/gitlab/encrypted_configuration.rb)
ENCRYPT_RB = """
require "active_support"
require "active_support/key_generator"
require "active_support/message_encryptor"
key = ActiveSupport::KeyGenerator.new(ENV.fetch("BASE_KEY"))
  .generate_key("GitLabEncryptedConfigSalt", ActiveSupport::MessageEncryptor.key_len("aes-256-gcm"))
contents = STDIN.binmode.read.force_encoding(ENV.fetch("ENCODING"))
encryptor = ActiveSupport::MessageEncryptor.new(key, cipher: "aes-256-gcm")
File.binwrite(ENV.fetch("OUT"), encryptor.encrypt_and_sign(contents))
"""


def ruby_encrypt(out: Path, contents: str, base_key: str, encoding: str = "UTF-8") -> None:
    """``out`` as ``gitlab-rake gitlab:incoming_email:secret:write`` writes it."""
    if shutil.which("ruby") is None:
        pytest.fail("ruby-activesupport is missing: run `make test` (it installs it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BASE_KEY": base_key, "OUT": str(out), "ENCODING": encoding}
    subprocess.run(
        ["ruby", "-e", ENCRYPT_RB], input=contents.encode(), env=env, check=True, timeout=60
    )


def rails_root(tmp_path: Path, fixture: str | dict[str, Any], **files: str) -> Path:
    """A GitLab Rails root: config/gitlab.yml (a fixture or a document), the secret files."""
    root = tmp_path / "gitlab"
    (root / "config").mkdir(parents=True)
    gitlab_yml = root / "config" / "gitlab.yml"
    if isinstance(fixture, str):
        shutil.copy(FIXTURES / fixture, gitlab_yml)
    else:
        gitlab_yml.write_text(yaml.safe_dump(fixture))
    for name in (".gitlab_incoming_email_secret", ".gitlab-mailroom-secret"):
        (root / name).write_text(SECRET + "\n")
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return gitlab_yml


def load(gitlab_yml: Path, **env: str) -> Config:
    return load_gitlab(gitlab_yml, env=env)


def first(config: Config) -> ImapMailboxConfig:
    """The first mailbox, an IMAP one in these files."""
    mailbox = config.mailboxes[0]
    assert isinstance(mailbox, ImapMailboxConfig)
    return mailbox


def section(**changes: Any) -> dict[str, Any]:
    incoming = {
        "enabled": True,
        "address": "incoming+%{key}@gitlab.example.com",
        "user": "incoming",
        "password": "[REDACTED]",
        "host": "gitlab.example.com",
        "delivery_method": "webhook",
        "gitlab_url": "http://127.0.0.1:8080/",
        "secret_file": ".gitlab_incoming_email_secret",
    }
    incoming.update(changes)
    return {"production": {"gitlab": {"host": "gitlab.example.com"}, "incoming_email": incoming}}


def error(gitlab_yml: Path, **env: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(gitlab_yml, **env)
    text = str(info.value)
    for secret in (SECRET, PASSWORD, KEY_BASE, "[REDACTED]"):
        assert secret not in text
    return text


def test_imap_with_sub_addressing_from_gitlabs_docs(tmp_path: Path) -> None:
    config = load(rails_root(tmp_path, "imap_sub_addressing.yml"))
    (box,) = config.mailboxes
    assert isinstance(box, ImapMailboxConfig)
    assert (box.id, box.host, box.port, box.ssl, box.start_tls) == (
        "incoming_email",
        "imap.gmail.com",
        993,
        True,
        False,
    )
    assert (box.user, box.mailbox, box.idle_timeout_s) == ("gitlab-incoming@gmail.com", "inbox", 60)
    assert box.password is not None and box.password.reveal() == "[REDACTED]"
    assert box.expunge_deleted and box.delete_after_delivery  # GitLab's default: delete
    assert box.routing.address.template == "gitlab-incoming+%{key}@gmail.com"
    assert box.routing.reply_domain == "gitlab.example.com"  # reply-<key>@<gitlab.host>
    assert box.routing.mode is routing.RoutingMode.FORWARD_ALL
    assert box.routing.forward_auto_generated
    hook = box.webhook
    assert hook.url == "https://gitlab.example.com/api/v4/internal/mail_room/incoming_email"
    assert (hook.format, hook.request_content_type) == ("raw", "text/plain")
    assert hook.jwt is not None and hook.jwt.key() == bytes(range(32))
    assert (hook.jwt.header, hook.jwt.issuer) == ("Gitlab-Mailroom-Api-Request", "gitlab-mailroom")
    assert hook.jwt.secret_file == str(tmp_path / "gitlab" / ".gitlab_incoming_email_secret")
    assert config.reject_notices is None and config.health is None
    assert config.warnings == ()


def test_microsoft_graph_from_gitlabs_docs(tmp_path: Path) -> None:
    (box,) = load(rails_root(tmp_path, "microsoft_graph.yml")).mailboxes
    assert isinstance(box, GraphMailboxConfig)
    options = box.inbox_options
    assert (options.tenant_id, options.client_id) == ("YOUR-TENANT-ID", "YOUR-CLIENT-ID")
    assert options.client_secret is not None
    assert options.client_secret.reveal() == "YOUR-CLIENT-SECRET"
    assert options.poll_interval_s == 60
    assert (box.user, box.mailbox) == ("incoming@example.onmicrosoft.com", "inbox")
    assert box.delete_after_delivery  # GitLab's default, for Graph too


def test_service_desk_from_gitlabs_docs(tmp_path: Path) -> None:
    config = load(rails_root(tmp_path, "service_desk.yml"))
    incoming, desk = config.mailboxes
    assert (incoming.id, desk.id) == ("incoming_email", "service_desk_email")
    assert desk.webhook.url.endswith("/api/v4/internal/mail_room/service_desk_email")
    assert desk.webhook.jwt is not None
    assert desk.webhook.jwt.secret_file == str(tmp_path / "gitlab" / ".gitlab-mailroom-secret")
    assert isinstance(desk, GraphMailboxConfig)
    assert desk.inbox_options.graph_endpoint == "https://graph.microsoft.us"
    assert desk.inbox_options.client_secret is not None
    assert desk.inbox_options.client_secret.reveal() == "client-secret-of-the-app"
    assert desk.routing.address.template == "project_contact+%{key}@example.onmicrosoft.com"


def test_gitlabs_defaults_and_what_is_on(tmp_path: Path) -> None:
    document = section()
    document["production"]["service_desk_email"] = {"enabled": True, "address": ""}
    config = load(rails_root(tmp_path, document))
    (box,) = config.mailboxes  # service_desk_email: no address, so off
    assert isinstance(box, ImapMailboxConfig)
    assert (box.port, box.ssl, box.start_tls, box.mailbox) == (143, False, False, "inbox")
    assert (box.idle_timeout_s, box.expunge_deleted, box.delete_after_delivery) == (60, False, True)
    assert box.webhook.url == "http://127.0.0.1:8080/api/v4/internal/mail_room/incoming_email"
    (warning,) = config.warnings
    assert warning.startswith(f"{tmp_path / 'gitlab/config/gitlab.yml'}: production.incoming_email")
    assert "clear text" in warning


def test_rails_env_picks_the_section(tmp_path: Path) -> None:
    document = section()
    document["staging"] = document["production"]["incoming_email"] | {"user": "staging"}
    document["staging"] = {"incoming_email": document["staging"]}
    gitlab_yml = rails_root(tmp_path, document)
    assert first(load(gitlab_yml, RAILS_ENV="staging")).user == "staging"
    assert "has no development: section (RAILS_ENV=development)" in error(
        gitlab_yml, RAILS_ENV="development"
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"enabled": False}, "neither production.incoming_email nor production.service_desk"),
        ({"delivery_method": "que"}, "incoming_email.delivery_method: 'que' is not webhook or"),
        ({"gitlab_url": None}, "gitlab_url: is required with delivery_method: webhook"),
        ({"secret_file": None}, "secret_file: is required with delivery_method: webhook"),
        ({"port": 993}, "production.incoming_email.port: 993 with ssl: false; set ssl: true"),
        ({"address": "incoming@%{key}.example.com"}, "incoming_email.address: 'incoming@%"),
        ({"host": "${IMAP_HOST}"}, "incoming_email.host: contains ${...}"),
        ({"password": 1234}, "incoming_email.password: expected a string; put the value in"),
        ({"inbox_method": "pop3"}, "incoming_email.inbox_method: is not imap or microsoft"),
    ],
)
def test_bad_gitlab_yml_is_a_config_error_naming_the_file(
    tmp_path: Path, changes: dict[str, Any], expected: str
) -> None:
    gitlab_yml = rails_root(tmp_path, section(**changes))
    text = error(gitlab_yml)
    assert text.startswith(str(gitlab_yml)), text
    assert expected in text


def test_the_gitlab_url_hint_is_gitlabs_own_url(tmp_path: Path) -> None:
    document = section(gitlab_url=None)
    document["production"]["gitlab"] = {"host": "git.example.org", "https": True, "port": 8443}
    assert "here, https://git.example.org:8443; gitlab.rb" in error(rails_root(tmp_path, document))


def test_secret_file_problems_name_the_file_never_the_secret(tmp_path: Path) -> None:
    gitlab_yml = rails_root(tmp_path, section())
    secret = tmp_path / "gitlab" / ".gitlab_incoming_email_secret"
    secret.write_text("not base64 at all, a plain secret\n")
    text = error(gitlab_yml)
    assert f"production.incoming_email.secret_file: {secret} is not base64 text" in text
    assert "plain secret" not in text
    secret.unlink()
    text = error(gitlab_yml)
    assert (
        f"{gitlab_yml}: production.incoming_email.secret_file: .gitlab_incoming_email_secret "
        "is in none of the directories GitLab and MailRoom read it from on a self-compiled "
        f"install (tried {secret})" in text
    )


def test_both_types_problems_are_told_with_gitlabs_keys(tmp_path: Path) -> None:
    document = section(secret_file="/nonexistent/incoming")
    desk = {**document["production"]["incoming_email"], "secret_file": ".missing_desk_secret"}
    document["production"]["service_desk_email"] = desk
    gitlab_yml = rails_root(tmp_path, document)
    text = error(gitlab_yml)
    assert text.startswith("2 settings cannot be read; fix them all:")
    assert (
        f"\n  {gitlab_yml}: production.incoming_email.secret_file: /nonexistent/incoming does "
        "not exist" in text
    )
    assert f"\n  {gitlab_yml}: production.service_desk_email.secret_file: .missing_desk" in text
    assert "mailboxes[" not in text and "webhook.jwt" not in text


def test_the_linux_package_layout_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Linux package's files (its cookbook's links), gitlab.yml named by its real path or
    through the Rails root's link: a relative secret_file is found in the Rails root, in
    MailRoom's working directory, or (only /var/opt/gitlab there) as the file the links name."""
    rails_dir = tmp_path / "var" / "gitlab-rails"
    (rails_dir / "etc").mkdir(parents=True)
    (rails_dir / "working").mkdir()
    gitlab_yml = rails_dir / "etc" / "gitlab.yml"
    gitlab_yml.write_text(yaml.safe_dump(section()))
    secret = rails_dir / "etc" / "gitlab_incoming_email_secret"
    secret.write_text(SECRET + "\n")
    monkeypatch.chdir("/")
    (box,) = load(gitlab_yml).mailboxes
    assert box.webhook.jwt is not None and box.webhook.jwt.secret_file == str(secret)
    root = tmp_path / "opt" / "gitlab-rails"
    (root / "config").mkdir(parents=True)
    (root / "config" / "gitlab.yml").symlink_to(gitlab_yml)
    (root / ".gitlab_incoming_email_secret").symlink_to(secret)
    (rails_dir / "working" / ".gitlab_incoming_email_secret").write_text(SECRET + "\n")
    (box,) = load(root / "config" / "gitlab.yml").mailboxes
    assert box.webhook.jwt is not None
    assert box.webhook.jwt.secret_file == str(root / ".gitlab_incoming_email_secret")
    (root / ".gitlab_incoming_email_secret").unlink()
    (box,) = load(root / "config" / "gitlab.yml").mailboxes
    assert box.webhook.jwt is not None
    working = rails_dir / "working" / ".gitlab_incoming_email_secret"
    assert box.webhook.jwt.secret_file == str(working)
    secret.unlink()
    working.unlink()
    text = error(gitlab_yml)
    tried = [
        "/opt/gitlab/embedded/service/gitlab-rails/.gitlab_incoming_email_secret",
        str(rails_dir / "working" / ".gitlab_incoming_email_secret"),
        str(secret),
    ]
    assert f"on a Linux package install (tried {', '.join(tried)})" in text


def test_a_password_is_taken_literally(tmp_path: Path) -> None:
    (box,) = load(rails_root(tmp_path, section(password="pa${HOME}ss"))).mailboxes
    assert isinstance(box, ImapMailboxConfig) and box.password is not None
    assert box.password.reveal() == "pa${HOME}ss"


def test_unknown_keys_warn_and_mailrooms_log_path_is_ignored(tmp_path: Path) -> None:
    gitlab_yml = rails_root(
        tmp_path, section(log_path="log/x.log", idle_timout=30, ssl=True, port=993)
    )
    config = load(gitlab_yml, RAILS_ENV="production")
    assert config.warnings == (
        f"{gitlab_yml}: production.incoming_email.idle_timout: not a setting GitLab's MailRoom "
        "reads; ignored",
    )
    # A key of another type, or one a password ended up in ({password hunter2}): not sorted
    # together, and never shown.
    document = section(**{"password hunter2": None}, ssl=True, port=993)
    document["production"]["incoming_email"][7] = "x"
    config = load(rails_root(tmp_path / "b", document))
    assert [w.partition(": ")[2] for w in config.warnings] == [
        "production.incoming_email.<a key of 16 characters>: not a setting GitLab's MailRoom "
        "reads; ignored",
        "production.incoming_email.<a key of type int>: not a setting GitLab's MailRoom "
        "reads; ignored",
    ]


def secrets_yml(**production: Any) -> str:
    return yaml.safe_dump({"production": production, "shared": {}})


def test_encrypted_credentials_written_by_activesupport(tmp_path: Path) -> None:
    gitlab_yml = rails_root(
        tmp_path,
        section(user=None, password=None),
        **{"config/secrets.yml": secrets_yml(encrypted_settings_key_base=KEY_BASE)},
    )
    enc = tmp_path / "gitlab/shared/encrypted_settings/incoming_email.yaml.enc"
    ruby_encrypt(enc, f"user: enc-user\npassword: '{PASSWORD}'\n", KEY_BASE)
    (box,) = load(gitlab_yml).mailboxes
    assert isinstance(box, ImapMailboxConfig) and box.password is not None
    assert (box.user, box.password.reveal()) == ("enc-user", PASSWORD)
    assert PASSWORD not in repr(box)


@pytest.mark.parametrize("encoding", ["UTF-8", "US-ASCII", "ASCII-8BIT", "ISO-8859-1"])
def test_every_string_encoding_ruby_may_marshal(tmp_path: Path, encoding: str) -> None:
    enc = tmp_path / "settings.yaml.enc"
    ruby_encrypt(enc, ":user: u\n:password: p\n", KEY_BASE, encoding)
    assert encrypted.read_settings(enc, [KEY_BASE]) == {"user": "u", "password": "p"}


def test_encrypted_file_paths_as_gitlab_finds_them(tmp_path: Path) -> None:
    secrets = {"config/secrets.yml": secrets_yml(encrypted_settings_key_base=KEY_BASE)}
    document = section()
    document["production"]["shared"] = {"path": "/nonexistent/shared"}
    document["production"]["encrypted_settings"] = {"path": str(tmp_path / "enc")}
    gitlab_yml = rails_root(tmp_path, document, **secrets)
    ruby_encrypt(tmp_path / "enc/incoming_email.yaml.enc", "user: from-enc\n", KEY_BASE)
    assert first(load(gitlab_yml)).user == "from-enc"
    named = tmp_path / "elsewhere.enc"
    document["production"]["incoming_email"]["encrypted_secret_file"] = str(named)
    gitlab_yml.write_text(yaml.safe_dump(document))
    ruby_encrypt(named, "password: from-named-file\n", KEY_BASE)
    (box,) = load(gitlab_yml).mailboxes
    assert isinstance(box, ImapMailboxConfig) and box.password is not None
    assert (box.user, box.password.reveal()) == ("incoming", "from-named-file")


def test_rotated_keys_and_a_secrets_file_named_by_the_environment(tmp_path: Path) -> None:
    old = "an-old-key-base-" * 4
    elsewhere = tmp_path / "secrets-elsewhere.yml"
    elsewhere.write_text(
        secrets_yml(encrypted_settings_key_base=KEY_BASE, rotated_encrypted_settings_key_base=[old])
    )
    gitlab_yml = rails_root(tmp_path, section())
    ruby_encrypt(
        tmp_path / "gitlab/shared/encrypted_settings/incoming_email.yaml.enc", "user: r\n", old
    )
    config = load(gitlab_yml, MAIL_ROOM_GITLAB_SECRETS_FILE=str(elsewhere))
    assert first(config).user == "r"


def test_a_wrong_key_base_is_a_config_error_without_the_key(tmp_path: Path) -> None:
    gitlab_yml = rails_root(
        tmp_path,
        section(),
        **{"config/secrets.yml": secrets_yml(encrypted_settings_key_base=KEY_BASE)},
    )
    enc = tmp_path / "gitlab/shared/encrypted_settings/incoming_email.yaml.enc"
    ruby_encrypt(enc, f"password: {PASSWORD}\n", "some-other-key-base-of-gitlab")
    text = error(gitlab_yml)
    assert text.startswith(f"{tmp_path / 'gitlab/config/secrets.yml'}: encrypted_settings_key_base")
    assert f"{enc} does not decrypt with encrypted_settings_key_base" in text


def test_no_key_base_means_gitlab_reads_no_encrypted_file(tmp_path: Path) -> None:
    gitlab_yml = rails_root(tmp_path, section())
    enc = tmp_path / "gitlab/shared/encrypted_settings/incoming_email.yaml.enc"
    ruby_encrypt(enc, "user: never-read\n", KEY_BASE)
    config = load(gitlab_yml)
    assert first(config).user == "incoming"
    (warning,) = [w for w in config.warnings if "encrypted_settings_key_base" in w]
    assert warning.startswith(f"{enc}: not read, as GitLab would not read it")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"garbage", "is not an encrypted settings file as GitLab writes it"),
        (b"YQ==--YQ==--YQ==", "is not an encrypted settings file as GitLab writes it"),
    ],
)
def test_damaged_encrypted_files(tmp_path: Path, content: bytes, expected: str) -> None:
    gitlab_yml = rails_root(
        tmp_path,
        section(),
        **{"config/secrets.yml": secrets_yml(encrypted_settings_key_base=KEY_BASE)},
    )
    enc = tmp_path / "gitlab/shared/encrypted_settings/incoming_email.yaml.enc"
    enc.parent.mkdir(parents=True)
    enc.write_bytes(content)
    assert expected in error(gitlab_yml)


def test_values_yaml_cannot_construct_are_refused_without_them(tmp_path: Path) -> None:
    # PyYAML's constructors quote what they refuse (int('...') in a ValueError): never shown.
    enc = tmp_path / "gitlab/shared/encrypted_settings/incoming_email.yaml.enc"
    ruby_encrypt(enc, f"password: !!int {PASSWORD}\n", KEY_BASE)
    secrets = {"config/secrets.yml": secrets_yml(encrypted_settings_key_base=KEY_BASE)}
    gitlab_yml = rails_root(tmp_path, section(), **secrets)
    assert f"{enc} decrypts, but is not valid YAML" in error(gitlab_yml)
    tagged = f"production:\n  encrypted_settings_key_base: !!float {KEY_BASE}\n"
    (gitlab_yml.parent / "secrets.yml").write_text(tagged)
    assert error(gitlab_yml).endswith("secrets.yml: is not valid YAML; fix its syntax")
    resque = "production:\n  url: redis://x\n  password: !!int hunter2\n"
    (tmp_path / "resque.yml").write_text(resque)
    with pytest.raises(ValueError, match=r"resque\.yml is not valid YAML") as raised:
        find_queues_redis(tmp_path, env={})
    assert "hunter2" not in str(raised.value)


def test_a_short_key_base_is_refused_as_gitlab_does(tmp_path: Path) -> None:
    gitlab_yml = rails_root(
        tmp_path,
        section(),
        **{"config/secrets.yml": secrets_yml(encrypted_settings_key_base="short")},
    )
    ruby_encrypt(
        tmp_path / "gitlab/shared/encrypted_settings/incoming_email.yaml.enc", "x: 1\n", KEY_BASE
    )
    assert "shorter than 16 characters" in error(gitlab_yml)


def test_cli_exit_2_names_the_file_for_each_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_production = tmp_path / "a" / "config" / "gitlab.yml"
    no_production.parent.mkdir(parents=True)
    no_production.write_text(yaml.safe_dump({"development": section()["production"]}))
    assert cli.main(["run", "--gitlab-config", str(no_production)]) == 2
    assert f"mailroom: config error: {no_production}: has no production: section" in (
        capsys.readouterr().err
    )
    missing_secret = rails_root(tmp_path / "b", section(secret_file="missing"))
    assert cli.main(["check", "--gitlab-config", str(missing_secret)]) == 2
    out = capsys.readouterr().out
    assert f"{missing_secret}: production.incoming_email.secret_file: missing is in none" in out
    assert cli.main(["check", "--gitlab-config", str(missing_secret), "--send-test"]) == 2
    assert "would take for an email" in capsys.readouterr().err
    assert cli.main(["run", "--gitlab-config", "x", "--mail-room-config", "y"]) == 2


def test_the_environment_names_gitlab_yml_as_for_gitlabs_mailroom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gitlab_yml = rails_root(tmp_path, section(delivery_method="que"))
    monkeypatch.setenv("MAIL_ROOM_GITLAB_CONFIG_FILE", str(gitlab_yml))
    assert cli.main([]) == 2
    assert "delivery_method: 'que' is not webhook or sidekiq" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logging")
def test_a_log_path_that_cannot_be_opened_names_gitlabs_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GitLab's default log_path is log/mail_room_json.log in the Rails root."""
    gitlab_yml = rails_root(tmp_path, section())
    assert cli.main(["run", "--gitlab-config", str(gitlab_yml)]) == 2
    log = tmp_path / "gitlab" / "log" / "mail_room_json.log"
    assert (
        f"mailroom: config error: {gitlab_yml}: production.incoming_email.log_path: cannot open "
        f"{log} to log to: No such file or directory" in capsys.readouterr().err
    )


def test_the_mailroom_yaml_adds_what_gitlab_yml_cannot_say(tmp_path: Path) -> None:
    gitlab_yml = rails_root(tmp_path, "imap_sub_addressing.yml")
    overlay = tmp_path / "mailroom.yml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "health": {"listen": "127.0.0.1:9090"},
                "log": {"format": "text"},
                "webhook": {"timeout": 5, "retry": {"initial": 2, "max": 60}},
                "mailboxes": {"incoming_email": {"failed_folder": "Failed"}},
                "routing": {"mode": "forward_all"},
            }
        )
    )
    config = load_gitlab(gitlab_yml, mailroom_config=overlay, env={})
    box = first(config)
    assert len(config.mailboxes) == 1
    assert box.failed_folder == "Failed" and box.webhook.timeout_s == 5
    assert box.webhook.jwt is not None and box.webhook.retry.initial_s == 2
    assert not box.routing.forward_auto_generated
    assert config.health is not None and config.health.port == 9090
    assert config.log.format == "text"


def test_warnings_name_the_file_the_setting_came_from(tmp_path: Path) -> None:
    gitlab_yml = rails_root(tmp_path, section(port=993, ssl=True))
    assert not [w for w in load(gitlab_yml).warnings if "clear text" in w]
    overlay = tmp_path / "mailroom.yml"
    overlay.write_text(
        yaml.safe_dump({"mailboxes": {"incoming_email": {"ssl": False, "port": 143}}})
    )
    config = load_gitlab(gitlab_yml, mailroom_config=overlay, env={})
    (warning,) = [w for w in config.warnings if "clear text" in w]
    assert warning.startswith(f"{overlay}: mailboxes.incoming_email.ssl: the IMAP password")
    (warning,) = [w for w in load(rails_root(tmp_path / "b", section())).warnings if "clear" in w]
    assert warning.startswith(f"{tmp_path / 'b'}/gitlab/config/gitlab.yml: production.incoming")


@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        ({"webhook": {"url": "http://x"}}, "webhook.url: comes from the foreign file"),
        ({"mailboxes": [{"id": "x"}]}, "mailboxes: expected per-mailbox keys by id"),
        ({"mailboxes": {"nope": {}}}, "mailboxes.nope: no such mailbox"),
        ({"mailboxes": {"incoming_email": {"port": "x"}}}, "mailboxes.incoming_email.port:"),
        ({"webhook": {"timeout": -1}}, "mailroom.yml: webhook.timeout: -1 is out of range"),
        ({"health": {"listen": "nowhere"}}, "mailroom.yml: health.listen: 'nowhere'"),
        ({"credentials": {"file": "x"}}, "credentials: the mailbox logins come from"),
    ],
)
def test_mailroom_yaml_errors_name_that_file(
    tmp_path: Path, overlay: dict[str, Any], expected: str
) -> None:
    gitlab_yml = rails_root(tmp_path, "imap_sub_addressing.yml")
    path = tmp_path / "mailroom.yml"
    path.write_text(yaml.safe_dump(overlay))
    with pytest.raises(ConfigError) as info:
        load_gitlab(gitlab_yml, mailroom_config=path, env={})
    assert str(info.value).startswith(str(path)), str(info.value)
    assert expected in str(info.value)


# -- Marshal and the encrypted format, byte by byte -------------------------------------------


def test_marshal_strings() -> None:
    assert load_string(b'\x04\x08I"\x07\xc3\xa4\x06:\x06ET') == "ä"
    assert load_string(b'\x04\x08"\x00') == ""
    long = b"x" * 300  # a length over 122 takes two bytes: 0x02 + little-endian
    assert load_string(b'\x04\x08I"\x02,\x01' + long + b"\x06:\x06EF") == long.decode()
    for bad in (
        b"",
        b'\x04\x09"\x00',  # another Marshal version
        b"\x04\x08i\x06",  # an Integer
        b"\x04\x08o:\x0bObject\x00",  # an object: never built
        b'\x04\x08I"\x06x\x07:\x06ET:\x06ET',  # two instance variables
        b'\x04\x08I"\x06x\x06:\rencoding"\x09zlib',  # not a text encoding
        b'\x04\x08"\x06xx',  # trailing data
        b'\x04\x08"\xfa',  # negative length
        b'\x04\x08"\x04\xff\xff\xff\x7f',  # longer than the data
    ):
        with pytest.raises(MarshalError):
            load_string(bad)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64).map(lambda b: b"\x04\x08" + b))
def test_marshal_reader_refuses_or_reads_any_bytes(data: bytes) -> None:
    with contextlib.suppress(MarshalError):
        assert isinstance(load_string(data), str)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40).map(base64.b64encode), min_size=1, max_size=4))
def test_the_encrypted_format_refuses_anything_else(parts: list[bytes]) -> None:
    with pytest.raises(ValueError, match=r"file\.enc"):
        encrypted.decrypt(b"--".join(parts), ["k" * 16], name="file.enc")


def test_the_key_is_activesupports_pbkdf2_sha1() -> None:
    # ActiveSupport::KeyGenerator.new("a" * 128).generate_key("GitLabEncryptedConfigSalt", 32),
    # computed with Debian's ruby-activesupport 6.1.7
    expected = "1408981893ae6d089eac54266b154905ae872bb4cdd9856b0bddc5bdb27ccfbe"
    assert encrypted.derive_key("a" * 128).hex() == expected


# -- GitLab's queues Redis --------------------------------------------------------------------


def redis_file(tmp_path: Path, name: str, entry: Any) -> Path:
    (tmp_path / name).write_text(yaml.safe_dump({"production": entry}))
    return tmp_path


def test_redis_defaults_to_gitlabs_queues_url(tmp_path: Path) -> None:
    found = find_queues_redis(tmp_path, env={})
    assert (found.source, found.url, found.namespace) == (
        "default",
        "redis://localhost:6381",
        "mail_room:gitlab",
    )


def test_redis_queues_yml_wins_over_resque_yml(tmp_path: Path) -> None:
    redis_file(tmp_path, "resque.yml", "redis://resque:6379")
    assert find_queues_redis(tmp_path, env={}).url == "redis://resque:6379"
    redis_file(tmp_path, "redis.queues.yml", {"url": "redis://:s3cret@queues:6380/2"})
    found = find_queues_redis(tmp_path, env={})
    assert (found.url, found.db, found.source) == (
        "redis://queues:6380/2",
        2,
        str(tmp_path / "redis.queues.yml"),
    )
    assert found.password is not None and found.password.reveal() == "s3cret"
    assert "s3cret" not in repr(found)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    redis_file(elsewhere, "r.yml", "redis://env:1")
    env = {"GITLAB_REDIS_QUEUES_CONFIG_FILE": str(elsewhere / "r.yml")}
    assert find_queues_redis(tmp_path, env=env).url == "redis://env:1"


def test_redis_with_sentinels_as_the_linux_package_renders_them(tmp_path: Path) -> None:
    entry = {
        "url": "redis://gitlab-redis",
        "password": "redis-password",
        "sentinels": [{"host": "10.0.0.1", "port": 26379}, {"host": "10.0.0.2"}],
        "sentinel_password": "sentinel-password",
    }
    found = find_queues_redis(redis_file(tmp_path, "resque.yml", entry), env={})
    assert found.master_name == "gitlab-redis"
    assert [(s.host, s.port) for s in found.sentinels] == [("10.0.0.1", 26379), ("10.0.0.2", 26379)]
    assert found.password is not None and found.password.reveal() == "redis-password"
    assert found.sentinel_password is not None
    assert "password" not in repr(found).replace("sentinel_password", "").replace("password=", "")


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"url": "http://x"}, "is not redis://"),
        ({"url": "redis://x", "config_command": "/bin/x"}, "config_command runs a program"),
        ({"url": "redis://x", "sentinels": [{"port": 1}]}, "each sentinel is"),
        ({"url": "redis://x", "db": "two"}, "not a number"),
        ({"password": "p"}, "url is missing"),
    ],
)
def test_redis_errors(tmp_path: Path, entry: Any, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        find_queues_redis(redis_file(tmp_path, "resque.yml", entry), env={})
    (tmp_path / "resque.yml").write_text("production:\n  url: <%= ENV['REDIS_URL'] %>\n")
    with pytest.raises(ValueError, match="holds ERB"):
        find_queues_redis(tmp_path, env={})


def test_redis_unix_socket(tmp_path: Path) -> None:
    found = find_queues_redis(
        redis_file(tmp_path, "resque.yml", "unix:/run/redis.sock?db=3"), env={}
    )
    assert (found.url, found.db) == ("unix:///run/redis.sock", 3)


# -- Fuzz: whatever gitlab.yml or a Redis config holds, a Config or a ConfigError/ValueError ---

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
GITLAB_KEYS = [
    "enabled",
    "address",
    "user",
    "password",
    "host",
    "port",
    "ssl",
    "start_tls",
    "mailbox",
    "idle_timeout",
    "delete_after_delivery",
    "expunge_deleted",
    "delivery_method",
    "gitlab_url",
    "secret_file",
    "inbox_method",
    "inbox_options",
    "encrypted_secret_file",
    "other",
]


@settings(max_examples=150, deadline=None)
@given(
    changes=st.dictionaries(st.sampled_from(GITLAB_KEYS), VALUES, max_size=4),
    top=st.dictionaries(st.sampled_from(["gitlab", "shared", "encrypted_settings"]), VALUES),
)
@pytest.mark.slow
def test_any_gitlab_yml_loads_or_is_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, changes: dict[str, Any], top: dict[str, Any]
) -> None:
    document = section(**changes)
    document["production"].update(top)
    gitlab_yml = rails_root(tmp_path_factory.mktemp("fuzz"), document)
    try:
        load(gitlab_yml)
    except ConfigError as exc:
        assert str(exc).startswith(str(gitlab_yml)), str(exc)


@settings(max_examples=300, deadline=None)
@given(entry=VALUES)
@pytest.mark.slow
def test_any_redis_entry_is_read_or_refused(entry: Any) -> None:
    try:
        found = parse_entry(entry, source="resque.yml")
    except ValueError as exc:
        assert str(exc).startswith("resque.yml")
    else:
        assert found.url.startswith(("redis://", "rediss://", "unix://"))


def test_gitlab_mode_shares_the_mailboxes_through_gitlabs_queues_redis(tmp_path: Path) -> None:
    queues = "production:\n  url: redis://:q%40ueue-pass@redis.internal:6380/2\n"
    gitlab_yml = rails_root(tmp_path, section(), **{"config/redis.queues.yml": queues})
    arbitration = load(gitlab_yml).arbitration
    assert (arbitration.method, arbitration.url, arbitration.db) == (
        "redis",
        "redis://redis.internal:6380/2",
        2,
    )
    assert arbitration.namespace == "mail_room:gitlab"
    assert arbitration.password is not None and arbitration.password.reveal() == "q@ueue-pass"
    # Without redis.queues.yml: resque.yml; without either: GitLab's default.
    resque = {"config/resque.yml": "production: unix:///var/opt/gitlab/redis/redis.socket\n"}
    other = rails_root(tmp_path / "b", section(), **resque)
    assert load(other).arbitration.url == "unix:///var/opt/gitlab/redis/redis.socket"
    default = rails_root(tmp_path / "c", section())
    assert load(default).arbitration.url == "redis://localhost:6381"
    # The -c file may name another Redis, or none.
    small = tmp_path / "mailroom.yml"
    small.write_text("arbitration: {method: none}\n")
    assert load_gitlab(gitlab_yml, mailroom_config=small, env={}).arbitration.enabled is False


def test_gitlabs_redis_behind_sentinels(tmp_path: Path) -> None:
    queues = (
        "production:\n  url: redis://gitlab-redis\n  password: p\n"
        "  sentinels: [{host: s1, port: 26379}, {host: s2, port: 26380}]\n"
    )
    gitlab_yml = rails_root(tmp_path, section(), **{"config/redis.queues.yml": queues})
    arbitration = load(gitlab_yml).arbitration
    assert arbitration.sentinels == (("s1", 26379), ("s2", 26380))
    assert arbitration.master_name == "gitlab-redis"
    assert arbitration.password is not None and arbitration.password.reveal() == "p"


def test_gitlabs_redis_config_with_erb_is_a_config_error(tmp_path: Path) -> None:
    queues = "production:\n  url: <%= ENV['REDIS_URL'] %>\n"
    gitlab_yml = rails_root(tmp_path, section(), **{"config/redis.queues.yml": queues})
    text = error(gitlab_yml)
    assert "holds ERB" in text and "arbitration:" in text
    # What the error advises: with arbitration: in the -c file, GitLab's Redis is not read.
    small = tmp_path / "mailroom.yml"
    small.write_text("arbitration: {method: redis, url: 'redis://other:6379', password: pw}\n")
    arbitration = load_gitlab(gitlab_yml, mailroom_config=small, env={}).arbitration
    assert (arbitration.url, arbitration.namespace) == ("redis://other:6379", "mailroom")
    assert arbitration.password is not None and arbitration.password.reveal() == "pw"


def test_mailroom_gems_claims_are_on_in_gitlab_mode_and_can_be_switched_off(
    tmp_path: Path,
) -> None:
    gitlab_yml = rails_root(tmp_path, section())
    arbitration = load(gitlab_yml).arbitration
    assert arbitration.enabled and arbitration.mail_room_claims
    assert arbitration.mail_room_key("12") == "mail_room:gitlab:delivered:12"
    overlay = tmp_path / "mailroom.yml"
    overlay.write_text("arbitration: {mail_room_claims: false, lease_ttl: 30}\n")
    arbitration = load_gitlab(gitlab_yml, mailroom_config=overlay, env={}).arbitration
    assert arbitration.enabled and arbitration.url == "redis://localhost:6381"  # still GitLab's
    assert not arbitration.mail_room_claims and arbitration.lease_ttl_s == 30
    overlay.write_text("arbitration: {method: none}\n")
    assert not load_gitlab(gitlab_yml, mailroom_config=overlay, env={}).arbitration.enabled
