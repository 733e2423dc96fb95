"""Soft targets from the real default teacher: exact top-k, alignment, storage round trip, tokenizer identity."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import artifacts
from pipeline.artifacts import ArtifactSpec
from pipeline.data.prompts import student_messages
from pipeline.distill import targets as T
from pipeline.stages.parquet_schemas import soft_targets_schema

pytestmark = pytest.mark.slow


def test_stored_top_k_is_torch_topk_of_the_full_logits_even_in_a_padded_batch(teacher):
    seqs = [
        T.encode(teacher.tokenizer, "Calculate 3 + 5.", "3 + 5 = 8. The final answer is 8."),
        T.encode(teacher.tokenizer, "Calculate 12 - 4.", "12 - 4 = 8. So the final answer is 8."),
    ]
    batched = teacher.score([s for s, _ in seqs], [i for _, i in seqs], top_k=20)
    for (seq, start), got in zip(seqs, batched, strict=True):
        with torch.no_grad():
            logits = teacher.model(torch.tensor([seq])).logits[0].float()
        lp = torch.log_softmax(logits[start - 1 : len(seq) - 1], -1)
        want_lp, want_ids = lp.topk(20, -1)
        assert got.topk_ids.shape == (len(seq) - start, 20)
        np.testing.assert_array_equal(got.topk_ids, want_ids.numpy())
        np.testing.assert_allclose(got.topk_logprobs, want_lp.numpy(), atol=1e-4)
        outside = lp.clone().scatter_(-1, want_ids, float("-inf")).logsumexp(-1)
        np.testing.assert_allclose(got.tail_logmass, outside.numpy(), atol=1e-4)
        np.testing.assert_allclose(T.topk_mass(got) + np.exp(got.tail_logmass), 1.0, atol=1e-4)


def test_targets_at_position_i_describe_token_i_plus_1(teacher):
    """On the teacher's own greedy answer, each stored row's top-1 is exactly the token that follows."""
    prompt = list(
        teacher.tokenizer.apply_chat_template(
            student_messages("What is 2 + 2?"), add_generation_prompt=True, tokenize=True
        )["input_ids"]
    )
    with torch.no_grad():
        out = teacher.model.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=teacher.tokenizer.pad_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )[0].tolist()
    seq, start = out, len(prompt)
    [got] = teacher.score([seq], [start], top_k=5)
    assert got.topk_ids[:, 0].tolist() == seq[start:]  # row j <-> token start + j
    mask = T.loss_mask(len(seq), start)
    assert sum(mask) == len(seq) - start and mask[start - 1] and not mask[-1] and not mask[start - 2]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_parquet_round_trip_is_exact(teacher, tmp_path, dtype):
    seq, start = T.encode(teacher.tokenizer, "Calculate 3 + 5.", "The final answer is 8.")
    [tg] = teacher.score([seq], [start], top_k=7)
    rows = [T.row("s-0", "basic_arithmetic", seq, start, tg), T.row("s-1", "basic_arithmetic", seq, start, None)]
    spec = ArtifactSpec("soft_targets", "dataset", soft_targets_schema(dtype))
    artifacts.write_table(tmp_path / "t" / "part-00000.parquet", pa.Table.from_pylist(rows, schema=spec.schema), spec)
    artifacts.commit(tmp_path / "t", spec)
    back = artifacts.read_table(tmp_path / "t", spec).to_pylist()
    stored = tg.topk_logprobs.astype(np.float16 if dtype == "float16" else np.float32)
    assert back[0]["token_ids"] == seq and back[0]["topk_ids"] == tg.topk_ids.tolist()
    assert np.array_equal(np.array(back[0]["topk_logprobs"], dtype=stored.dtype), stored)
    assert np.array_equal(np.array(back[0]["tail_logmass"], np.float32), tg.tail_logmass)
    assert back[1]["topk_ids"] == [] and back[1]["loss_mask"] == back[0]["loss_mask"]


def test_a_student_with_another_tokenizer_is_refused(teacher):
    fingerprint = T.tokenizer_fingerprint(teacher.tokenizer)
    T.check_tokenizer(teacher.tokenizer, fingerprint)  # the teacher's own passes
    other = copy.deepcopy(teacher.tokenizer)
    other.add_tokens(["<extra_token>"])
    with pytest.raises(T.TokenizerMismatch, match=f"computed with tokenizer {fingerprint}, the student's is"):
        T.check_tokenizer(other, fingerprint)
