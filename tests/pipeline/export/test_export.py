"""The exports against the real engines: transformers loads the HF directory without remote code and gives our
logits; llama.cpp (the `llamacpp` extra) loads the GGUF, tokenizes as we do and decodes our greedy tokens at F32,
and the serving engine's llama.cpp runner gives our logits on the real teacher converted.

The students are converted into the standard layout (one, from the real default teacher, slow) or from small random
Llama and Qwen2 teachers built here, with
the default teacher's tokenizer (its 49,152-token vocabulary and chat template), so the exports are full-sized in
everything but depth and width.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from pipeline.data.prompts import chat_token_ids, student_messages
from pipeline.export import ExportError, export
from pipeline.model.config import ModelConfig
from pipeline.model.convert import calibrate, convert
from pipeline.model.generate import SamplingParams, generate

QUESTIONS = ["What is 17 + 25?", "How many times does the letter r appear in the text: strawberry?"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from pipeline.teacher.hf import DEFAULT_TEACHER, default_cache_dir, resolve_model_dir

    return AutoTokenizer.from_pretrained(str(resolve_model_dir(DEFAULT_TEACHER, default_cache_dir())))


def _teacher(tokenizer, cls=LlamaForCausalLM, config_cls=LlamaConfig):
    torch.manual_seed(0)
    teacher = cls(
        config_cls(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
    ).eval()
    with torch.no_grad():  # widen the random weights so that every layer matters
        for p in teacher.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return teacher


def _prompts(tokenizer) -> list[list[int]]:
    return [chat_token_ids(tokenizer, student_messages(q)) for q in QUESTIONS]


def _student(tokenizer, directory: Path, layout: str = "standard", **teacher_kwargs) -> Path:
    teacher = _teacher(tokenizer, **teacher_kwargs)
    cfg = ModelConfig(
        n_layers=3,
        n_dense_layers=1,
        qk_rope_head_dim=8,
        kv_lora_rank=24,
        moe_inter_dim=16,
        n_shared_experts=2,
        n_routed_experts=6,
        n_activated_experts=2,
        max_seq_len=256,
    )
    student, _ = convert(teacher, cfg, calibrate(teacher, _prompts(tokenizer) * 4, ffn_sample=64), layout=layout)
    for gate in (m.ffn.gate for m in student.layers[1:]):  # a trained router's correction bias is not zero
        gate.bias.normal_(std=0.01)
    student.save_pretrained(directory, tokenizer)
    return directory


@pytest.fixture(scope="module")
def standard_student(tokenizer, tmp_path_factory) -> Path:
    return _student(tokenizer, tmp_path_factory.mktemp("standard"))


def _ours(directory: Path):
    from pipeline.model import Transformer

    return Transformer.from_pretrained(directory).eval()


def _assert_transformers_gives_our_logits(student_dir: Path, hf_dir: Path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=False).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ours = _ours(student_dir)
    for prompt in _prompts(tokenizer):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            diff = (hf(ids).logits - ours(ids)).abs().max().item()
        assert diff <= 1e-4


@pytest.mark.timeout(300)
def test_transformers_loads_the_hf_export_without_remote_code_and_its_logits_equal_ours(
    standard_student, tokenizer, tmp_path
):
    out = export(standard_student, "hf", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (config["scoring_func"], config["topk_method"], config["rope_interleave"]) == ("sigmoid", "noaux_tc", True)
    assert config["routed_scaling_factor"] == 2.0 and config["q_lora_rank"] is None
    assert "auto_map" not in config  # nothing for remote code to run
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(str(out))
    messages = student_messages(QUESTIONS[0])
    assert chat_token_ids(exported, messages) == chat_token_ids(tokenizer, messages)  # the chat template came along
    _assert_transformers_gives_our_logits(standard_student, out, tokenizer)


@pytest.mark.timeout(300)
def test_llama_cpp_loads_the_f32_gguf_tokenizes_as_we_do_and_decodes_our_greedy_tokens(
    standard_student, tokenizer, tmp_path
):
    import llama_cpp
    import numpy as np

    path = export(standard_student, "gguf", tmp_path / "gguf")
    assert path.name == "student-f32.gguf"
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    prompts = _prompts(tokenizer)
    text = tokenizer.decode(prompts[1])  # the chat template's special tokens and text, as a client would send it
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompts[1]
    ours = generate(_ours(standard_student), prompts, SamplingParams(max_new_tokens=32))
    for prompt, completion in zip(prompts, ours, strict=True):
        llm.reset()
        llm.eval(prompt)
        got = []
        for _ in range(32):
            got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([got[-1]])
        assert got == completion.tokens


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_serving_runner_gives_our_logits_for_the_real_converted_student_over_its_answer(teacher_dir, tmp_path):
    """The real teacher converted (6 of its layers, the default widths), exported at F32 and run by the `llama_cpp`
    engine's runner: its logits equal ours at every position of a prompt and our 64-token greedy answer. With
    llama.cpp's default fp16 KV cache they drifted by several units before position 80."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.serving.llama_cpp_runner import LlamaCppRunner

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    prompts = _prompts(tokenizer)
    cfg = ModelConfig(vocab_size=len(tokenizer), n_layers=6)
    student, _ = convert(teacher, cfg, calibrate(teacher, prompts * 2, ffn_sample=256), layout="standard")
    student.save_pretrained(tmp_path / "student", tokenizer)
    gguf = export(tmp_path / "student", "gguf", tmp_path / "gguf")
    answer = generate(student, prompts[:1], SamplingParams(max_new_tokens=64))[0].tokens
    ids = prompts[0] + answer
    with torch.no_grad():
        ours = student(torch.tensor([ids]))[0]
    runner = LlamaCppRunner(gguf, 1, len(ids) + 1, 2)
    try:
        slot = runner.allocate()
        theirs = [runner.prefill([slot], [prompts[0]])[0]] + [runner.decode([slot], [t])[0] for t in answer]
    finally:
        runner.close()
    diff_T = (torch.stack(theirs) - ours[len(prompts[0]) - 1 :]).abs().amax(-1)
    assert len(ids) > 80 and diff_T.max().item() <= 2e-2, diff_T.tolist()


