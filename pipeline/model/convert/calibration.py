"""Calibration: the teacher run over teacher-written token sequences, keeping per layer what the mappings need.

Per layer: the attention input's second moment, each query/key channel pair's norm, FFN activations of a token
sample, and the block's importance (Minitron's BI: 1 - cos(block input, block output)). Forward hooks on the
teacher's layers add each batch's real tokens (padding dropped) into one running tally per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.model.convert.shapes import ConversionError, TeacherShape


def pad_batch(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences right-padded with id 0 to the longest: ids (B, S) and the mask of real tokens (B, S)."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([list(s) + [0] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], dtype=torch.bool)
    return ids, mask


@dataclass
class LayerStats:
    """One teacher layer's calibration statistics."""

    attn_moment_DD: torch.Tensor  # mean over tokens of x x^T, x the attention input (after its norm)
    pair_norm_GP: torch.Tensor  # per KV head and channel pair: sum over its query heads of E|q_pair| * E|k_pair|
    ffn_in_ND: torch.Tensor  # a sample of FFN inputs (after its norm) ...
    ffn_act_NF: torch.Tensor  # ... and the neurons' activations silu(gate) * up on them
    ffn_mass_F: torch.Tensor  # mean |activation| of each neuron over all calibration tokens
    importance: float  # Minitron's block importance: mean 1 - cos(block input, block output)
    attn_mean_D: torch.Tensor | None = None  # mean over tokens of x, the attention input
    attn_in_ND: torch.Tensor | None = None  # the attention inputs of the same token sample as the FFN's


@dataclass
class Calibration:
    layers: list[LayerStats]
    tokens: int
    sequences: int


@dataclass
class _Batch:
    """The batch the teacher is running: which positions are real tokens, and which of those the FFN sample keeps."""

    mask_BS: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))
    keep_N: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))


def _pair_norms(y: torch.Tensor, heads: int, n_pairs: int) -> torch.Tensor:
    """Per head and channel pair, the norms of projections y (N, heads·head_dim) summed over tokens: (heads, P)."""
    pairs = y.view(-1, heads, 2, n_pairs)  # rotate_half layout: pair i is channels (i, i + P)
    return pairs.norm(dim=2).double().sum(0)


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _LayerTally:
    """One teacher layer's running sums over the calibration batches; its methods are the layer's forward hooks."""

    def __init__(self, shape: TeacherShape, batch: _Batch):
        self.batch = batch
        self.n_heads, self.n_kv_heads, self.n_pairs = shape.n_heads, shape.n_kv_heads, shape.head_dim // 2
        self.moment_DD = torch.zeros(shape.dim, shape.dim, dtype=torch.float64)
        self.sum_D = torch.zeros(shape.dim, dtype=torch.float64)
        self.attn_in: list[torch.Tensor] = []
        self.q_norm_HP = torch.zeros(self.n_heads, self.n_pairs, dtype=torch.float64)
        self.k_norm_GP = torch.zeros(self.n_kv_heads, self.n_pairs, dtype=torch.float64)
        self.ffn_in: list[torch.Tensor] = []
        self.ffn_act: list[torch.Tensor] = []
        self.mass_F = torch.zeros(shape.inter_dim, dtype=torch.float64)
        self.importance = 0.0

    def on_attn(self, module, args: tuple, kwargs: dict) -> None:
        x_ND = _hidden_states(args, kwargs)[self.batch.mask_BS]  # padding dropped
        self.moment_DD.add_(x_ND.T.double() @ x_ND.double())
        self.sum_D.add_(x_ND.double().sum(0))
        self.attn_in.append(x_ND[self.batch.keep_N])
        self.q_norm_HP.add_(_pair_norms(module.q_proj(x_ND), self.n_heads, self.n_pairs))
        self.k_norm_GP.add_(_pair_norms(module.k_proj(x_ND), self.n_kv_heads, self.n_pairs))

    def on_mlp(self, module, args: tuple) -> None:
        x_ND = args[0][self.batch.mask_BS]
        act_NF = nn.functional.silu(module.gate_proj(x_ND)) * module.up_proj(x_ND)
        self.mass_F.add_(act_NF.abs().double().sum(0))
        keep_N = self.batch.keep_N
        self.ffn_in.append(x_ND[keep_N])
        self.ffn_act.append(act_NF[keep_N])

    def on_block(self, module, args: tuple, kwargs: dict, output) -> None:
        x_ND = _hidden_states(args, kwargs)[self.batch.mask_BS].double()
        y_ND = (output[0] if isinstance(output, tuple) else output)[self.batch.mask_BS].double()
        self.importance += float((1 - nn.functional.cosine_similarity(x_ND, y_ND, dim=-1)).sum())

    def attach(self, layer) -> list:
        """Hook this tally onto a teacher decoder layer; returns the hooks' handles, for removing them."""
        return [
            layer.self_attn.register_forward_pre_hook(self.on_attn, with_kwargs=True),
            layer.mlp.register_forward_pre_hook(self.on_mlp),
            layer.register_forward_hook(self.on_block, with_kwargs=True),
        ]

    def stats(self, total: int) -> LayerStats:
        """The means over `total` calibration tokens; a KV head's pair norm sums its query heads'."""
        q_HP = self.q_norm_HP / total
        k_GP = self.k_norm_GP / total
        per_kv_head = self.n_heads // self.n_kv_heads
        pair_GP = (q_HP.view(self.n_kv_heads, per_kv_head, self.n_pairs) * k_GP[:, None, :]).sum(1)
        return LayerStats(
            self.moment_DD / total,
            pair_GP,
            torch.cat(self.ffn_in),
            torch.cat(self.ffn_act),
            self.mass_F / total,
            self.importance / total,
            self.sum_D / total,
            torch.cat(self.attn_in),
        )


