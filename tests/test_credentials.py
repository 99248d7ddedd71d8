"""Encrypted credentials: the file format, wrong keys, changed files, the config, the commands."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailroom.config import ConfigError, ImapMailboxConfig, parse_config
from mailroom.errors import CredentialsError
from mailroom.trust import credentials
from tests.helpers import ROOT, WHSEC, config_dict, mailbox_dict
from tests.servers.dovecot import Account, Dovecot
from tests.servers.webhook import WebhookReceiver

TEXT = """\
# the help desk mailbox
incoming:
  user: incoming@example.com
  password: "s3cret ${NOT_EXPANDED} pa55"
"""

# An editor for `mailroom credentials edit`: records what it was given, then writes the
# content of $EDIT_WITH into the file (or leaves it), and exits with $EDIT_STATUS.
EDITOR = """\
import json, os, stat, sys
path = sys.argv[-1]
mode = stat.S_IMODE(os.stat(path).st_mode)
dir_mode = stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)
with open(os.environ["EDIT_LOG"], "a") as log:
    log.write(json.dumps({"path": path, "mode": mode, "dir_mode": dir_mode,
                          "text": open(path).read()}) + "\\n")
if os.environ.get("EDIT_WITH"):
    with open(path, "w") as out:
        out.write(open(os.environ["EDIT_WITH"]).read())
