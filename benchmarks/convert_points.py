"""What each conversion knob costs before any training: next-token KL to the teacher and perplexity on held-out
teacher text, for SmolLM2-135M-Instruct converted at several compression points, in moeforge's exact layout and
in DeepSeek-V3's standard one (ours only: the peer is the teacher itself, KL 0 at the lossless point).

The calibration and held-out text are the teacher's own samples from a finished `generate` stage (`--samples`, the
folder of its Parquet parts: 48 calibrate, the rest are held out, as in the `convert` stage).

    .venv/bin/python benchmarks/convert_points.py --samples <workdir>/mlartifacts/<run>/artifacts/outputs/samples
        [--only standard]
"""

from __future__ import annotations

import argparse
import glob
import re
import time

import pyarrow.parquet as pq
import torch
from _common import result
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.model.config import ModelConfig
from pipeline.model.convert import TeacherShape, calibrate, convert, economics, fidelity
from pipeline.stages.convert import teacher_texts
from pipeline.teacher.hf import DEFAULT_TEACHER, default_cache_dir, resolve_model_dir

BASE = dict(
    n_layers=30,
    n_dense_layers=1,
    qk_rope_head_dim=64,
    kv_lora_rank=192,
    moe_inter_dim=64,
    n_shared_experts=4,
    n_routed_experts=20,
    n_activated_experts=20,
    max_seq_len=2048,
)
POINTS = {
    "lossless": {},
    "rope 16 pairs (tiny default)": dict(qk_rope_head_dim=32, kv_lora_rank=192, n_activated_experts=12),
    "rope 8 pairs, latent 96, 8 experts": dict(qk_rope_head_dim=16, kv_lora_rank=96, n_activated_experts=8),
    "rope 4 pairs, latent 72, 8 experts, 24 layers (small/base)": dict(
        n_layers=24, qk_rope_head_dim=8, kv_lora_rank=72, n_activated_experts=8
    ),
    "only 24 layers": dict(n_layers=24),
    "only 8 of 20 experts": dict(n_activated_experts=8),
    "only rope 4 pairs": dict(qk_rope_head_dim=8, kv_lora_rank=3 * (56 + 64)),
    # DeepSeek-V3's standard layout (one shared rope key by RoRoPE, the latent norm, normalised routing), which
    # engines run, beside the exact one at the same knobs
    "standard: full rank, every pair, every expert": dict(kv_lora_rank=385, layout="standard"),
    "standard: tiny default, the norm weight alone (no anchor)": dict(
        qk_rope_head_dim=32, kv_lora_rank=192, n_activated_experts=12, layout="standard", anchor=False
    ),
    "standard: rope 16 pairs (tiny default)": dict(
        qk_rope_head_dim=32, kv_lora_rank=192, n_activated_experts=12, layout="standard"
    ),
    "standard: 24 layers, rope 4 pairs, latent 72, 8 experts": dict(
        n_layers=24, qk_rope_head_dim=8, kv_lora_rank=72, n_activated_experts=8, layout="standard"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", required=True)
    parser.add_argument("--only", default="", help="run only the points whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = resolve_model_dir(DEFAULT_TEACHER, default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    teacher = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    rows = [r for f in sorted(glob.glob(f"{args.samples}/*.parquet")) for r in pq.read_table(f).to_pylist()]
    texts = teacher_texts(rows, tokenizer, 2048)
    calib = calibrate(teacher, texts[:48])
    held = texts[48:]
    shape = TeacherShape.of(teacher.config)
    figures = {}
    for name, knobs in ((n, k) for n, k in POINTS.items() if args.only in n):
        t0 = time.perf_counter()
        knobs = dict(knobs)
        layout, anchor = knobs.pop("layout", "exact"), knobs.pop("anchor", True)
        cfg = ModelConfig.model_validate({**BASE, **knobs})
        student, _ = convert(teacher, cfg, calib, layout=layout, latent_anchor=anchor)
        f = fidelity(teacher, student, held)
        e = economics(student.cfg, student.num_params(), shape)
        print(
            f"{name:<60} KL {f.kl:6.3f}  ppl {f.student_ppl:7.2f} (teacher {f.teacher_ppl:.2f})  active "
            f"{e['active_param_ratio']:5.1%}  cache {e['cache_ratio']:5.1%}  ({time.perf_counter() - t0:.0f} s)"
        )
        figures[name] = f.kl
    result(**{re.sub(r"\W+", "_", name).strip("_")[:48] + "_kl": f"{kl:.4f}" for name, kl in figures.items()})


if __name__ == "__main__":
    main()
