"""Every path the Dockerfile copies is in the build context that ``.dockerignore`` leaves (no
container engine needed): a file left out fails ``docker build`` for every user, and the image
tests (``make test-image``) would be the first to notice."""

from __future__ import annotations

import re
import shlex
import subprocess
from functools import cache

from tests.helpers import ROOT


def _pattern(text: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it (moby/patternmatcher): ``*`` and ``?`` stay
    within one path segment, ``**`` spans any number; leading and trailing ``/`` do not count."""
    out = ""
    parts = re.split(r"(\*\*/?|\*|\?)", text.strip("/"))
    for part in parts:
        if part.startswith("**"):
            out += "(?:.*/)?" if part.endswith("/") else ".*"
        elif part == "*":
            out += "[^/]*"
        elif part == "?":
            out += "[^/]"
        else:
            out += re.escape(part)
    return re.compile(out)


@cache
def _rules() -> tuple[tuple[bool, re.Pattern[str]], ...]:
    """(exclude?, pattern) for every line of .dockerignore, in order."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        keep = text.startswith("!")
        rules.append((not keep, _pattern(text.removeprefix("!"))))
    return tuple(rules)


def in_context(path: str) -> bool:
    """Whether Docker sends ``path`` (relative to the repository) with the build context: the
    last pattern that matches it or one of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for exclude, pattern in _rules():
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            excluded = exclude
    return not excluded


def copied_paths() -> list[str]:
    """The sources of every ``COPY``/``ADD`` of the Dockerfile that reads the build context."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    sources = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        options = [w for w in words[1:] if w.startswith("--")]
        if any(option.startswith("--from") for option in options):
            continue  # from another stage
        sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    return [name for name in listed.decode().split("\0") if name]


def test_the_pattern_reading_matches_docker() -> None:
    assert _pattern("*").fullmatch("anything") and not _pattern("*").fullmatch("a/b")
    assert _pattern("**/__pycache__").fullmatch("mailroom/sources/__pycache__")
    assert _pattern("**/__pycache__").fullmatch("__pycache__")
    assert _pattern("mailroom/").fullmatch("mailroom")


def test_every_path_the_dockerfile_copies_is_in_the_build_context() -> None:
    sources = copied_paths()
    assert {"pyproject.toml", "constraints.txt", "mailroom", "docker/healthcheck"} <= set(sources)
    files = tracked_files()
    for source in sources:
        under = [f for f in files if f == source or f.startswith(source.rstrip("/") + "/")]
        assert under, f"the Dockerfile copies {source}, which is not in the repository"
        left_out = [f for f in under if not in_context(f)]
        assert not left_out, f".dockerignore leaves out {left_out} (the Dockerfile copies them)"


def test_the_build_context_holds_nothing_else() -> None:
    """Tests, docs, secrets under examples/ or a local .venv never reach the build."""
    sent = {f for f in tracked_files() if in_context(f)}
    copied = copied_paths()
    stray = {f for f in sent if not any(f == s or f.startswith(s + "/") for s in copied)}
    assert stray == set()
    for path in (".venv/bin/python", "examples/secrets/imap-password", "mailroom/__pycache__/x"):
        assert not in_context(path), path
