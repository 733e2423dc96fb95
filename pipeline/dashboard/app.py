"""The dashboard's web app: a static page (`static/`) and the JSON it polls.

GET /                      the page (`?run=RUN_ID`; default: the latest pipeline run)
GET /api/runs              recent pipeline runs
GET /api/runs/latest       the latest run's view
GET /api/runs/{run_id}     one run's view: stages, DAG edges, acceptance, loss, expert load, evaluation, serving
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from mlflow.exceptions import MlflowException

from pipeline.dashboard.data import RunData

STATIC = Path(__file__).parent / "static"


def create_app(data: RunData) -> FastAPI:
    app = FastAPI(title="moeforge dashboard", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/runs")
    def runs(limit: int = 20):
        return {
            "runs": data.runs(limit),
            "tracking_uri": data.tracker.shown_uri,
            "experiment": data.tracker.cfg.experiment,
        }

    @app.get("/api/runs/latest")
    def latest():
        found = data.runs(1)
        if not found:
            raise HTTPException(
                404, f"no pipeline runs in experiment {data.tracker.cfg.experiment!r} at {data.tracker.shown_uri}"
            )
        return data.run(found[0]["run_id"])

    @app.get("/api/runs/{run_id}")
    def run(run_id: str):
        try:
            return data.run(run_id)
        except (MlflowException, KeyError) as e:
            raise HTTPException(404, f"no pipeline run {run_id!r} at {data.tracker.shown_uri}: {e}") from None

    return app
