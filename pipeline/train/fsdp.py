"""Sharded data parallelism for the student with PyTorch's FSDP2 (`fully_shard`), the way torchtitan applies it.

Every transformer block (the MTP block's too) is its own FSDP unit, and the objective module is the root unit: it
holds what the objective reads outside a block's `forward` (the embedding, the final norm, the output head whose
weight the MTP loss multiplies directly), so those are gathered once for the whole step. Parameters, gradients
and AdamW's moments are split over the ranks (dim 0 of every tensor); a block's parameters are gathered just
before its forward and again before its backward, and freed after. Buffers (the router biases and their expert
counts, RoPE frequencies) are not sharded: every rank keeps a whole copy, kept equal by the all-reduced counts of
`update_router_biases`, as under DDP.

The model is built on the meta device and sharded before it holds any memory; its starting weights come from
rank 0 alone (`broadcast_from_rank0`), so no rank ever holds the whole model plus its shard, and only rank 0
holds the whole starting state. On CUDA parameters are gathered and computed in bf16 with gradients reduced in
fp32 (`MixedPrecisionPolicy`); on CPU everything stays fp32 (gloo reduces fp32 only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.model import ModelConfig, Transformer
from pipeline.model.transformer import Block


def blocks(model: Transformer) -> list[nn.Module]:
    """The FSDP units below the root: the trunk's blocks, then the MTP block."""
    return [m for m in model.modules() if isinstance(m, Block)]


def sharded_student(
    model_cfg: ModelConfig,
    root_of: type[nn.Module] | None,
    device: torch.device,
    full_state: dict[str, torch.Tensor] | None,
    **root_kwargs,
) -> tuple[Transformer, nn.Module]:
    """The student sharded over the default process group, with rank 0's `full_state` as its weights.

    Args:
        model_cfg: the student's config.
        root_of: the module class wrapping the model that becomes the root FSDP unit (called as
            `root_of(model, **root_kwargs)`); None: the model itself.
        device: this rank's device (the mesh's device type).
        full_state: on rank 0, the whole state dict to start from (ignored on the other ranks).

    Returns:
        (the model, the root module to call).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("train.parallelism=fsdp needs torch.distributed initialised (Ray Train does it)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    with torch.device("meta"):
        model = Transformer(model_cfg)
        root = root_of(model, **root_kwargs) if root_of is not None else model
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)
    for name, buffer in model.named_buffers():  # non-persistent buffers are not in any state dict: start them at 0
        if name.endswith("counts"):
            buffer.zero_()
    state: dict[str, Any] = full_state if dist.get_rank() == 0 and full_state is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model, root
