"""Two data-parallel replicas over gloo (real torch.distributed, two processes): gradients are synced through DDP and
the all-reduced expert counts keep every replica's router biases identical; without the all-reduce they drift."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port

pytestmark = pytest.mark.slow


def _replica(rank: int, world: int, port: int, out: str, sync_counts: bool) -> None:
    import numpy as np
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pipeline.config import TrainConfig
    from pipeline.model import Transformer
    from pipeline.train.objective import ObjectiveModule
    from pipeline.train.state import TrainState
    from pipeline.train.stream import WindowStream
    from tests.pipeline.train.test_objective import CFG, teacher_row

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # identical initial weights on every replica
    model = Transformer(CFG.model_copy(update={"bias_update_speed": 0.01}))
    rng = np.random.default_rng(100 + rank)  # each replica its own data shard
    cfg = TrainConfig(max_steps=6, warmup_steps=1, batch_size=2, lr=3e-3, seed=rank)
    rows = [teacher_row(rng) for _ in range(8)]
    state = TrainState(model, cfg, WindowStream(lambda epoch: rows, seq_len=16, k=3, buffer_windows=8, rank=rank))
    ddp = DDP(ObjectiveModule(model, cfg), find_unused_parameters=True, broadcast_buffers=False)
    list(state.run(6, forward=ddp, all_reduce=dist.all_reduce if sync_counts else None))
    torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _run(tmp_path, sync_counts: bool) -> list[dict]:
    mp.spawn(_replica, args=(2, free_port(), str(tmp_path), sync_counts), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_replicas_stay_identical_weights_and_router_biases(tmp_path):
    a, b = _run(tmp_path, sync_counts=True)
    biases = [k for k in a if k.endswith("gate.bias")]
    assert biases and all(a[k].abs().sum() > 0 for k in biases)  # the biases did move
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    a, b = _run(tmp_path, sync_counts=False)  # the same run without the all-reduce: the biases drift apart
    assert any(not torch.equal(a[k], b[k]) for k in biases)
