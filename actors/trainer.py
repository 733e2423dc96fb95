"""The trainer role: one data-parallel replica of the student per Ray Train worker.

`Replica` is the plain class (tests drive it without Ray): its shard of soft-target rows packed into windows, the
model and its `TrainState`, DDP when there is more than one replica, step metrics (losses, throughput, MFU, expert
load) and its part of a checkpoint. `train_loop` is the thin Ray Train wrapper that runs in every worker: it reads
the worker's Ray Data shard, restores from `ray.train.get_checkpoint()`, reports every step and a checkpoint every
`checkpoint_every` steps, and on rank 0 logs the step metrics to the stage's MLflow run. `fit` builds the
`TorchTrainer` (Train V2) with a deterministic `RunConfig(name, storage_path)`, so a pipeline rerun after a driver
crash continues from the latest checkpoint instead of step 0.

A checkpoint is a folder: `train_state.pt` (rank 0: weights with router biases, AdamW moments, LR schedule, step)
and `data_rank<r>.pt` per rank (that replica's epoch, position in its window order, and torch RNG), merged by Ray
Train into one checkpoint directory.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ModelConfig, TrainConfig
from pipeline.distill.objective import ObjectiveModule
from pipeline.distill.packing import pack
from pipeline.distill.trainer import TrainState
from pipeline.model import Transformer, load_imbalance
from pipeline.model.moe import Gate

STATE_FILE = "train_state.pt"

# Dense bf16 peak of common accelerators (FLOP/s), for the MFU estimate; see docs/architecture.md.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
                  "V100": 125e12, "T4": 65e12}


@dataclass
class TrainJob:
    """What every worker needs (picklable): the student's config, the training config, where to log."""

    model: ModelConfig  # vocab_size resolved from the tokenizer
    train: TrainConfig
    top_k: int  # teacher top-k stored in the soft targets
    run_id: str | None = None  # MLflow run rank 0 logs step metrics to
    tracking_uri: str | None = None
    flush_every: int = 10  # steps between MLflow writes (metrics keep their own step numbers)
    parent_run_id: str = ""  # the pipeline run: a tag of rank 0's live Ray metrics


# ---------------------------------------------------------------------------------------------------- FLOPs


