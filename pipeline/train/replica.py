"""One data-parallel rank of the student: its input stream, model, train state, DDP or FSDP wrapping, step metrics.

Plain PyTorch: `actors/trainer.py` builds one per Ray Train worker (rank, world size and device from Ray), and
tests build them directly. With more than one replica, torch.distributed must be initialised by the caller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from pipeline.config import TrainConfig
from pipeline.model import ModelConfig, Transformer
from pipeline.train import checkpoint
from pipeline.train.expert_metrics import expert_metrics
from pipeline.train.mfu import flops_per_step, peak_flops
from pipeline.train.objective import ObjectiveModule, to_tensors
from pipeline.train.packing import PackedBatch, pack
from pipeline.train.state import TrainState
from pipeline.train.stream import RowSource, WindowStream, buffer_windows


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` under DDP as the student needs it: routed experts that got no token (and a frozen router) have no
    gradient; router biases stay equal through the all-reduced expert counts, not by copying rank 0's buffers;
    gradients are views into the all-reduce buckets, not a second copy of them."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
        broadcast_buffers=False,
        gradient_as_bucket_view=True,
    )


@dataclass
class TrainJob:
    """What every worker needs (picklable): the student's config, the training config, where to log."""

    model: ModelConfig  # vocab_size resolved from the tokenizer
    train: TrainConfig
    top_k: int  # teacher top-k stored in the soft targets
    run_id: str | None = None  # MLflow run rank 0 logs step metrics to
    tracking_uri: str | None = None
    parent_run_id: str = ""  # the pipeline run: a tag of rank 0's live Ray metrics
    # the student's starting weights: a state dict; on Ray Train an ObjectRef to one, or the folder of a saved
    # student every worker can read (one-node clusters), resolved by the worker; None: random initialisation from
    # train.seed. A replica drops it once its model holds the weights.
    initial_state: Any = None
    val_rows: list[dict] = field(default_factory=list)  # held-out soft-target rows rank 0 validates on
    # the soft-target shards every Ray Train worker reads its own rows of (`parquet_rows.py`): a local folder every
    # worker sees, or a pyarrow filesystem URI (s3://…); the held-out share is read from them too
    data: str | None = None


