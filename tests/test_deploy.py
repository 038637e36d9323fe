"""The deployment kit under deploy/ (issue 13, items 7 and 8): the alert rules pass `promtool check
rules` and their unit tests `promtool test rules`; the scrape configuration passes `promtool check
config`; every dashboard query parses and reads documented metrics; the systemd units pass
`systemd-analyze verify`; the Dockerfile runs `stemedb serve` on the default ports and a volume.

Each external check is shown to fail on a broken copy first, so a pass means something. Without
promtool or systemd-analyze these tests skip, unless STEMEDB_REQUIRE_OPS_TOOLS=1 (CI sets it),
which makes a missing tool a failure."""

from __future__ import annotations

import configparser
import json
import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess
import sys
from typing import Any

import pytest

import stemedb
from stemedb.server.config import DEFAULT_LISTEN, SETTINGS_BY_VARIABLE, ServerConfig, parse_address
from stemedb.server.http import OPEN_ROUTES

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
SCRAPE = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "stemedb.json"
SYSTEMD = DEPLOY / "systemd"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
OPERATIONS = ROOT / "docs" / "operations.md"
EXAMPLE = ROOT / "examples" / "stemedb.toml"
INSTALLED = "/opt/stemedb/bin/stemedb"  # where the units expect the package (docs/operations.md)
SRC = str(pathlib.Path(stemedb.__file__).resolve().parent.parent)

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
    return {"promtool": "prometheus", "systemd-analyze": "systemd"}.get(name, name)


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


# ------------------------------------------------------------------ systemd


def unit_files() -> list[pathlib.Path]:
    return sorted(p for p in SYSTEMD.iterdir() if p.suffix in (".service", ".timer"))


