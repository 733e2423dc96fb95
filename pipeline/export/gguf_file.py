"""The student as a llama.cpp `deepseek2` GGUF file: written with the `gguf` package (ggml-org's own writer),
quantized by llama.cpp's own quantizer.

The keys and tensors are those llama.cpp's `convert_hf_to_gguf.py` writes for DeepSeek-V3, with two choices of
ours: `q_lora_rank` is always written (0 selects the full-rank query; llama.cpp refuses a file without the key for
layer counts other than 26/27), and the KV up-projection is split into the absorbed `attn_k_b` / `attn_v_b` with
`key_length_mla` / `value_length_mla`, so llama.cpp caches the latent and the rope key (kv_lora_rank +
qk_rope_head_dim per token and layer), not decompressed heads. The tokenizer (GPT-2-style BPE) and its chat
template go in the file; llama.cpp picks its pre-tokenizer by name, so only the ones listed in PRE_TOKENIZERS
are exported.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.export.engine_layout import ExportError, check_engine_layout
from pipeline.model.mla import MLA
from pipeline.model.moe import MLP, MoE

ARCH = "deepseek2"
# the tokenizer.json pre-tokenizers llama.cpp knows, by the name it knows them by
PRE_TOKENIZERS = {
    # GPT-2's regex split (what transformers builds from SmolLM2's GGUF: its vocabulary has single digits only, so
    # numbers still split into digits)
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    },
}
QUANT_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}


def _pre_tokenizer(tokenizer_json: dict) -> str:
    pre = tokenizer_json.get("pre_tokenizer")
    for name, known in PRE_TOKENIZERS.items():
        if pre == known:
            return name
    raise ExportError(
        f"the student's tokenizer splits text with a pre-tokenizer llama.cpp has no name for here ({json.dumps(pre)}); "
        f"known: {', '.join(PRE_TOKENIZERS)}"
    )


def _add_tokenizer(writer, tokenizer) -> None:
    """GPT-2-style BPE: every token in id order (special ones typed CONTROL, as llama.cpp's converter does),
    the merges, the special ids and the chat template."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tokenizer_json = json.loads((Path(tmp) / "tokenizer.json").read_text())
        model = tokenizer_json["model"]
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            raise ExportError("the student's tokenizer is not a byte-level BPE; only those are exported to GGUF")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(tokenizer_json))
        by_id = {i: t for t, i in tokenizer.get_vocab().items()}
        added = tokenizer.added_tokens_decoder
        tokens, types = [], []
        for i in range(len(tokenizer)):
            tokens.append(by_id[i])
            if i in added:
                types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def _add_hparams(writer, model) -> None:
    import gguf

    cfg = model.cfg
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.inter_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(1)  # MLA runs as multi-query attention over the latent
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.qk_rope_head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_leading_dense_block_count(cfg.n_dense_layers)
    writer.add_q_lora_rank(cfg.q_lora_rank)  # 0: the full-rank query
    writer.add_kv_lora_rank(cfg.kv_lora_rank)
    writer.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    writer.add_value_length(cfg.kv_lora_rank)
    writer.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    writer.add_value_length_mla(cfg.v_head_dim)
    writer.add_expert_feed_forward_length(cfg.moe_inter_dim)
    writer.add_expert_count(cfg.n_routed_experts)
    writer.add_expert_used_count(cfg.n_activated_experts)
    writer.add_expert_shared_count(cfg.n_shared_experts)
    writer.add_expert_weights_scale(cfg.route_scale)
    writer.add_expert_weights_norm(True)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if cfg.n_group > 1:
        writer.add_expert_group_count(cfg.n_group)
        writer.add_expert_group_used_count(cfg.topk_group)


def _tensors(model):
    """(llama.cpp name, tensor) for every weight, in llama.cpp's layouts."""
    cfg = model.cfg
    yield "token_embd.weight", model.embed.weight
    yield "output_norm.weight", model.norm.weight
    yield "output.weight", model.head.weight
    H, U, V, C = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    for i, block in enumerate(model.layers):
        b, attn, ffn = f"blk.{i}.", block.attn, block.ffn
        assert isinstance(attn, MLA)
        yield b + "attn_norm.weight", block.attn_norm.weight
        yield b + "ffn_norm.weight", block.ffn_norm.weight
        if cfg.q_lora_rank:
            yield b + "attn_q_a.weight", attn.wq_a.weight
            yield b + "attn_q_a_norm.weight", attn.q_norm.weight
            yield b + "attn_q_b.weight", attn.wq_b.weight
        else:
            yield b + "attn_q.weight", attn.wq.weight
        yield b + "attn_kv_a_mqa.weight", attn.wkv_a.weight
        yield b + "attn_kv_a_norm.weight", attn.kv_norm.weight
        w_HYC = attn.wkv_b.weight.view(H, U + V, C)  # per head [nope key ; value] rows
        yield b + "attn_k_b.weight", w_HYC[:, :U].transpose(1, 2)  # (H, C, U): absorbed into the query
        yield b + "attn_v_b.weight", w_HYC[:, U:]  # (H, O, C)
        yield b + "attn_output.weight", attn.wo.weight
        if isinstance(ffn, MLP):
            gate, up = ffn.w13.weight.chunk(2, dim=0)
            yield b + "ffn_gate.weight", gate
            yield b + "ffn_up.weight", up
            yield b + "ffn_down.weight", ffn.w2.weight
            continue
        assert isinstance(ffn, MoE) and ffn.shared is not None
        F = cfg.moe_inter_dim
        yield b + "ffn_gate_inp.weight", ffn.gate.weight
        yield b + "exp_probs_b.bias", ffn.gate.bias
        yield b + "ffn_gate_exps.weight", ffn.experts.w13[:, :F]
        yield b + "ffn_up_exps.weight", ffn.experts.w13[:, F:]
        yield b + "ffn_down_exps.weight", ffn.experts.w2
        gate, up = ffn.shared.w13.weight.chunk(2, dim=0)
        yield b + "ffn_gate_shexp.weight", gate
        yield b + "ffn_up_shexp.weight", up
        yield b + "ffn_down_shexp.weight", ffn.shared.w2.weight


def _write(model, tokenizer, path: Path, float_type: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name("moeforge student")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if float_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    _add_hparams(writer, model)
    _add_tokenizer(writer, tokenizer)
    for name, t in _tensors(model):
        data = t.detach().float().contiguous().numpy()
        # norms, biases and the router stay fp32, as llama.cpp's converter keeps them
        if float_type == "f16" and data.ndim >= 2 and "ffn_gate_inp" not in name:
            data = data.astype(np.float16)
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's own quantizer (`llama_model_quantize`) from `src` (F32/F16) to `dst`."""
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            f"--quant {quant} runs llama.cpp's quantizer: install the extra, pip install 'moeforge[llamacpp]'"
        ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[quant])
    params.nthread = 0
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ExportError(f"llama.cpp's quantizer failed ({rc}) on {src}")


@torch.no_grad()
def export_gguf(model, tokenizer, out: Path, quant: str = "f32") -> Path:
    """Write `out`/student-<quant>.gguf (replacing an older one); returns its path."""
    from pipeline.artifacts import atomic_path

    check_engine_layout(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"student-{quant}.gguf"
    with atomic_path(dest) as tmp:
        if quant in ("f32", "f16"):
            _write(model, tokenizer, tmp, quant)
        else:
            with tempfile.TemporaryDirectory(dir=out) as work:
                f32 = Path(work) / "student-f32.gguf"
                _write(model, tokenizer, f32, "f32")
                quantize(f32, tmp, quant)
    return dest
