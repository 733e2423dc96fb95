"""The training checkpoint format: one folder per checkpoint, a part per replica.

- `train_state.pt` (rank 0): weights with router biases, AdamW moments, LR schedule, step.
- `data_rank<r>.pt` (every rank): that replica's epoch, position in its window order, torch RNG, and its own
  router biases (equal on every rank while the expert counts are all-reduced; checked on restore).

Ray Train merges the ranks' folders into one checkpoint directory; these functions only read and write files.
Checkpoints live on shared storage that other jobs can write, so they are read with `weights_only=True`: tensors,
numbers, strings and containers only, never a pickled object that would run code on load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.train.expert_metrics import router_biases
from pipeline.train.state import TrainState

STATE_FILE = "train_state.pt"
DATA_FIELDS = ("epoch", "position", "torch_rng")  # per-replica parts of `TrainState.state_dict()`


def data_file(rank: int) -> str:
    return f"data_rank{rank}.pt"


def save(state: TrainState, rank: int, directory: Path) -> None:
    """Replica `rank`'s part of a checkpoint: the shared state (rank 0 only) and its own data position and RNG."""
    full = state.state_dict()
    data = {k: full.pop(k) for k in DATA_FIELDS}
    data["router_biases"] = router_biases(state.model)
    if rank == 0:
        torch.save(full, Path(directory) / STATE_FILE)
    torch.save(data, Path(directory) / data_file(rank))


def restore(state: TrainState, rank: int, directory: Path, device: torch.device | str = "cpu") -> None:
    """Load a checkpoint into replica `rank`'s state; refuse one whose replicas' router biases diverged.

    A rank without a part of its own (the run resumes with more replicas than it was saved with) starts its
    shard afresh.
    """
    directory = Path(directory)
    full = torch.load(directory / STATE_FILE, map_location=device, weights_only=True)
    mine = directory / data_file(rank)
    if mine.is_file():
        data = torch.load(mine, weights_only=True)
        for name, bias in data.pop("router_biases").items():
            if not torch.equal(bias.to(full["model"][name].device), full["model"][name]):
                raise RuntimeError(
                    f"checkpoint {directory}: rank {rank}'s {name} differs from rank 0's; "
                    "the replicas' router biases diverged"
                )
        full.update(data)
    else:
        full.update(epoch=0, position=0, torch_rng=torch.get_rng_state())
    state.load_state_dict(full)


def final_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The model weights (router biases included) of a checkpoint."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)["model"]
