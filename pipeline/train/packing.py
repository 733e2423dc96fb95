"""Packing soft-target rows into fixed-length training sequences (what a replica trains on).

Rows are laid end to end as one token stream (each already ends in the end-of-turn token) and cut into windows of
`seq_len + 1` tokens, nanoGPT-style: inputs are a window's first `seq_len` tokens, targets its last `seq_len`. A
position keeps its loss mask and, where the row had soft targets, the teacher's top-k ids, log-probs and tail mass,
so position t of a window predicts targets[t] with exactly the targets stored for it. A sample may run on into the
next window; nothing is dropped except the stream's final partial window, which is padded with masked positions.
Windows see the samples before them in the stream as context (the usual cost of packing; attention is not reset).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np


@dataclass
class PackedBatch:
    tokens_BT: np.ndarray  # int64 inputs
    targets_BT: np.ndarray  # int64 next tokens
    mask_BT: np.ndarray  # bool: completion positions (where the loss counts)
    soft_BT: np.ndarray  # bool: positions that have teacher targets (a subset of mask)
    topk_ids_BTK: np.ndarray  # int64, zeros where soft is false
    topk_logprobs_BTK: np.ndarray  # float32, zeros where soft is false
    tail_logmass_BT: np.ndarray  # float32, -inf where soft is false


def _stream(rows: list[dict], k: int):
    """Concatenate rows into per-token arrays: token, mask, soft, top-k ids, log-probs, tail."""
    n = sum(len(r["token_ids"]) for r in rows)
    tokens = np.zeros(n, np.int64)
    mask = np.zeros(n, bool)
    soft = np.zeros(n, bool)
    ids = np.zeros((n, k), np.int64)
    lps = np.zeros((n, k), np.float32)
    tail = np.full(n, -np.inf, np.float32)
    at = 0
    for r in rows:
        length = len(r["token_ids"])
        tokens[at : at + length] = r["token_ids"]
        m = np.asarray(r["loss_mask"], bool)
        mask[at : at + length] = m
        if len(r["topk_ids"]):
            where = at + np.flatnonzero(m)
            soft[where] = True
            ids[where] = np.asarray(r["topk_ids"])[:, :k]
            lps[where] = np.asarray(r["topk_logprobs"], np.float32)[:, :k]
            tail[where] = np.asarray(r["tail_logmass"], np.float32)
        at += length
    return tokens, mask, soft, ids, lps, tail


@dataclass
class Window:
    """One training sequence: the `PackedBatch` fields for T positions, and the samples that start in it."""

    tokens_T: np.ndarray
    targets_T: np.ndarray
    mask_T: np.ndarray
    soft_T: np.ndarray
    topk_ids_TK: np.ndarray
    topk_logprobs_TK: np.ndarray
    tail_logmass_T: np.ndarray
    sample_ids: tuple[str, ...]  # rows whose first token is an input of this window (each row has exactly one)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))


def stack(windows: list[Window]) -> PackedBatch:
    """Windows as a [B, T] batch."""
    return PackedBatch(
        *(
            np.stack([getattr(w, f) for w in windows])
            for f in ("tokens_T", "targets_T", "mask_T", "soft_T", "topk_ids_TK", "topk_logprobs_TK", "tail_logmass_T")
        )
    )


class Packer:
    """Rows in, windows out, incrementally: the packing above without holding more than one window's worth of rows.

    `add(row)` appends a row to the token stream and returns the windows it completed (a window needs T + 1
    tokens: its T inputs and the next token as the last target); `finish()` returns the stream's last, partial
    window padded with masked positions (none if nothing is left to predict) and starts a new stream.
    """

    def __init__(self, seq_len: int, k: int):
        self.T, self.k = seq_len, k
        self._reset()

    def _reset(self) -> None:
        self.carry = _stream([], self.k)
        self.offset = 0  # stream position of carry[0]
        self.starts: collections.deque[tuple[int, str]] = collections.deque()  # (stream position, sample id)

    def add(self, row: dict) -> list[Window]:
        self.starts.append((self.offset + len(self.carry[0]), str(row.get("sample_id", ""))))
        self.carry = tuple(np.concatenate([c, r]) for c, r in zip(self.carry, _stream([row], self.k), strict=True))
        out = []
        while len(self.carry[0]) >= self.T + 1:
            out.append(self._cut())
        return out

    def finish(self) -> list[Window]:
        out = []
        if len(self.carry[0]) > 1:  # at least one position still has a next token to predict
            pad = self.T + 1 - len(self.carry[0])
            fill = (
                np.zeros(pad, np.int64),
                np.zeros(pad, bool),
                np.zeros(pad, bool),
                np.zeros((pad, self.k), np.int64),
                np.zeros((pad, self.k), np.float32),
                np.full(pad, -np.inf, np.float32),
            )
            self.carry = tuple(np.concatenate([c, f]) for c, f in zip(self.carry, fill, strict=True))
            out.append(self._cut())
        self._reset()
        return out

    def _cut(self) -> Window:
        # the window covers stream positions [offset, offset + T]; inputs are its first T tokens, targets the next
        # T; the mask and soft targets stored at position i describe token i + 1, so they align with the inputs
        T = self.T
        tokens, mask, soft, ids, lps, tail = self.carry
        started = []
        while self.starts and self.starts[0][0] < self.offset + T:
            started.append(self.starts.popleft()[1])
        window = Window(
            tokens[:T].copy(),
            tokens[1 : T + 1].copy(),
            mask[:T].copy(),
            soft[:T].copy(),
            ids[:T].copy(),
            lps[:T].copy(),
            tail[:T].copy(),
            tuple(started),
        )
        self.carry = tuple(c[T:] for c in self.carry)
        self.offset += T
        return window


def pack(rows: list[dict], seq_len: int, k: int) -> PackedBatch:
    """All `rows` as windows of `seq_len` positions: [B, T] arrays (B = windows)."""
    packer = Packer(seq_len, k)
    windows = [w for r in rows for w in packer.add(r)] + packer.finish()
    return stack(windows)
