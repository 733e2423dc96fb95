"""Per-thread scratch buffers for large temporaries that die within one call.

On this kind of machine a fresh multi-megabyte tensor costs page faults on every call (glibc hands big blocks
back to the OS on free); the hot paths (MoE backward, the fused cross-entropy) take theirs from here instead.
"""

from __future__ import annotations

import threading

import torch


class Scratch(threading.local):
    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(
        self, name: str, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """A tensor of `shape` on `like`'s device (and dtype, unless given), reused by later calls with `name`.

        The contents are garbage; the caller owns it until its call returns.
        """
        dtype = dtype or like.dtype
        key = (name, like.device, dtype)
        n = 1
        for d in shape:
            n *= d
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self.buffers[key] = torch.empty(n, device=like.device, dtype=dtype)
        return buf[:n].view(shape)


scratch = Scratch()
