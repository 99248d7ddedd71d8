"""The compose examples are valid against the Compose specification's JSON schema (the copy
check-jsonschema ships: no network), and every file, secret and service they name exists.
`make test-image` runs docker-compose.yml itself (tests/test_image.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT

EXAMPLES = ROOT / "examples"
COMPOSE_FILES = sorted(
    p for p in EXAMPLES.glob("docker-compose*.yml") if "services" in yaml.safe_load(p.read_text())
)


def check_jsonschema(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_compose_files_are_found() -> None:
    names = [p.name for p in COMPOSE_FILES]
    assert names == ["docker-compose.replicas.yml", "docker-compose.yml"]


def test_the_compose_files_follow_the_compose_specification(tmp_path: Path) -> None:
    result = check_jsonschema(*COMPOSE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "docker-compose.yml"  # the check finds what compose would refuse
    broken.write_text("services:\n  mailroom:\n    image: mailroom\n    cap_drops: [ALL]\n")
    refused = check_jsonschema(broken)
    assert refused.returncode == 1 and "cap_drops" in refused.stdout, refused.stdout


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_file_secret_and_service_named_exists(path: Path) -> None:
    compose: dict[str, Any] = yaml.safe_load(path.read_text())
    services, secrets = compose["services"], compose.get("secrets", {})
    header = path.read_text().split("\nservices:", 1)[0]
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on {dependency}"
        for secret in service.get("secrets", []):
            assert secret in secrets, f"{name} uses secret {secret}, not defined"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (path.parent / source).exists(), f"{name} mounts {source}"
        if "build" in service:
            assert (path.parent / service["build"]["context"] / "Dockerfile").exists()
        mounted = {
            v.split(":")[1]: (path.parent / v.split(":", 1)[0])
            for v in service.get("volumes", [])
            if v.split(":", 1)[0].startswith(".")
        }
        config = mounted.get("/etc/mailroom/mailroom.yml")
        if config is not None:  # the secrets the mailroom config reads are the service's
            used = re.findall(r"/run/secrets/([a-z-]+)", config.read_text())
            assert set(used) <= set(service.get("secrets", [])), name
            url = yaml.safe_load(config.read_text())["webhook"]["url"]
            assert re.match(r"http://([a-z0-9-]+):", url)[1] in services  # type: ignore[index]
        commands = " ".join(service.get("command", []) + service.get("entrypoint", []))
        for secret in re.findall(r"/run/secrets/([a-z-]+)", commands):
            assert secret in service.get("secrets", []), f"{name} reads secret {secret}"
    for name, secret in secrets.items():  # the header tells users to make each file
        assert secret["file"].startswith("./secrets/")
        assert secret["file"].removeprefix("./") in header, f"{path.name}'s header: {name}"