@pytest.mark.timeout(300)
def test_llama_cpps_quantizer_writes_a_q4_1_gguf_that_llama_cpp_runs(standard_student, tmp_path):
    import llama_cpp

    f32 = export(standard_student, "gguf", tmp_path / "f32")
    q4 = export(standard_student, "gguf", tmp_path / "q4", quant="q4_1")
    assert q4.name == "student-q4_1.gguf" and q4.stat().st_size < f32.stat().st_size / 2
    llm = llama_cpp.Llama(model_path=str(q4), n_ctx=128, n_threads=2, verbose=False)
    assert len(llm.create_completion("What is", max_tokens=4, temperature=0)["choices"][0]["text"]) > 0


@pytest.mark.timeout(300)
def test_a_qwen2_shaped_teacher_converts_to_the_standard_layout_and_exports(tokenizer, tmp_path):
    """Qwen2's query/key/value biases have no place in the standard layout: they are dropped, and the student
    exports to both formats and runs in both engines."""
    import llama_cpp

    student_dir = _student(tokenizer, tmp_path / "student", cls=Qwen2ForCausalLM, config_cls=Qwen2Config)
    assert _ours(student_dir).cfg.qkv_bias is False
    _assert_transformers_gives_our_logits(student_dir, export(student_dir, "hf", tmp_path / "hf"), tokenizer)
    llm = llama_cpp.Llama(model_path=str(export(student_dir, "gguf", tmp_path / "gguf")), n_ctx=128, verbose=False)
    assert llm.n_vocab() == len(tokenizer)


def test_an_exact_layout_student_is_refused_in_one_line_naming_the_knob_and_nothing_is_written(tokenizer, tmp_path):
    student_dir = _student(tokenizer, tmp_path / "student", layout="exact")
    for fmt in ("hf", "gguf"):
        with pytest.raises(ExportError) as refused:
            export(student_dir, fmt, tmp_path / fmt)  # type: ignore[arg-type]
        message = str(refused.value)
        assert "\n" not in message and "convert.layout: standard" in message and "n_rope_heads 2" in message
        assert not (tmp_path / fmt).exists()


def test_deviations_an_engine_cannot_express_are_refused(standard_student, tmp_path):
    from pipeline.export import check_engine_layout

    model = _ours(standard_student)
    model.layers[1].attn.inv_freq.mul_(1.5)  # would load anywhere and compute another attention
    with pytest.raises(ExportError, match="layer 1's rope frequencies"):
        check_engine_layout(model)
    model = _ours(standard_student)
    model.cfg = model.cfg.model_copy(update={"mtp_depth": 1})
    with pytest.raises(ExportError, match="mtp_depth"):
        check_engine_layout(model)


def test_a_tokenizer_llama_cpp_cannot_name_is_refused(standard_student, tmp_path):
    from pipeline.export.gguf_file import _pre_tokenizer

    with pytest.raises(ExportError, match=r"pre-tokenizer llama\.cpp has no name for"):
        _pre_tokenizer({"pre_tokenizer": {"type": "Metaspace"}})


def test_the_export_command_writes_the_hf_directory_and_refuses_a_bad_format(standard_student, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    ok = CliRunner().invoke(app, ["export", str(standard_student), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    bad = CliRunner().invoke(app, ["export", str(standard_student), "--format", "onnx", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--format is hf or gguf" in bad.output and not (tmp_path / "x").exists()
