"""``mailroom [run] -c FILE`` and ``mailroom version``.

Exit codes: 0 ok, 1 runtime failure, 2 config error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from importlib.metadata import PackageNotFoundError, version

from mailroom import logs, supervisor
from mailroom.config import load_config
from mailroom.errors import ConfigError

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _version() -> str:
    try:
        return version("mailroom-incoming")
    except PackageNotFoundError:
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailroom", description="Receive email in your application: mailboxes → webhook."
    )
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="watch the mailboxes and deliver (the default)")
    for target in (parser, run):
        target.add_argument("-c", "--config", help="the YAML config file")
    commands.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"mailroom {_version()}")
        return EXIT_OK
    if not args.config:
        print("mailroom: -c FILE is required (see examples/mailroom.yml)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mailroom: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(config.log.format, config.log.level)
    for warning in config.warnings:
        logging.getLogger("mailroom.config").warning("config: %s", warning)
    try:
        return asyncio.run(supervisor.run(config))
    except Exception:
        logging.getLogger("mailroom").exception("mailroom failed")
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
