"""The deployment kit under deploy/ (issue 13, item 7): the alert rules pass `promtool check
rules` and their unit tests `promtool test rules`; the scrape configuration passes `promtool check
config`; every dashboard query parses and reads documented metrics.

Each external check is shown to fail on a broken copy first, so a pass means something. Without
promtool these tests skip, unless STEMEDB_REQUIRE_OPS_TOOLS=1, which makes a missing tool a
failure."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
from typing import Any

import pytest

from stemedb.server.http import OPEN_ROUTES

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
SCRAPE = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "stemedb.json"
OPERATIONS = ROOT / "docs" / "operations.md"

# What the issue asks the alert rules to cover, and the alert that covers it.
REQUIRED_ALERTS = {
    "store failed": "StemeDBStoreFailed",
    "fsync p99": "StemeDBFsyncSlow",
    "disk nearly full": "StemeDBDiskNearlyFull",
    "archive lag": "StemeDBArchiveLag",
    "node down": "StemeDBNodeDown",
    "server down": "StemeDBDown",
}
# What the issue asks the dashboard to cover, and a metric a panel for it must read.
REQUIRED_PANELS = {
    "writes": "stemedb_writes_total",
    "fsync latency": "stemedb_wal_fsync_seconds_bucket",
    "commit batch sizes": "stemedb_group_commit_batch_records_bucket",
    "query latency by lens": "stemedb_query_seconds_bucket",
    "rejections": "stemedb_requests_rejected_total",
    "connections": "stemedb_connections",
    "disk": "stemedb_filesystem_avail_bytes",
    "archive lag": "stemedb_archive_lag_seconds",
    "replication lag": "stemedb_replication_lag_seconds",
}


def required(message: str) -> None:
    if os.environ.get("STEMEDB_REQUIRE_OPS_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


try:
    import yaml
except ImportError:  # PyYAML: a test dependency of these checks only (CI installs it)
    yaml = None


def load_yaml(text: str) -> Any:
    if yaml is None:
        required("PyYAML is not installed (pip install pyyaml)")
    return yaml.safe_load(text)


def dump_yaml(document: Any) -> str:
    if yaml is None:
        required("PyYAML is not installed (pip install pyyaml)")
    return str(yaml.safe_dump(document))


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        required(f"{name} is not installed (Debian: apt-get install {_package(name)})")
    assert path is not None
    return path


def _package(name: str) -> str:
    return {"promtool": "prometheus"}.get(name, name)


def run(*command: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def documented_metrics() -> set[str]:
    """The sample names docs/operations.md's metric table lists (histograms with their series)."""
    names: set[str] = set()
    for name, kind in re.findall(r"^\| `(stemedb_\w+)` \| (counter|gauge|histogram) \|",
                                 OPERATIONS.read_text(), re.MULTILINE):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return names


PROCESS_METRICS = {"up", "process_resident_memory_bytes", "process_cpu_seconds_total",
                   "process_open_fds", "process_max_fds", "process_start_time_seconds",
                   "process_virtual_memory_bytes"}


def metrics_in(expression: str) -> set[str]:
    return set(re.findall(r"\b(?:stemedb_\w+|process_\w+|up)\b(?=\s*[{\[)]|\s*$|\s*[/<>=*+-])",
                          expression))


