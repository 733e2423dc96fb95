"""MoE layer forward+backward tokens/s: ours (batched dispatch) vs transformers' DeepseekV3MoE, identical weights.

.venv/bin/python benchmarks/moe_layer.py [--tokens 4096 --dim 256 --experts 16 --topk 4 --inter 128 --shared 1]
                                         [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import logging

import torch
from _common import describe, device_arg, interleaved, result

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
    ap.add_argument("--device", type=device_arg, default=torch.device("cpu"))
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--no-loop", action="store_true", help="skip the per-expert loop (slow at many experts)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    torch.manual_seed(0)
    cfg = model_preset(
        "toy",
        dim=args.dim,
        n_routed_experts=args.experts,
        n_activated_experts=args.topk,
        moe_inter_dim=args.inter,
        n_shared_experts=args.shared,
        route_scale=2.5,
    )
    ours = MoE(cfg).train()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.05)
    loop = MoE(cfg.model_copy(update={"moe_impl": "loop"})).train()
    loop.load_state_dict(ours.state_dict())
    hf = hf_moe(cfg).train()
    copy_moe_to_hf(ours, hf)
    for module in (ours, loop, hf):
        module.to(device=args.device, dtype=dtype)
    x = torch.randn(1, args.tokens, args.dim, device=args.device, dtype=dtype)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), **tol)  # the same function, before timing

    def step(module):
        def run():
            xi = x.detach().requires_grad_(True)
            module(xi).sum().backward()

        return run

    fns = {"transformers": step(hf), "ours": step(ours), **({} if args.no_loop else {"ours_loop": step(loop)})}
    sec = interleaved(fns, rounds=args.rounds)
    for name, s in sec.items():
        print(f"{name:>13}: {s * 1e3:7.1f} ms per forward+backward, {args.tokens / s:8.0f} tokens/s")
    print(
        f"config: {args.tokens} tokens, dim {args.dim}, {args.experts} routed experts, top-{args.topk}, "
        f"expert width {args.inter}, {args.shared} shared, {args.dtype} on {args.device}; {describe(args.device)}"
    )
    loop_figure = {} if args.no_loop else {"loop_vs_transformers": sec["transformers"] / sec["ours_loop"]}
    result(
        speedup_vs_transformers=sec["transformers"] / sec["ours"],
        ours_tok_s=args.tokens / sec["ours"],
        transformers_tok_s=args.tokens / sec["transformers"],
        **loop_figure,
    )


if __name__ == "__main__":
    main()
