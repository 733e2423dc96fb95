"""moeforge: the workflow (config, stage DAG + runner, artifacts, tracking, CLI) and the pure-torch parts.

The workflow: config.py (one typed config for a run) with validation.py (what its sections share), stage.py
(what a stage is and the context it runs in), stages/ (the stages and their contract), dag.py (the DAG from
artifact names), runner.py (the driver: cache, Ray tasks, MLflow), artifacts.py (what flows between stages),
tracking.py (MLflow's run tree, lineage and the stage cache), version.py (the code hash in cache keys),
run_log.py (what the terminal shows), redaction.py (secrets kept out of what a run shows), metrics.py (live
metrics on Ray's Prometheus endpoint), cli.py (`moeforge`), submit.py (Ray jobs), dashboard/ (a run's web page).

The parts the stages build on, each usable without Ray: data/ (prompts, answers, grading), teacher/ (the teacher
backends), distill/ (soft targets), model/ (the MoE student and its conversion from the teacher), train/ (one
training replica and refine's learner), student/ (the trained student as a registered product), export/ (the
student for other engines), serving/ (the OpenAI-compatible API)."""
