"""What the pipeline dashboard shows, read from MLflow (the run tree) and Ray (its dashboard API and the nodes'
Prometheus endpoints). No store of its own: every view is rebuilt from those on request.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import httpx
from mlflow.entities import Run

from pipeline.dag import Dag
from pipeline.stages.results import MODEL_LABELS, EvaluationSummary
from pipeline.tracking import P, Tracker, run_url

log = logging.getLogger(__name__)

STATES = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed", "RUNNING": "running", "SCHEDULED": "running"}
_SHARE = re.compile(r"^expert_share\.l(\d+)\.e(\d+)$")


def _seconds(run: Run) -> float | None:
    start, end = run.info.start_time, run.info.end_time
    if not start:
        return None
    return ((end or int(time.time() * 1000)) - start) / 1000


def _by_task(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: v for k, v in sorted(metrics.items()) if k.startswith(prefix)}


def ray_auth_headers() -> dict[str, str]:
    """The Authorization header of a token-authenticated Ray cluster (token from $RAY_AUTH_TOKEN, its path, or
    ~/.ray/auth_token, as Ray's own clients find it); empty when token auth is off."""
    try:
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
    except ImportError:  # a Ray without token authentication
        return {}
    return get_auth_headers_if_auth_enabled({})


def find_ray_dashboard(local: str = "http://127.0.0.1:8265") -> str | None:
    """The Ray dashboard to show: $RAY_ADDRESS when it is the dashboard's URL, else a local head's when it answers."""
    import os

    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    try:
        httpx.get(f"{local}/api/version", headers=ray_auth_headers(), timeout=2).raise_for_status()
    except httpx.HTTPError:
        return None
    return local


@dataclass
class RayView:
    """A Ray cluster as the dashboard sees it: its dashboard URL and the Prometheus endpoints of its nodes."""

    dashboard_url: str | None
    metrics_urls: tuple[str, ...] = ()

    def endpoints(self) -> list[str]:
        """Explicit metrics URLs, else one per alive node from the Ray dashboard's node summary."""
        if self.metrics_urls or not self.dashboard_url:
            return list(self.metrics_urls)
        try:
            body = httpx.get(
                f"{self.dashboard_url}/nodes", params={"view": "summary"}, headers=ray_auth_headers(), timeout=5
            ).json()
        except (httpx.HTTPError, ValueError):
            return []
        urls = []
        for node in body.get("data", {}).get("summary", []):
            raylet = node.get("raylet", {})
            port, ip = raylet.get("metricsExportPort"), node.get("ip") or raylet.get("nodeManagerAddress")
            if port and ip and raylet.get("state", "ALIVE") == "ALIVE":
                urls.append(f"http://{ip}:{port}/metrics")
        return urls

    def scrape(self) -> list:
        """Every metric family of every node (Prometheus text format parsed)."""
        from prometheus_client.parser import text_string_to_metric_families

        families = []
        for url in self.endpoints():
            try:
                text = httpx.get(url, timeout=5).text
            except httpx.HTTPError:
                log.warning("cannot scrape %s", url)
                continue
            families += list(text_string_to_metric_families(text))
        return families


def histogram_summary(families: list, name: str, **match: str) -> dict[str, dict[str, float]]:
    """Per `route`: count, mean and p50/p95 (bucket upper bounds) of histogram `name`, summed over processes.

    The mean is approximate: Ray's exporter adds each observation to `_sum` as its bucket's midpoint.
    """
    routes: dict[str, dict[str, Any]] = {}
    for family in families:
        if family.name != name:
            continue
        for s in family.samples:
            if any(s.labels.get(k) != v for k, v in match.items()):
                continue
            r = routes.setdefault(s.labels.get("route", ""), {"buckets": {}, "sum": 0.0, "count": 0.0})
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                r["buckets"][le] = r["buckets"].get(le, 0.0) + s.value
            elif s.name.endswith("_sum"):
                r["sum"] += s.value
            elif s.name.endswith("_count"):
                r["count"] += s.value
    out = {}
    for route, r in routes.items():
        if not r["count"]:
            continue
        bounds = sorted(r["buckets"].items())
        out[route] = {
            "count": r["count"],
            "mean_s": r["sum"] / r["count"],
            "p50_s": _bucket_quantile(bounds, r["count"], 0.5),
            "p95_s": _bucket_quantile(bounds, r["count"], 0.95),
        }
    return out


def _bucket_quantile(bounds: list[tuple[float, float]], count: float, q: float) -> float | None:
    """The upper bound of the first cumulative bucket holding `q` of `count`; None above the largest finite one."""
    for le, cumulative in bounds:
        if cumulative >= q * count:
            return le if le != float("inf") else None
    return None


def counter_total(families: list, name: str, **match: str) -> float:
    return sum(
        s.value
        for f in families
        if f.name == name
        for s in f.samples
        if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in match.items())
    )


