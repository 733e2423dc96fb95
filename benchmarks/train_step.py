"""Whole training step (forward, backward, AdamW) tokens/s of the tiny preset: ours vs transformers'
DeepseekV3ForCausalLM built from the same config, with identical initial weights and batches.

    .venv/bin/python benchmarks/train_step.py [--batch 8 --seq 256]
"""

from __future__ import annotations

import argparse
import logging

import torch
from _common import describe, interleaved, result

from pipeline.model.config import model_preset
from pipeline.model.hf_compat import copy_model_to_hf, to_hf_config
from pipeline.model.transformer import Transformer

VOCAB = 49152  # the default teacher's tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = model_preset("toy", vocab_size=VOCAB, max_seq_len=args.seq + 1)
    ours = Transformer(cfg).train()
    hf_cfg = to_hf_config(cfg)
    hf_cfg._attn_implementation = "sdpa"
    hf = DeepseekV3ForCausalLM(hf_cfg).train()
    copy_model_to_hf(ours, hf)
    batch = torch.randint(0, VOCAB, (args.batch, args.seq + 1))
    inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    # the same optimizer for both: PyTorch's fused AdamW (what transformers' Trainer picks by default when present)
    opts = {
        "ours": torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True),
        "transformers": torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True),
    }

    def ours_step():
        ours.loss(inputs, targets).total.backward()
        opts["ours"].step()
        opts["ours"].zero_grad(set_to_none=True)

    def hf_step():
        # same tokens and targets: transformers shifts labels itself, so hand it the pre-shifted ones
        loss = hf(input_ids=inputs, labels=targets, shift_labels=targets).loss
        loss.backward()
        opts["transformers"].step()
        opts["transformers"].zero_grad(set_to_none=True)

    sec = interleaved({"transformers": hf_step, "ours": ours_step}, rounds=args.rounds, warmup=1)
    tokens = args.batch * args.seq
    for name, s in sec.items():
        print(f"{name:>13}: {s:.2f} s per step, {tokens / s:7.0f} tokens/s")
    params = ours.num_params()
    print(
        f"model: tiny preset, vocab {VOCAB}, {params['total'] / 1e6:.1f}M params ({params['active'] / 1e6:.1f}M "
        f"active); batch {args.batch} x {args.seq}; {describe()}"
    )
    result(
        speedup_vs_transformers=sec["transformers"] / sec["ours"],
        ours_tok_s=tokens / sec["ours"],
        transformers_tok_s=tokens / sec["transformers"],
    )


if __name__ == "__main__":
    main()
