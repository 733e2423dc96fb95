"""Tensors through Ray's object store without a copy per reader.

Ray stores a pickled torch tensor as bytes, so every `ray.get` builds a private copy: a learner rank fetching the
student's weights and AdamW's state held them twice while loading them (gigabytes at the tiny size, enough for
Ray's memory monitor to kill the stage on a 24 GB machine). NumPy arrays are stored once in shared memory and a
`ray.get` maps them read-only, so `put_tensors` stores every tensor of a nested state (dicts, lists, tuples) as an
array and `get_tensors` wraps them back: without a copy for what is only read or copied from (weights loaded with
`load_state_dict`), with one for what becomes live state (`writable=True`: an optimizer's moments). Tensors NumPy
has no dtype for (bfloat16) travel pickled, as before.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ray import ObjectRef


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        t = tree.detach().cpu()
        return t if t.dtype == torch.bfloat16 else t.numpy()
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_numpy(v) for v in tree)
    return tree


def _to_torch(tree: Any, writable: bool) -> Any:
    if isinstance(tree, np.ndarray):
        with warnings.catch_warnings():  # read-only shared memory: torch warns that writing to it is undefined
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(tree.copy() if writable else tree)
    if isinstance(tree, dict):
        return {k: _to_torch(v, writable) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_torch(v, writable) for v in tree)
    return tree


def put_tensors(tree: Any):
    """`ray.put` of a nested state whose tensors are stored once, in shared memory."""
    import ray

    return ray.put(_to_numpy(tree))


def get_tensors(ref_or_tree: Any, writable: bool = False) -> Any:
    """The state behind `put_tensors`'s ref (or a plain state, unchanged) with torch tensors again: views of the
    shared memory, read-only, unless `writable`."""
    import ray

    tree = ray.get(ref_or_tree) if isinstance(ref_or_tree, ray.ObjectRef) else ref_or_tree
    return _to_torch(tree, writable)


class CarriedState:
    """The state refine carries from one iteration to the next (weights and AdamW's), held in one place at a
    time: this process's memory between iterations; the object store alone while the iteration runs.

    `publish` moves it into the object store and keeps no tensor here, so while the rollout actors and the learner
    read it (gigabytes at the default size) this process adds no second copy; `LearnerGroup.update` then replaces
    it with the new state it copies out. Between iterations `state` is what is kept and, at the end, saved."""

    def __init__(self, state: dict[str, Any]):
        self._state: dict[str, Any] | None = state
        self.weights: ObjectRef | None = None
        self.optimizer: ObjectRef | None = None

    @property
    def state(self) -> dict[str, Any]:
        if self._state is None:
            raise RuntimeError("the state is in the object store while an iteration runs")
        return self._state

    def publish(self) -> ObjectRef:
        """The state into the object store (a ref of the weights for the rollout actors and the learner)."""
        state, self._state = self.state, None
        self.weights = put_tensors(state["model"])
        self.optimizer = put_tensors(state["optimizer"]) if state["optimizer"] is not None else None
        return self.weights

    def replace(self, state: dict[str, Any]) -> None:
        """The new state, here again; the object store's copies are released."""
        self._state, self.weights, self.optimizer = state, None, None