def flops_per_step(model: Transformer, trunk_tokens: int, head_tokens: int, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward), PaLM-style.

    Trunk: 6 x the active non-embedding parameters per token, plus attention scores and values
    (6 x layers x heads x (qk_head_dim + v_head_dim) x seq_len per token). Output head: 6 x dim x vocab at the
    completion positions only (the objective applies it nowhere else). Router-bias and norm FLOPs are ignored.
    """
    c = model.cfg
    active = model.num_params()["active"] - model.embed.weight.numel() - model.head.weight.numel()
    attn = 6 * c.n_layers * c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * seq_len
    return trunk_tokens * (6 * active + attn) + head_tokens * 6 * c.dim * c.vocab_size


def peak_flops(device: torch.device, configured: float | None) -> tuple[float, str]:
    """The per-worker peak MFU is measured against, and where it came from."""
    if configured:
        return configured, "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value, f"{name} dense bf16 datasheet"
    # CPU: no datasheet to trust; the fp32 matmul throughput these threads actually reach (best of 3)
    a = torch.randn(1024, 1024)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best, f"measured fp32 matmul on {torch.get_num_threads()} CPU threads"


# ---------------------------------------------------------------------------------------------------- replica


class Replica:
    """One data-parallel replica: its windows, model, optimizer state, and step metrics.

    Args:
        job: the student and training config.
        rows: this replica's soft-target rows (dicts with the columns of `pipeline/distill/targets.schema`).
        rank, world: its rank and the number of replicas (torch.distributed is initialised when world > 1).
        device: where it trains.
    """

    def __init__(self, job: TrainJob, rows: list[dict], rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu"):
        if not rows:
            raise ValueError(f"training replica {rank} received no soft-target rows: the dataset has fewer samples "
                             f"than train.num_workers ({world})")
        self.job, self.cfg, self.rank, self.world = job, job.train, rank, world
        self.device = torch.device(device)
        self.windows = pack(rows, self.cfg.seq_len, job.top_k)
        torch.manual_seed(self.cfg.seed)  # identical initial weights on every replica (DDP also broadcasts them)
        self.model = Transformer(job.model).to(self.device)
        self.state = TrainState(self.model, self.cfg, self.windows)
        self.objective = ObjectiveModule(self.model, self.cfg)
        self.forward = self.objective
        self.all_reduce = None
        if world > 1:
            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel as DDP

            # unused routed experts have no gradient; biases stay equal through the all-reduced counts, not a copy
            self.forward = DDP(self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                               find_unused_parameters=True, broadcast_buffers=False)
            self.all_reduce = dist.all_reduce
        self.peak, self.peak_source = peak_flops(self.device, self.cfg.peak_flops_per_worker)
        self.resumed_from = 0

    @property
    def step(self) -> int:
        return self.state.step

    def _forward(self, batch: dict) -> Any:
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.forward(batch)
        return self.forward(batch)

    def train_step(self) -> dict[str, float]:
        """One optimizer step on every replica; metrics averaged (losses) or summed (tokens) over replicas."""
        t0 = time.perf_counter()
        m = self.state.train_step(all_reduce=self.all_reduce, forward=self._forward)
        counts_LE = self.state.last_counts
        trunk = self.cfg.batch_size * self.cfg.seq_len
        stats = torch.tensor([m["loss"], m["kd"], m["ce"], m["balance"], float(m["tokens"]), float(trunk)],
                             dtype=torch.float64)
        if self.all_reduce is not None:
            self.all_reduce(stats)
            stats[:4] /= self.world
        seconds = time.perf_counter() - t0
        loss, kd, ce, balance, head_tokens, trunk_tokens = stats.tolist()
        flops = flops_per_step(self.model, int(trunk_tokens), int(head_tokens), self.cfg.seq_len)
        out = {"loss": loss, "kd": kd, "ce": ce, "balance": balance, "lr": m["lr"], "grad_norm": m["grad_norm"],
               "tokens_per_s": trunk_tokens / seconds, "completion_tokens": head_tokens,
               "mfu": flops / seconds / (self.peak * self.world), "step_seconds": seconds}
        if "mtp" in m:
            out["mtp"] = m["mtp"]
        out.update(expert_metrics(self.model, counts_LE))
        return out

    # ------------------------------------------------------------------------------------------------ checkpoint

    def save(self, directory: Path) -> None:
        """This replica's part of a checkpoint: the shared state (rank 0) and its own data position and RNG."""
        state = self.state.state_dict()
        data = {k: state.pop(k) for k in ("epoch", "position", "torch_rng")}
        # each replica's own router biases: equal on every rank while the counts are all-reduced (checked on restore)
        data["router_biases"] = router_biases(self.model)
        if self.rank == 0:
            torch.save(state, directory / STATE_FILE)
        torch.save(data, directory / f"data_rank{self.rank}.pt")

    def restore(self, directory: Path) -> None:
        state = torch.load(directory / STATE_FILE, map_location=self.device, weights_only=False)
        mine = directory / f"data_rank{self.rank}.pt"
        if mine.is_file():
            data = torch.load(mine, weights_only=False)
            for name, bias in data.pop("router_biases").items():
                if not torch.equal(bias.to(self.device), state["model"][name]):
                    raise RuntimeError(f"checkpoint {directory}: rank {self.rank}'s {name} differs from rank 0's; "
                                       "the replicas' router biases diverged")
            state.update(data)
        else:  # the run is resumed with more replicas than it was saved with: this one starts its shard afresh
            state.update(epoch=0, position=0, torch_rng=torch.get_rng_state())
        self.state.load_state_dict(state)
        self.resumed_from = self.state.step