sys.exit(int(os.environ.get("EDIT_STATUS", "0")))
"""


@pytest.fixture
def key() -> credentials.Key:
    return credentials.Key(base64.b64decode(credentials.generate_key()), "test")


def test_round_trip_is_one_ascii_line_without_the_secrets(
    tmp_path: Path, key: credentials.Key
) -> None:
    path = tmp_path / "mailroom.credentials"
    credentials.write_text(path, key, TEXT)
    data = path.read_bytes()
    assert data.count(b"\n") == 1 and data.isascii()
    assert data.startswith(f"mailroom-credentials:v1:{key.id}:".encode())
    assert b"s3cret" not in data and b"incoming@example.com" not in data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert credentials.read_text(path, key) == TEXT  # comments kept
    (login,) = credentials.read(path, key).items()
    assert login == (
        "incoming",
        credentials.StoredLogin(
            user="incoming@example.com", password="s3cret ${NOT_EXPANDED} pa55"
        ),
    )
    assert "s3cret" not in repr(login)
    credentials.write_text(path, key, TEXT)
    assert path.read_bytes() != data  # a fresh nonce every time


def test_wrong_key_is_told_apart_from_a_changed_file(tmp_path: Path, key: credentials.Key) -> None:
    path = tmp_path / "mailroom.credentials"
    credentials.write_text(path, key, TEXT)
    other = credentials.Key(base64.b64decode(credentials.generate_key()), "key file k2")
    with pytest.raises(CredentialsError) as wrong:
        credentials.read(path, other)
    assert str(wrong.value) == (
        f"wrong key for {path}: it was encrypted with key id {key.id}, the key from key file k2 "
        f"has key id {other.id}; give the key it was encrypted with (--key-file, "
        "MAILROOM_CREDENTIALS_KEY or credentials.key_file)"
    )
    from_env = credentials.Key(other.value, "MAILROOM_CREDENTIALS_KEY")
    with pytest.raises(CredentialsError, match=r"wins over credentials\.key_file: unset it"):
        credentials.read(path, from_env)

    header, body = path.read_text().strip().rsplit(":", 1)
    raw = bytearray(base64.b64decode(body))
    raw[20] ^= 0x01  # one bit of the ciphertext
    path.write_text(f"{header}:{base64.b64encode(bytes(raw)).decode()}\n")
    with pytest.raises(CredentialsError) as changed:
        credentials.read(path, key)
    assert str(changed.value) == (
        f"{path} was changed or damaged after it was encrypted (authentication failed); restore "
        "it from a backup or write it anew with mailroom credentials edit"
    )

    raw[20] ^= 0x01
    raw[-1] ^= 0x80  # the tag
    path.write_text(f"{header}:{base64.b64encode(bytes(raw)).decode()}\n")
    with pytest.raises(CredentialsError, match="was changed or damaged"):
        credentials.read(path, key)

    path.write_text(f"{header}:{body[:10]}\n")
    with pytest.raises(CredentialsError, match="is damaged \\(truncated or not base64\\)"):
        credentials.read(path, key)
    path.write_text("incoming: {user: a}\n")
    with pytest.raises(CredentialsError, match="is not a mailroom credentials file"):
        credentials.read(path, key)
    path.write_text(f"mailroom-credentials:v2:{key.id}:{body}\n")
    with pytest.raises(CredentialsError, match="has format 'v2'; this mailroom reads v1"):
        credentials.read(path, key)


def test_keys_missing_malformed_from_env_or_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError) as missing:
        credentials.load_key(key_file=None, env={})
    assert str(missing.value) == (
        "no key: set MAILROOM_CREDENTIALS_KEY, or credentials.key_file to a key file "
        "(make one with: mailroom credentials generate-key --key-file FILE)"
    )
    with pytest.raises(CredentialsError, match="is not base64 of 32 bytes"):
        credentials.load_key(key_file=None, env={"MAILROOM_CREDENTIALS_KEY": "c2hvcnQ="})
    key_file = tmp_path / "mailroom.key"
    credentials.write_key_file(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with pytest.raises(CredentialsError, match="exists; not overwritten"):
        credentials.write_key_file(key_file)
    from_file = credentials.load_key(key_file=key_file, env={})
    assert from_file.source == f"key file {key_file}"
    from_env = credentials.load_key(
        key_file=key_file, env={"MAILROOM_CREDENTIALS_KEY": key_file.read_text()}
    )
    assert (from_env.source, from_env.id) == ("MAILROOM_CREDENTIALS_KEY", from_file.id)
    assert credentials.key_file_warning(key_file) is None
    key_file.chmod(0o644)
    assert (
        credentials.key_file_warning(key_file) == f"key file {key_file} has mode 0644; chmod 600 it"
    )
    with pytest.raises(CredentialsError, match="cannot read key file"):
        credentials.load_key(key_file=tmp_path / "nope", env={})


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("- a\n- b\n", "the credentials must be a mapping"),
        (
            "incoming: secret\n",
            "credentials[incoming]: expected a mapping with user and/or password",
        ),
        ("incoming: {user: a, pasword: b}\n", "credentials[incoming].pasword: unknown key"),
        (
            "incoming: {user: a, password hunter2}\n",  # a colon left out: a key, not a value
            "credentials[incoming].<a key of 16 characters>: unknown key",
        ),
        ("incoming: {password: [1]}\n", "credentials[incoming].password: expected a non-empty"),
        ("incoming: {user: a\n", "the credentials are not valid YAML at line 2, column 1"),
    ],
)
def test_content_errors_name_the_entry_never_the_value(text: str, error: str) -> None:
    with pytest.raises(CredentialsError) as raised:
        credentials.parse_logins(text)
    assert str(raised.value).startswith(error)


@pytest.mark.parametrize("tagged", ["!!int hunter2", "!!float hunter2", "!!bool hunter2"])
def test_a_value_yaml_cannot_construct_is_refused_without_it(tagged: str) -> None:
    # PyYAML's own ValueError/KeyError here quote the value: 'hunter2'.
    with pytest.raises(CredentialsError) as raised:
        credentials.parse_logins(f"incoming: {{password: {tagged}}}\n")
    assert str(raised.value).startswith("the credentials hold a value YAML cannot read")
    assert "hunter2" not in str(raised.value)


# -- the config --------------------------------------------------------------------------


def write_config(
    tmp_path: Path, box: dict[str, Any], webhook_url: str, **block: Any
) -> tuple[Path, dict[str, Any]]:
    data = config_dict([box], webhook_url)
    data["credentials"] = {"file": "mailroom.credentials", **block}
    path = tmp_path / "mailroom.yml"
    path.write_text(yaml.safe_dump(data))
    return path, data


def test_config_takes_user_and_password_from_the_file(tmp_path: Path, key: credentials.Key) -> None:
    credentials.write_text(tmp_path / "mailroom.credentials", key, TEXT + "stale: {user: x}\n")
    env = {"MAILROOM_CREDENTIALS_KEY": base64.b64encode(key.value).decode()}
    box = {
        "id": "incoming",
        "address": "in+%{key}@example.com",
        "host": "imap.example.com",
        "ssl": True,
    }
    data = config_dict([box], "http://127.0.0.1:1/")
    data["credentials"] = {"file": "mailroom.credentials"}
    config = parse_config(data, env=env, base_dir=tmp_path)
    (mailbox,) = config.mailboxes
    assert isinstance(mailbox, ImapMailboxConfig)
    assert mailbox.user == "incoming@example.com"
    assert mailbox.password is not None
    assert mailbox.password.reveal() == "s3cret ${NOT_EXPANDED} pa55"  # never ${}-expanded
    assert config.credentials is not None
    assert config.credentials.file == str(tmp_path / "mailroom.credentials")
    assert config.warnings == (
        "credentials: the entry 'stale' matches no mailbox id; fix its name or remove it "
        "(mailroom credentials edit)",
    )

    box_own = {**box, "user": "own@example.com", "password": "own-password"}
    config = parse_config({**data, "mailboxes": [box_own]}, env=env, base_dir=tmp_path)
    assert isinstance(config.mailboxes[0], ImapMailboxConfig)
    assert config.mailboxes[0].user == "own@example.com"  # the config wins
    assert config.mailboxes[0].password is not None
    assert config.mailboxes[0].password.reveal() == "own-password"

    with pytest.raises(ConfigError) as no_key:
        parse_config(data, env={}, base_dir=tmp_path)
    assert str(no_key.value).startswith("credentials: no key: set MAILROOM_CREDENTIALS_KEY")
    other = {"MAILROOM_CREDENTIALS_KEY": credentials.generate_key()}
    with pytest.raises(ConfigError, match=r"^credentials: wrong key for "):
        parse_config(data, env=other, base_dir=tmp_path)
    oauth = {"tenant_id": "t", "client_id": "c", "client_secret": "x"}
    xoauth2 = {**box, "auth": "xoauth2", "oauth": oauth}
    with pytest.raises(
        ConfigError, match=r"^mailboxes\[0\]\.auth: is xoauth2, but the credentials"
    ):
        parse_config({**data, "mailboxes": [xoauth2]}, env=env, base_dir=tmp_path)
    no_id = {k: v for k, v in box.items() if k != "id"}
    with pytest.raises(ConfigError, match=r"^mailboxes\[0\]\.user: is required: in the config, or"):
        parse_config({**data, "mailboxes": [no_id]}, env=env, base_dir=tmp_path)


async def mailroom(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("MAILROOM_CREDENTIALS_KEY", "VISUAL")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailroom",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**clean, "PYTHONPATH": str(ROOT), **(env or {})},
        cwd=cwd,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_edit_show_and_check_with_the_commands(
    tmp_path: Path, dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    code, out, err = await mailroom(
        "credentials", "generate-key", "--key-file", "mailroom.key", cwd=tmp_path
    )
    assert (code, out) == (0, "")
    key_file = tmp_path / "mailroom.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    box = mailbox_dict(dovecot, account, id="incoming", user=None, password=None)
    config, _ = write_config(tmp_path, box, webhook.url, key_file="mailroom.key")
    editor = tmp_path / "editor.py"
    editor.write_text(EDITOR)
    content = tmp_path / "content.yml"
    content.write_text(f"incoming:\n  user: {account.user}\n  password: {account.password}\n")
    log = tmp_path / "editor.log"
    edit_env = {"EDITOR": f"{sys.executable} {editor}", "EDIT_LOG": str(log)}

    code, out, err = await mailroom(
        "credentials", "edit", "-c", str(config), env={**edit_env, "EDIT_WITH": str(content)}
    )
    assert code == 0, err
    assert (
        err
        == f"mailroom: saved {tmp_path / 'mailroom.credentials'} (encrypted; 1 mailbox entries)\n"
    )
    (seen,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert (seen["mode"], seen["dir_mode"]) == (0o600, 0o700)
    assert seen["text"] == credentials.TEMPLATE  # a new file starts from the template
    assert not Path(seen["path"]).parent.exists()  # the plain text is gone
    stored = (tmp_path / "mailroom.credentials").read_bytes()
    assert account.password.encode() not in stored

    code, out, err = await mailroom("credentials", "show", "-c", str(config))
    assert (code, out, err) == (0, content.read_text(), "")

    code, out, err = await mailroom("check", "-c", str(config))
    assert code == 0, out + err
    assert f"OK   imap[incoming] login: logged in as {account.user} (password)\n" in out
    assert (
        f", credentials decrypted from {tmp_path / 'mailroom.credentials'}" in out.splitlines()[0]
    )
    assert account.password not in out + err
    assert key_file.read_text().strip() not in out + err

    code, out, err = await mailroom("credentials", "edit", "-c", str(config), env=edit_env)
    assert (code, err) == (
        0,
        f"mailroom: no changes; {tmp_path / 'mailroom.credentials'} not written\n",
    )
    assert json.loads(log.read_text().splitlines()[-1])["text"] == content.read_text()

    broken = tmp_path / "broken.yml"
    broken.write_text("incoming: {user: a, pasword: b}\n")
    code, out, err = await mailroom(
        "credentials", "edit", "-c", str(config), env={**edit_env, "EDIT_WITH": str(broken)}
    )
    assert (code, out) == (1, "")
    assert err == (
        "mailroom: credentials[incoming].pasword: unknown key; known keys: user, password; "
        "nothing saved\n"
    )
    code, out, err = await mailroom(
        "credentials", "edit", "-c", str(config), env={**edit_env, "EDIT_STATUS": "3"}
    )
    assert (code, err) == (1, "mailroom: the editor exited with status 3; nothing saved\n")
    assert (tmp_path / "mailroom.credentials").read_bytes() == stored

    other = tmp_path / "other.key"
    credentials.write_key_file(other)
    code, out, err = await mailroom(
        "credentials", "show", "-c", str(config), "--key-file", str(other)
    )
    assert (code, out) == (1, "")
    assert err.startswith(f"mailroom: wrong key for {tmp_path / 'mailroom.credentials'}: ")
    code, out, err = await mailroom(
        "check", "-c", str(config), env={"MAILROOM_CREDENTIALS_KEY": other.read_text()}
    )
    assert code == 2
    assert out.startswith("FAIL config load: credentials: wrong key for ")
    assert "the key from MAILROOM_CREDENTIALS_KEY has key id" in out


@pytest.mark.slow
async def test_generate_key_prints_one_and_commands_need_the_block(tmp_path: Path) -> None:
    code, out, err = await mailroom("credentials", "generate-key")
    assert code == 0 and len(base64.b64decode(out.strip(), validate=True)) == 32
    config = tmp_path / "mailroom.yml"
    config.write_text(yaml.safe_dump(config_dict([], "http://127.0.0.1:1/")))
    code, out, err = await mailroom("credentials", "show", "-c", str(config))
    assert code == 2
    assert err.startswith(f"mailroom: config error: credentials: is not set in {config}; add ")
    assert WHSEC not in err


@pytest.mark.slow
async def test_sigterm_while_editing_removes_the_plain_text(tmp_path: Path) -> None:
    runtime = tmp_path / "run"  # stands for $XDG_RUNTIME_DIR, preferred (RAM) for the temp dir
    runtime.mkdir(mode=0o700)
    credentials.write_key_file(tmp_path / "mailroom.key")
    data = config_dict([], "http://127.0.0.1:1/")
    data["credentials"] = {"file": "mailroom.credentials", "key_file": "mailroom.key"}
    config = tmp_path / "mailroom.yml"
    config.write_text(yaml.safe_dump(data))
    editor = tmp_path / "editor.py"  # says which file it edits, then edits for a long time
    editor.write_text("import sys, time\nprint(sys.argv[-1], flush=True)\ntime.sleep(60)\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("MAILROOM_CREDENTIALS_KEY", "VISUAL")}
    env = {"PYTHONPATH": str(ROOT), "EDITOR": f"{sys.executable} {editor}"}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "mailroom", "credentials", "edit", "-c", str(config)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        env={**clean, **env, "XDG_RUNTIME_DIR": str(runtime)},
    )
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        plain = Path((await proc.stdout.readline()).decode().strip())
        assert plain.parent.parent == runtime
        assert await asyncio.to_thread(plain.read_text) == credentials.TEMPLATE
        proc.send_signal(signal.SIGTERM)
        code = await proc.wait()
    assert code == 128 + signal.SIGTERM
    assert await asyncio.to_thread(lambda: not plain.exists() and not any(runtime.iterdir()))


def test_unquoted_numbers_are_not_taken_as_passwords() -> None:
    with pytest.raises(
        CredentialsError, match=r"incoming\]\.password: expected a non-empty string"
    ):
        credentials.parse_logins("incoming: {user: u, password: 0755}\n")
