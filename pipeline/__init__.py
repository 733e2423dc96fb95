"""moeforge: the workflow (config, stage DAG + runner, artifacts, tracking, CLI) and the pure-torch parts."""
