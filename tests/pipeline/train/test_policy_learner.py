"""refine's learner without Ray: its batch layout, an update that moves the student, the frozen router."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import RefineConfig
from pipeline.model import Transformer
from pipeline.model.moe import Gate
from pipeline.train.policy_learner import CompletionLogits, PolicyLearner, PolicySample, to_batch
from tests.pipeline.train.test_policy_losses import CFG, V, teacher_scores


def sample(rng, teacher: Transformer, advantage: float = 0.0, k: int = 8, scored: bool = True) -> PolicySample:
    prompt = rng.integers(0, V, 4).tolist()
    completion = rng.integers(0, V, int(rng.integers(2, 6))).tolist()
    tokens = prompt + completion
    with torch.no_grad():
        ids, lps, tail = teacher_scores(teacher(torch.tensor([tokens]))[0, len(prompt) - 1 : -1], k)
    if not scored:
        return PolicySample(tokens, len(prompt), advantage, None, None, None)
    return PolicySample(tokens, len(prompt), advantage, ids.numpy(), lps.numpy(), tail.numpy())


def test_the_batch_puts_each_completion_token_where_the_logits_predict_it():
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    rng = np.random.default_rng(0)
    samples = [sample(rng, model, advantage=a) for a in (1.0, -0.5, 0.0)]
    batch = to_batch(samples, 8)
    logits_NV = CompletionLogits(model)(batch["tokens_BT"], batch["mask_BT"])
    n = sum(len(s.tokens) - s.start for s in samples)
    assert logits_NV.shape == (n, V) and batch["tokens_N"].tolist() == [t for s in samples for t in s.tokens[s.start :]]
    # the teacher here is the model itself: its top-1 at each completion position is the model's own argmax
    assert torch.equal(batch["topk_ids_NK"][:, 0], logits_NV.argmax(-1))
    assert batch["advantages_N"].tolist() == [
        s.advantage for s in samples for _ in s.tokens[s.start :]
    ]  # one advantage per token of its completion


def test_an_opd_update_brings_the_student_closer_to_the_teacher_and_leaves_the_router_alone():
    torch.manual_seed(1)
    student, teacher = Transformer(CFG), Transformer(CFG).eval()
    rng = np.random.default_rng(1)
    samples = [sample(rng, teacher, k=V) for _ in range(8)] + [sample(rng, teacher, scored=False)]
    cfg = RefineConfig(objective="opd", lr=3e-3, updates_per_iteration=2)
    learner = PolicyLearner(CFG, cfg, student.state_dict())
    gates_before = [g.weight.detach().clone() for g in learner.model.modules() if isinstance(g, Gate)]
    first = learner.update(samples, V)
    for _ in range(5):
        again = learner.update(samples, V)
    assert again.reverse_kl < 0.5 * first.reverse_kl, (first, again)
    assert first.learner_tokens == sum(len(s.tokens) - s.start for s in samples)
    gates_after = [g.weight for g in learner.model.modules() if isinstance(g, Gate)]
    assert all(torch.equal(a, b) for a, b in zip(gates_before, gates_after, strict=True))  # router: frozen
    assert 0.0 < again.routing_agreement <= 1.0
    # the state carries AdamW's moments into the next iteration
    state = learner.state()
    resumed = PolicyLearner(CFG, cfg, state["model"], state["optimizer"])
    assert resumed.optimizer.state_dict()["state"].keys() == learner.optimizer.state_dict()["state"].keys()


def test_grpo_raises_the_probability_of_the_rewarded_completion():
    torch.manual_seed(2)
    model = Transformer(CFG)
    rng = np.random.default_rng(2)
    good, bad = sample(rng, model, advantage=1.0), sample(rng, model, advantage=-1.0)
    cfg = RefineConfig(objective="grpo", lr=1e-3, kl_coef=0.0, updates_per_iteration=1)
    learner = PolicyLearner(CFG, cfg, model.state_dict())

    def logprob(s: PolicySample) -> float:
        b = to_batch([s], 8)
        with torch.no_grad():
            logp = torch.log_softmax(CompletionLogits(learner.model)(b["tokens_BT"], b["mask_BT"]), -1)
        return float(logp.gather(-1, b["tokens_N"][:, None]).sum())

    before = logprob(good), logprob(bad)
    learner.update([good, bad], 8)
    after = logprob(good), logprob(bad)
    assert after[0] > before[0] and after[1] < before[1]


def test_too_few_samples_for_the_updates_is_refused():
    model = Transformer(CFG)
    learner = PolicyLearner(CFG, RefineConfig(updates_per_iteration=3), model.state_dict())
    with pytest.raises(ValueError, match="2 samples for 3 updates per iteration"):
        learner.update([sample(np.random.default_rng(3), model) for _ in range(2)], 8)
