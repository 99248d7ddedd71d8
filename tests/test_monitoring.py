"""examples/monitoring: the alerting rules pass ``promtool check rules`` and their unit tests,
the dashboard's queries are valid PromQL in an importable dashboard, and every metric, label and
label value they use exists in the ``/metrics`` of a running mailroom (replicas included)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mailroom.config import parse_config
from tests.helpers import ROOT, config_dict, mailbox_dict, message, running, wait_until
from tests.servers.dovecot import Account, Dovecot, free_port
from tests.servers.redis import RedisServer
from tests.servers.smtp import SmtpServer
from tests.servers.webhook import WebhookReceiver

MONITORING = ROOT / "examples" / "monitoring"
RULES = MONITORING / "mailroom-alerts.yml"
DASHBOARD = MONITORING / "mailroom-dashboard.json"
RULE_TESTS = ROOT / "tests" / "monitoring" / "mailroom-alerts.test.yml"
# On the PATH, or where `make test` puts it (from Debian's prometheus package).
PROMTOOL = shutil.which("promtool") or str(Path(sys.executable).with_name("promtool"))

# What Grafana puts in for its variables, to hand the queries to promtool.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__range": "6h",
    "$job": ".*",
    "$instance": ".*",
    "$mailbox": ".*",
    "$webhook": ".*",
}
# Labels that Prometheus adds when it scrapes, not mailroom.
TARGET_LABELS = {"job", "instance"}
_SELECTOR = re.compile(r"\b(mailroom_[a-z_]+|up)\b(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'([a-z_]+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*([a-z_]+)\)$")


@pytest.fixture
def promtool() -> str:
    if not Path(PROMTOOL).exists():
        pytest.fail(
            "promtool is missing: run `make promtool` (it takes it out of Debian's prometheus "
            "package into .venv/bin), or install Prometheus's promtool on the PATH",
            pytrace=False,
        )
    return PROMTOOL


def run(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=cwd, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def fill(query: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    return query


def dashboard_queries() -> dict[str, str]:
    """name → PromQL of every panel target and variable query, Grafana's variables filled."""
    data = dashboard()
    queries = {
        f"panel {panel['id']} ({panel['title']}) {target['refId']}": target["expr"]
        for panel in panels(data["panels"])
        for target in panel.get("targets", [])
    }
    for variable in data["templating"]["list"]:
        if variable["type"] == "query":
            match = _LABEL_VALUES.match(variable["query"]["query"])
            assert match, f"variable {variable['name']}: label_values(<selector>, <label>)"
            queries[f"variable {variable['name']}"] = match[1]
    for name, query in queries.items():
        queries[name] = filled = fill(query)
        assert "$" not in filled, f"{name}: a variable the dashboard does not define: {filled}"
    return queries


def all_queries() -> dict[str, str]:
    return dashboard_queries() | {f"alert {r['alert']}": r["expr"] for r in rules()}


def test_the_rules_pass_promtool(promtool: str) -> None:
    out = run(promtool, "check", "rules", str(RULES))
    assert f"SUCCESS: {len(rules())} rules found" in out


def test_the_alerts_fire_as_their_unit_tests_expect(promtool: str, tmp_path: Path) -> None:
    data = yaml.safe_load(RULES.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
            del rule["annotations"]  # checked by promtool check rules; the tests check labels
    (tmp_path / RULES.name).write_text(yaml.safe_dump(data))
    shutil.copy(RULE_TESTS, tmp_path)
    assert "SUCCESS" in run(promtool, "test", "rules", RULE_TESTS.name, cwd=tmp_path)
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {r["alert"] for r in rules()}


def test_the_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) > 40
    recording = [{"record": f"dashboard:q{n}", "expr": q} for n, q in enumerate(queries.values())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}))
    assert f"SUCCESS: {len(recording)} rules found" in run(promtool, "check", "rules", str(path))


