"""The operator kit: alert/recording rules, their promtool tests, the runbook, the dashboard.

promtool comes from ``.tools/prometheus`` (installed on demand by
``scripts/install-prometheus.sh``); the promtool tests are skipped, with the reason,
only where it cannot be installed (``REQUIRE_PROMETHEUS=1`` turns that into a failure).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.prometheus_helper import INSTALL_SCRIPT, REPO_ROOT, TOOLS_DIR, require_prometheus_binaries

RULES = REPO_ROOT / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = REPO_ROOT / "deploy" / "prometheus" / "rules_test.yml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "asset-forwarder.json"
RUNBOOK = REPO_ROOT / "docs" / "runbook.md"

# The public metric contract (issue 5, plus what the collector added since: parked, dead
# letter failures, source stalls, source disconnects/reconnects, the live topology's). tests/test_metrics.py
# checks that the collector exposes exactly these. A histogram also exposes
# _bucket/_sum/_count.
COUNTERS = {
    "forwarder_messages_received_total",
    "forwarder_messages_forwarded_total",
    "forwarder_messages_dead_lettered_total",
    "forwarder_publish_errors_total",
    "forwarder_redeliveries_total",
    "forwarder_slow_consumer_events_total",
    "forwarder_slow_consumer_dropped_total",
    "forwarder_cluster_reconnects_total",
    "forwarder_cluster_disconnects_total",
    "forwarder_messages_parked_total",
    "forwarder_duplicates_total",
    "forwarder_dead_letter_failures_total",
    "forwarder_source_stalls_total",
    "forwarder_source_disconnects_total",
    "forwarder_source_reconnects_total",
    "forwarder_topology_changes_total",
    "forwarder_topology_apply_errors_total",
    "forwarder_grace_publishes_total",
}
GAUGES = {
    "forwarder_pending_messages",
    "forwarder_pending_bytes",
    "forwarder_pending_bytes_limit",
    "forwarder_cluster_pending_bytes",
    "forwarder_cluster_pending_bytes_limit",
    "forwarder_cluster_connected",
    "forwarder_source_connected",
    "forwarder_source_lag_messages",
    "forwarder_ring_share",
    "forwarder_build_info",
    "forwarder_topology_version",
}
HISTOGRAMS = {"forwarder_forward_latency_seconds"}
KNOWN_METRICS = (
    COUNTERS | GAUGES | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("", "_bucket", "_sum", "_count")}
)
METRIC_TOKEN = re.compile(r"(?<![A-Za-z0-9_])forwarder_[A-Za-z0-9_]+")
SEVERITIES = {"critical", "warning", "info"}


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _load_yaml(RULES)["groups"] for rule in group["rules"]]


ALERTS = [r for r in _rules() if "alert" in r]
RECORDS = [r for r in _rules() if "record" in r]


def _github_anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _runbook_anchors() -> dict[str, str]:
    """anchor -> section text, for every '## ' section of the runbook."""
    sections: dict[str, str] = {}
    current = None
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("## "):
            current = _github_anchor(line[3:])
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def _exprs(obj: Any) -> Iterator[str]:
    """Every 'expr' string in a (dashboard) JSON document."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from _exprs(item)


@pytest.fixture(scope="module")
def promtool() -> Path:
    promtool, _ = require_prometheus_binaries()
    return promtool


def _run(cmd: list[str | Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, check=False)


# ------------------------------------------------------------------ promtool


def test_install_script_is_idempotent_and_prints_the_binaries(promtool: Path) -> None:
    proc = _run(["bash", INSTALL_SCRIPT])
    assert proc.returncode == 0, proc.stderr
    assert f"promtool: {TOOLS_DIR / 'promtool'}" in proc.stdout
    assert f"prometheus: {TOOLS_DIR / 'prometheus'}" in proc.stdout
    assert "version" in proc.stdout
    assert promtool == TOOLS_DIR / "promtool"


def test_promtool_check_rules(promtool: Path) -> None:
    proc = _run([promtool, "check", "rules", RULES])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERTS) + len(RECORDS)} rules found" in proc.stdout


def test_promtool_test_rules(promtool: Path) -> None:
    proc = _run([promtool, "test", "rules", RULES_TEST])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def _promtool_test_with(promtool: Path, tmp_path: Path, mutate: Any) -> subprocess.CompletedProcess[str]:
    """Run rules_test.yml against a mutated copy of rules.yml."""
    doc = copy.deepcopy(_load_yaml(RULES))
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                mutate(rule)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    shutil.copy(RULES_TEST, tmp_path / "rules_test.yml")
    return _run([promtool, "test", "rules", tmp_path / "rules_test.yml"])


def _failed_alerts(output: str) -> set[str]:
    return set(re.findall(r"alertname: (\w+), time:", output))


def test_the_unit_tests_notice_an_alert_that_never_fires(promtool: Path, tmp_path: Path) -> None:
    def never(rule: dict[str, Any]) -> None:
        rule["expr"] = "vector(1) == 0"

    proc = _promtool_test_with(promtool, tmp_path, never)
    assert proc.returncode != 0
    assert _failed_alerts(proc.stdout + proc.stderr) == {a["alert"] for a in ALERTS}


