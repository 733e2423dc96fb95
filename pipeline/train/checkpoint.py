"""The training checkpoint format: one folder per checkpoint, a part per rank.

DDP (`train.parallelism=ddp`):
- `train_state.pt` (rank 0): weights with router biases, AdamW moments, LR schedule, step.
FSDP (`train.parallelism=fsdp`):
- `sharded/`: weights and AdamW moments in torch.distributed.checkpoint's format, every rank writing its own
  shards (no rank gathers the model). It loads on any number of ranks: DCP reshards on read.
- `train_state.pt` (rank 0): LR schedule and step.
Both:
- `data_rank<r>.pt` (every rank): that rank's epoch, position in its window order, torch RNG, the world size it
  ran in, and its own router biases (equal on every rank while the expert counts are all-reduced; checked on
  restore).

Ray Train merges the ranks' folders into one checkpoint directory; these functions only read and write files.
Checkpoints live on shared storage that other jobs can write, so they are read with `weights_only=True`: tensors,
numbers, strings and containers only, never a pickled object that would run code on load (DCP's reader does not
unpickle tensors either).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.train.expert_metrics import router_biases
from pipeline.train.state import TrainState

STATE_FILE = "train_state.pt"
SHARDED_DIR = "sharded"
DATA_FIELDS = ("epoch", "position", "torch_rng")  # per-replica parts of `TrainState.state_dict()`
SHARED_FIELDS = ("scheduler", "step")  # what rank 0 writes beside the DCP folder under FSDP

log = logging.getLogger(__name__)


def data_file(rank: int) -> str:
    return f"data_rank{rank}.pt"


def save(state: TrainState, rank: int, world: int, directory: Path, sharded: bool = False) -> None:
    """Rank `rank`'s part of a checkpoint: the shared state (rank 0, or every rank's shards under FSDP) and its
    own data position and RNG. Under FSDP every rank must call it (the DCP save is a collective)."""
    directory = Path(directory)
    data = {
        "epoch": state.epoch,
        "position": state.position,
        "torch_rng": torch.get_rng_state(),
        "world": world,
        "router_biases": router_biases(state.model),
    }
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(state.model, state.optimizer)
        dcp.save({"model": model, "optimizer": optimizer}, checkpoint_id=str(directory / SHARDED_DIR))
        if rank == 0:
            torch.save({"scheduler": state.scheduler.state_dict(), "step": state.step}, directory / STATE_FILE)
    elif rank == 0:
        full = state.state_dict()
        for k in DATA_FIELDS:
            full.pop(k)
        torch.save(full, directory / STATE_FILE)
    torch.save(data, directory / data_file(rank))


def is_sharded(directory: Path) -> bool:
    return (Path(directory) / SHARDED_DIR).is_dir()


def restore(
    state: TrainState, rank: int, world: int, directory: Path, device: torch.device | str = "cpu", sharded: bool = False
) -> None:
    """Load a checkpoint into rank `rank`'s state; refuse one whose ranks' router biases diverged.

    A rank without a part of its own, or resuming with another number of ranks than the checkpoint was written
    by (the rows are split differently, so a window count means other rows), starts the checkpoint's epoch
    afresh. Under FSDP every rank must call it (the DCP load is a collective); a sharded checkpoint loads on any
    number of ranks.
    """
    directory = Path(directory)
    if is_sharded(directory) != sharded:
        wrote, runs = ("fsdp", "ddp") if is_sharded(directory) else ("ddp", "fsdp")
        raise ValueError(
            f"checkpoint {directory} was written with train.parallelism={wrote}; this run uses {runs}: "
            "resume it with the same parallelism"
        )
    shared = torch.load(directory / STATE_FILE, map_location=device, weights_only=True)
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model, optimizer = get_state_dict(state.model, state.optimizer)
        both: dict[str, Any] = {"model": model, "optimizer": optimizer}
        dcp.load(both, checkpoint_id=str(directory / SHARDED_DIR))
        set_state_dict(state.model, state.optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
        state.scheduler.load_state_dict(shared["scheduler"])
        state.step = shared["step"]
        full: dict = {}
    else:
        full = shared
    mine = directory / data_file(rank)
    position: dict[str, Any] = {"epoch": 0, "position": 0, "torch_rng": torch.get_rng_state()}
    if mine.is_file():
        data = torch.load(mine, weights_only=True)
        saved = full.get("model") or dict(state.model.named_buffers())
        for name, bias in data.pop("router_biases").items():
            if not torch.equal(bias.to(saved[name].device), saved[name]):
                raise RuntimeError(
                    f"checkpoint {directory}: rank {rank}'s {name} differs from rank 0's; "
                    "the replicas' router biases diverged"
                )
        if data.get("world", world) == world:
            position = {k: data[k] for k in DATA_FIELDS}
        else:
            position["epoch"] = data["epoch"]
            log.warning(
                "checkpoint %s was written by %d ranks, resumed on %d: rank %d starts epoch %d afresh",
                directory,
                data["world"],
                world,
                rank,
                data["epoch"],
            )
    if sharded:
        state.data.seek(position["epoch"], position["position"])
        torch.set_rng_state(position["torch_rng"])
    else:
        full.update(position)
        state.load_state_dict(full)


def final_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights (router biases included) of a checkpoint, in one process: a sharded checkpoint's
    shards are assembled from its DCP folder without a process group."""
    directory = Path(directory)
    if not is_sharded(directory):
        return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)["model"]
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = str(directory / SHARDED_DIR)
    metadata = dcp.FileSystemReader(path).read_metadata()
    model = {
        key.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    loaded = {"model": model}
    dcp.load(loaded, checkpoint_id=path, no_dist=True)
    return loaded["model"]
