"""The upgrade story holds together: CHANGELOG.md in the form of Keep a Changelog, its newest
release the version pyproject.toml and the image carry, docs/upgrading.md's table of deprecated
keys the one mailroom reads, and the exit codes its policy promises the ones the CLI returns."""

from __future__ import annotations

import re
import tomllib

from mailroom import cli
from mailroom.config import compat
from tests.helpers import ROOT

CHANGELOG = (ROOT / "CHANGELOG.md").read_text()
UPGRADING = (ROOT / "docs" / "upgrading.md").read_text()
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SECTIONS = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}


def releases() -> list[tuple[str, str]]:
    """(heading, body) of each ``## [...]`` section, in order."""
    parts = re.split(r"^## (.*)$", CHANGELOG, flags=re.M)
    return list(zip(parts[1::2], parts[2::2], strict=True))


def test_the_changelog_keeps_a_changelog() -> None:
    headings = [heading for heading, _ in releases()]
    assert headings[0] == "[Unreleased]"
    versions = [re.fullmatch(r"\[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}", h) for h in headings[1:]]
    assert all(versions), headings
    numbers = [tuple(int(n) for n in v[1].split(".")) for v in versions if v]
    assert numbers == sorted(numbers, reverse=True)  # newest first
    for heading, body in releases():
        kinds = re.findall(r"^### (.*)$", body, re.M)
        assert kinds and set(kinds) <= SECTIONS, (heading, kinds)
        assert len(kinds) == len(set(kinds)), heading


def test_the_newest_release_is_the_version_everything_carries() -> None:
    newest = releases()[1][0]
    assert newest.startswith(f"[{VERSION}] - ")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^ARG VERSION={re.escape(VERSION)}$", dockerfile, re.M)


def test_the_deprecated_keys_are_documented() -> None:
    table = UPGRADING.split("## Deprecated keys", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \| ([^|]*) \|", table, re.M)
    documented = {(path, since.strip()) for path, since, _ in rows}
    assert documented == {(entry.path, entry.since) for entry in compat.DEPRECATED}
    if not compat.DEPRECATED:
        assert "*(none so far)*" in table


def test_the_policy_promises_the_exit_codes_the_cli_returns() -> None:
    (row,) = [line for line in UPGRADING.splitlines() if line.startswith("| exit codes |")]
    promised = {int(code) for code in re.findall(r"\b(\d) (?:after|on)\b", row)}
    assert promised == {cli.EXIT_OK, cli.EXIT_FAILURE, cli.EXIT_CONFIG} == {0, 1, 2}
    assert "0 after a clean stop" in row and "2 on a config error" in row
