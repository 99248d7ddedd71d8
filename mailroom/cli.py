"""``mailroom [run] -c FILE``, ``check``, ``route``, ``redrive``, ``credentials
edit|show|generate-key``, ``sample-config``, ``version``.

``run`` and ``check`` also read GitLab's files (``--gitlab-config gitlab.yml``, or
``$MAIL_ROOM_GITLAB_CONFIG_FILE`` when no file is named) or MailRoom's YAML
(``--mail-room-config``); ``-c`` is then an optional mailroom YAML laid over them.
Exit codes: 0 ok, 1 runtime failure (or a failed check), 2 config error.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from mailroom import VERSION, check, gitlab, logs, redrive
from mailroom.check import gitlab as gitlab_check
from mailroom.check import route
from mailroom.config import Config, MailboxConfig, credentials_config, load_config
from mailroom.config.reader import suggestion
from mailroom.config.sample import SAMPLE, SAMPLE_HINT
from mailroom.errors import ConfigError, CredentialsError
from mailroom.kinds import KINDS
from mailroom.runtime import supervisor
from mailroom.runtime.running import configure_logs
from mailroom.trust import credentials, tls

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
NO_CONFIG = (
    "mailroom: -c FILE is required: the YAML config file; "
    f"{SAMPLE_HINT} (or --gitlab-config gitlab.yml, or --mail-room-config mail_room.yml)"
)
Mode = Literal["mailroom", "gitlab", "mail_room"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailroom", description="Receive email in your application: mailboxes → webhook."
    )
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="watch the mailboxes and deliver (the default)")
    commands.add_parser("version", help="print the version")
    checks = commands.add_parser(
        "check", help="check config, mailboxes, webhook and SMTP: one line each, exit 0 if all pass"
    )
    redrives = _redrive_parser(commands)
    for target in (parser, run, checks, redrives):
        target.add_argument("-c", "--config", help="the YAML config file")
        target.add_argument(
            "--gitlab-config",
            help="GitLab's gitlab.yml: take MailRoom's place (default: "
            "$MAIL_ROOM_GITLAB_CONFIG_FILE; -c is then optional, for what gitlab.yml cannot say)",
        )
        target.add_argument(
            "--mail-room-config", help="a MailRoom gem config (:mailboxes: ...) to run instead"
        )
    for target in (parser, run):
        target.add_argument(
            "--dry-run",
            action="store_true",
            help="fetch and decide, log what would be posted, rejected or ignored; post, send "
            "and settle nothing (a safe first run against a real inbox)",
        )
    checks.add_argument(
        "--send-test",
        action="store_true",
        help='also POST a signed test event {"type": "mailroom.check"}; it must get a 2xx',
    )
    routes = commands.add_parser(
        "route",
        help="what mailroom would do with one message (no network, no secrets needed): the "
        "matching header, the key, deliver/reject/ignore and why, the payload",
    )
    routes.add_argument("-c", "--config", help="the YAML config file")
    routes.add_argument(
        "--mailbox", help="the id of the mailbox it arrived in (default: the first)"
    )
    routes.add_argument("message", help="the message as a file (.eml), or - for stdin")
    commands.add_parser("sample-config", help="print a minimal config to start from")
    _credentials_parser(commands)
    return parser


def _redrive_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """``mailroom redrive`` (the config options are added with run's and check's)."""
    redrives = commands.add_parser(
        "redrive",
        help="put dead letters back (from failed_folder, or flagged $MailroomFailed) to be "
        "delivered again under their own webhook-id",
    )
    redrives.add_argument(
        "--mailbox",
        action="append",
        metavar="ID",
        help="only this mailbox (repeat for more; default: every mailbox)",
    )
    redrives.add_argument(
        "--since",
        metavar="DATE",
        help="only mail received since: 2026-05-01, 2026-05-01T14:30 or 2026-05-01T14:30+02:00 "
        "(without a zone: local time)",
    )
    redrives.add_argument(
        "--dry-run", action="store_true", help="list what would be redriven; change nothing"
    )
    return redrives


def _credentials_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``mailroom credentials edit | show | generate-key``."""
    stored = commands.add_parser(
        "credentials", help="the encrypted file of mailbox users and passwords"
    )
    actions = stored.add_subparsers(dest="action", required=True)
    for name, text in (
        ("edit", "decrypt into $VISUAL/$EDITOR, encrypt again on exit (creates the file)"),
        ("show", "print the decrypted credentials"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("-c", "--config", required=True, help="the config naming the file")
        action.add_argument(
            "--key-file",
            help="the key file to use (instead of MAILROOM_CREDENTIALS_KEY or "
            "credentials.key_file)",
        )
    generate = actions.add_parser(
        "generate-key", help="make a new random key (printed, or written to --key-file)"
    )
    generate.add_argument("--key-file", help="write it to this new file (mode 0600)")


def _source(args: argparse.Namespace) -> tuple[Callable[[], Config], str, Mode] | None:
    """How to (re)load the config, the file to name, and the mode; None when nothing is named."""
    gitlab_yml, mail_room, config = args.gitlab_config, args.mail_room_config, args.config
    if gitlab_yml and mail_room:
        raise ConfigError("", "give --gitlab-config or --mail-room-config, not both")
    if not (gitlab_yml or mail_room or config):
        gitlab_yml = os.environ.get("MAIL_ROOM_GITLAB_CONFIG_FILE")  # as GitLab's MailRoom
    if config and not (gitlab_yml or mail_room) and gitlab.is_mail_room_yaml(config):
        # MailRoom's YAML where mailroom's is expected (the image's default -c, with the Helm
        # chart's ConfigMap mounted there): read as --mail-room-config would read it.
        mail_room, config = config, None
    if gitlab_yml:
        return (
            functools.partial(gitlab.load_gitlab, gitlab_yml, mailroom_config=config),
            gitlab_yml,
            "gitlab",
        )
    if mail_room:
        return (
            functools.partial(gitlab.load_mail_room, mail_room, mailroom_config=config),
            mail_room,
            "mail_room",
        )
    if config:
        return functools.partial(load_config, config), config, "mailroom"
    return None


async def _checks(
    config: Config, *, path: str, send_test: bool, report: check.Report, mode: Mode
) -> bool:
    await check.run(config, path=path, send_test=send_test, report=report, kinds=KINDS)
    if mode == "gitlab":
        await gitlab_check.run(report, config)
    return report.ok


def _check(args: argparse.Namespace) -> int:
    try:
        source = _source(args)
    except ConfigError as exc:
        print(f"mailroom: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if source is None:
        print(NO_CONFIG, file=sys.stderr)
        return EXIT_CONFIG
    load, path, mode = source
    if args.send_test and mode != "mailroom":
        print(
            "mailroom: --send-test posts a JSON test event, which GitLab or a MailRoom receiver "
            "would take for an email; leave it out (GitLab mode probes GitLab's internal API "
            "without a token instead)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    logs.configure("text", "warning")  # stderr; the report is on stdout
    try:
        config = load()
    except ConfigError as exc:
        print(check.Result("config", "load", check.Status.FAIL, str(exc)).line(), flush=True)
        print("mailroom check: the config does not load; nothing else was checked")
        return EXIT_CONFIG
    report = check.Report(lambda line: print(line, flush=True))
    checks = _checks(config, path=path, send_test=args.send_test, report=report, mode=mode)
    ok = asyncio.run(checks)
    print(report.summary())
    return EXIT_OK if ok else EXIT_FAILURE


def _load_offline(path: str | None) -> Config | None:
    """The config in ``path`` for work without the network (no secret read, none needs to be
    set), or None after saying on stderr why there is none (exit 2)."""
    if not path:
        print(NO_CONFIG, file=sys.stderr)
        return None
    try:
        return load_config(path, offline=True)
    except ConfigError as exc:
        print(f"mailroom: config error: {exc}", file=sys.stderr)
        return None


def _route(args: argparse.Namespace) -> int:
    config = _load_offline(args.config)
    mailbox = None if config is None else _mailbox(config, args.mailbox)
    if config is None or mailbox is None:
        return EXIT_CONFIG
    try:
        raw = sys.stdin.buffer.read() if args.message == "-" else Path(args.message).read_bytes()
    except OSError as exc:
        print(f"mailroom: cannot read {args.message}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    for line in route.describe(raw, mailbox, config):
        print(line)
    return EXIT_OK


def _mailbox(config: Config, wanted: str | None) -> MailboxConfig | None:
    """The mailbox named ``wanted`` (default: the first), or None after saying why."""
    ids = [m.id for m in config.mailboxes]
    if wanted is None:
        if len(ids) > 1:
            print(f"(mailbox {ids[0]}, the first of {len(ids)}; --mailbox ID for another)")
        return config.mailboxes[0]
    for mailbox in config.mailboxes:
        if mailbox.id == wanted:
            return mailbox
    hint = suggestion(wanted, ids) or f"; the ids are: {', '.join(ids)}"
    print(f"mailroom: no mailbox has the id {wanted}{hint}", file=sys.stderr)
    return None


def _redrive(args: argparse.Namespace) -> int:
    try:
        source = _source(args)
        since = redrive.parse_since(args.since) if args.since else None
    except (ConfigError, ValueError) as exc:
        print(f"mailroom: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if source is None:
        print(NO_CONFIG, file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = source[0]()
    except ConfigError as exc:
        print(f"mailroom: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    chosen = [_mailbox(config, wanted) for wanted in dict.fromkeys(args.mailbox or ())]
    mailboxes = [m for m in chosen if m is not None] if chosen else list(config.mailboxes)
    problems = redrive.conflicts(config, mailboxes)
    for problem in problems:
        print(f"mailroom: {problem}", file=sys.stderr)
    if None in chosen or problems:
        return EXIT_CONFIG
    logs.configure("text", "warning")  # stderr; the lines are on stdout
    options = redrive.Options(since=since, dry_run=args.dry_run)
    out = functools.partial(print, flush=True)
    ok = asyncio.run(redrive.run(config, mailboxes, options, out, kinds=KINDS))
    return EXIT_OK if ok else EXIT_FAILURE


def _credentials(args: argparse.Namespace) -> int:
    try:
        if args.action == "generate-key":
            if args.key_file is None:
                print(credentials.generate_key())
                return EXIT_OK
            credentials.write_key_file(Path(args.key_file))
            print(f"mailroom: wrote a new key to {args.key_file} (mode 0600)", file=sys.stderr)
            return EXIT_OK
        try:
            settings = credentials_config(args.config)
        except ConfigError as exc:
            print(f"mailroom: config error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if args.key_file is not None:  # asked for by name: the environment does not count
            key = credentials.load_key(key_file=args.key_file, env={})
        else:
            key = credentials.load_key(key_file=settings.key_file, env=os.environ)
        path = Path(settings.file)
        if args.action == "show":
            sys.stdout.write(credentials.read_text(path, key))
            return EXIT_OK
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
        if credentials.edit(path, key, editor=editor):
            count = len(credentials.read(path, key))
            print(f"mailroom: saved {path} (encrypted; {count} mailbox entries)", file=sys.stderr)
        else:
            print(f"mailroom: no changes; {path} not written", file=sys.stderr)
        return EXIT_OK
    except CredentialsError as exc:
        print(f"mailroom: {exc}", file=sys.stderr)
        return EXIT_FAILURE


# The cyclic GC runs a young collection every 700 new container objects by default. Each
# message in flight holds many of them for seconds, so collections come every few messages and
# promote them, and the full collections that follow scan every object of a thousand
# connections. Measured (bench/many_mailboxes.py, 10,000 messages to 1,000 mailboxes at once):
# 7-10 s of 16-23 CPU-seconds in the GC, pauses of the event loop up to 0.95 s; at 20,000:
# 0.6-1.0 s in the GC, 9-17 CPU-seconds in all.
GC_YOUNG_THRESHOLD = 20_000


def _quiet_broken_pipe(command: Callable[[list[str] | None], int]) -> Callable[..., int]:
    """``mailroom route ... | head`` ends without a traceback (Python's documented recipe)."""

    @functools.wraps(command)
    def run(argv: list[str] | None = None) -> int:
        try:
            return command(argv)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILURE

    return run


@_quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"mailroom {VERSION}")
        return EXIT_OK
    if args.command == "check":
        return _check(args)
    if args.command == "credentials":
        return _credentials(args)
    if args.command == "route":
        return _route(args)
    if args.command == "redrive":
        return _redrive(args)
    if args.command == "sample-config":
        sys.stdout.write(SAMPLE)
        return EXIT_OK
    try:
        source = _source(args)
        if source is None:
            print(NO_CONFIG, file=sys.stderr)
            return EXIT_CONFIG
        load = source[0]
        config = load()
    except ConfigError as exc:
        print(f"mailroom: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        configure_logs(config.log)
    except ConfigError as exc:
        print(f"mailroom: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in config.warnings:
        logging.getLogger("mailroom.config").warning("config: %s", warning)
    gc.set_threshold(GC_YOUNG_THRESHOLD)
    tls.small_read_buffers()
    try:
        # SIGHUP reloads the file the same way (an invalid one is refused).
        watch = list(dict.fromkeys(Path(p) for p in (source[1], args.config) if p))
        run = supervisor.run(config, kinds=KINDS, load=load, dry_run=args.dry_run, watch=watch)
        return asyncio.run(run)
    except ConfigError as exc:  # found at start: health.listen cannot be bound
        print(f"mailroom: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception:
        logging.getLogger("mailroom").exception("mailroom failed")
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