def _gates(model: Transformer) -> list[tuple[str, str, Gate]]:
    """(module name, layer index, router) of every MoE layer, in layer order."""
    return [(name, name.split(".")[1], m) for name, m in model.named_modules() if isinstance(m, Gate)]


def router_biases(model: Transformer) -> dict[str, torch.Tensor]:
    return {f"{name}.bias": gate.bias.detach().cpu().clone() for name, _, gate in _gates(model)}


def _shares(model: Transformer, counts_LE: torch.Tensor):
    """(layer, router, share of routed tokens per expert) per MoE layer."""
    for (_, layer, gate), counts_E in zip(_gates(model), counts_LE):
        yield layer, gate, counts_E.double() / counts_E.sum().clamp(min=1)


def expert_metrics(model: Transformer, counts_LE: torch.Tensor) -> dict[str, float]:
    """Per MoE layer: share of routed tokens per expert (min, max, coefficient of variation) and router-bias norm."""
    out: dict[str, float] = {}
    for layer, gate, share_E in _shares(model, counts_LE):
        out[f"expert_load.l{layer}.min"] = float(share_E.min())
        out[f"expert_load.l{layer}.max"] = float(share_E.max())
        out[f"expert_load.l{layer}.cv"] = load_imbalance(share_E)
        out[f"router_bias_norm.l{layer}"] = float(gate.bias.norm())
    return out


def expert_shares(model: Transformer, counts_LE: torch.Tensor) -> dict[str, float]:
    """The full layer x expert share matrix as metrics (`expert_share.l<layer>.e<expert>`), for heatmaps."""
    return {f"expert_share.l{layer}.e{e}": float(s)
            for layer, _, share_E in _shares(model, counts_LE) for e, s in enumerate(share_E)}


# ---------------------------------------------------------------------------------------------------- Ray Train