class RunData:
    """The dashboard's view of pipeline runs."""

    def __init__(self, tracker: Tracker, ray: RayView, stages: Dag):
        self.tracker, self.ray, self.dag = tracker, ray, stages
        self.client = tracker.client

    def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        return [
            {
                "run_id": r.info.run_id,
                "name": r.info.run_name,
                "state": STATES.get(r.info.status, "unknown"),
                "config": r.data.tags.get(P + "config_name"),
                "started": r.info.start_time,
                "seconds": _seconds(r),
                "ray_job": r.data.tags.get(P + "ray_job"),
            }
            for r in self.tracker.pipeline_runs(max_results=limit)
        ]

    def run(self, run_id: str) -> dict[str, Any]:
        parent = self.client.get_run(run_id)
        if parent.data.tags.get(P + "kind") != "pipeline":
            raise KeyError(f"run {run_id} is not a pipeline run")
        planned = [n for n in parent.data.tags.get(P + "stages", "").split(",") if n]
        children = {c.data.tags.get(P + "stage", c.info.run_name): c for c in self.tracker.stage_runs(run_id)}
        sources = {name: self._source(child) for name, child in children.items()}
        stages = [self._stage(name, children.get(name), sources.get(name), parent) for name in planned]
        known = {s.name for s in self.dag.stages}
        edges = [[up, name] for name in planned if name in known for up in self.dag.upstream_among(name, planned)]
        out: dict[str, Any] = {
            "run": {
                "run_id": run_id,
                "name": parent.info.run_name,
                "state": STATES.get(parent.info.status),
                "seconds": _seconds(parent),
                "config": parent.data.tags.get(P + "config_name"),
                "config_hash": parent.data.tags.get(P + "config_hash", "")[:12],
                "code_version": parent.data.tags.get(P + "code_version"),
                "error": parent.data.tags.get(P + "error"),
                "ray_job": parent.data.tags.get(P + "ray_job"),
            },
            "stages": stages,
            "edges": edges,
            "links": {
                "mlflow": run_url(self.tracker.uri, parent.info.experiment_id, run_id),
                "ray": self.ray.dashboard_url,
                "tracking_uri": self.tracker.shown_uri,
            },
        }
        if src := sources.get("generate"):
            m = src.data.metrics
            out["acceptance"] = {
                "by_task": _by_task(m, "acceptance_rate."),
                "overall": m.get("acceptance_rate"),
                "samples": m.get("samples"),
                "accepted": m.get("accepted"),
            }
        if src := sources.get("train"):
            out["loss"] = self._loss(src)
            out["expert_load"] = self._expert_load(src.data.metrics)
        if src := sources.get("refine"):
            out["refine"] = self._curves(src, ("reward", "reverse_kl"))
        if (src := sources.get("evaluate")) and (summary := evaluation_summary(src)):
            out["evaluation"] = evaluation_view(summary)
        if src := sources.get("register"):
            out["registration"] = {
                "version": src.data.metrics.get("version"),
                "alias": "champion" if src.data.metrics.get("champion") else "challenger",
            }
        if "serve" in planned:
            out["serving"] = self._serving()
        return out

    def evaluation(self, run_id: str) -> EvaluationSummary | None:
        """The summary of the pipeline run's `evaluate` stage (from the run that did the work, for a cache hit);
        None before it logged one."""
        for child in self.tracker.stage_runs(run_id):
            if child.data.tags.get(P + "stage", child.info.run_name) == "evaluate":
                return evaluation_summary(self._source(child))
        return None

    def _source(self, child: Run) -> Run:
        """The run that did the work: the stage run itself, or for a cache hit the run it reused."""
        origin = child.data.tags.get(P + "cached_from")
        if child.data.tags.get(P + "cache_hit") == "true" and origin:
            return self.client.get_run(origin)
        return child

    def _stage(self, name: str, child: Run | None, source: Run | None, parent: Run) -> dict[str, Any]:
        if child is None:
            state = "pending" if parent.info.status == "RUNNING" else "not run"
            return {"name": name, "state": state}
        metrics = (source or child).data.metrics  # source: the run that did the work (a cache hit's origin)
        stage = next((s for s in self.dag.stages if s.name == name), None)
        keys = stage.key_metrics if stage else sorted(metrics)[:3]  # a stage outside the product's DAG
        out = {
            "name": name,
            "state": STATES.get(child.info.status, child.info.status.lower()),
            "seconds": _seconds(child),
            "cache_hit": child.data.tags.get(P + "cache_hit") == "true",
            "cached_from": child.data.tags.get(P + "cached_from"),
            "run_id": child.info.run_id,
            "key_metrics": {k: metrics[k] for k in keys if k in metrics},
            "error": child.data.tags.get(P + "error"),
        }
        if child.info.status == "RUNNING":
            out["progress"] = self._progress(name, child)
        return out

    def _progress(self, name: str, child: Run) -> dict[str, Any] | None:
        m = child.data.metrics
        if name == "train":  # rank 0's step metrics; the goal is the run's train.max_steps param
            total = float(child.data.params.get("train.max_steps", 0) or 0)
            steps = [x.step for x in self.client.get_metric_history(child.info.run_id, "loss")]
            return {"done": max(steps, default=0), "total": total, "unit": "steps"} if total else None
        if "progress.total" in m:
            return {"done": m.get("progress.done", 0), "total": m["progress.total"], "unit": "items"}
        return None

    def _loss(self, run: Run) -> dict[str, list]:
        return self._curves(run, ("loss", "kd", "ce", "val_loss"))

    def _curves(self, run: Run, keys: tuple[str, ...]) -> dict[str, list]:
        """[[step, value], ...] of each metric of `run` that has a history, in step order."""
        curves = {}
        for key in keys:
            history = sorted(self.client.get_metric_history(run.info.run_id, key), key=lambda x: x.step)
            if history:
                curves[key] = [[x.step, x.value] for x in history]
        return curves

    @staticmethod
    def _expert_load(metrics: dict[str, float]) -> dict[str, Any] | None:
        cells = {(int(m[1]), int(m[2])): v for k, v in metrics.items() if (m := _SHARE.match(k))}
        if not cells:
            return None
        layers = sorted({layer for layer, _ in cells})
        experts = sorted({e for _, e in cells})
        return {
            "layers": layers,
            "experts": experts,
            "share": [[cells.get((layer, e)) for e in experts] for layer in layers],
        }

    def _serving(self) -> dict[str, Any]:
        families = self.ray.scrape()
        return {
            "latency": histogram_summary(families, "ray_moeforge_serve_latency_seconds"),
            "ttft": histogram_summary(families, "ray_moeforge_serve_ttft_seconds"),
            "requests": counter_total(families, "ray_moeforge_serve_requests"),
            "scraped": len(self.ray.endpoints()),
        }


