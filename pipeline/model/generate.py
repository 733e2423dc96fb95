"""Batched generation on the latent KV cache: prefill, decode steps, per-row sampling.

`prefill` and `decode` work on cache slots, so a server can add a sequence (allocate + prefill) or drop one
(free) between any two decode steps; `generate` is the simple all-at-once loop built from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch

from pipeline.model.mla import CacheView, LatentKVCache
from pipeline.model.transformer import Transformer


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence sampling settings. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token) or "length" (max_new_tokens)


@torch.no_grad()
def prefill(model: Transformer, cache: LatentKVCache, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
    """Write the prompts into their (fresh) slots in one right-padded batch; return each one's last logits (B, V)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: a sequence needs at least one token")
    device = cache.lengths.device
    lens_B = torch.tensor([len(p) for p in prompts], device=device)
    if int(lens_B.max()) > cache.max_len:
        raise ValueError(f"prompt of {int(lens_B.max())} tokens exceeds the cache length {cache.max_len}")
    tokens_BS = torch.zeros(len(prompts), int(lens_B.max()), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens_BS[b, : len(p)] = torch.tensor(p, device=device)
    slots_B = torch.tensor(slots, device=device)
    logits_BSV = model(tokens_BS, CacheView(cache, slots_B, torch.zeros_like(slots_B)))
    cache.lengths[slots_B] = lens_B  # padding written past each length is masked and later overwritten
    return logits_BSV[torch.arange(len(prompts), device=device), lens_B - 1]


class CompiledDecode:
    """`torch.compile` of the one-token decode step for batches of at most `max_batch` rows; larger ones run eager.

    At small batch a decode step is thousands of small ops, and their dispatch, not the weights' bytes, bounds it
    on a CPU; compiled (inductor), the step is a few fused kernels around the GEMVs. It needs static shapes: the
    step attends over the cache's whole length with the rows' ends masked (`CacheView(static=True)`), and is
    compiled once per batch size (about a minute each for the default student on 2 cores, at the first step of
    that size). Past `max_batch` the products dominate and the compiled step is no faster (docs/benchmarks.md), so
    those run eagerly.

    Weights that change (an optimizer step, a weight sync, a dtype cast) are noticed by every parameter's storage
    and version counter: the step after a change runs eagerly, which rebuilds the derived weight layouts the
    compiled graph reads.
    """

    def __init__(self, model: Transformer, max_batch: int = 1):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self._step = torch.compile(model.forward, dynamic=False)  # compiles lazily, per batch size
        self._weights: tuple[tuple[int, int], ...] | None = None
        self.compiled_steps = 0  # steps that ran compiled (the others ran eagerly)

    def __call__(self, tokens_B1: torch.Tensor, cache: LatentKVCache, slots_B, start_B) -> torch.Tensor:
        weights = tuple((p.data_ptr(), p._version) for p in self.model.parameters())
        if tokens_B1.shape[0] > self.max_batch or weights != self._weights:
            self._weights = weights
            return self.model(tokens_B1, CacheView(cache, slots_B, start_B))
        self.compiled_steps += 1
        return cast(torch.Tensor, self._step(tokens_B1, CacheView(cache, slots_B, start_B, static=True)))


@torch.no_grad()
def decode(
    model: Transformer,
    cache: LatentKVCache,
    slots: list[int],
    tokens: list[int],
    compiled: CompiledDecode | None = None,
) -> torch.Tensor:
    """Append one token to each given slot; return the next-token logits (B, V). `compiled`: the model's
    compiled step, used where it applies."""
    device = cache.lengths.device
    slots_B = torch.tensor(slots, device=device)
    start_B = cache.lengths[slots_B]
    if int(start_B.max()) >= cache.max_len:
        raise ValueError(f"a sequence reached the cache length {cache.max_len}")
    tokens_B1 = torch.tensor(tokens, device=device)[:, None]
    if compiled is not None:
        logits_B1V = compiled(tokens_B1, cache, slots_B, start_B)
    else:
        logits_B1V = model(tokens_B1, CacheView(cache, slots_B, start_B))
    cache.lengths[slots_B] = start_B + 1
    return logits_B1V[:, 0]


def sample(
    logits_BV: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row, each row with its own temperature / top-k / top-p and random stream.

    Sampled rows draw by inverse CDF: one uniform number per row from that row's generator, located in the
    cumulative distribution (float64, so the 50k-token tail keeps its mass). That is exact, and one random number
    instead of a vocabulary-sized draw (multinomial / Gumbel noise cost ~2 ms a row on a CPU; this ~0.3 ms).
    Filters sort only rows that ask for them.
    """
    logits_BV = logits_BV.float()
    out_B = logits_BV.argmax(dim=-1)
    hot = [b for b, p in enumerate(params) if p.temperature > 0]
    if not hot:
        return out_B.tolist()
    temps_b = torch.tensor([params[b].temperature for b in hot], dtype=logits_BV.dtype)
    scaled_bV = logits_BV[hot] / temps_b[:, None]  # b: the rows that sample
    for i, b in enumerate(hot):
        p = params[b]
        if p.top_k:
            kth = scaled_bV[i].topk(min(p.top_k, scaled_bV.shape[-1])).values[-1]
            scaled_bV[i] = scaled_bV[i].masked_fill(scaled_bV[i] < kth, float("-inf"))
        if p.top_p < 1:
            sorted_V, idx_V = scaled_bV[i].sort(descending=True)
            probs_V = sorted_V.softmax(-1)
            drop_V = probs_V.cumsum(-1) - probs_V > p.top_p  # keep the smallest prefix reaching top_p
            scaled_bV[i, idx_V[drop_V]] = float("-inf")
    cdf_bV = scaled_bV.softmax(-1).double().cumsum(-1)
    u_b = torch.cat([torch.rand(1, generator=generators[b], dtype=torch.float64) for b in hot])
    choice_b = torch.searchsorted(cdf_bV, (u_b * cdf_bV[:, -1])[:, None])[:, 0].clamp(max=cdf_bV.shape[-1] - 1)
    out_B[hot] = choice_b
    return out_B.tolist()


def make_generator(seed: int | None) -> torch.Generator | None:
    """A per-sequence random stream for `sample` (which runs on the CPU), or None for the global one."""
    return None if seed is None else torch.Generator().manual_seed(seed)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams] = SamplingParams(),
    compiled: CompiledDecode | None = None,
) -> list[Completion]:
    """Complete a batch of ragged prompts; rows stop independently (stop token or max_new_tokens).

    With `compiled` (the model's `CompiledDecode`) the cache length is rounded up to a multiple of 256, so that
    calls of different lengths share compiled steps.
    """
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling settings")
    was_training = model.training
    model.eval()
    try:
        longest = max(len(p) + s.max_new_tokens for p, s in zip(prompts, params, strict=True))
        if compiled is not None:
            longest = -(-longest // 256) * 256
        cache = model.new_cache(len(prompts), max_len=min(longest, model.cfg.max_seq_len))
        slots = [cache.allocate() for _ in prompts]
        generators = [make_generator(s.seed) for s in params]  # sampling happens on the CPU
        logits_BV = prefill(model, cache, slots, prompts)
        results = [Completion() for _ in prompts]
        active = list(range(len(prompts)))
        while active:
            tokens = sample(logits_BV.cpu(), [params[i] for i in active], [generators[i] for i in active])
            still = []
            for i, tok in zip(active, tokens, strict=True):
                results[i].tokens.append(tok)
                if tok in params[i].stop_token_ids:
                    results[i].finish_reason = "stop"
                elif (
                    len(results[i].tokens) >= params[i].max_new_tokens
                    or int(cache.lengths[slots[i]]) + 1 >= cache.max_len
                ):
                    results[i].finish_reason = "length"
                else:
                    still.append(i)
            active = still
            if active:
                step_slots, step_tokens = [slots[i] for i in active], [results[i].tokens[-1] for i in active]
                logits_BV = decode(model, cache, step_slots, step_tokens, compiled)
        return results
    finally:
        model.train(was_training)
