"""The `moeforge` command line."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, MoeforgeConfig, load_config
from pipeline.redaction import redact_uri

if TYPE_CHECKING:
    from pipeline.stages.results import Exports, R, RefineReport

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Distil a teacher LLM into a DeepSeek-V3-style MoE student on Ray, tracked in MLflow.",
)
config_app = typer.Typer(no_args_is_help=True, help="Inspect the resolved configuration.")
app.add_typer(config_app, name="config")
console = Console()
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="Preset name (configs/NAME.yaml) or YAML file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override, e.g. train.max_steps=50.")]


def _load(config: str, overrides: list[str] | None) -> MoeforgeConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        err.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


@app.command()
def run(
    config: ConfigOpt = "tiny",
    set_: SetOpt = None,
    force: Annotated[list[str] | None, typer.Option("--force", help="Re-run STAGE even if cached.")] = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="Re-run STAGE and everything after it.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Stop after STAGE.")] = None,
    only: Annotated[
        str | None,
        typer.Option(
            "--only", help="Run STAGE alone: its inputs come from cached upstream runs (an error if there are none)."
        ),
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Also show library warnings and worker logs live (they always go to the run's log "
            "file under the work dir).",
        ),
    ] = False,
) -> None:
    """Run the pipeline (or resume it: finished stages with the same inputs and config are reused)."""
    from pipeline.run_log import RunLog

    cfg = _load(config, set_)
    run_log = RunLog(cfg.tracking.workdir, verbose)
    run_log.install()
    try:
        result = _run(cfg, run_log, force or [], from_stage, until, only)
        _next_steps(result, cfg, config, set_ or [])
    finally:
        run_log.drain()
        run_log.uninstall()


_EVENTS = {
    "cached": lambda stage, info: f"[green]✓[/green] {stage:<10} cached (from run {info['from']})",
    "start": lambda stage, info: f"[cyan]▶[/cyan] {stage:<10} running (run {info['run_id']})",
    "done": lambda stage, info: f"[green]✓[/green] {stage:<10} done in {_duration(info['seconds'])}",
    "failed": lambda stage, info: f"[red]✗[/red] {stage:<10} failed (run {info['run_id']})",
    "skipped": lambda stage, info: f"[dim]-[/dim] {stage:<10} off ({_passes(info['passes'])})",
}


def _passes(passes: dict[str, str]) -> str:
    return ", ".join(f"{source} as {out}" for out, source in passes.items())


def _report(event: str, stage: str, info: dict) -> None:
    """One line per stage event of a run (`run_pipeline`'s reporter)."""
    if event in _EVENTS:
        console.print(_EVENTS[event](stage, info))


def _run(cfg: MoeforgeConfig, run_log, force: list[str], from_stage: str | None, until: str | None, only: str | None):
    from pipeline.dag import DagError
    from pipeline.runner import StageFailed, run_pipeline

    started = time.perf_counter()

    console.print(f"moeforge run [bold]{cfg.name}[/bold] (config {cfg.hash()[:12]})")
    try:
        result = run_pipeline(
            cfg,
            force=force,
            from_stage=from_stage,
            until=until,
            only=only,
            report=_report,
            on_ray_connect=run_log.route_worker_logs,
        )
    except (DagError, StageFailed) as e:
        err.print(f"[red]error:[/red] {e}")
        err.print(f"warnings and worker logs of this run: {run_log.path}")
        raise typer.Exit(1) from None
    except BaseException:
        err.print(f"warnings and worker logs of this run: {run_log.path}")
        raise
    hits = sum(s.cache_hit for s in result.stages)
    _print_outcome(result, cfg)
    console.print(
        f"pipeline run {result.run_id} finished in {_duration(time.perf_counter() - started)}: "
        f"{len(result.stages)} stages, {hits} cached; tracking {redact_uri(result.tracking_uri)}"
    )
    if any(s.name == "serve" for s in result.stages):
        from pipeline.stages.results import Endpoint

        endpoint = _read_output(result, cfg, "endpoint", Endpoint)
        console.print(f"serving {endpoint.pinned_uri} at {endpoint.openai_base_url}")
        if cfg.serve.keep_running:
            _serve_until_interrupted(endpoint.url, endpoint.pinned_uri, detach=False)
        else:
            console.print("the app stops with this driver on a local cluster (serve.keep_running=true keeps it up)")
    return result


def _next_steps(result, cfg: MoeforgeConfig, config: str, sets: list[str]) -> None:
    """One closing line: how to serve the version the run registered and where to watch the run, with the same
    config and overrides. Nothing when the run registered nothing or already serves."""
    import shlex

    produced = {name for s in result.stages for name in s.outputs}
    if "registration" not in produced or "endpoint" in produced:
        return
    from pipeline.stages.results import Registration

    reg = _read_output(result, cfg, "registration", Registration)
    model = f"models:/{reg.name}/{reg.version}"
    from pipeline.redaction import redact

    shown = [f"{k}={redact(v, k.strip())}" for k, _, v in (s.partition("=") for s in sets)]  # no secret echoed
    args = [*(["--config", config] if config != "tiny" else []), *(a for s in shown for a in ("--set", s))]
    tail = "".join(f" {shlex.quote(a)}" for a in args)
    console.print(
        f"next: `moeforge serve --model {model}{tail}` serves it; `moeforge dashboard{tail}` shows this run; "
        f"`moeforge ui{tail}` opens MLflow",
        soft_wrap=True,
    )


def _output_path(result, cfg, artifact: str) -> Path:
    """The local folder of an artifact the run produced (or took from the cache)."""
    from pipeline.artifacts import fetch

    ref = next(ref for s in result.stages for name, ref in s.outputs.items() if name == artifact)
    return fetch(ref, result.tracking_uri, cfg.tracking.workdir)


def _read_output(result, cfg, artifact: str, kind: type[R]) -> R:
    """The typed result stored in an artifact the run produced (or took from the cache)."""
    from pipeline.stages.results import read_result

    return read_result(_output_path(result, cfg, artifact), kind)


def _print_outcome(result, cfg) -> None:
    """The evaluation (teacher vs student pass@1 per task) and the registry decision, when the run reached them."""
    from pipeline.stages.results import RefineReport, Registration, read_summary

    produced = {name for s in result.stages for name in s.outputs}
    if any(s.name == "refine" for s in result.stages):
        _print_refine(_read_output(result, cfg, "student", RefineReport))
    if "eval_report" in produced:
        _print_evaluation(read_summary(_output_path(result, cfg, "eval_report")))
    if "registration" in produced:
        reg = _read_output(result, cfg, "registration", Registration)
        console.print(
            f"registered [bold]{reg.name}[/bold] version {reg.version} as [bold]{reg.alias}"
            f"[/bold]: {reg.reason} ({reg.model_uri})"
        )
        _print_exports(reg.exports, _output_path(result, cfg, "exports"))


def _print_exports(exports: Exports, folder: Path) -> None:
    """Where the registered student's exports are, for the engines users run (or why there are none)."""
    if exports.skipped:
        console.print(f"not exported for other engines: {exports.skipped}", soft_wrap=True)
        return
    engines = {"hf": "transformers, vLLM", "gguf": "llama.cpp, Ollama"}
    written = [(fmt, path) for fmt, path in (("hf", exports.hf), ("gguf", exports.gguf)) if path]
    console.print(
        "exported for other engines: " + "; ".join(f"{folder / path} ({engines[fmt]})" for fmt, path in written),
        soft_wrap=True,
    )


def _print_refine(report: RefineReport) -> None:
    """What refine did and cost, before the evaluation that judges the refined student."""
    rewards, kls = report.reward_by_iteration, report.reverse_kl_by_iteration
    console.print(
        f"refine ({report.objective}, router {report.router}): {report.iterations} iterations of "
        f"{report.samples_per_iteration} samples; reward {' → '.join(f'{r:.2f}' for r in rewards)}, reverse KL "
        f"to the teacher {' → '.join(f'{k:.3f}' for k in kls)}; cost {report.rollout_tokens} rollout tokens, "
        f"{report.teacher_scored_tokens} teacher-scored tokens, {report.minutes:.1f} min"
    )


def _print_evaluation(summary) -> None:
    """The evaluation table (pass@1 per task and overall of each model and the constant-answer floor), the
    student's costs beside the teacher's and the decode speeds: what `moeforge run` ends with and `status` shows."""
    from pipeline.stages.results import MODEL_LABELS

    models = summary.models()
    by_task = summary.floor.pass_at_1_by_task if summary.floor else {}
    answers = summary.floor.answer_by_task if summary.floor else {}
    table = Table("held-out pass@1", *(MODEL_LABELS[m] for m in models), "constant-answer floor", title="evaluation")
    for task in summary.tasks():
        table.add_row(
            task,
            *(f"{r.pass_at_1_by_task.get(task, 0):.3f}" for r in models.values()),
            f"{by_task.get(task, float('nan')):.3f} ({answers.get(task, '?')!r})",
        )
    table.add_row(
        "[bold]overall[/bold]",
        *(f"[bold]{r.pass_at_1:.3f}[/bold]" for r in models.values()),
        f"{summary.floor.pass_at_1 if summary.floor else float('nan'):.3f}",
    )
    table.add_row("format failures", *(f"{r.format_failure_rate:.3f}" for r in models.values()), "")
    table.add_row("mean completion tokens", *(f"{r.mean_completion_tokens:.1f}" for r in models.values()), "")
    console.print(table)
    econ = summary.economics
    if econ.costs is not None:  # a converted student (a scratch one has no teacher to compare with)
        c, kl = econ.costs, econ.kl_to_teacher
        console.print(
            f"student cost vs teacher: active non-embedding parameters per token "
            f"{c.student_params_active_nonembedding / 1e6:.1f}M vs {c.teacher_params_nonembedding / 1e6:.1f}M "
            f"({c.active_param_ratio:.0%}); KV cache per token {c.student_cache_floats_per_token:.0f} vs "
            f"{c.teacher_cache_floats_per_token:.0f} floats ({c.cache_ratio:.0%}); KL to the teacher before "
            f"training {kl if kl is not None else float('nan'):.3f} nats/token"
        )
    if econ.decode_tokens_per_s:
        console.print(
            "decode tokens/s (this machine, greedy): "
            + "; ".join(
                f"batch {b}: student {s.student:.1f}, teacher "
                f"{s.teacher if s.teacher is not None else float('nan'):.1f}"
                for b, s in sorted(econ.decode_tokens_per_s.items())
            )
        )


@app.command()
def serve(
    config: ConfigOpt = "tiny",
    set_: SetOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="models:/NAME@ALIAS, models:/NAME/VERSION or a saved student directory; "
            "default: serve.model_uri, else models:/<registry.model_name>@champion."
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address the HTTP proxy binds (default serve.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port of the HTTP proxy (default serve.port).")] = None,
    replicas: Annotated[int | None, typer.Option(help="Fixed number of replicas (turns autoscaling off).")] = None,
    detach: Annotated[
        bool, typer.Option(help="Return once deployed (a remote cluster keeps serving); default: stay until Ctrl-C.")
    ] = False,
) -> None:
    """Serve a registered student behind an OpenAI-compatible API (Ray Serve) until Ctrl-C."""
    from actors.server import default_model_uri, start
    from pipeline.runner import ensure_ray
    from pipeline.serving.auth import deployer_key
    from pipeline.serving.source import ModelSourceError, resolve
    from pipeline.tracking import resolve_tracking_uri

    extra = [f"serve.{k}={v}" for k, v in (("host", host), ("port", port), ("num_replicas", replicas)) if v is not None]
    if replicas is not None:
        extra.append("serve.autoscaling=null")
    cfg = _load(config, [*(set_ or []), *extra])
    model = model or default_model_uri(cfg.serve, cfg.registry)
    tracking_uri = resolve_tracking_uri(cfg.tracking)
    try:
        deployer_key(cfg.serve)  # a public host without a key refuses here, before a cluster is started
        resolve(model, tracking_uri)  # so does a model that names nothing (the app pins it again when it is built)
    except (ModelSourceError, ConfigError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    ensure_ray(cfg.ray)
    try:
        url = start(cfg.serve, model, tracking_uri)
    except (ModelSourceError, ConfigError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if not url.endswith(f":{cfg.serve.port}"):
        err.print(
            f"[yellow]note:[/yellow] Serve already runs on this cluster at {url}; port {cfg.serve.port} is "
            "not used (Serve's HTTP options are fixed until `serve shutdown`)"
        )
    _serve_until_interrupted(url, model, detach)


@app.command("export")
def export_model(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION or a saved student directory")],
    format: Annotated[str, typer.Option("--format", help="hf (transformers, vLLM, SGLang) or gguf (llama.cpp)")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write (hf: the model directory; gguf: holds the file)")],
    quant: Annotated[str, typer.Option(help="gguf: f32, f16, q8_0 or q4_1 (llama.cpp's quantizer)")] = "f32",
    config: ConfigOpt = "tiny",
    set_: SetOpt = None,
) -> None:
    """Export a student in DeepSeek-V3's standard layout for the engines users run."""
    from pipeline.export import ExportError, export
    from pipeline.serving.source import ModelSourceError, materialize, resolve
    from pipeline.teacher.hf import default_cache_dir
    from pipeline.tracking import resolve_tracking_uri

    if format not in ("hf", "gguf") or quant not in ("f32", "f16", "q8_0", "q4_1"):
        err.print(f"[red]error:[/red] --format is hf or gguf, --quant f32, f16, q8_0 or q4_1 (got {format}, {quant})")
        raise typer.Exit(2)
    try:
        if Path(model).is_dir():
            student = Path(model)
        else:
            tracking_uri = resolve_tracking_uri(_load(config, set_).tracking)
            student = materialize(resolve(model, tracking_uri), tracking_uri, default_cache_dir())
        written = export(student, format, out, quant)  # type: ignore[arg-type]  # checked above
    except (ExportError, ModelSourceError, FileNotFoundError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(f"exported {model} as {format} ({quant}) to {written}")


def _serve_until_interrupted(url: str, model: str, detach: bool) -> None:
    """Print where the app answers; keep this driver alive until Ctrl-C unless detached."""
    import httpx

    httpx.get(f"{url}/healthz", timeout=30).raise_for_status()
    console.print(f"serving [bold]{model}[/bold] at {url}/v1 (OpenAI API; health {url}/healthz)")
    if detach:
        console.print("detached: the app keeps running on the cluster until `serve shutdown` (or the cluster ends)")
        return
    from ray import serve

    console.print("Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    job: Annotated[
        str,
        typer.Argument(
            help="pipeline, a stage (generate, distill, convert, train, refine, evaluate, register) or serve: runs "
            "`python -m jobs.JOB`."
        ),
    ] = "pipeline",
    config: ConfigOpt = "tiny",
    set_: SetOpt = None,
    address: Annotated[
        str | None,
        typer.Option(help="Ray job server (dashboard) URL; default job.address, $RAY_ADDRESS, http://127.0.0.1:8265."),
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Follow the logs until the job ends (--no-wait: submit and return).")
    ] = True,
    submission_id: Annotated[str | None, typer.Option(help="Job id to use (default moeforge-JOB-TIME-RAND).")] = None,
) -> None:
    """Submit the pipeline (or one stage, or serve) to a Ray cluster as a Ray job; arguments after the options
    (e.g. `-- --until train`) go to the job."""
    from pipeline import submit as sub
    from pipeline.tracking import Tracker, run_url

    overrides = [*(set_ or []), *([f"job.address={address}"] if address else [])]
    cfg = _load(config, overrides)
    uri = sub.tracking_uri_of_job(cfg)
    server = sub.job_address(cfg.job)
    job_sets = list(set_ or [])
    if uri.startswith("sqlite:"):
        if any(h in server for h in ("127.0.0.1", "localhost")):
            # a cluster on this machine: the job tracks into this workdir (not its temporary copy of the code)
            job_sets.append(f"tracking.workdir={Path(cfg.tracking.workdir).resolve()}")
        else:
            err.print(
                f"[yellow]warning:[/yellow] no tracking server configured: the job tracks to a SQLite file on "
                f"the head node of {server}; set MLFLOW_TRACKING_URI (or tracking.uri) to a server every node "
                "reaches"
            )
    try:
        jobs, sid = sub.submit(cfg, job, config, job_sets, list(ctx.args), submission_id)
    except sub.SubmitError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(
        f"submitted job [bold]{sid}[/bold] to {server} (Ray dashboard: {server}/#/jobs/{sid})", soft_wrap=True
    )
    if not wait:
        console.print(
            f"follow it with `ray job logs -f {sid} --address {server}`; `moeforge jobs` lists jobs", soft_wrap=True
        )
        return
    try:
        final = sub.follow(jobs, sid, lambda text: sys.stdout.write(text) and sys.stdout.flush())
    except KeyboardInterrupt:
        console.print(f"\nstopped following; job {sid} keeps running (`ray job stop {sid}` stops it)", soft_wrap=True)
        raise typer.Exit(130) from None
    tracker = Tracker(cfg.tracking.model_copy(update={"uri": uri}))
    for run in tracker.runs_of_job(sid):
        link = run_url(uri, run.info.experiment_id, run.info.run_id)
        console.print(
            f"MLflow run {run.info.run_id} ({run.info.status.lower()}): "
            f"{link or f'{redact_uri(uri)} (`moeforge ui` opens it)'}",
            soft_wrap=True,
        )
    colour = "green" if final == "SUCCEEDED" else "red"
    console.print(f"job {sid}: [{colour}]{final}[/{colour}]")
    if final != "SUCCEEDED":
        raise typer.Exit(1)


@app.command("jobs")
def list_jobs(
    config: ConfigOpt = "tiny",
    set_: SetOpt = None,
    address: Annotated[str | None, typer.Option(help="Ray job server (dashboard) URL.")] = None,
    limit: Annotated[int, typer.Option(help="How many of the most recent jobs.")] = 20,
) -> None:
    """Recent Ray jobs on the cluster: id, status, entrypoint, start, duration."""
    from pipeline import submit as sub

    cfg = _load(config, [*(set_ or []), *([f"job.address={address}"] if address else [])])
    try:
        address = sub.job_address(cfg.job)
        details = sub.recent(sub.client(address), limit, address)
    except sub.SubmitError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    table = Table("job", "status", "entrypoint", "started", "duration")
    for d in details:
        start = d.start_time / 1000 if d.start_time else None
        end = d.end_time / 1000 if d.end_time else (time.time() if start else None)
        table.add_row(
            d.submission_id or d.job_id or "-",
            str(d.status).split(".")[-1],
            d.entrypoint,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)) if start else "-",
            _duration(end - start if start else None),
        )
    console.print(table)


@app.command()
def status(
    run_id: Annotated[str | None, typer.Argument(help="Pipeline run id; default: the latest.")] = None,
    config: ConfigOpt = "tiny",
    set_: SetOpt = None,
) -> None:
    """A table of a pipeline run's stages: state, duration, cache hit, key metrics (the dashboard's run view); and
    its evaluation, when it has one."""
    from mlflow.exceptions import MlflowException

    from pipeline.dag import Dag
    from pipeline.dashboard.data import RayView, RunData
    from pipeline.runner import default_stages
    from pipeline.tracking import Tracker

    tracker = Tracker(_load(config, set_).tracking)
    if run_id is None:
        runs = tracker.pipeline_runs(max_results=1)
        if not runs:
            err.print(f"no pipeline runs in experiment {tracker.cfg.experiment!r} at {tracker.shown_uri}")
            raise typer.Exit(1)
        run_id = runs[0].info.run_id
    data = RunData(tracker, RayView(None), Dag(default_stages()))
    try:
        view = data.run(run_id)
    except MlflowException:
        err.print(f"no run {run_id!r} at {tracker.shown_uri}")
        raise typer.Exit(1) from None
    except KeyError as e:
        err.print(f"{e.args[0]} (a stage run? `moeforge status` with no argument shows the latest pipeline run)")
        raise typer.Exit(1) from None
    run = view["run"]
    console.print(
        f"pipeline run {run['run_id']} ({run['name']}): {(run['state'] or '?').upper()}, "
        f"code {run['code_version'] or '?'}, config {run['config_hash'] or '?'}"
    )
    if run["error"]:
        console.print(f"[red]error:[/red] {run['error']}")
    table = Table("stage", "state", "duration", "cache", "key metrics", "run")
    colours = {"finished": "green", "failed": "red", "killed": "red", "running": "cyan"}
    for st in view["stages"]:
        colour = colours.get(st["state"])
        state = f"[{colour}]{st['state']}[/{colour}]" if colour else st["state"]
        if "run_id" not in st:  # planned, not started
            table.add_row(st["name"], state, "-", "-", "-", "-")
            continue
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in st["key_metrics"].items())
        cache = f"hit ← {(st['cached_from'] or '?')[:8]}" if st["cache_hit"] else "miss"
        table.add_row(st["name"], state, _duration(st["seconds"]), cache, metrics or "-", st["run_id"][:8])
    console.print(table)
    if summary := data.evaluation(run_id):  # the evaluation, as the run printed it
        _print_evaluation(summary)


@app.command()
def stages() -> None:
    """The stage DAG: each stage's inputs, outputs and config slice, in execution order."""
    from pipeline.dag import Dag
    from pipeline.runner import default_stages

    dag = Dag(default_stages())
    table = Table("#", "stage", "after", "inputs", "outputs", "config")
    for i, s in enumerate(dag.order, 1):
        table.add_row(
            str(i),
            s.name,
            ", ".join(dag.upstream(s.name)) or "-",
            ", ".join(s.inputs) or "-",
            ", ".join(f"{o.name} ({o.kind})" for o in s.outputs) or "-",
            ", ".join(s.config_sections),
        )
    console.print(table)


@config_app.command("show")
def config_show(config: ConfigOpt = "tiny", set_: SetOpt = None) -> None:
    """Print the resolved, validated configuration as YAML."""
    cfg = _load(config, set_)
    sys.stdout.write(f"# config hash {cfg.hash()}\n{cfg.to_yaml()}")


@app.command()
def dashboard(
    config: ConfigOpt = "tiny",
    set_: SetOpt = None,
    host: Annotated[
        str, typer.Option(help="Address to bind (loopback by default: the page has no login).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the dashboard.")] = 8270,
    ray_dashboard: Annotated[
        str | None,
        typer.Option(
            help="Ray dashboard URL (links, node metrics endpoints); default $RAY_ADDRESS if http(s), else "
            "http://127.0.0.1:8265 when it answers."
        ),
    ] = None,
    metrics_url: Annotated[
        list[str] | None,
        typer.Option(
            help="Prometheus endpoint(s) of Ray nodes to read serving metrics from; default: every node's, from the "
            "Ray dashboard."
        ),
    ] = None,
) -> None:
    """A web page per pipeline run: stage DAG, progress, acceptance, loss curve, expert load, evaluation, serving."""
    import uvicorn

    from pipeline.dag import Dag
    from pipeline.dashboard.app import create_app
    from pipeline.dashboard.data import RayView, RunData, find_ray_dashboard
    from pipeline.runner import default_stages
    from pipeline.tracking import Tracker

    cfg = _load(config, set_)
    tracker = Tracker(cfg.tracking)
    ray_url = ray_dashboard or find_ray_dashboard()
    data = RunData(tracker, RayView(ray_url, tuple(metrics_url or ())), Dag(default_stages()))
    console.print(
        f"moeforge dashboard: http://{host}:{port}/  (MLflow {tracker.shown_uri}; Ray dashboard "
        f"{ray_url or 'not found'})  Ctrl-C to stop"
    )
    uvicorn.run(create_app(data), host=host, port=port, log_level="warning")


@app.command()
def ui(
    config: ConfigOpt = "tiny",
    set_: SetOpt = None,
    port: Annotated[int, typer.Option(help="Port of the MLflow UI (loopback only).")] = 5000,
) -> None:
    """Start the MLflow UI on loopback for this config's tracking store; print its URL and Ray's dashboard."""
    from pipeline.dashboard.data import find_ray_dashboard
    from pipeline.tracking import resolve_tracking_uri

    cfg = _load(config, set_)
    uri = resolve_tracking_uri(cfg.tracking)
    dashboard = find_ray_dashboard()
    none = "no Ray cluster running (a local run starts its own; or `ray start --head`)"
    console.print(f"Ray dashboard: {dashboard or none}")
    if uri.startswith(("http://", "https://")):
        console.print(f"MLflow UI: {redact_uri(uri)} (tracking server)")
        return
    mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    cmd = [mlflow_bin, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    console.print(f"MLflow UI: http://127.0.0.1:{port}  (Ctrl-C to stop)")
    with contextlib.suppress(KeyboardInterrupt):
        subprocess.run(cmd, check=False)


if __name__ == "__main__":  # pragma: no cover
    app()