# ------------------------------------------------------------------ Prometheus


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    promtool = tool("promtool")
    checked = run(promtool, "check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run(promtool, "test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_alert_unit_tests_fail_on_a_broken_rule(tmp_path):
    """The unit tests are able to fail: a raised threshold, a quiet rule, a changed message."""
    promtool = tool("promtool")
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    rules = ALERTS.read_text()
    for broken, alert in (
        (rules.replace("rate(stemedb_wal_fsync_seconds_bucket[5m]))) > 0.1",
                       "rate(stemedb_wal_fsync_seconds_bucket[5m]))) > 0.5"), "StemeDBFsyncSlow"),
        (rules.replace("stemedb_archive_lag_seconds > 60", "stemedb_archive_lag_seconds > 600"),
         "StemeDBArchiveLag"),
        (rules.replace("max by (node) (stemedb_node_up) == 0", "min by (node) (stemedb_node_up) == 0"),
         "StemeDBNodeDown"),
        (rules.replace("refuses writes after a failed fsync", "has a problem"), "StemeDBStoreFailed"),
    ):
        assert broken != rules, alert
        (tmp_path / ALERTS.name).write_text(broken)
        result = run(promtool, "test", "rules", ALERT_TESTS.name, cwd=tmp_path)
        assert result.returncode != 0, alert
        assert f"alertname: {alert}" in result.stdout + result.stderr, result.stdout


def test_every_required_alert_exists_and_is_unit_tested_firing_and_quiet():
    rules = {rule["alert"]: rule for group in load_yaml(ALERTS.read_text())["groups"]
             for rule in group["rules"]}
    for condition, alert in REQUIRED_ALERTS.items():
        assert alert in rules, condition
    cases: dict[str, list[Any]] = {}
    for test in load_yaml(ALERT_TESTS.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            cases.setdefault(case["alertname"], []).append(case["exp_alerts"])
    for alert, rule in rules.items():
        assert any(expected for expected in cases.get(alert, [])), f"{alert}: no firing case"
        assert any(not expected for expected in cases.get(alert, [])), f"{alert}: no quiet case"
        assert rule["labels"]["severity"] in ("warning", "critical"), alert
        assert {"summary", "description"} <= set(rule["annotations"]), alert
        for name in metrics_in(rule["expr"]):
            assert name in documented_metrics() | PROCESS_METRICS, f"{alert} reads {name}"


def test_scrape_configuration_passes_promtool_check_config(tmp_path):
    """The example scrape job is valid (its CA and token files replaced by files that exist)."""
    promtool = tool("promtool")
    config = SCRAPE.read_text()
    files = set(re.findall(r"/etc/prometheus/[\w.-]+", config))
    assert files, "the example names its CA and token files"
    for path in files:
        local = tmp_path / pathlib.Path(path).name
        local.write_text("placeholder\n")
        config = config.replace(path, str(local))
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    result = run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    job = load_yaml(SCRAPE.read_text())["scrape_configs"][0]
    assert job["job_name"] == "stemedb" and 'up{job="stemedb"}' in ALERTS.read_text()
    assert job["metrics_path"] in OPEN_ROUTES


# ------------------------------------------------------------------ Grafana


def dashboard_queries() -> list[tuple[str, str]]:
    document = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in document["panels"]
            for target in panel.get("targets", [])]


def test_dashboard_is_well_formed():
    document = json.loads(DASHBOARD.read_text())
    assert document["uid"] and document["title"] == "StemeDB"
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in document["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + \
            panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    for title, expression in dashboard_queries():
        assert 'instance=~"$instance"' in expression, title


def test_dashboard_covers_what_the_issue_asks():
    by_metric: dict[str, list[str]] = {}
    for title, expression in dashboard_queries():
        for name in metrics_in(expression):
            by_metric.setdefault(name, []).append(title)
    for topic, metric in REQUIRED_PANELS.items():
        assert metric in by_metric, f"no panel shows {topic} ({metric})"


def test_dashboard_queries_read_documented_metrics_and_parse(tmp_path):
    """Every query reads metrics the server documents, and parses as PromQL (promtool)."""
    for title, expression in dashboard_queries():
        for name in metrics_in(expression):
            assert name in documented_metrics() | PROCESS_METRICS, f"{title}: {name}"
    promtool = tool("promtool")
    rules = [{"record": f"dashboard:query_{index}",
              "expr": expression.replace("$__rate_interval", "5m").replace("$instance", ".*")}
             for index, (_, expression) in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(dump_yaml({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    path.write_text(dump_yaml({"groups": [{"name": "broken", "rules": [
        {"record": "dashboard:broken", "expr": "sum by (instance (rate(stemedb_writes_total[5m]))"}]}]}))
    assert run(promtool, "check", "rules", str(path)).returncode != 0  # the check can fail
