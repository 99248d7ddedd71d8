"""The layout rules that import-linter cannot state: no module reaches into another's private
names, and each stage's package says in its docstring what it owns and may import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mailroom

PACKAGE = Path(mailroom.__file__).parent
STAGES = ("sources", "mail", "delivery", "observe", "runtime", "trust", "kinds")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_another_modules_private_names() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mailroom"):
                found += [
                    f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and node.module != importer
                ]
    assert found == [], "make the name public, or move the code that needs it"


def test_every_stage_says_what_it_owns_and_may_import() -> None:
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert doc is not None and "May import" in doc, stage


def test_the_architecture_map_names_every_module() -> None:
    """docs/architecture.md's table is how a maintainer finds the way: a new module gets its
    line there (by file name, or by ``name`` in backquotes)."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py"
        and path.name not in text
        and f"`{path.stem}`" not in text
        and f"{path.stem}." not in text
    ]
    assert missing == [], "name these modules in docs/architecture.md's map"


def test_no_bare_asserts_in_production_code() -> None:
    """An invariant is a real check: ``python -O`` strips an assert (issue 19)."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Assert)
    ]
    assert found == [], "raise an exception that says what broke, or narrow the type without"


def test_the_command_line_starts_without_what_only_some_configs_use() -> None:
    """msal (Graph), PyJWT (webhook.jwt), redis (replicas, Sidekiq), cryptography (a client
    certificate, the credentials file, GitLab's encrypted settings), requests (OAuth tokens),
    aiosmtpd (LMTP), aiosmtplib (reject notices) and charset-normalizer (Sidekiq) are imported
    where they are first used: 25 MiB of a start-up that an IMAP-only config never needs
    (issue 23)."""
    code = (
        "import sys, mailroom.cli, mailroom.kinds, mailroom.runtime.supervisor\n"
        "print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    for lazy in (
        "msal",
        "jwt",
        "redis",
        "cryptography",
        "requests",
        "urllib3",
        "aiosmtpd",
        "aiosmtplib",
        "charset_normalizer",
    ):
        assert f"'{lazy}'" not in found, lazy