def read_unit(path: pathlib.Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def systemd_verify(directory: pathlib.Path) -> str:
    """Everything systemd-analyze verify said about the units in `directory`, '' when clean.

    It exits 0 on an unknown key or a timer whose unit is missing (it only warns, or says
    nothing), so its output counts as a failure too, and timers are checked here.
    """
    analyze = tool("systemd-analyze")
    units = sorted(str(p) for p in directory.iterdir() if p.suffix in (".service", ".timer"))
    result = run(analyze, "verify", "--man=no", *units, cwd=directory)
    problems = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and not problems:
        problems = f"systemd-analyze verify exited {result.returncode}"
    for timer in directory.glob("*.timer"):
        target = read_unit(timer).get("Timer", "Unit", fallback=timer.stem + ".service")
        if not (directory / target).exists():
            problems += f"\n{timer.name}: starts {target}, which is not among the units"
    return problems.strip()


def installed_copy(tmp_path: pathlib.Path) -> pathlib.Path:
    """The units with ExecStart's /opt/stemedb/bin/stemedb replaced by an executable that exists."""
    stub = tmp_path / "opt" / "stemedb" / "bin" / "stemedb"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    units = tmp_path / "units"
    units.mkdir()
    for path in unit_files():
        (units / path.name).write_text(path.read_text().replace(INSTALLED, str(stub)))
    return units


def test_units_pass_systemd_analyze_verify(tmp_path):
    """As shipped, with the package's executable in place (CI verifies them at /opt/stemedb)."""
    assert systemd_verify(installed_copy(tmp_path)) == ""


def test_systemd_check_fails_on_broken_units(tmp_path):
    units = installed_copy(tmp_path)
    if not pathlib.Path(INSTALLED).exists():
        missing = tmp_path / "missing"
        shutil.copytree(units, missing)
        server = missing / "stemedb.service"
        server.write_text(server.read_text().replace(str(tmp_path / "opt"), "/opt"))
        assert "is not executable" in systemd_verify(missing)
    for name, old, new, said in (
        ("stemedb.service", "NoNewPrivileges=yes", "NoNewPrivilege=yes", "Unknown key"),
        ("stemedb-backup.timer", "OnCalendar=*-*-* 02:30:00", "OnCalendar=nightly-ish",
         "Failed to parse"),
        ("stemedb-verify.timer", "Unit=stemedb-verify.service", "Unit=stemedb-scrub.service",
         "stemedb-scrub.service, which is not among the units"),
    ):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(units, broken)
        text = (broken / name).read_text()
        assert old in text, (name, old)
        (broken / name).write_text(text.replace(old, new))
        assert said in systemd_verify(broken), name


def exec_start(name: str) -> list[str]:
    return shlex.split(read_unit(SYSTEMD / name).get("Service", "ExecStart"))


def test_units_run_the_installed_command_on_one_data_directory():
    serve, backup, verify = (exec_start(n) for n in ("stemedb.service", "stemedb-backup.service",
                                                      "stemedb-verify.service"))
    assert serve[:2] == [INSTALLED, "serve"] and backup[:2] == [INSTALLED, "backup"]
    assert verify[:2] == [INSTALLED, "verify"]
    data = {command[command.index("--data") + 1] for command in (serve, backup)}
    server = read_unit(SYSTEMD / "stemedb.service")
    assert data == {"/var/lib/" + server.get("Service", "StateDirectory")}
    config = serve[serve.index("--config") + 1]
    assert config == f"/etc/{server.get('Service', 'ConfigurationDirectory')}/stemedb.toml"
    destination = backup[backup.index("--to") + 1]
    backup_unit = read_unit(SYSTEMD / "stemedb-backup.service")
    assert backup_unit.get("Service", "ReadWritePaths") == destination
    assert f"d {destination} " in (SYSTEMD / "stemedb.tmpfiles.conf").read_text()
    users = {read_unit(SYSTEMD / n).get("Service", "User") for n in
             ("stemedb.service", "stemedb-backup.service", "stemedb-verify.service")}
    assert users == {"stemedb"} and "u stemedb " in (SYSTEMD / "stemedb.sysusers.conf").read_text()
    # SIGTERM drains for up to limits.shutdown_grace, then the store closes: give it longer.
    stop = int(server.get("Service", "TimeoutStopSec"))
    assert stop > ServerConfig().limits.shutdown_grace
    environment = dict(item.split("=", 1) for item in
                       shlex.split(server.get("Service", "Environment")))
    assert set(environment) <= set(SETTINGS_BY_VARIABLE)
    settings = ServerConfig.resolve(EXAMPLE, environ=environment)  # the unit's settings are valid
    # The scrub is the server's own (VERIFY): the verify unit asks the address the server listens on.
    assert verify[verify.index("--url") + 1] == f"stemedb://{settings.listen}"
    assert "AF_INET" in read_unit(SYSTEMD / "stemedb-verify.service").get("Service", "RestrictAddressFamilies")


# The units' commands as issue 13 documents them; some are not in this build's CLI yet.
PENDING = {
    "backup": "stemedb backup comes with issue 13's item 1",
    "verify --data": "stemedb verify --data comes with the CLI rework (it takes DIR until then)",
}


@pytest.mark.parametrize("unit", ["stemedb.service", "stemedb-backup.service",
                                  "stemedb-verify.service"])
def test_unit_commands_are_accepted_by_the_cli(unit, request):
    command = exec_start(unit)
    subcommand = command[1]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    shown = subprocess.run([sys.executable, "-m", "stemedb", subcommand, "--help"],
                           capture_output=True, text=True, env=env, timeout=60)
    missing = [option for option in command[2:] if option.startswith("--")
               and not re.search(rf"(^|[\s\[,]){re.escape(option)}\b", shown.stdout)]
    pending = [PENDING[key] for key in (subcommand, *(f"{subcommand} {o}" for o in missing))
               if key in PENDING]
    if (shown.returncode != 0 or missing) and pending:
        request.applymarker(pytest.mark.xfail(reason="; ".join(pending)))
    assert shown.returncode == 0, shown.stderr
    assert missing == []


# ------------------------------------------------------------------ Docker


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            if word.upper() == "FROM":
                instructions = []
            instructions.append((word.upper(), rest.strip()))
    return instructions


def test_dockerfile_serves_the_volume_on_the_default_ports():
    """Not built here (no container engine): its last stage is checked against the code."""
    stage = dockerfile_instructions()
    one = {word: rest for word, rest in stage}
    entrypoint = json.loads(one["ENTRYPOINT"]) + json.loads(one["CMD"])
    assert entrypoint[:2] == ["stemedb", "serve"]
    data = entrypoint[entrypoint.index("--data") + 1]
    assert json.loads(one["VOLUME"]) == [data]
    environment: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            environment.update(item.split("=", 1) for item in shlex.split(rest))
    settings = {k: v for k, v in environment.items() if k.startswith("STEMEDB_")}
    assert set(settings) <= set(SETTINGS_BY_VARIABLE)
    config = entrypoint[entrypoint.index("--config") + 1]
    copied = [rest.split() for word, rest in stage if word == "COPY" and rest.split()[-1] == config]
    assert copied and (ROOT / copied[0][0]).is_file()
    served = ServerConfig.resolve(ROOT / copied[0][0], environ=settings)
    ports = {parse_address(address)[1] for address in (served.listen, served.http) if address}
    assert {int(p) for p in one["EXPOSE"].split()} == ports
    assert parse_address(DEFAULT_LISTEN)[1] in ports
    assert served.log_format == "json"
    assert one["USER"] not in ("root", "0")
    assert "/ready" in one["HEALTHCHECK"] and "/ready" in OPEN_ROUTES
    assert f":{parse_address(served.http or '')[1]}/ready" in one["HEALTHCHECK"]
    assert one["STOPSIGNAL"] == "SIGTERM"


def test_dockerfile_build_stage_copies_what_the_wheel_needs():
    text = DOCKERFILE.read_text()
    sources = [rest.split()[:-1] for word, rest in
               ((line.split(" ", 1)[0], line.split(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("COPY ") and "--from" not in line)]
    copied = {source for group in sources for source in group}
    for needed in ("pyproject.toml", "setup.py", "ext", "src"):
        assert needed in copied, needed
    for source in copied:
        assert (ROOT / source).exists(), source
