"""Teacher → student conversion on small random Llama/Qwen2 teachers built locally with transformers.

Each mapping is exact where it loses nothing (every rope pair kept, full latent rank, every expert active, the
layers kept): the student's logits are the teacher's to float tolerance. The lossy settings are checked for what
they promise: the named layers, the measured choices, a finite divergence.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from pipeline.model.config import ModelConfig
from pipeline.model.convert import (
    ConversionError,
    TeacherShape,
    calibrate,
    convert,
    convert_ffn,
    fidelity,
    rope_pairs,
    student_config,
)
from pipeline.model.moe import MoE

VOCAB, DIM, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 96, 64, 4, 2, 16, 96, 4


def llama(seed: int = 0, cls=LlamaForCausalLM, config_cls=LlamaConfig, **extra):
    torch.manual_seed(seed)
    extra = {"num_key_value_heads": KV_HEADS, **extra}
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        **extra,
    )
    model = cls(config).eval()
    with torch.no_grad():  # random init gives every layer a near-identity block; widen them so layers matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def sequences(n: int = 12, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, VOCAB, (int(torch.randint(8, 40, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(n)
    ]


def lossless(**knobs) -> ModelConfig:
    """Every rope pair, full latent rank, every neuron in an expert and every expert active."""
    base = dict(
        n_layers=LAYERS,
        n_dense_layers=1,
        qk_rope_head_dim=HEAD_DIM,
        kv_lora_rank=KV_HEADS * HEAD_DIM,
        moe_inter_dim=16,
        n_shared_experts=2,
        n_routed_experts=4,
        n_activated_experts=4,
        n_group=1,
        topk_group=1,
        max_seq_len=128,
    )
    return ModelConfig.model_validate({**base, **knobs})


def teacher_logits(teacher, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return teacher(input_ids=ids, use_cache=False).logits


def student_logits(student, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return student(ids)


def batch(n: int = 3, length: int = 24) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(7))


def test_mla_from_gqa_at_full_rank_is_exact():
    teacher = llama()
    cfg = lossless(n_dense_layers=LAYERS)  # only attention changes form
    student, _ = convert(teacher, cfg, calibrate(teacher, sequences()))
    assert student.cfg.n_rope_heads == KV_HEADS and student.cfg.qk_nope_head_dim == 0
    ids = batch()
    torch.testing.assert_close(student_logits(student, ids), teacher_logits(teacher, ids), atol=2e-5, rtol=1e-4)


def test_full_rank_latent_with_partial_rope_reproduces_the_keys_and_values_exactly():
    """The SVD half alone: at full rank the latent loses nothing, whatever pairs stay rotary."""
    teacher = llama()
    cfg = lossless(n_dense_layers=LAYERS, qk_rope_head_dim=4)
    cfg = cfg.model_copy(update={"kv_lora_rank": KV_HEADS * (HEAD_DIM - 4 + HEAD_DIM)})
    student, report = convert(teacher, cfg, calibrate(teacher, sequences()))
    x = torch.randn(2, 5, DIM)
    for j, layer in enumerate(teacher.model.layers):
        attn, mla = layer.self_attn, student.layers[j].attn
        kv = mla.wkv_b(mla.wkv_a(x)[..., : mla.kv_rank]).view(2, 5, HEADS, -1)
        v = attn.v_proj(x).view(2, 5, KV_HEADS, HEAD_DIM).repeat_interleave(HEADS // KV_HEADS, dim=2)
        torch.testing.assert_close(kv[..., mla.nope :], v, atol=1e-5, rtol=1e-5)
        k = attn.k_proj(x).view(2, 5, KV_HEADS, HEAD_DIM)
        kept = report.rope_pairs[j][0]
        rest = [i for i in range(HEAD_DIM // 2) if i not in kept]
        nope_channels = rest + [i + HEAD_DIM // 2 for i in rest]
        torch.testing.assert_close(kv[..., 0, : mla.nope], k[..., 0, nope_channels], atol=1e-5, rtol=1e-5)


def test_ffn_split_into_shared_and_routed_experts_with_all_active_is_exact():
    teacher = llama()
    calib = calibrate(teacher, sequences())
    cfg = student_config(TeacherShape.of(teacher.config), lossless())
    moe = MoE(cfg).eval()
    carved = convert_ffn(teacher.model.layers[2].mlp, moe, calib.layers[2], 32, 16)
    neurons = carved["shared"] + [n for e in carved["experts"] for n in e]
    assert sorted(neurons) == list(range(FFN)) and len(carved["shared"]) == 32
    assert all(len(e) == 16 for e in carved["experts"])
    x = torch.randn(2, 9, DIM)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), teacher.model.layers[2].mlp(x), atol=1e-5, rtol=1e-5)


def test_the_shared_expert_holds_the_most_activated_neurons_and_experts_group_co_activated_ones():
    teacher = llama()
    calib = calibrate(teacher, sequences(24))
    stats = calib.layers[1]
    cfg = student_config(TeacherShape.of(teacher.config), lossless(n_activated_experts=1))
    carved = convert_ffn(teacher.model.layers[1].mlp, MoE(cfg), stats, 32, 16)
    mass = stats.ffn_mass_F
    assert mass[carved["shared"]].min() >= mass[[n for e in carved["experts"] for n in e]].max()

    def within(groups) -> float:  # mean pairwise cosine of |activation| inside each group
        f = stats.ffn_act_NF.abs().T
        f = f / f.norm(dim=1, keepdim=True)
        return float(sum((f[g] @ f[g].T).mean() for g in groups) / len(groups))

    by_index = [sorted(n for e in carved["experts"] for n in e)[i * 16 : (i + 1) * 16] for i in range(4)]
    assert within(carved["experts"]) > within(by_index)


def test_depth_pruning_keeps_the_named_layers_and_equals_the_teacher_without_the_others():
    teacher = llama()
    student, report = convert(teacher, lossless(n_layers=3), calibrate(teacher, sequences()), keep_layers=[0, 2, 3])
    assert report.layers == [0, 2, 3]
    torch.testing.assert_close(student.layers[1].attn.wo.weight, teacher.model.layers[2].self_attn.o_proj.weight)
    del teacher.model.layers[1]
    teacher.config.num_hidden_layers = 3
    for i, layer in enumerate(teacher.model.layers):
        layer.self_attn.layer_idx = i
    ids = batch()
    torch.testing.assert_close(student_logits(student, ids), teacher_logits(teacher, ids), atol=2e-5, rtol=1e-4)


def test_depth_pruning_without_names_drops_the_least_important_layers():
    teacher = llama()
    calib = calibrate(teacher, sequences())
    _, report = convert(teacher, lossless(n_layers=2), calib)
    ranked = sorted(range(LAYERS), key=lambda i: -calib.layers[i].importance)
    assert report.layers == sorted(ranked[:2])
    with pytest.raises(ConversionError, match="keep_layers"):
        convert(teacher, lossless(n_layers=2), calib, keep_layers=[3, 1])


def test_the_whole_lossless_conversion_is_exact_and_a_qwen2_teacher_with_biases_too():
    for teacher in (llama(), llama(cls=Qwen2ForCausalLM, config_cls=Qwen2Config)):
        student, _ = convert(teacher, lossless(), calibrate(teacher, sequences()))
        ids = batch()
        torch.testing.assert_close(student_logits(student, ids), teacher_logits(teacher, ids), atol=2e-5, rtol=1e-4)
    assert student.cfg.qkv_bias


def test_compression_gives_a_finite_divergence_and_calibration_beats_weights_alone():
    teacher = llama()
    calib = calibrate(teacher, sequences(24))
    cfg = lossless(qk_rope_head_dim=4, kv_lora_rank=16, n_activated_experts=2)
    held_out = sequences(8, seed=99)
    calibrated = fidelity(teacher, convert(teacher, cfg, calib)[0], held_out)
    blind = fidelity(teacher, convert(teacher, cfg)[0], held_out)
    assert 0 < calibrated.kl < blind.kl < float("inf")
    assert calibrated.student_ppl > 0 and calibrated.tokens == sum(len(s) - 1 for s in held_out)


def test_rope_pairs_are_the_largest_q_k_norms():
    norms = torch.tensor([[0.1, 5.0, 0.3, 4.0], [9.0, 0.0, 1.0, 2.0]])
    assert rope_pairs(norms, 2).tolist() == [[1, 3], [0, 3]]


def test_knobs_that_do_not_fit_the_teacher_are_named():
    shape = TeacherShape.of(llama().config)
    with pytest.raises(ConversionError, match="qk_rope_head_dim"):
        student_config(shape, lossless(qk_rope_head_dim=32))
    with pytest.raises(ConversionError, match="kv_lora_rank"):
        student_config(shape, lossless(kv_lora_rank=1000))
    with pytest.raises(ConversionError, match="n_layers"):
        student_config(shape, lossless(n_layers=5, n_dense_layers=1))
    with pytest.raises(ConversionError, match="moe_inter_dim"):
        student_config(shape, lossless(moe_inter_dim=32))


@pytest.mark.timeout(600)
def test_the_uncompressed_conversion_of_the_real_default_teacher_gives_its_logits():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.prompts import chat_token_ids, student_messages, teacher_messages
    from pipeline.teacher.hf import DEFAULT_TEACHER, default_cache_dir, resolve_model_dir

    path = str(resolve_model_dir(DEFAULT_TEACHER, default_cache_dir()))
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    questions = [
        "What is 7 + 5?",
        "How many times does the letter r appear in the text: strawberry?",
        "State the final answer to the following arithmetic problem: 3 + 4 - 2 =",
        "What is 9 - 6 + 1?",
    ]
    calib = [chat_token_ids(tokenizer, student_messages(q)) for q in questions]
    shape = TeacherShape.of(teacher.config)
    cfg = ModelConfig(
        n_layers=shape.n_layers,
        qk_rope_head_dim=shape.head_dim,
        kv_lora_rank=shape.n_kv_heads * shape.head_dim,
        moe_inter_dim=64,
        n_shared_experts=4,
        n_routed_experts=20,
        n_activated_experts=20,
        max_seq_len=1024,
    )
    student, report = convert(teacher, cfg, calibrate(teacher, calib, ffn_sample=256))
    assert report.layers == list(range(shape.n_layers))
    held_out = [
        teacher_messages("basic_arithmetic", "What is 8 - 3?"),
        student_messages("Count the letter e in: tree"),
        teacher_messages("chain_sum", "State the final answer to the following arithmetic problem: 4 + 4 ="),
    ]
    width = max(len(chat_token_ids(tokenizer, m)) for m in held_out)
    rows = [chat_token_ids(tokenizer, m) for m in held_out]
    ids = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])  # right padding: causal
    got, want = student_logits(student, ids), teacher_logits(teacher, ids)
    for i, r in enumerate(rows):
        torch.testing.assert_close(got[i, : len(r)], want[i, : len(r)], atol=2e-4, rtol=1e-4)


def _keys_and_values(student, report, layer: int, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `layer`'s non-rotary keys and values of inputs x, from its KV latent before and after its RMSNorm (the
    up-projection holds the latent norm's scale: the unnormed latent is divided by it)."""
    attn = student.layers[layer].attn
    latent = attn.wkv_a(x_ND)[:, : attn.kv_rank]
    return attn.wkv_b(latent / report.latent_scale[layer]), attn.wkv_b(attn.kv_norm(latent))


