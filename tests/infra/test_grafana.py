"""The Grafana dashboard charts the project's metrics, and only metrics the code emits."""

from __future__ import annotations

import json
import re

from pipeline.metrics import METRICS, exported_names
from tests.conftest import REPO

DASHBOARD = REPO / "infra" / "k8s" / "monitoring" / "grafana-dashboard-moeforge.json"
SERIES = re.compile(r"\bray_[A-Za-z0-9_:]+")


def referenced(dashboard: dict) -> set[str]:
    """Every Prometheus series name in the dashboard's queries (panel targets and template variables)."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    return {name for e in exprs for name in SERIES.findall(e)}


def test_the_dashboard_is_valid_and_refers_only_to_emitted_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 30
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dashboard["panels"]:
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
    names = referenced(dashboard)
    unknown = names - exported_names()
    assert not unknown, f"the dashboard queries metrics the code does not emit: {sorted(unknown)}"
    charted = {n for n, spec in METRICS.items() if spec.exported(n) & names}
    assert charted == set(METRICS), f"metrics with no panel: {sorted(set(METRICS) - charted)}"
