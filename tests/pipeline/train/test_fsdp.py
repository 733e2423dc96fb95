"""FSDP2 over gloo (real torch.distributed, two processes): the same losses as DDP step for step, each rank holding
a shard; a sharded checkpoint written by two ranks resumes on one (DCP reshards) and reassembles whole without a
process group; a DDP checkpoint is refused by an FSDP run with the reason."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port

pytestmark = pytest.mark.slow


def _rank(rank: int, world: int, port: int, out: str, parallelism: str, steps: int, resume: str | None) -> None:
    import torch.distributed as dist

    from pipeline.train.replica import Replica
    from tests.pipeline.train.test_replica import job, rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    j = job(parallelism=parallelism, max_steps=steps + 8, checkpoint_every=100)
    data = rows(24, seed=0)
    replica = Replica(j, data[rank::world], rank, world)
    if resume:
        replica.restore(resume)
    losses = [replica.train_step()["loss"] for _ in range(steps)]
    replica.save(out)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"losses": losses, "step": replica.step, **replica.held_bytes()}, f)
    dist.destroy_process_group()


def _run(out, parallelism: str, world: int = 2, steps: int = 10, resume=None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    args = (world, free_port(), str(out), parallelism, steps, str(resume) if resume else None)
    mp.spawn(_rank, args=args, nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_fsdp_gives_the_losses_of_ddp_with_each_rank_holding_half(tmp_path):
    ddp, fsdp = _run(tmp_path / "ddp", "ddp"), _run(tmp_path / "fsdp", "fsdp")
    torch.testing.assert_close(fsdp[0]["losses"], ddp[0]["losses"], rtol=1e-4, atol=1e-5)
    assert fsdp[0]["losses"][-1] < fsdp[0]["losses"][0]  # it trained
    for key in ("param_bytes", "grad_bytes", "optimizer_bytes"):  # each rank a shard, the two together the whole
        assert sum(r[key] for r in fsdp) == pytest.approx(ddp[0][key], rel=0.01), key
        assert max(r[key] for r in fsdp) < 0.6 * ddp[0][key], key
    from pipeline.train.checkpoint import final_weights

    whole, sharded = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp")
    assert whole.keys() == sharded.keys()
    for name in whole:
        torch.testing.assert_close(sharded[name], whole[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_sharded_checkpoint_of_two_ranks_resumes_on_one(tmp_path):
    from pipeline.train.checkpoint import final_weights

    (two,) = _run(tmp_path / "two", "fsdp", steps=4)[:1]
    (one,) = _run(tmp_path / "one", "fsdp", world=1, steps=0, resume=tmp_path / "two")
    assert one["step"] == two["step"] == 4  # step, schedule, weights and AdamW state came back on one rank
    assert one["optimizer_bytes"] == pytest.approx(2 * two["optimizer_bytes"], rel=0.01)
    saved, resumed = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    for name in saved:
        assert torch.equal(resumed[name], saved[name]), name
    (more,) = _run(tmp_path / "more", "fsdp", world=1, steps=2, resume=tmp_path / "two")
    assert more["step"] == 6 and all(torch.isfinite(torch.tensor(more["losses"])))


def test_a_ddp_checkpoint_is_refused_by_an_fsdp_run(tmp_path):
    _run(tmp_path / "ddp", "ddp", world=1, steps=1)
    with pytest.raises(Exception, match=r"written with train\.parallelism=ddp; this run uses fsdp"):
        _run(tmp_path / "fsdp", "fsdp", world=1, steps=1, resume=tmp_path / "ddp")