def test_the_standard_layout_is_deepseek_v3s_and_exact_for_one_kv_head_up_to_its_latent_norm():
    """One KV head (MQA): the shared rope key is that head's, so RoRoPE loses nothing; only the latent RMSNorm,
    which the teacher never had, differs. With it swapped for a division by the latent's scale (which the conversion
    moved into the up-projection) the logits are the teacher's; with it, the divergence stays small."""
    teacher = llama(num_key_value_heads=1)
    calib = calibrate(teacher, sequences(24))
    held_out = sequences(8, seed=99)
    cfg = lossless(n_dense_layers=LAYERS, kv_lora_rank=2 * HEAD_DIM + 1)  # full rank, plus the anchor channel
    student, report = convert(teacher, cfg, calib, layout="standard")
    c = student.cfg
    assert (c.n_rope_heads, c.kv_norm, c.qkv_bias, c.route_weight, c.qk_nope_head_dim) == (
        1,
        True,
        False,
        "normalized",
        HEAD_DIM,
    )
    assert report.layout == "standard" and report.rope_key_energy == pytest.approx([1.0] * LAYERS)
    for block in student.layers:  # the standard frequencies are the teacher's leading ones
        torch.testing.assert_close(block.attn.inv_freq[0], teacher.model.rotary_emb.inv_freq.float())
    assert 0 < fidelity(teacher, student, held_out).kl < 0.02
    # the latent's scale is in the up-projection, the norm's weight has RMS 1 (AdamW moves both at one pace)
    for block, anchor in zip(student.layers, report.latent_anchor, strict=True):
        learned = block.attn.kv_norm.weight.detach()[int(anchor > 0) :]  # all but an anchor
        assert float(learned.pow(2).mean().sqrt()) == pytest.approx(1.0, abs=1e-5)
    for block, scale in zip(student.layers, report.latent_scale, strict=True):
        block.attn.kv_norm = Scale(1 / scale)
    assert fidelity(teacher, student, held_out).kl < 1e-6


