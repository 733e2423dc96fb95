"""The student as an MLflow model: logged, registered, loaded in a fresh process through `models:/`, generating."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient

from pipeline.config import ModelConfig
from pipeline.model import Transformer
from pipeline.registry import log_student

pytestmark = pytest.mark.slow

LOAD = """
import sys, mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
out = model.predict(pd.DataFrame({"prompt": ["What is 2 + 2?", "Calculate 3 + 5."]}), params={"max_new_tokens": 6})
print(repr(out))
"""


def test_a_logged_student_loads_by_alias_in_a_fresh_process_and_generates(tmp_path, teacher):
    torch.manual_seed(0)
    student = Transformer.for_tokenizer(ModelConfig(dim=64, n_layers=2, n_heads=2, inter_dim=128, moe_inter_dim=32,
                                                    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                                    v_head_dim=16), teacher.tokenizer)
    student.save_pretrained(tmp_path / "student", teacher.tokenizer)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("reg", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    version = log_student(tmp_path / "student", run.info.run_id, uri, "moeforge-student")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    client.set_registered_model_alias("moeforge-student", "champion", version.version)
    proc = subprocess.run([sys.executable, "-c", LOAD, uri, "models:/moeforge-student@champion"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - the repr printed by our own child process
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(t, str) for t in out)
