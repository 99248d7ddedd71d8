"""The Kubernetes examples are checked, not just written: every manifest against Kubernetes' own
schemas (kubernetes-validate, whose schemas come with the package: no network), and the files
against each other as the kubelet would meet them: every ConfigMap, Secret, key, volume and
Service they name exists; every file a container is told to read (a ``*_file`` of the mailroom
config, a path in a command or an environment variable) is mounted and readable by the
container's user under the pod's fsGroup and the volume's mode; the probes ask the port the
config's ``health.listen`` opens."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from mailroom.config.document import walk
from tests.helpers import ROOT

EXAMPLES = ROOT / "examples"
KUBERNETES = EXAMPLES / "kubernetes"
# The oldest release the examples are for (deployment.yaml's preStop sleep needs 1.30) and the
# newest the package knows.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
IMAGE_UID = 10001  # the Dockerfile's USER, for a container that does not set runAsUser
SECRET_MODE = 0o644  # the kubelet's defaultMode


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def manifests() -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Every Kubernetes object among the examples (a document with apiVersion and kind)."""
    for path in sorted(EXAMPLES.rglob("*.y*ml")):
        for i, doc in enumerate(documents(path)):
            if "apiVersion" in doc and "kind" in doc:
                yield str(path.relative_to(EXAMPLES)), i, doc


MANIFESTS = list(manifests())


def test_the_manifests_are_found() -> None:
    names = {(doc["kind"], doc["metadata"]["name"]) for _, _, doc in MANIFESTS}
    assert {
        ("ConfigMap", "mailroom"),
        ("Secret", "mailroom-credentials"),
        ("Deployment", "app"),
        ("Deployment", "mailroom"),
        ("Service", "app"),
        ("Service", "mailroom-redis"),
    } <= names


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("name", "index", "doc"), MANIFESTS, ids=[f"{n}#{i}" for n, i, _ in MANIFESTS]
)
def test_the_manifest_is_valid_kubernetes(
    name: str, index: int, doc: dict[str, Any], version: str
) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name} document {index}: {exc.message} (at {exc.path})")


def test_the_validation_finds_what_the_kubelet_would_refuse() -> None:
    """defaultMode 0o400 is a string to Kubernetes' YAML (YAML 1.1 writes octal as 0400)."""
    deployment = objects("Deployment")["mailroom"]
    text = yaml.safe_dump(deployment)
    assert "defaultMode: 288" in text
    broken = yaml.safe_load(text.replace("defaultMode: 288", "defaultMode: 0o400"))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


# -- the files against each other ------------------------------------------------------------


def objects(kind: str) -> dict[str, dict[str, Any]]:
    """The examples/kubernetes objects of one kind, by name."""
    found = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in documents(path):
            if doc.get("kind") == kind:
                found[doc["metadata"]["name"]] = doc
    return found


def keys(obj: dict[str, Any]) -> set[str]:
    return set(obj.get("data") or {}) | set(obj.get("stringData") or {})


@dataclass(frozen=True)
class Mounted:
    """A file that a ConfigMap or Secret volume shows."""

    kind: str  # ConfigMap or Secret
    name: str
    key: str
    mode: int


