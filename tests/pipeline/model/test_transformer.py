"""The whole student: sizes, save/load, learning, config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.model.config import MODEL_PRESETS, model_preset
from pipeline.model.moe import Gate
from pipeline.model.transformer import Transformer


def test_param_counts_match_the_architecture():
    cfg = model_preset("toy", vocab_size=49152)
    model = Transformer(cfg)
    counts = model.num_params()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    per_expert = 3 * cfg.dim * cfg.moe_inter_dim
    moe_layers = cfg.n_layers - cfg.n_dense_layers
    inactive = cfg.n_routed_experts - cfg.n_activated_experts
    assert counts["total"] - counts["active"] == moe_layers * per_expert * inactive
    assert counts["mtp"] == 0


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_size_presets_are_valid(name):
    cfg = model_preset(name, vocab_size=49152)
    assert cfg.n_activated_experts <= cfg.n_routed_experts


def test_vocab_must_come_from_the_tokenizer():
    with pytest.raises(ValueError, match="vocab_size is not set"):
        Transformer(model_preset("toy"))


def test_save_load_reproduces_outputs_exactly(tmp_path):
    torch.manual_seed(0)
    model = Transformer(model_preset("toy", vocab_size=101, mtp_depth=1)).eval()
    for gate in (m for m in model.modules() if isinstance(m, Gate)):
        gate.bias.normal_()  # router biases are state that must survive the round trip
    model.save_pretrained(tmp_path / "student")
    loaded = Transformer.from_pretrained(tmp_path / "student").eval()
    x = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.cfg == model.cfg
    with pytest.raises(FileNotFoundError, match=r"model.safetensors is missing"):
        (tmp_path / "student" / "model.safetensors").unlink()
        Transformer.from_pretrained(tmp_path / "student")


def test_bad_saved_config_names_the_field(tmp_path):
    model = Transformer(model_preset("toy", vocab_size=11))
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(
        (tmp_path / "config.json").read_text().replace('"n_activated_experts": 2', '"n_activated_experts": 99')
    )
    with pytest.raises(ConfigError, match="n_activated_experts"):
        Transformer.from_pretrained(tmp_path)


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    cfg = model_preset(
        "toy",
        vocab_size=64,
        dim=64,
        n_layers=2,
        n_heads=2,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        inter_dim=128,
        moe_inter_dim=32,
        mtp_depth=1,
    )
    model = Transformer(cfg).train()
    batch = torch.randint(0, 64, (4, 33))
    x, y = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        out = model(x, return_aux=True)
        ce = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        mtp = F.cross_entropy(out.mtp_logits.flatten(0, 1), y[:, 1:].flatten())  # position i predicts i+2
        loss = ce + cfg.mtp_lambda * mtp + out.balance_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ce.item() < 0.1, f"cross-entropy {ce.item():.3f} after 150 steps on one batch"
    assert out.balance_loss.item() > 0


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = Transformer(model_preset("toy", vocab_size=50, mtp_depth=1, q_lora_rank=16)).train()
    out = model(torch.randint(0, 50, (2, 12)), return_aux=True)
    (out.logits.mean() + out.mtp_logits.mean() + out.balance_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_whole_model_matches_transformers_deepseek_v3(q_lora_rank):
    """litgpt-style parity: identical weights give the same logits as transformers' DeepseekV3ForCausalLM."""
    from transformers import DeepseekV3ForCausalLM

    from pipeline.model.hf_compat import copy_model_to_hf, to_hf_config

    torch.manual_seed(0)
    cfg = model_preset(
        "toy",
        vocab_size=120,
        q_lora_rank=q_lora_rank,
        n_routed_experts=8,
        n_activated_experts=2,
        n_group=2,
        topk_group=1,
        route_scale=2.5,
    )
    ours = Transformer(cfg).eval()
    for gate in (m for m in ours.modules() if isinstance(m, Gate)):
        gate.bias.normal_(std=0.01)
    hf_cfg = to_hf_config(cfg)
    hf_cfg._attn_implementation = "eager"
    hf = DeepseekV3ForCausalLM(hf_cfg).eval()
    copy_model_to_hf(ours, hf)
    tokens = torch.randint(0, 120, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # a fresh interpreter
def test_model_package_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, pipeline.model, pipeline.model.hf_compat; assert 'ray' not in sys.modules, 'ray imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "one", "two", "three", "plus", "is"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def test_vocabulary_comes_from_the_paired_tokenizer_and_travels_with_the_weights(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = _tokenizer()
    model = Transformer.for_tokenizer(model_preset("toy"), tokenizer)
    assert model.cfg.vocab_size == len(tokenizer) == 7
    with pytest.raises(ValueError, match="vocab_size is 9 but the paired tokenizer has 7 tokens"):
        Transformer.for_tokenizer(model_preset("toy", vocab_size=9), tokenizer)
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded("one plus two")["input_ids"] == tokenizer("one plus two")["input_ids"]
    assert Transformer.from_pretrained(tmp_path).cfg.vocab_size == len(reloaded)
