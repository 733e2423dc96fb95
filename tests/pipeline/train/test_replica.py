"""A training replica without Ray: checkpoint parts that resume exactly, step metrics, FLOPs, clear errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.train.expert_metrics import expert_metrics
from pipeline.train.mfu import flops_per_step
from pipeline.train.replica import Replica, TrainJob
from tests.pipeline.train.test_objective import CFG, teacher_row


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{**teacher_row(rng), "sample_id": f"s{i:04d}", "task": "plus_one"} for i in range(n)]


def job(**train) -> TrainJob:
    base = dict(max_steps=8, warmup_steps=1, batch_size=2, seq_len=16, lr=3e-3, checkpoint_every=4, cpus_per_worker=1)
    return TrainJob(CFG.model_copy(update={"bias_update_speed": 0.01}), TrainConfig(**{**base, **train}), top_k=3)


def test_a_replica_restored_from_its_checkpoint_continues_exactly(tmp_path):
    data = rows(12)
    a = Replica(job(), data)
    for _ in range(3):
        a.train_step()
    a.save(tmp_path)
    rest = [a.train_step()["loss"] for _ in range(3)]
    b = Replica(job(), data)
    b.restore(tmp_path)
    assert b.resumed_from == 3
    assert [b.train_step()["loss"] for _ in range(3)] == rest
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[k], v, rtol=0, atol=0)


def test_restore_refuses_a_checkpoint_whose_replicas_diverged(tmp_path):
    a = Replica(job(), rows(8))
    a.train_step()
    a.save(tmp_path)
    part = torch.load(tmp_path / "data_rank0.pt", weights_only=True)
    name = next(iter(part["router_biases"]))
    part["router_biases"][name] += 1
    torch.save(part, tmp_path / "data_rank0.pt")
    with pytest.raises(RuntimeError, match="router biases diverged"):
        Replica(job(), rows(8)).restore(tmp_path)


class _RunsOnLoad:
    """What an attacker with write access to the checkpoint store could plant: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_on_load_is_refused_and_runs_nothing(tmp_path):
    a = Replica(job(), rows(8))
    a.train_step()
    a.save(tmp_path)
    marker = tmp_path / "pwned"
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    state["step"] = _RunsOnLoad(marker)
    torch.save(state, tmp_path / "train_state.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        Replica(job(), rows(8)).restore(tmp_path)
    assert not marker.exists()


def test_step_metrics_cover_losses_throughput_mfu_and_expert_load():
    replica = Replica(job(peak_flops_per_worker=1e9), rows(8))
    m = replica.train_step()
    assert {"loss", "kd", "ce", "balance", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(m)
    assert m["tokens_per_s"] > 0 and 0 < m["mfu"] < 1 and replica.peak_source == "configured"
    moe_layers = CFG.n_layers - CFG.n_dense_layers
    load = {k: v for k, v in m.items() if k.startswith("expert_load.")}
    assert len(load) == 3 * moe_layers
    for layer in range(CFG.n_dense_layers, CFG.n_layers):
        assert 0 <= m[f"expert_load.l{layer}.min"] <= 1 / CFG.n_routed_experts <= m[f"expert_load.l{layer}.max"]
        assert m[f"router_bias_norm.l{layer}"] > 0  # the bias update ran after the step


def test_expert_metrics_from_known_counts():
    replica = Replica(job(), rows(4))
    counts_LE = torch.tensor([[30.0, 10.0, 0.0, 0.0]])  # one MoE layer in CFG
    m = expert_metrics(replica.model, counts_LE)
    layer = CFG.n_dense_layers
    assert m[f"expert_load.l{layer}.max"] == 0.75 and m[f"expert_load.l{layer}.min"] == 0.0
    assert m[f"expert_load.l{layer}.cv"] == pytest.approx(np.std([30, 10, 0, 0]) / 10)


def test_model_flops_count_the_head_only_at_completion_positions():
    model = Replica(job(), rows(4)).model
    per_token = model.flops_per_token(seq_len=16)
    base = flops_per_step(per_token, trunk_tokens=100, head_tokens=0)
    with_head = flops_per_step(per_token, trunk_tokens=100, head_tokens=10)
    assert with_head - base == 10 * 6 * CFG.dim * CFG.vocab_size
    assert flops_per_step(per_token, 200, 0) == 2 * base


def test_a_replica_without_rows_is_a_clear_error():
    with pytest.raises(ValueError, match=r"fewer samples than train.num_workers"):
        Replica(job(), [], rank=1, world=2)


def test_the_validation_loss_is_the_objective_on_held_out_rows_and_does_not_train():
    from dataclasses import replace

    from pipeline.train.objective import objective, to_tensors
    from pipeline.train.packing import pack

    held_out = rows(5, seed=9)
    replica = Replica(replace(job(), val_rows=held_out), rows(8))
    before = {k: v.clone() for k, v in replica.model.state_dict().items()}
    val = replica.validate()
    assert all(torch.equal(v, replica.model.state_dict()[k]) for k, v in before.items())  # nothing moved
    assert replica.model.training  # back in training mode
    replica.model.eval()
    with torch.no_grad():
        want = objective(replica.model, to_tensors(pack(held_out, 16, 3)), replica.cfg)
    assert val["val_tokens"] == want.tokens
    assert val["val_loss"] == pytest.approx(float(want.total), rel=1e-5)
    assert val["val_kd"] == pytest.approx(float(want.kd), rel=1e-5)
    assert val["val_ce"] == pytest.approx(float(want.ce), rel=1e-5)
    assert Replica(job(), rows(8)).validate() == {}


def test_validation_runs_one_micro_batch_at_a_time():
    """Held-out rows are scored in slices of `micro_batch_size`, as training runs: the logits of a whole batch at
    once were the worker's peak memory."""
    from dataclasses import replace

    replica = Replica(replace(job(batch_size=4, micro_batch_size=1), val_rows=rows(5, seed=9)), rows(8))
    forwards: list[int] = []
    replica.model.embed.register_forward_hook(lambda m, args, out: forwards.append(out.shape[0]))
    assert replica.validate()["val_tokens"] > 0
    assert len(forwards) > 1 and max(forwards) == 1


def test_held_out_samples_are_chosen_by_id_and_seed():
    from pipeline.train.split import is_held_out

    ids = [f"p{i}-0" for i in range(2000)]
    chosen = [i for i in ids if is_held_out(i, 0.1)]
    assert 150 < len(chosen) < 250 and chosen == [i for i in ids if is_held_out(i, 0.1)]
    assert chosen != [i for i in ids if is_held_out(i, 0.1, seed=1)]
    assert not any(is_held_out(i, 0.0) for i in ids)