class Replica:
    """One data-parallel replica: its input stream, model, optimizer state, and step metrics.

    Args:
        job: the student and training config.
        rows: this replica's soft-target rows (dicts with the columns of the `soft_targets` schema): a list, or a
            function of the epoch returning one pass over them (`parquet_rows.RankRows`; see `stream.py`).
        rank, world: its rank and the number of replicas (torch.distributed is initialised when world > 1, and
            always with `train.parallelism=fsdp`).
        device: where it trains.
    """

    def __init__(
        self,
        job: TrainJob,
        rows: list[dict] | RowSource,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str = "cpu",
    ):
        if isinstance(rows, list):
            if not rows:
                raise ValueError(
                    f"training replica {rank} received no soft-target rows: the dataset has fewer "
                    f"samples than train.num_workers ({world})"
                )
            listed = rows
            rows = lambda epoch: listed
        self.job, self.cfg, self.rank, self.world = job, job.train, rank, world
        self.device = torch.device(device)
        capacity = buffer_windows(
            int(self.cfg.input_buffer_mb * 2**20), self.cfg.seq_len, job.top_k, self.cfg.batch_size
        )
        self.data = WindowStream(rows, self.cfg.seq_len, job.top_k, capacity, self.cfg.seed, rank)
        torch.manual_seed(self.cfg.seed)  # identical initial weights on every replica (DDP also broadcasts them)
        self.sharded = self.cfg.parallelism == "fsdp"
        self.all_reduce = None
        if self.sharded:
            import torch.distributed as dist

            from pipeline.train.fsdp import sharded_student

            full = None
            if rank == 0:  # only rank 0 holds the whole starting state; the others receive their shards
                full = job.initial_state if job.initial_state is not None else Transformer(job.model).state_dict()
            self.model, self.objective = sharded_student(job.model, ObjectiveModule, self.device, full, cfg=self.cfg)
            self.forward: torch.nn.Module = self.objective
            if world > 1:
                self.all_reduce = dist.all_reduce
        else:
            self.model = Transformer(job.model)
            if job.initial_state is not None:
                self.model.load_state_dict(job.initial_state)
            self.model.to(self.device)
            self.objective = ObjectiveModule(self.model, self.cfg)
            self.forward = self.objective
            if world > 1:
                import torch.distributed as dist

                self.forward = data_parallel(self.objective, self.device)
                self.all_reduce = dist.all_reduce
        # the model holds the starting weights now: the job's copy (a whole student) is not kept for the run
        self.job = replace(job, initial_state=None)
        self.state = TrainState(self.model, self.cfg, self.data)  # after sharding: AdamW holds the shards
        self.peak, self.peak_source = peak_flops(self.device, self.cfg.peak_flops_per_worker)
        self.flops_per_token = self.model.flops_per_token(self.cfg.seq_len)  # fixed by the architecture
        self.resumed_from = 0

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def last_counts(self) -> torch.Tensor:
        """(MoE layers, experts) tokens routed in the last step, over all replicas."""
        return self.state.last_counts

    def _forward(self, batch: dict) -> Any:
        if self.device.type == "cuda" and not self.sharded:  # FSDP casts by its own mixed-precision policy
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.forward(batch)
        return self.forward(batch)

    def train_step(self) -> dict[str, float]:
        """One optimizer step on every replica; metrics averaged (losses) or summed (tokens) over replicas."""
        t0 = time.perf_counter()
        m = self.state.train_step(all_reduce=self.all_reduce, forward=self._forward)
        trunk = self.cfg.batch_size * self.cfg.seq_len
        stats = torch.tensor(
            [m["loss"], m["kd"], m["ce"], m["balance"], float(m["tokens"]), float(trunk)], dtype=torch.float64
        )
        if self.all_reduce is not None:
            self.all_reduce(stats)
            stats[:4] /= self.world
        seconds = time.perf_counter() - t0
        loss, kd, ce, balance, head_tokens, trunk_tokens = stats.tolist()
        flops = flops_per_step(self.flops_per_token, int(trunk_tokens), int(head_tokens))
        out = {
            "loss": loss,
            "kd": kd,
            "ce": ce,
            "balance": balance,
            "lr": m["lr"],
            "grad_norm": m["grad_norm"],
            "tokens_per_s": trunk_tokens / seconds,
            "completion_tokens": head_tokens,
            "mfu": flops / seconds / (self.peak * self.world),
            "step_seconds": seconds,
        }
        if "mtp" in m:
            out["mtp"] = m["mtp"]
        out.update(expert_metrics(self.model, self.last_counts))
        return out

    def held_bytes(self) -> dict[str, float]:
        """Bytes of parameters, gradients and AdamW state this rank holds (its shards under FSDP), and the
        process's peak resident memory so far."""
        import resource

        def size(t: torch.Tensor) -> int:
            local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank
            return local.numel() * local.element_size()

        params = list(self.model.parameters())
        state = self.state.optimizer.state.values()
        return {
            "param_bytes": float(sum(size(p) for p in params)),
            "grad_bytes": float(sum(size(p.grad) for p in params if p.grad is not None)),
            "optimizer_bytes": float(sum(size(v) for s in state for v in s.values() if isinstance(v, torch.Tensor))),
            "peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),  # Linux: KiB
        }

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """KD, CE and total loss on the held-out rows (`job.val_rows`), in eval mode; {} without any.

        The same objective as training over every held-out completion position, averaged per position (windows
        weighted by their positions), so it compares with the training loss. Rank-local under DDP; under FSDP
        every forward gathers parameters, so every rank calls it at the same steps, on the same rows.
        """
        if not self.job.val_rows:
            return {}
        was_training = self.model.training
        self.model.eval()
        sums, tokens = torch.zeros(3, dtype=torch.float64), 0
        try:
            windows = pack(self.job.val_rows, self.cfg.seq_len, self.job.top_k)
            size = self.cfg.micro_batch_size or self.cfg.batch_size  # as in training: one slice's logits at a time
            for start in range(0, windows.tokens_BT.shape[0], size):
                part = PackedBatch(**{k: v[start : start + size] for k, v in vars(windows).items()})
                batch = to_tensors(part, self.device)
                loss = self._forward_eval(batch)
                sums += (
                    torch.tensor([float(loss.total), float(loss.kd), float(loss.ce)], dtype=torch.float64) * loss.tokens
                )
                tokens += loss.tokens
        finally:
            self.model.train(was_training)
        total, kd, ce = (sums / max(tokens, 1)).tolist()
        return {"val_loss": total, "val_kd": kd, "val_ce": ce, "val_tokens": float(tokens)}

    def _forward_eval(self, batch: dict):
        if self.device.type == "cuda" and not self.sharded:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.objective(batch)
        return self.objective(batch)

    def save(self, directory: Path) -> None:
        """This replica's part of a checkpoint (see `pipeline/train/checkpoint.py`)."""
        checkpoint.save(self.state, self.rank, self.world, directory, sharded=self.sharded)

    def restore(self, directory: Path) -> None:
        checkpoint.restore(self.state, self.rank, self.world, directory, self.device, sharded=self.sharded)
        self.resumed_from = self.state.step
