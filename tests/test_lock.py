"""constraints.txt pins every dependency pyproject.toml names (run `make lock` after a change)."""

from __future__ import annotations

import re
import tomllib

from tests.helpers import ROOT


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def test_every_dependency_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        wanted += extra
    pinned = {
        _name(line): line.split("==", 1)[1].split(";")[0].strip()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    missing = sorted({_name(r) for r in wanted} - set(pinned))
    assert not missing, f"not in constraints.txt: {missing}; run `make lock`"
    assert pinned["aioimaplib"] == "2.0.3"  # pinned in pyproject.toml too (its private parts)
