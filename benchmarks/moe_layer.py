"""MoE layer forward+backward tokens/s: ours (batched dispatch) vs transformers' DeepseekV3MoE, identical weights.

    python benchmarks/moe_layer.py [--tokens 4096 --dim 256 --experts 16 --topk 4 --inter 128 --shared 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import describe, timeit  # noqa: E402
from pipeline.model.moe import MoE  # noqa: E402
from pipeline.model.presets import model_preset  # noqa: E402
from tests.pipeline.model.test_moe import _hf_moe, copy_to_hf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--inter", type=int, default=128)
    ap.add_argument("--shared", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = model_preset("tiny", dim=args.dim, n_routed_experts=args.experts, n_activated_experts=args.topk,
                       moe_inter_dim=args.inter, n_shared_experts=args.shared, route_scale=2.5)
    ours = MoE(cfg).train()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.05)
    loop = MoE(cfg.model_copy(update={"moe_impl": "loop"})).train()
    loop.load_state_dict(ours.state_dict())
    hf = _hf_moe(cfg).train()
    copy_to_hf(ours, hf)
    x = torch.randn(1, args.tokens, args.dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), rtol=1e-4, atol=1e-5)  # same function before we time it

    def step(module):
        def run():
            xi = x.detach().requires_grad_(True)
            module(xi).sum().backward()
        return run

    results = {}
    for name, module in (("transformers", hf), ("ours", ours), ("ours_loop", loop)):
        seconds = timeit(step(module), repeat=args.repeat)
        results[name] = args.tokens / seconds
        print(f"{name:>13}: {seconds * 1e3:7.1f} ms/fwd+bwd  {results[name]:9.0f} tokens/s")
    print(describe())
    speedup = results["ours"] / results["transformers"]
    print(f"RESULT speedup_vs_transformers={speedup:.2f} ours_tok_s={results['ours']:.0f} "
          f"transformers_tok_s={results['transformers']:.0f} loop_speedup={results['ours_loop'] / results['transformers']:.2f}")


if __name__ == "__main__":
    main()
