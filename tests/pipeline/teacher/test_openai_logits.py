"""The `openai` backend's logits, against a real third-party server: llama-cpp-python's OpenAI-compatible server
on the default teacher's GGUF (`llama_cpp_server` in tests/conftest.py), with the local teacher as the reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.distill.targets import encode
from pipeline.teacher.openai_http import OpenAITeacher

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUESTION = [{"role": "user", "content": "What is 3 + 4? Answer with a number."}]


@pytest.fixture(scope="module")
def remote(llama_cpp_server, teacher_dir) -> OpenAITeacher:
    return OpenAITeacher(llama_cpp_server.base_url, llama_cpp_server.MODEL, vocabulary=str(teacher_dir), top_k=5)


def test_the_server_is_probed_once_for_what_it_gives(remote):
    caps = remote.capabilities()
    assert caps.score and caps.generation_top_logprobs == 5 and caps.refused is None
    assert "echo" in caps.how
    assert remote.capabilities() is caps


def test_generation_comes_with_the_top_k_of_its_own_tokens_in_local_ids(remote):
    (out,) = remote.generate([QUESTION], max_new_tokens=12, top_logprobs=5)
    assert out.error is None and len(out.logprobs) == out.completion_tokens > 0
    ids, targets = remote.soft_targets_of(out, top_k=5)
    assert remote.tokenizer.decode(ids) == out.text
    assert targets.topk_ids.shape == (len(ids), 5)
    # greedy decoding: every token is the top-1 of the distribution it was drawn from
    assert (targets.topk_ids[:, 0] == np.array(ids)).all()
    assert (np.diff(targets.topk_logprobs, axis=1) <= 0).all()
    covered = np.exp(targets.topk_logprobs.astype(np.float64)).sum(1)
    np.testing.assert_allclose(covered + np.exp(targets.tail_logmass.astype(np.float64)), 1.0, atol=1e-3)


def test_scored_sequences_agree_with_the_local_teacher_on_the_same_weights(remote, teacher):
    """Both run the shipped Q4_1 weights: llama.cpp on the quantized blocks, `hf` dequantized to fp32."""
    completions = ["3 + 4 = 7. <answer>7</answer>", "Adding them: 3 + 4 gives 7, so the answer is 7."]
    seqs = [encode(teacher.tokenizer, "What is 3 + 4?", c) for c in completions]
    theirs = remote.score([s for s, _ in seqs], [i for _, i in seqs], 5)
    ours = teacher.score([s for s, _ in seqs], [i for _, i in seqs], 5)
    for (seq, start), a, b in zip(seqs, ours, theirs, strict=True):
        assert b is not None and b.topk_ids.shape == a.topk_ids.shape == (len(seq) - start, 5)
        assert (a.topk_ids[:, 0] == b.topk_ids[:, 0]).mean() >= 0.9
        # the end-of-turn token, printed as "" by llama.cpp, is placed: its probability teaches the student to stop
        assert a.topk_ids[-1, 0] == b.topk_ids[-1, 0] == teacher.tokenizer.eos_token_id
        np.testing.assert_allclose(b.topk_logprobs[:, 0], a.topk_logprobs[:, 0], atol=0.35)
        # each scored token's own log-prob, as refine asks of a teacher (the echo gives it for every token)
        assert a.token_logprobs is not None and b.token_logprobs is not None
        assert (a.token_logprobs <= 0).all() and (b.token_logprobs <= 0).all()
        np.testing.assert_allclose(np.median(b.token_logprobs - a.token_logprobs), 0.0, atol=0.35)


def _other_tokenizer(path):
    """A byte-level BPE trained on a few sentences: a real tokenizer, but not the server's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>"]
    corpus = ["What is 12 + 7? The answer is 19.", "Spell naive and cafe.", "user assistant system"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1])
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(str(path))
    return path


def test_a_server_whose_tokenizer_is_not_the_local_one_is_refused_with_the_reason(llama_cpp_server, tmp_path):
    other = OpenAITeacher(
        llama_cpp_server.base_url, llama_cpp_server.MODEL, vocabulary=str(_other_tokenizer(tmp_path / "tok"))
    )
    caps = other.capabilities()
    assert not caps.score and caps.generation_top_logprobs == 0
    assert "the server's tokenizer is not the local one" in caps.refused and "locally but" in caps.refused
    with pytest.raises(ValueError, match="cannot score sequences: the server's tokenizer is not the local one"):
        other.score([[1, 2, 3]], [1], 5)
    (out,) = other.generate([QUESTION], max_new_tokens=4)  # text still comes through
    assert out.error is None and out.text


def test_a_teacher_without_a_local_tokenizer_gives_text_only(llama_cpp_server):
    bare = OpenAITeacher(llama_cpp_server.base_url, llama_cpp_server.MODEL)
    caps = bare.capabilities()
    assert not caps.score and "no local tokenizer" in caps.refused