@dataclass
class Container:
    """One container of a Deployment, with what its pod gives it."""

    workload: str
    spec: dict[str, Any]
    pod: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.workload}/{self.spec['name']}"

    def context(self, key: str) -> Any:
        """A securityContext setting: the container's, else the pod's."""
        own = (self.spec.get("securityContext") or {}).get(key)
        return own if own is not None else (self.pod.get("securityContext") or {}).get(key)

    def volume(self, path: str) -> tuple[dict[str, Any], str] | None:
        """The volume mounted where ``path`` is, and the path inside it."""
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        for mount in self.spec.get("volumeMounts", []):
            root = mount["mountPath"].rstrip("/") + "/"
            if path.startswith(root):
                return volumes[mount["name"]], path.removeprefix(root)
        return None

    def read(self, path: str) -> Mounted:
        """The ConfigMap or Secret key that ``path`` shows, or a failed test."""
        found = self.volume(path)
        assert found is not None, f"{self.name} reads {path}, which no volume mounts"
        volume, inside = found
        kind = "Secret" if "secret" in volume else "ConfigMap"
        source = volume.get("secret") or volume.get("configMap")
        assert source is not None, f"{self.name}: {path} is on volume {volume['name']}"
        mode, key = source.get("defaultMode", SECRET_MODE), inside
        if "items" in source:
            item = next((i for i in source["items"] if i["path"] == inside), None)
            assert item is not None, f"{self.name}: {path}: not among {volume['name']}'s items"
            key, mode = item["key"], item.get("mode", mode)
        return Mounted(kind, source.get("secretName") or source["name"], key, mode)

    def readable(self, mode: int) -> bool:
        """The kubelet writes ConfigMap and Secret files owned by root, group fsGroup (root
        without one); the processes get fsGroup as a supplementary group."""
        uid = self.context("runAsUser")
        uid = IMAGE_UID if uid is None else uid
        if uid == 0:
            return True
        fs_group = (self.pod.get("securityContext") or {}).get("fsGroup")
        gid = self.context("runAsGroup")
        in_group = fs_group is not None or gid == 0
        return bool(mode & 0o004 or (in_group and mode & 0o040))

    def paths(self) -> set[str]:
        """The files under /run/secrets or /etc/mailroom its command and environment name."""
        texts = [*self.spec.get("command", []), *self.spec.get("args", [])]
        texts += [e.get("value", "") for e in self.spec.get("env", [])]
        return {
            p for text in texts for p in re.findall(r"/(?:run/secrets|etc/mailroom)/[\w./-]+", text)
        }


