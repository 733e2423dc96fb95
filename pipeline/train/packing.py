"""Packing soft-target rows into fixed-length training sequences (what a replica trains on).

Rows are laid end to end as one token stream (each already ends in the end-of-turn token) and cut into windows of
`seq_len + 1` tokens, nanoGPT-style: inputs are a window's first `seq_len` tokens, targets its last `seq_len`. A
position keeps its loss mask and, where the row had soft targets, the teacher's top-k ids, log-probs and tail mass,
so position t of a window predicts targets[t] with exactly the targets stored for it. A sample may run on into the
next window; nothing is dropped except the stream's final partial window, which is padded with masked positions.
Windows see the samples before them in the stream as context (the usual cost of packing; attention is not reset).
"""

from __future__ import annotations

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
        tokens[at:at + length] = r["token_ids"]
        m = np.asarray(r["loss_mask"], bool)
        mask[at:at + length] = m
        if len(r["topk_ids"]):
            where = at + np.flatnonzero(m)
            soft[where] = True
            ids[where] = np.asarray(r["topk_ids"])[:, :k]
            lps[where] = np.asarray(r["topk_logprobs"], np.float32)[:, :k]
            tail[where] = np.asarray(r["tail_logmass"], np.float32)
        at += length
    return tokens, mask, soft, ids, lps, tail


def pack(rows: list[dict], seq_len: int, k: int) -> PackedBatch:
    """All `rows` as windows of `seq_len` positions: [B, T] arrays (B = windows)."""
    tokens, mask, soft, ids, lps, tail = _stream(rows, k)
    n_windows = max(1, -(-(len(tokens) - 1) // seq_len))
    size = n_windows * seq_len + 1
    pad = size - len(tokens)
    tokens = np.concatenate([tokens, np.zeros(pad, np.int64)])
    mask = np.concatenate([mask, np.zeros(pad, bool)])
    soft = np.concatenate([soft, np.zeros(pad, bool)])
    ids = np.concatenate([ids, np.zeros((pad, k), np.int64)])
    lps = np.concatenate([lps, np.zeros((pad, k), np.float32)])
    tail = np.concatenate([tail, np.full(pad, -np.inf, np.float32)])
    # window w covers stream positions [w*T, w*T + T]; inputs are its first T tokens, targets the next T; the
    # mask and soft targets stored at stream position i describe token i + 1, so they align with the inputs
    starts = np.arange(n_windows) * seq_len
    idx_BT = starts[:, None] + np.arange(seq_len)[None, :]
    return PackedBatch(tokens[idx_BT], tokens[idx_BT + 1], mask[idx_BT], soft[idx_BT], ids[idx_BT], lps[idx_BT],
                       tail[idx_BT])