def _ffn_sample(total: int, ffn_sample: int, seed: int) -> torch.Tensor:
    """Which of the `total` calibration tokens keep their FFN inputs and activations: (N,) bool, seeded."""
    gen = torch.Generator().manual_seed(seed)
    keep_N = torch.zeros(total, dtype=torch.bool)
    keep_N[torch.randperm(total, generator=gen)[:ffn_sample]] = True
    return keep_N


def _run(teacher, sequences: Sequence[Sequence[int]], batch_size: int, keep_N: torch.Tensor, batch: _Batch) -> None:
    """The teacher's trunk over `sequences` in padded batches, `batch` saying each one's real and sampled tokens."""
    offset = 0
    for start in range(0, len(sequences), batch_size):
        ids_BS, mask_BS = pad_batch(sequences[start : start + batch_size])
        n = int(mask_BS.sum())
        batch.mask_BS, batch.keep_N = mask_BS, keep_N[offset : offset + n]
        offset += n
        teacher.model(input_ids=ids_BS, attention_mask=mask_BS.long())


@torch.no_grad()
def calibrate(
    teacher, sequences: Sequence[Sequence[int]], ffn_sample: int = 1024, batch_size: int = 8, seed: int = 0
) -> Calibration:
    """Run the teacher over `sequences` (token ids) and collect each layer's statistics.

    `ffn_sample` tokens per layer (spread over all sequences, seeded) keep their FFN inputs and activations for
    clustering and the router fit, and their attention inputs for the latent norm's fit; every token counts
    towards the moments, norms and importances.
    """
    if not sequences:
        raise ConversionError("calibration needs at least one token sequence")
    shape = TeacherShape.of(teacher.config)
    total = sum(len(s) for s in sequences)
    keep_N = _ffn_sample(total, ffn_sample, seed)
    batch = _Batch()
    tallies = [_LayerTally(shape, batch) for _ in range(shape.n_layers)]
    handles = [h for tally, layer in zip(tallies, teacher.model.layers, strict=True) for h in tally.attach(layer)]
    was_training = teacher.training
    teacher.eval()
    try:
        _run(teacher, sequences, batch_size, keep_N, batch)
    finally:
        for h in handles:
            h.remove()
        teacher.train(was_training)
    return Calibration([tally.stats(total) for tally in tallies], total, len(sequences))
