"""Tensors reused across calls: per-thread buffers for large temporaries that die within one call.

On this kind of machine a fresh multi-megabyte tensor costs page faults on every call (glibc hands big blocks
back to the OS on free); the hot paths (MoE backward, the fused cross-entropy) take theirs from here instead.
`DerivedLayout` is the other kind of reused tensor: a weight kept in a second layout for the decode paths.
"""

from __future__ import annotations

import threading

import torch


class TemporaryBuffers(threading.local):
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


temporary_buffers = TemporaryBuffers()


class DerivedLayout:
    """An inference-only copy of a parameter in another layout, rebuilt whenever the parameter changed.

    The fast decode paths want weights laid out for their products (experts' `w2` as one matrix, MLA's W_UK and
    W_UV per head, contiguous). The copy is keyed on the parameter's storage and version counter, so an optimizer
    step, a `load_state_dict` or a dtype/device cast (all of which bump one or the other) rebuilds it on next use.
    """

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._value: object = None

    @property
    def built(self) -> bool:
        return self._key is not None

    def get(self, weight: torch.Tensor, build):
        if torch.compiler.is_compiling() and self.built:
            # inside a compiled decode step, which traces the layout as it is: `CompiledDecode` runs a step eagerly
            # (rebuilding what changed) whenever the model's weights changed
            return self._value
        key = (weight.data_ptr(), weight._version)
        if self._key != key:
            self._value, self._key = build(weight.detach()), key
        return self._value