def test_the_unit_tests_notice_a_missing_for_duration(promtool: Path, tmp_path: Path) -> None:
    # Every alert has a test evaluating it while its condition holds for less than `for:`.
    def no_for(rule: dict[str, Any]) -> None:
        rule.pop("for", None)

    proc = _promtool_test_with(promtool, tmp_path, no_for)
    assert proc.returncode != 0
    assert _failed_alerts(proc.stdout + proc.stderr) == {a["alert"] for a in ALERTS}


# ------------------------------------------------------------------ rules and their tests


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for case in _load_yaml(RULES_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {a["alert"] for a in ALERTS}
    assert names - firing == set(), "alerts without a test where they fire"
    assert names - silent == set(), "alerts without a test where they must not fire"
    assert (firing | silent) - names == set(), "tests for alerts that do not exist"


def test_every_recording_rule_is_tested() -> None:
    tested = " ".join(
        check["expr"]
        for case in _load_yaml(RULES_TEST)["tests"]
        for check in case.get("promql_expr_test", [])
    )
    untested = [
        r["record"] for r in RECORDS if not re.search(rf"(?<![\w:]){re.escape(r['record'])}(?![\w:])", tested)
    ]
    assert untested == []


@pytest.mark.parametrize("alert", ALERTS, ids=[a["alert"] for a in ALERTS])
def test_alert_has_severity_summary_description_and_runbook(alert: dict[str, Any]) -> None:
    name = alert["alert"]
    assert re.fullmatch(r"Forwarder[A-Z]\w+", name)
    assert alert.get("labels", {}).get("severity") in SEVERITIES
    annotations = alert.get("annotations", {})
    assert set(annotations) == {"summary", "description", "runbook"}
    # Summary and description name where the problem is (instance/cluster/connection/...).
    for key in ("summary", "description"):
        assert re.search(r"\{\{ \$labels\.\w+ \}\}", annotations[key]), f"{key} names no label"
    anchor = name.lower()
    assert annotations["runbook"] == f"docs/runbook.md#{anchor}"
    section = _runbook_anchors().get(anchor)
    assert section is not None, f"docs/runbook.md has no '## {name}' section"
    for part in ("**Means**", "**Check first**", "**Fix**"):
        assert part in section, f"runbook section {name} lacks {part}"


def test_runbook_has_no_section_without_an_alert() -> None:
    assert set(_runbook_anchors()) == {a["alert"].lower() for a in ALERTS}


# ------------------------------------------------------------------ metric names


@pytest.mark.parametrize("path", [RULES, RULES_TEST, DASHBOARD, RUNBOOK], ids=lambda p: p.name)
def test_only_contract_metrics_are_referenced(path: Path) -> None:
    unknown = sorted(set(METRIC_TOKEN.findall(path.read_text())) - KNOWN_METRICS)
    assert unknown == [], f"{path.name} references metrics outside the contract"


def test_the_metric_name_check_catches_an_unknown_name() -> None:
    text = "sum(rate(forwarder_messages_sent_total[1m])) + job:forwarder_messages_received_total:rate1m"
    assert set(METRIC_TOKEN.findall(text)) - KNOWN_METRICS == {"forwarder_messages_sent_total"}


# ------------------------------------------------------------------ dashboard


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def test_dashboard_structure() -> None:
    dash = _dashboard()
    assert dash["schemaVersion"] >= 36
    assert dash["uid"] == "asset-forwarder"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("cluster", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert 'job=~"$job"' in target["expr"], f"{panel['title']}: not filtered by the job variable"


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_covers_the_operator_questions() -> None:
    used = set(METRIC_TOKEN.findall(DASHBOARD.read_text()))
    required = {
        "forwarder_messages_received_total",  # throughput: received vs forwarded
        "forwarder_messages_forwarded_total",
        "forwarder_forward_latency_seconds_bucket",  # latency quantiles
        "forwarder_pending_messages",  # pending, with the limits
        "forwarder_pending_bytes",
        "forwarder_pending_bytes_limit",
        "forwarder_cluster_pending_bytes",
        "forwarder_cluster_pending_bytes_limit",
        "forwarder_slow_consumer_events_total",  # slow consumers
        "forwarder_slow_consumer_dropped_total",
        "forwarder_cluster_connected",  # connection state
        "forwarder_source_connected",
        "forwarder_source_disconnects_total",  # a server-side slow consumer shows only as this
        "forwarder_source_lag_messages",  # lag
        "forwarder_messages_dead_lettered_total",  # dead letters by reason
        "forwarder_messages_parked_total",  # JetStream source: parked while a cluster is down
        "forwarder_ring_share",
        "forwarder_topology_version",  # live topology: do the replicas agree, do changes apply
        "forwarder_topology_apply_errors_total",
        "forwarder_grace_publishes_total",
        "forwarder_duplicates_total",
    }
    assert required - used == set()


def test_dashboard_queries_are_valid_promql(promtool: Path, tmp_path: Path) -> None:
    # Grafana's variables replaced by what "All" and the rate interval expand to, each
    # query checked by promtool as a recording rule.
    substitutions = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*", "$cluster": ".*"}
    exprs = list(_exprs(_dashboard()))
    rules = []
    for i, expr in enumerate(exprs):
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = _run([promtool, "check", "rules", path])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(exprs) >= 30