def test_the_dashboard_imports_with_a_prometheus_datasource_variable() -> None:
    data = dashboard()
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert data["uid"] == "mailroom" and "id" not in data  # Grafana assigns the id on import
    source = {"type": "prometheus", "uid": "${datasource}"}
    ids = []
    cells: set[tuple[int, int]] = set()
    for panel in panels(data["panels"]):
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        covered = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]
        assert panel["datasource"] == source, panel["title"]
        assert all(t["datasource"] == source for t in panel["targets"]), panel["title"]
    for name in ("job", "instance", "mailbox", "webhook"):
        assert variables[name]["datasource"] == source
    assert len(ids) == len(set(ids))


def used(queries: dict[str, str]) -> tuple[dict[str, dict[str, set[str]]], set[str]]:
    """The metrics the queries select, with their matchers (label → values matched with = or
    =~ a|b), and every label they aggregate or join on."""
    metrics: dict[str, dict[str, set[str]]] = {}
    grouping: set[str] = set()
    for query in queries.values():
        for name, matchers in _SELECTOR.findall(query):
            labels = metrics.setdefault(name, {})
            for label, op, value in _MATCHER.findall(matchers):
                values = labels.setdefault(label, set())
                if op == "=":
                    values.add(value)
                elif op == "=~" and re.fullmatch(r"[\w|]+", value):
                    values.update(value.split("|"))
        for labels in _GROUPING.findall(query):
            grouping.update(label.strip() for label in labels.split(",") if label.strip())
    return metrics, grouping


def test_the_queries_are_understood() -> None:
    metrics, grouping = used(all_queries())
    assert len(metrics) > 25
    assert metrics["mailroom_settled_total"]["outcome"] == {"delivered", "dead_lettered"}
    assert metrics["mailroom_webhook_requests_total"]["status"] == {"5xx", "3xx", "error"}
    assert {"mailbox", "webhook", "le", "outcome", "status", "kind", "change"} <= grouping


async def test_every_metric_used_exists_in_a_live_metrics(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp: SmtpServer,
    redis_server: RedisServer,
) -> None:
    port = free_port()
    config = config_dict(
        [mailbox_dict(dovecot, account)],
        webhook.url,
        reject_notices={
            "from": "Example <noreply@example.com>",
            "smtp": {"host": smtp.host, "port": smtp.port, "timeout": 5},
        },
    )
    config["health"] = {"listen": f"127.0.0.1:{port}"}
    config["arbitration"] = {"method": "redis", "url": redis_server.url, "lease_ttl": 3}
    await dovecot.aappend_many(
        account,
        [message(1), message(2, to="someone@elsewhere.example")],  # 2: a notice
    )
    box = account.user
    live: dict[str, list[tuple[dict[str, str], float]]] = {}

    async def scrape() -> bool:
        """True once the message is delivered, the notice sent and the lease held."""
        live.clear()
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(f"http://127.0.0.1:{port}/metrics") as response,
            ):
                text = await response.text()
        except aiohttp.ClientConnectionError:  # not listening yet
            return False
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                live.setdefault(sample.name, []).append((sample.labels, sample.value))
        values = {
            (name, tuple(sorted(labels.items()))): value
            for name, samples in live.items()
            for labels, value in samples
        }
        return (
            values.get(("mailroom_settled_total", (("mailbox", box), ("outcome", "delivered"))))
            == 1
            and values.get(("mailroom_notices_total", (("mailbox", box), ("result", "sent")))) == 1
            and values.get(("mailroom_leases_held", ())) == 1
        )

    async with running(parse_config(config, env={})):
        await wait_until(scrape, what="delivered, a notice sent, the lease held")

    metrics, grouping = used(all_queries())
    for name, matchers in sorted(metrics.items()):
        if name == "up":  # Prometheus's own, per scrape target
            continue
        assert name in live, f"{name} is used by examples/monitoring but not in /metrics"
        seen: dict[str, set[str]] = {}
        for labels, _ in live[name]:
            for label, value in labels.items():
                seen.setdefault(label, set()).add(value)
        for label, values in matchers.items():
            if label in TARGET_LABELS:
                continue
            assert label in seen, f"{name}{{{label}=...}}: mailroom exports no label {label}"
            assert values <= seen[label], f"{name}: no series with {label} in {values}"
    exported = {label for samples in live.values() for labels, _ in samples for label in labels}
    assert grouping - TARGET_LABELS <= exported
