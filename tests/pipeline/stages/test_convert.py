"""Stage `convert` for real: the default teacher's own samples calibrate a pruned student, recovery moves it back
towards the teacher, and both divergences are on the stage's run."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from pipeline.artifacts import fetch
from pipeline.config import load_config
from pipeline.runner import StageFailed, run_pipeline
from pipeline.stages.results import Fidelity, Recovery, read_conversion
from tests.pipeline.stages.conftest import TEACHER_SAMPLES

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

# the teacher's samples come from the `upstream` fixture (conftest.py); 6 of the 30 layers: a lossy student, quick
# to recover
SMALL = [*TEACHER_SAMPLES, "model.n_layers=6", "model.kv_lora_rank=64"]


@pytest.mark.timeout(600)
def test_recovery_lowers_the_converted_students_divergence_on_held_out_teacher_text(upstream):
    overrides = [
        f"tracking.workdir={upstream}",
        *SMALL,
        "convert.recovery_steps=2",
        "convert.recovery_lr=5e-4",
        "convert.recovery_batch_size=2",
        "convert.held_out_samples=3",
    ]
    result = run_pipeline(load_config("tiny", overrides), until="convert")
    run = MlflowClient(result.tracking_uri).get_run(result["convert"].run_id)
    fidelity, recovery = Fidelity.from_metrics(run.data.metrics), Recovery.from_metrics(run.data.metrics)
    assert fidelity is not None and recovery is not None, run.data.metrics
    assert 0 < fidelity.kl_to_teacher < recovery.kl_to_teacher_converted < float("inf")
    assert recovery.recovery_tokens > 0 and fidelity.student_ppl < recovery.student_ppl_converted
    history = MlflowClient(result.tracking_uri).get_metric_history(run.info.run_id, "recovery_kl")
    assert sorted(h.step for h in history) == [1, 2]
    # conversion.json holds what the run logged, beside the kept layers
    student_dir = fetch(result["convert"].outputs["initial_student"], result.tracking_uri, upstream)
    conversion = read_conversion(student_dir)
    assert conversion.init == "teacher" and conversion.layers is not None and len(conversion.layers) == 6
    assert conversion.fidelity == fidelity and conversion.recovery == recovery
    assert conversion.to_metrics() == {k: v for k, v in run.data.metrics.items() if k != "recovery_kl"}


def test_recovery_of_a_scratch_student_is_refused_by_name(upstream):
    overrides = [f"tracking.workdir={upstream}", *SMALL, "model.init=scratch", "convert.recovery_steps=2"]
    with pytest.raises(StageFailed, match=r"model\.init=scratch converts nothing: set convert\.recovery_steps=0"):
        run_pipeline(load_config("tiny", overrides), until="convert")
