"""The GPU check's dry run: every part that needs no CUDA, on tiny sizes, through the same code the device run
uses (so a run on a GPU spends its minutes measuring, not fixing imports and wiring)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_dry_run_passes_every_part_and_names_what_it_skipped(tmp_path):
    # its own temp folder (Ray's sockets stay under /tmp/ray: a socket path has a length limit), to see what it leaves
    env = {**os.environ, "TMPDIR": str(tmp_path), "RAY_TMPDIR": "/tmp/ray"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=840, env=env,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-5000:]
    for part in ("train", "moe", "mla", "generate", "serve", "vllm"):
        assert any(line.startswith(f"PART {part} ok") for line in out.splitlines()), out
    assert any(line.startswith("SKIP ") and "need CUDA" in line for line in out.splitlines())
    last = out.strip().splitlines()[-1]
    figures = dict(kv.split("=", 1) for kv in last.split()[1:])
    assert last.startswith("RESULT ") and float(figures["train_tok_s"]) > 0 and float(figures["serve_speedup"]) > 0
    assert float(figures["train_fsdp_tok_s"]) > 0 and figures["train_fsdp_ranks"] == "2"  # the sharded path, on CPU
    assert figures["train_device"] == "cpu" and figures["generate_vllm"] == "skipped-no-cuda"
    # the HF export answers our greedy tokens in transformers; both CPU serving engines served
    assert float(figures["hf_export_greedy_match"]) == 1.0 and figures["vllm"] == "skipped-no-cuda"
    assert float(figures["serve_llama_cpp_tok_s_concurrent"]) > 0
    # every part removes its work folders (students, exports: GBs on a GPU run); only caches such as torch's stay
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(("moeforge-", "tmp"))]
    assert leftovers == [], leftovers


@pytest.mark.slow  # a Python subprocess
def test_without_cuda_the_full_run_refuses_and_says_how_to_dry_run():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the full run would start")
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1 and "FAILED setup: no CUDA device here" in proc.stdout and "--dry-run" in proc.stdout