class Scale(torch.nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_the_anchor_channel_makes_the_latent_norm_give_back_the_latent():
    """Per token, the keys and values from the RMSNorm'd latent are nearer those from the unnormed one with the
    anchor than without it (the norm's weight alone, no mean statistics), where tokens whose latent is small are
    scaled up. The teacher's inputs
    share a large common component, as a real LLM's do (massive activations)."""
    teacher = llama()
    with torch.no_grad():
        teacher.model.embed_tokens.weight[:, :4] += 1.5
    calib = calibrate(teacher, sequences(24))
    cfg = lossless(n_dense_layers=LAYERS, kv_lora_rank=24)
    anchored, anchored_report = convert(teacher, cfg, calib, layout="standard")
    for stats in calib.layers:
        stats.attn_mean_D = None
    plain, plain_report = convert(teacher, cfg, calib, layout="standard")
    with torch.no_grad():
        hidden = teacher.model(input_ids=torch.tensor([sequences(8, seed=5)[0]]), output_hidden_states=True)
        x_ND = teacher.model.layers[1].input_layernorm(hidden.hidden_states[1][0])
        errors = []
        for student, report in ((anchored, anchored_report), (plain, plain_report)):
            unnormed, normed = _keys_and_values(student, report, 1, x_ND)
            errors.append(float(((normed - unnormed).norm(dim=-1) / unnormed.norm(dim=-1)).max()))
    assert errors[0] < errors[1] / 2
    # the anchor (channel 0) feeds nothing and learns nothing: normed to 0, its up-projection column and norm
    # weight get no gradient, so training cannot turn it into a huge input to every key and value
    attn = anchored.layers[1].attn
    assert attn.kv_norm.weight[0] == 0 and not attn.wkv_b.weight[:, 0].any()
    anchored.train()
    ids = torch.tensor([sequences(4, seed=3)[0]])
    anchored.loss(ids[:, :-1], ids[:, 1:]).total.backward()
    assert attn.wkv_b.weight.grad[:, 0].abs().max() == 0 and attn.kv_norm.weight.grad[0] == 0
    assert attn.wkv_b.weight.grad[:, 1:].abs().max() > 0


def test_a_gqa_teacher_in_the_standard_layout_shares_its_principal_rope_key_and_weighs_each_chosen_expert_about_1():
    teacher = llama()
    calib = calibrate(teacher, sequences(24), ffn_sample=256)
    cfg = lossless(kv_lora_rank=24, n_activated_experts=2)
    student, report = convert(teacher, cfg, calib, layout="standard")
    assert student.cfg.route_scale == 2.0
    assert all(1 / KV_HEADS < e < 1 for e in report.rope_key_energy)  # the principal direction beats any one head
    # the shared key of pair i is the KV heads' keys mixed by a unit vector: its rows lie in their span
    k = teacher.model.layers[0].self_attn.k_proj.weight.view(KV_HEADS, HEAD_DIM, DIM)
    rope = student.layers[0].attn.wkv_a.weight[student.cfg.kv_lora_rank :]
    re_GnD = k[:, : student.cfg.qk_rope_head_dim // 2]
    mix_n = torch.linalg.lstsq(re_GnD.permute(1, 2, 0), rope[0::2, :, None]).solution[..., 0]  # (n, G)
    torch.testing.assert_close(mix_n.norm(dim=-1), torch.ones(mix_n.shape[0]), atol=1e-4, rtol=0)
    with torch.no_grad():
        hidden = teacher.model(input_ids=torch.tensor([sequences(4, seed=7)[0]]), output_hidden_states=True)
        x_ND = teacher.model.layers[1].post_attention_layernorm(hidden.hidden_states[1][0])
        weights_NK, _, _ = student.layers[1].ffn.gate(x_ND)
    assert weights_NK.sub(1).abs().max() < 0.1
    assert fidelity(teacher, student, sequences(8, seed=99)).kl < 1.0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_real_default_student_decodes_the_same_greedy_tokens_on_the_fast_path_as_on_the_oracles():
    """The default (compressed) student converted from the real teacher, fp32: 64 greedy steps for a ragged batch
    of two on the fast path (absorbed attention, fused experts) give the tokens of the oracles (naive attention,
    the per-expert loop)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.prompts import chat_token_ids, student_messages
    from pipeline.model.generate import SamplingParams, generate
    from pipeline.teacher.hf import DEFAULT_TEACHER, default_cache_dir, resolve_model_dir

    path = str(resolve_model_dir(DEFAULT_TEACHER, default_cache_dir()))
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    questions = ["What is 7 + 5?", "How many times does the letter r appear in the text: strawberry?"]
    prompts = [chat_token_ids(tokenizer, student_messages(q)) for q in questions]
    cfg = ModelConfig(vocab_size=len(tokenizer))  # the default student: every layer, 16 rope pairs, 12 of 20
    fast, _ = convert(teacher, cfg, calibrate(teacher, prompts, ffn_sample=256))
    oracle = type(fast)(fast.cfg.model_copy(update={"attn_impl": "naive", "moe_impl": "loop"}))
    oracle.load_state_dict(fast.state_dict())
    params = SamplingParams(max_new_tokens=64)  # greedy, no stop token: all 64 steps
    got, want = generate(fast, prompts, params), generate(oracle, prompts, params)
    assert [c.tokens for c in got] == [c.tokens for c in want]
    assert all(len(c.tokens) == 64 for c in got)
