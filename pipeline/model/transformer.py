"""The student: a DeepSeek-V3-style decoder (MLA attention; dense SwiGLU in the first blocks, DeepSeekMoE after).

Single-device and Ray-free; training, distribution and serving wrap a built model from elsewhere. Shape suffixes:
the legend in `pipeline/model/__init__.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.model.loss import linear_cross_entropy
from pipeline.model.mla import MLA, CacheView, LatentKVCache, RMSNorm, init_linear
from pipeline.model.moe import MLP, Experts, Gate, MoE

WEIGHTS, CONFIG = "model.safetensors", "config.json"


class Block(nn.Module):
    """Pre-norm residual block: x + MLA(norm(x)), then + FFN(norm(x)) where FFN is dense or MoE."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MLP(cfg.dim, cfg.inter_dim) if layer_id < cfg.n_dense_layers else MoE(cfg)

    def forward(self, x_BSD, pos_BS, cache: CacheView | None = None) -> torch.Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), pos_BS, cache)
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


class MTP(nn.Module):
    """One multi-token-prediction depth: from the trunk's state at i and the embedding of token i+1, predict i+2.

    Shares the embedding and output head with the trunk; used for training only.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h_norm, self.e_norm = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, layer_id=cfg.n_layers)  # an MoE block when the trunk has any
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


@dataclass
class Losses:
    total: torch.Tensor
    ce: torch.Tensor
    balance: torch.Tensor
    mtp: torch.Tensor | None


@dataclass
class Output:
    logits: torch.Tensor  # (B, S, V)
    balance_loss: torch.Tensor  # sum of the MoE layers' sequence-wise balance losses (0 outside training)
    mtp_logits: torch.Tensor | None  # (B, S-1, V): position i predicts token i+2; None without MTP


class Transformer(nn.Module):
    """The MoE student.

    Args:
        cfg: a validated `ModelConfig` with `vocab_size` set (take it from the tokenizer the student is paired
            with: `cfg.model_copy(update={"vocab_size": len(tokenizer)})`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set: take it from the tokenizer the student is paired with")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = MTP(cfg) if cfg.mtp_depth else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_linear(self)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
            elif isinstance(m, Gate):
                nn.init.normal_(m.weight, std=0.02)
                m.bias.zero_()
            elif isinstance(m, Experts):
                nn.init.normal_(m.w13, std=0.02)
                nn.init.normal_(m.w2, std=0.02)

    def trunk(self, tokens_BS: torch.Tensor, cache: CacheView | None = None) -> torch.Tensor:
        """Hidden states after the last block, before the final norm: (B, S, D)."""
        B, S = tokens_BS.shape
        start_B = cache.start_B if cache is not None else torch.zeros(B, dtype=torch.long, device=tokens_BS.device)
        pos_BS = start_B[:, None] + torch.arange(S, device=tokens_BS.device)
        if not torch.compiler.is_compiling():  # a compiled decode step: `decode` checked the cache's length
            if int(pos_BS.max()) >= self.cfg.max_seq_len:
                raise ValueError(f"position {int(pos_BS.max())} is past model.max_seq_len ({self.cfg.max_seq_len})")
            for m in self.modules():  # balance terms describe this forward only (the MTP block may not run)
                if isinstance(m, MoE):
                    m.balance_loss = torch.zeros((), device=tokens_BS.device)
        h_BSD = self.embed(tokens_BS)
        for layer in self.layers:
            h_BSD = layer(h_BSD, pos_BS, cache)
        return h_BSD

    def mtp_hidden(self, h_BSD: torch.Tensor, tokens_BS: torch.Tensor) -> torch.Tensor:
        """MTP states (B, S-1, D), normed: position i combines trunk state i with the embedding of token i+1."""
        m, S = self.mtp, tokens_BS.shape[1]
        assert m is not None, "the model has no MTP block (model.mtp_depth is 0)"
        x_BSD = m.proj(torch.cat([m.h_norm(h_BSD[:, :-1]), m.e_norm(self.embed(tokens_BS[:, 1:]))], dim=-1))
        pos_BS = torch.arange(S - 1, device=tokens_BS.device)[None]
        return m.norm(m.block(x_BSD, pos_BS))

    def forward(
        self, tokens_BS: torch.Tensor, cache: CacheView | None = None, return_aux: bool = False
    ) -> torch.Tensor | Output:
        """Logits for every position.

        Args:
            tokens_BS: token ids. Without a cache: whole sequences from position 0 (training, scoring).
            cache: with a cache view, these tokens continue each row's cached sequence at `cache.start_B`.
            return_aux: return an `Output` with the balance loss and MTP logits besides the logits.
        """
        h_BSD = self.trunk(tokens_BS, cache)
        logits_BSV = self.head(self.norm(h_BSD))
        if not return_aux:
            return logits_BSV
        mtp_logits = None
        if self.mtp is not None and cache is None and tokens_BS.shape[1] > 1:
            mtp_logits = self.head(self.mtp_hidden(h_BSD, tokens_BS))
        return Output(logits_BSV, self.balance_loss(), mtp_logits)

    def loss(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor, ignore_index: int = -100) -> Losses:
        """Next-token training loss without materialising the logits (fused, chunked head + cross-entropy).

        total = CE + balance + mtp_lambda * MTP-CE, where MTP at position i predicts targets[i + 1].
        """
        h_BSD = self.trunk(tokens_BS)
        D = h_BSD.shape[-1]
        ce = linear_cross_entropy(
            self.norm(h_BSD).reshape(-1, D), self.head.weight, targets_BS.reshape(-1), ignore_index
        )
        mtp = None
        if self.mtp is not None and tokens_BS.shape[1] > 1:
            mtp = linear_cross_entropy(
                self.mtp_hidden(h_BSD, tokens_BS).reshape(-1, D),
                self.head.weight,
                targets_BS[:, 1:].reshape(-1),
                ignore_index,
            )
        balance = self.balance_loss()  # after the MTP block, whose MoE adds its own term
        total = ce + balance + (self.cfg.mtp_lambda * mtp if mtp is not None else 0)
        return Losses(total, ce, balance, mtp)

    def balance_loss(self) -> torch.Tensor:
        losses = [m.balance_loss for m in self.modules() if isinstance(m, MoE) and self.training]
        return torch.stack(losses).sum() if losses else self.head.weight.new_zeros(())

    def new_cache(self, max_batch: int, max_len: int | None = None) -> LatentKVCache:
        p = self.head.weight
        return LatentKVCache(
            self.cfg, self.cfg.n_layers, max_batch, max_len or self.cfg.max_seq_len, device=p.device, dtype=p.dtype
        )

    # ------------------------------------------------------------------------------------------------ sizes

    def num_params(self) -> dict[str, int]:
        """Total parameters, the active ones per token (shared experts + top-k routed; no MTP), and how many of
        either are the embedding and output head (`embedding`)."""
        total = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("mtp."))
        inactive = 0
        for m in self.layers.modules():
            if isinstance(m, Experts):
                per_expert = (m.w13.numel() + m.w2.numel()) // m.w13.shape[0]
                inactive += per_expert * (m.w13.shape[0] - self.cfg.n_activated_experts)
        return {
            "total": total,
            "active": total - inactive,
            "embedding": self.embed.weight.numel() + self.head.weight.numel(),
            "mtp": sum(p.numel() for name, p in self.named_parameters() if name.startswith("mtp.")),
        }

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Training FLOPs (forward + backward = 3x forward) per token: (trunk, output head), PaLM-style.

        Trunk: 6 x the active non-embedding parameters, plus attention scores and values (6 x layers x heads x
        (qk_head_dim + v_head_dim) x seq_len). Head: 6 x dim x vocab, counted apart because the distillation
        objective applies it at completion positions only. Router, bias and norm FLOPs are ignored.
        """
        c = self.cfg
        active = self.num_params()["active"] - self.embed.weight.numel() - self.head.weight.numel()
        attn = 6 * c.n_layers * c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * seq_len
        return float(6 * active + attn), float(6 * c.dim * (c.vocab_size or 0))

    # ------------------------------------------------------------------------------------------------ I/O

    @classmethod
    def for_tokenizer(cls, cfg: ModelConfig, tokenizer) -> Transformer:
        """A student whose vocabulary is the tokenizer's (`len(tokenizer)`, added tokens included)."""
        vocab = len(tokenizer)
        if cfg.vocab_size is not None and cfg.vocab_size != vocab:
            raise ValueError(f"model.vocab_size is {cfg.vocab_size} but the paired tokenizer has {vocab} tokens")
        return cls(cfg.model_copy(update={"vocab_size": vocab}))

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        """safetensors weights (router biases included) + the JSON config (+ the tokenizer's files, if given)."""
        from pipeline.artifacts import write_checkpoint

        if tokenizer is not None:
            if len(tokenizer) != self.cfg.vocab_size:
                raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model's vocabulary {self.cfg.vocab_size}")
            tokenizer.save_pretrained(str(directory))
        write_checkpoint(Path(directory), dict(self.state_dict()), self.cfg.model_dump(mode="json"), WEIGHTS)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> Transformer:
        from pydantic import ValidationError

        from pipeline.validation import ConfigError, format_validation_error

        directory = Path(directory)
        for name in (CONFIG, WEIGHTS):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not a saved student: {name} is missing")
        try:
            cfg = ModelConfig.model_validate(json.loads((directory / CONFIG).read_text()))
        except ValueError as e:
            msg = format_validation_error(e) if isinstance(e, ValidationError) else str(e)
            raise ConfigError(f"{directory / CONFIG}: {msg}") from None
        model = cls(cfg)
        model.load_state_dict(saved_weights(directory, map_location))
        return model.to(map_location)


def saved_weights(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state dict of a student saved with `save_pretrained` (its weights alone, no model built)."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved student: {WEIGHTS} is missing")
    return load_file(str(path), device=str(map_location))