class _MetricLog:
    """Rank 0's MLflow writer: step metrics buffered and written in batches to the stage's run."""

    def __init__(self, job: TrainJob):
        from mlflow import MlflowClient

        self.client, self.run_id, self.buffer = MlflowClient(job.tracking_uri), job.run_id, []
        self.flush_every = job.flush_every
        self.system = None
        try:  # CPU, memory, disk, network (and GPU when pynvml is present) of this worker's node
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.system = SystemMetricsMonitor(job.run_id, sampling_interval=5, resume_logging=True,
                                               tracking_uri=job.tracking_uri)
            self.system.start()
        except Exception:  # noqa: BLE001 - system metrics are optional (psutil missing, platform quirks)
            self.system = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.buffer) >= self.flush_every * len(metrics):
            self.flush()

    def tag(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def flush(self) -> None:
        for start in range(0, len(self.buffer), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=self.buffer[start:start + 1000])
        self.buffer = []

    def close(self) -> None:
        self.flush()
        if self.system is not None:
            self.system.finish()


def contiguous_split(dataset, world_size: int):
    """A Ray Train `DataConfig` that gives every row to exactly one worker.

    Ray Train's default split (`streaming_split(equal=True)`) drops up to `num_workers - 1` rows to make shards
    equal, and hands blocks out as workers ask. Here the dataset is materialized and cut at fixed row indices
    now, before the workers take the cluster's CPUs (a split run later, from inside training, would wait for CPUs
    the workers hold): shards differ by at most one row, nothing is dropped, and rank r gets the same rows on every
    attempt, so a restarted worker continues its own data order. DDP does not need equal shards: every replica
    takes the same number of windows per step and cycles through its own.
    """
    from ray.train import DataConfig

    ds = dataset.materialize()
    n = ds.count()
    if n < world_size:
        raise ValueError(f"the soft-target dataset has {n} rows, fewer than train.num_workers ({world_size}): "
                         "every worker needs at least one sample")
    cuts = [n * i // world_size for i in range(1, world_size)]
    parts = ds.split_at_indices(cuts) if cuts else [ds]
    for part in parts:  # a worker reads its shard once; a progress bar there would linger for the whole run
        part.context.enable_progress_bars = False

    class ContiguousSplit(DataConfig):
        def configure(self, datasets, world_size, worker_handles=None, worker_node_ids=None, **kwargs):
            return [{name: parts[rank].iterator() for name in datasets} for rank in range(world_size)]

    return ContiguousSplit()


def read_shard(shard) -> list[dict]:
    """All rows of this worker's Ray Data shard, in sample-id order (a stable order for a resumed run)."""
    import pyarrow as pa

    tables = list(shard.iter_batches(batch_format="pyarrow", batch_size=None))
    if not tables:
        return []
    return pa.concat_tables(tables).sort_by("sample_id").to_pylist()


def train_loop(job: TrainJob) -> None:
    """The body of every Ray Train worker."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(job.train.cpus_per_worker)))
    replica = Replica(job, read_shard(ray.train.get_dataset_shard("train")), rank, world, device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            replica.restore(Path(d))
    log = _MetricLog(job) if rank == 0 and job.run_id else None
    if log:
        log.tag({"moeforge.train.mfu_peak": f"{replica.peak:.3g} FLOP/s per worker ({replica.peak_source})",
                 "moeforge.train.workers": world, "moeforge.train.device": str(device)})
        log.log({"resumed_from_step": replica.resumed_from, "windows_rank0": len(replica.windows.tokens_BT)},
                replica.step)
    cfg = job.train
    try:
        while replica.step < cfg.max_steps:
            metrics = replica.train_step()
            step = replica.step
            save = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
            if rank == 0:
                record_step(job, replica, metrics, step)
            if log:
                if save:
                    metrics.update(expert_shares(replica.model, replica.state.last_counts))
                log.log(metrics, step)
            if save:  # report (a barrier across workers) only with a checkpoint; step metrics go to MLflow
                if log:
                    log.flush()  # metrics up to a checkpoint are on the run before the checkpoint exists
                with tempfile.TemporaryDirectory() as d:
                    replica.save(Path(d))
                    ray.train.report({"step": step, "loss": metrics["loss"], "resumed_from_step": replica.resumed_from},
                                     checkpoint=ray.train.Checkpoint.from_directory(d),
                                     checkpoint_dir_name=f"step_{step:06d}")
    finally:
        if log:
            log.close()


def record_step(job: TrainJob, replica: Replica, metrics: dict[str, float], step: int) -> None:
    """Rank 0's live Ray metrics of a step: loss, throughput, and the layer x expert load of the router."""
    from pipeline.metrics import record

    tags = {"run": job.parent_run_id, "stage": "train"}
    record("moeforge_train_step", step, **tags)
    record("moeforge_train_loss", metrics["loss"], **tags)
    record("moeforge_train_tokens_per_second", metrics["tokens_per_s"], **tags)
    record("moeforge_train_tokens", metrics["tokens_per_s"] * metrics["step_seconds"], **tags)
    for layer, _, share_E in _shares(replica.model, replica.state.last_counts):
        for e, share in enumerate(share_E.tolist()):
            record("moeforge_expert_load", share, layer=layer, expert=e, **tags)


def fit(job: TrainJob, dataset, run_name: str, storage_path: str):
    """Train on `dataset` (a Ray Dataset of soft-target rows) with `job.train.num_workers` Ray Train workers.

    The same `run_name` and `storage_path` continue the latest checkpoint stored there. Returns the Train
    `Result` (its `checkpoint` is the final one).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = job.train
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets={"train": dataset},
        dataset_config=contiguous_split(dataset, cfg.num_workers),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": _worker_env()}),
    )
    return trainer.fit()


def _worker_env() -> dict[str, str]:
    """Environment the workers need from the driver's (the package path when run from a checkout)."""
    return {k: os.environ[k] for k in ("PYTHONPATH", "MOEFORGE_CACHE_DIR") if k in os.environ}


def final_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The model weights (router biases included) of a checkpoint written by `Replica.save`."""
    return torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=False)["model"]
