"""MLA latent KV cache: bytes per token per layer vs standard multi-head attention, and decode tokens/s with the
`absorb` path vs the `naive` path (expand every cached latent each step) at 1k and 2k cached tokens.

    .venv/bin/python benchmarks/mla_cache.py [--batch 4 --contexts 1024 2048] [--device cuda]
"""

from __future__ import annotations

import argparse

import torch
from _common import describe, device_arg, interleaved, result

from pipeline.model.config import model_preset
from pipeline.model.generate import decode
from pipeline.model.mla import mha_cache_bytes_per_token
from pipeline.model.transformer import Transformer

VOCAB = 49152  # the default teacher's tokenizer


def cache_bytes(preset: str) -> tuple[int, int]:
    """(latent bytes, MHA bytes) per token per layer in float32, measured on allocated caches."""
    cfg = model_preset(preset, vocab_size=VOCAB)
    model = Transformer(cfg.model_copy(update={"n_layers": 1, "n_dense_layers": 1, "mtp_depth": 0}))
    cache = model.new_cache(max_batch=1, max_len=1)
    latent = (cache.kv_LBTC.numel() + cache.pe_LBTGR.numel()) * cache.kv_LBTC.element_size()
    head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    k_and_v = [torch.empty(1, cfg.n_heads, 1, head_dim) for _ in range(2)]  # what an MHA layer caches per token
    mha = sum(t.numel() * t.element_size() for t in k_and_v)
    assert latent == cache.bytes_per_token_per_layer and mha == mha_cache_bytes_per_token(cfg.n_heads, head_dim)
    return latent, mha


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", type=device_arg, default=torch.device("cpu"))
    args = ap.parse_args()

    figures: dict[str, float] = {}
    for preset in ("toy",):  # converted students: their cache beside the teacher's is `convert`'s cache_ratio
        latent, mha = cache_bytes(preset)
        print(f"{preset:>5}: latent cache {latent} B/token/layer vs MHA {mha} B ({100 * (1 - latent / mha):.1f}% less)")
        figures[f"cache_ratio_{preset}"] = latent / mha

    torch.manual_seed(0)
    cfg = model_preset("toy", vocab_size=VOCAB, max_seq_len=max(args.contexts) + args.steps + 8)
    models = {
        impl: Transformer(cfg.model_copy(update={"attn_impl": impl})).eval().to(args.device)
        for impl in ("naive", "absorb")
    }
    models["naive"].load_state_dict(models["absorb"].state_dict())
    for ctx_len in args.contexts:
        caches = {}
        for impl, model in models.items():
            cache = model.new_cache(args.batch, max_len=ctx_len + args.steps + 4)
            slots = [cache.allocate() for _ in range(args.batch)]
            # random latents stand in for a prefilled context: decode speed does not depend on their values
            if caches:
                other = next(iter(caches.values()))[0]
                cache.kv_LBTC.copy_(other.kv_LBTC)
                cache.pe_LBTGR.copy_(other.pe_LBTGR)
            else:
                cache.kv_LBTC.normal_()
                cache.pe_LBTGR.normal_()
            caches[impl] = (cache, slots)

        def run(impl, caches=caches, ctx_len=ctx_len):  # bound now: called within this iteration
            def go():
                cache, slots = caches[impl]
                cache.lengths[slots] = ctx_len
                for _ in range(args.steps):
                    decode(models[impl], cache, slots, [1] * args.batch)

            return go

        with torch.no_grad():  # both paths agree before we time them
            for impl in models:
                caches[impl][0].lengths[caches[impl][1]] = ctx_len
            a = decode(models["absorb"], *caches["absorb"], [3] * args.batch)
            n = decode(models["naive"], *caches["naive"], [3] * args.batch)
            torch.testing.assert_close(a, n, rtol=1e-3, atol=1e-3)
        sec = interleaved({impl: run(impl) for impl in models}, rounds=args.rounds, warmup=1)
        tok_s = {impl: args.batch * args.steps / s for impl, s in sec.items()}
        print(
            f"context {ctx_len}: naive {tok_s['naive']:.0f} tok/s, absorb {tok_s['absorb']:.0f} tok/s "
            f"(batch {args.batch})"
        )
        figures[f"absorb_speedup_{ctx_len}"] = tok_s["absorb"] / tok_s["naive"]
        figures[f"absorb_tok_s_{ctx_len}"] = tok_s["absorb"]
    print(f"model: tiny preset, vocab {VOCAB}, on {args.device}; {describe(args.device)}")
    result(**figures)


if __name__ == "__main__":
    main()
