"""MoE layer forward+backward tokens/s: ours (batched dispatch) vs transformers' DeepseekV3MoE, identical weights.

    .venv/bin/python benchmarks/moe_layer.py [--tokens 4096 --dim 256 --experts 16 --topk 4 --inter 128 --shared 1]
"""

from __future__ import annotations

import argparse
import logging

import torch
from _common import describe, interleaved, result

from pipeline.model.config import model_preset
from pipeline.model.hf_compat import copy_moe_to_hf, hf_moe
from pipeline.model.moe import MoE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--inter", type=int, default=128)
    ap.add_argument("--shared", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)

    torch.manual_seed(0)
    cfg = model_preset("tiny", dim=args.dim, n_routed_experts=args.experts, n_activated_experts=args.topk,
                       moe_inter_dim=args.inter, n_shared_experts=args.shared, route_scale=2.5)
    ours = MoE(cfg).train()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.05)
    loop = MoE(cfg.model_copy(update={"moe_impl": "loop"})).train()
    loop.load_state_dict(ours.state_dict())
    hf = hf_moe(cfg).train()
    copy_moe_to_hf(ours, hf)
    x = torch.randn(1, args.tokens, args.dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), rtol=1e-4, atol=1e-5)  # the same function, before timing

    def step(module):
        def run():
            xi = x.detach().requires_grad_(True)
            module(xi).sum().backward()
        return run

    sec = interleaved({"transformers": step(hf), "ours": step(ours), "ours_loop": step(loop)}, rounds=args.rounds)
    for name, s in sec.items():
        print(f"{name:>13}: {s * 1e3:7.1f} ms per forward+backward, {args.tokens / s:8.0f} tokens/s")
    print(f"config: {args.tokens} tokens, dim {args.dim}, {args.experts} routed experts, top-{args.topk}, "
          f"expert width {args.inter}, {args.shared} shared; {describe()}")
    result(speedup_vs_transformers=sec["transformers"] / sec["ours"], ours_tok_s=args.tokens / sec["ours"],
           transformers_tok_s=args.tokens / sec["transformers"],
           loop_vs_transformers=sec["transformers"] / sec["ours_loop"])


if __name__ == "__main__":
    main()