def containers() -> list[Container]:
    found = []
    for name, deployment in objects("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        found += [Container(name, spec, pod) for spec in pod["containers"]]
    return found


def mailroom_config(container: Container) -> dict[str, Any] | None:
    """The mailroom config a container runs with (``-c FILE`` from a ConfigMap), or None."""
    args = container.spec.get("args", [])
    if "-c" not in args:
        return None
    file = container.read(args[args.index("-c") + 1])
    config: dict[str, Any] = yaml.safe_load(objects(file.kind)[file.name]["data"][file.key])
    return config


def test_the_mailroom_containers_are_found() -> None:
    running = [c.name for c in containers() if mailroom_config(c) is not None]
    assert running == ["app/mailroom", "mailroom/mailroom"]


def test_every_configmap_secret_key_and_volume_named_exists() -> None:
    config_maps, secrets = objects("ConfigMap"), objects("Secret")
    for container in containers():
        volumes = {v["name"]: v for v in container.pod.get("volumes", [])}
        for mount in container.spec.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{container.name}: no volume {mount['name']}"
        for volume in volumes.values():
            if "secret" in volume:
                source, known, name = volume["secret"], secrets, volume["secret"]["secretName"]
            elif "configMap" in volume:
                source, known, name = volume["configMap"], config_maps, volume["configMap"]["name"]
            else:
                continue
            assert name in known, (
                f"{container.name}: volume {volume['name']} names {name}, which no example defines"
            )
            for item in source.get("items", []):
                assert item["key"] in keys(known[name]), f"{name} has no key {item['key']}"
        for env in container.spec.get("env", []):
            ref = env.get("valueFrom", {})
            for kind, known in (("secretKeyRef", secrets), ("configMapKeyRef", config_maps)):
                if kind in ref:
                    assert ref[kind]["key"] in keys(known[ref[kind]["name"]])


def test_every_file_a_container_is_told_to_read_is_mounted_and_readable() -> None:
    checked = []
    for container in containers():
        config = mailroom_config(container)
        paths = container.paths()
        if config is not None:
            paths |= {
                value
                for path, value in walk(config)
                if path.endswith("_file") and isinstance(value, str)
            }
        for path in sorted(paths):
            file = container.read(path)
            assert file.key in keys(objects(file.kind)[file.name]), f"{file.name} has no {file.key}"
            assert container.readable(file.mode), (
                f"{container.name} cannot read {path}: mode {file.mode:o}, "
                f"runAsUser {container.context('runAsUser')}, no fsGroup to read it by"
            )
            checked.append(f"{container.name}:{path}")
    assert "app/mailroom:/run/secrets/mailroom/imap-password" in checked
    assert "app/app:/run/secrets/app/webhook-signing-secret" in checked
    assert "mailroom/mailroom:/run/secrets/redis/password" in checked
    assert "mailroom-redis/redis:/run/secrets/redis/password" in checked


def test_a_secret_file_without_fsgroup_is_found_unreadable() -> None:
    (container,) = (c for c in containers() if c.name == "mailroom/mailroom")
    pod = {**container.pod, "securityContext": {"runAsUser": 10001}}
    assert not Container(container.workload, container.spec, pod).readable(0o440)
    assert container.readable(0o440)


def test_the_probes_ask_the_port_health_listen_opens() -> None:
    for container in containers():
        config = mailroom_config(container)
        if config is None:
            continue
        host, _, port = config["health"]["listen"].rpartition(":")
        assert host == "0.0.0.0", f"{container.name}: the kubelet probes the pod's IP"
        ports = {p.get("name"): p["containerPort"] for p in container.spec["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            target = container.spec[probe]["httpGet"]["port"]
            assert ports.get(target, target) == int(port), f"{container.name}.{probe}"
        annotations = objects("Deployment")[container.workload]["spec"]["template"]["metadata"]
        assert annotations["annotations"]["prometheus.io/port"] == port


def test_the_services_the_configs_name_exist_and_select_pods() -> None:
    services = objects("Service")
    pods = [d["spec"]["template"] for d in objects("Deployment").values()]
    for service in services.values():
        selector = service["spec"]["selector"]
        selected = [p for p in pods if selector.items() <= p["metadata"]["labels"].items()]
        assert selected, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            named = {
                p.get("name")
                for pod in selected
                for c in pod["spec"]["containers"]
                for p in c.get("ports", [])
            }
            assert port["targetPort"] in named
    for container in containers():
        config = mailroom_config(container)
        if config is None:
            continue
        urls = [config["webhook"]["url"], (config.get("arbitration") or {}).get("url")]
        for url in filter(None, urls):
            parts = urlsplit(url)
            if parts.hostname in ("127.0.0.1", "localhost"):
                continue  # the same pod
            assert parts.hostname in services, f"{container.name}: {url} names no Service"
            service_ports = [p["port"] for p in services[parts.hostname]["spec"]["ports"]]
            assert parts.port in service_ports, f"{url}: the Service has ports {service_ports}"


def test_redis_asks_for_the_password_the_replicas_send() -> None:
    (redis,) = (c for c in containers() if c.name == "mailroom-redis/redis")
    (replica,) = (c for c in containers() if c.name == "mailroom/mailroom")
    config = mailroom_config(replica)
    assert config is not None
    password_file = config["arbitration"]["password_file"]
    command = " ".join(redis.spec["command"])
    (asked,) = re.findall(r'--requirepass "\$\(cat ([^)]+)\)"', command)
    assert posixpath.basename(asked) == posixpath.basename(password_file)
    redis_volume, replica_volume = redis.volume(asked), replica.volume(password_file)
    assert redis_volume is not None and replica_volume is not None
    assert redis_volume[0]["secret"]["secretName"] == replica_volume[0]["secret"]["secretName"]


def test_the_sidecar_app_reads_the_signing_secret_mailroom_signs_with() -> None:
    (mailroom,) = (c for c in containers() if c.name == "app/mailroom")
    (app,) = (c for c in containers() if c.name == "app/app")
    config = mailroom_config(mailroom)
    assert config is not None
    signs_with = mailroom.read(config["webhook"]["signing_secret_file"])
    assert [app.read(path) for path in sorted(app.paths())] == [signs_with]
