"""The metric registry and recording outside Ray (the Prometheus export itself: tests/jobs/test_cluster.py)."""

from __future__ import annotations

import pytest

from pipeline.metrics import METRICS, exported_names, record


def test_every_metric_has_a_prometheus_name_and_the_run_or_model_tags():
    names = exported_names()
    assert "ray_moeforge_samples_accepted_total" in names  # counters: _total
    assert {"ray_moeforge_serve_ttft_seconds_bucket", "ray_moeforge_serve_ttft_seconds_count"} <= names
    assert "ray_moeforge_train_loss" in names  # gauges: as named
    for name, spec in METRICS.items():
        assert name.startswith("moeforge_")
        assert {"run", "stage"} <= set(spec.tags) or "model" in spec.tags, name
        assert (spec.kind == "histogram") == bool(spec.boundaries), name


def test_recording_never_fails_the_work_but_wrong_tags_are_a_clear_error():
    record("moeforge_train_loss", 1.5, run="r", stage="train")  # without Ray (a plain class in a test): a no-op
    record("moeforge_samples_generated", 0, run="r", stage="generate", task="t")  # a zero count: nothing to add
    with pytest.raises(ValueError, match=r"moeforge_train_loss takes tags \('run', 'stage'\), got \('run',\)"):
        record("moeforge_train_loss", 1.5, run="r")
    with pytest.raises(KeyError):
        record("moeforge_no_such_metric", 1.0)