def evaluation_summary(run: Run) -> EvaluationSummary | None:
    """An evaluate run's summary, from its metrics and tags."""
    return EvaluationSummary.from_metrics(run.data.metrics, run.data.tags)


def evaluation_view(summary: EvaluationSummary) -> dict[str, Any]:
    """The evaluation panel, as `moeforge run` prints it: pass@1 per task and overall of each model and of the
    constant-answer floor (with its answer), format failures and completion lengths, the student's costs beside
    the teacher's and the decode speeds."""
    models = summary.models()
    floor = summary.floor

    def row(task: str | None) -> dict[str, Any]:  # None: overall
        return {
            "task": task or "overall",
            **{name: result.pass_at_1_on(task) for name, result in models.items()},
            "floor": floor.pass_at_1_on(task) if floor else None,
            "floor_answer": floor.answer_by_task.get(task) if floor and task else None,
        }

    econ = summary.economics
    return {
        "models": [{"name": name, "label": MODEL_LABELS[name]} for name in models],
        "rows": [row(task) for task in [*summary.tasks(), None]],
        "format_failure_rate": {name: result.format_failure_rate for name, result in models.items()},
        "mean_completion_tokens": {name: result.mean_completion_tokens for name, result in models.items()},
        "costs": {**econ.costs.model_dump(), "kl_to_teacher": econ.kl_to_teacher} if econ.costs else None,
        "decode": [
            {"batch": batch, "student": speed.student, "teacher": speed.teacher}
            for batch, speed in sorted(econ.decode_tokens_per_s.items())
        ],
    }
