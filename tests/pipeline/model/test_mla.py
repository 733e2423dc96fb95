"""MLA and the latent KV cache: absorbed decoding against full naive recomputation, slot reuse, cache size."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.config import model_preset
from pipeline.model.generate import decode, prefill
from pipeline.model.mla import mha_cache_bytes_per_token
from pipeline.model.transformer import Transformer


def _model(impl, seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(model_preset("toy", vocab_size=97, attn_impl=impl, q_lora_rank=32, **kw)).eval()


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_cached_decode_equals_full_naive_recomputation(impl):
    """Ragged batch of two, 40 greedy steps: every step's logits equal a no-cache forward over the whole prefix."""
    model = _model(impl)
    oracle = _model("naive")
    oracle.load_state_dict(model.state_dict())
    seqs = [[5, 17, 3], [9, 1, 44, 2, 60, 7, 8]]
    cache = model.new_cache(2, max_len=64)
    slots = [cache.allocate(), cache.allocate()]
    logits = prefill(model, cache, slots, seqs)
    for step in range(40):
        for b, seq in enumerate(seqs):
            with torch.no_grad():
                ref = oracle(torch.tensor([seq]))[0, -1]
            torch.testing.assert_close(logits[b], ref, rtol=1e-4, atol=2e-5, msg=f"step {step} row {b}")
        nxt = logits.argmax(-1).tolist()
        for seq, t in zip(seqs, nxt, strict=True):
            seq.append(t)
        logits = decode(model, cache, slots, nxt)
    assert cache.lengths[slots].tolist() == [len(s) for s in seqs]


def test_slots_join_and_leave_between_steps():
    """A sequence added mid-way, and one removed, do not disturb the others (continuous batching)."""
    model = _model("absorb")
    cache = model.new_cache(3, max_len=64)
    a = cache.allocate()
    la = prefill(model, cache, [a], [[1, 2, 3]])
    seq_a = [1, 2, 3]
    for _ in range(4):
        t = int(la.argmax())
        seq_a.append(t)
        la = decode(model, cache, [a], [t])
    b = cache.allocate()
    lb = prefill(model, cache, [b], [[7, 8]])
    seq_b = [7, 8]
    logits = torch.stack([la[0], lb[0]])
    for _ in range(5):
        ta, tb = logits.argmax(-1).tolist()
        seq_a.append(ta)
        seq_b.append(tb)
        logits = decode(model, cache, [a, b], [ta, tb])
    cache.free(a)
    c = cache.allocate()
    assert c == a  # the freed slot is reused
    lc = prefill(model, cache, [c], [[4]])
    with torch.no_grad():
        torch.testing.assert_close(logits[1], model(torch.tensor([seq_b]))[0, -1], rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(lc[0], model(torch.tensor([[4]]))[0, -1], rtol=1e-4, atol=2e-5)
    cache.free(c)
    with pytest.raises(ValueError, match="slot 0 is not in use"):
        cache.free(c)


def test_cache_full_and_too_long_are_errors():
    model = _model("absorb", max_seq_len=16)
    cache = model.new_cache(1, max_len=8)
    slot = cache.allocate()
    with pytest.raises(RuntimeError, match="cache is full"):
        cache.allocate()
    with pytest.raises(ValueError, match="exceeds the cache length 8"):
        prefill(model, cache, [slot], [list(range(9))])
    with pytest.raises(ValueError, match="empty prompt"):
        prefill(model, cache, [slot], [[]])
    with pytest.raises(ValueError, match=r"past model.max_seq_len \(16\)"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_latent_cache_is_smaller_than_multi_head_attention():
    model = _model("absorb")
    cfg = model.cfg
    cache = model.new_cache(1, 4)
    latent = cache.bytes_per_token_per_layer
    assert latent == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    mha = mha_cache_bytes_per_token(cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    assert latent < mha / 2


@pytest.mark.parametrize("n_new", [1, 2, 5, 17, 64])
def test_one_absorbed_attention_layer_equals_the_naive_one_on_a_padded_ragged_batch(n_new):
    """Per layer, not per model: one MLA call over new tokens after ragged cached prefixes (row lengths 0, 3, 9;
    the shorter rows padded as a prefill pads them) gives the naive layer's outputs at every position."""
    from pipeline.model.mla import CacheView

    absorb, naive = _model("absorb"), _model("naive")
    naive.load_state_dict(absorb.state_dict())
    layer_a, layer_n = absorb.layers[1].attn, naive.layers[1].attn
    starts, dim = torch.tensor([0, 3, 9]), absorb.cfg.dim
    past = torch.randn(3, 9, dim)
    x = torch.randn(3, n_new, dim)
    caches = [m.new_cache(3, max_len=80) for m in (absorb, naive)]
    outs = []
    with torch.no_grad():
        for layer, cache in zip((layer_a, layer_n), caches, strict=True):
            slots = torch.tensor([cache.allocate() for _ in range(3)])
            layer(past, torch.arange(9)[None].expand(3, -1), CacheView(cache, slots, torch.zeros(3, dtype=torch.long)))
            pos = starts[:, None] + torch.arange(n_new)
            outs.append(layer(x, pos, CacheView(cache, slots, starts)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_absorbed_decoding_sees_attention_weights_changed_after_its_first_call():
    """The absorbed path keeps W_UK and W_UV in their own layout; a later in-place update must reach it."""
    model, oracle = _model("absorb"), _model("naive")
    seq = [5, 17, 3, 9]
    with torch.no_grad():
        cache = model.new_cache(1, max_len=16)
        prefill(model, cache, [cache.allocate()], [seq])
        for block in model.layers:
            block.attn.wkv_b.weight.mul_(1.5)
        oracle.load_state_dict(model.state_dict())
        cache = model.new_cache(1, max_len=16)
        got = prefill(model, cache, [cache.allocate()], [seq])[0]
        torch.testing.assert_close(got, oracle(torch.tensor([seq]))[0, -1], rtol=1e-4, atol=2e-5)
