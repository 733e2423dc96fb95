"""Packing rows into fixed windows keeps every completion position with its own soft targets."""

from __future__ import annotations

import numpy as np

from pipeline.distill.targets import loss_mask
from pipeline.train.packing import pack


def _row(tokens, start, k=3, soft=True):
    mask = loss_mask(len(tokens), start)
    nxt = [tokens[i + 1] for i, m in enumerate(mask) if m]
    return {
        "token_ids": tokens,
        "loss_mask": mask,
        # top-1 is the true next token, the others are markers, so alignment is checkable
        "topk_ids": [[t, 900 + t, 950] for t in nxt] if soft else [],
        "topk_logprobs": [[-0.1, -3.0, -4.0]] * len(nxt) if soft else [],
        "tail_logmass": [-2.5] * len(nxt) if soft else [],
    }


def test_windows_keep_every_completion_position_aligned():
    rows = [_row(list(range(10, 17)), 4), _row(list(range(20, 31)), 6, soft=False), _row(list(range(40, 45)), 2)]
    b = pack(rows, seq_len=6, k=3)
    total = sum(len(r["token_ids"]) for r in rows)  # 23 tokens -> 22 predictions -> 4 windows of 6
    assert b.tokens_BT.shape == (4, 6) and b.topk_ids_BTK.shape == (4, 6, 3)
    assert b.mask_BT.sum() == sum(sum(r["loss_mask"]) for r in rows)  # nothing dropped
    stream = np.concatenate([r["token_ids"] for r in rows])
    np.testing.assert_array_equal(b.tokens_BT.reshape(-1)[: total - 1], stream[:-1])
    np.testing.assert_array_equal(b.targets_BT.reshape(-1)[: total - 1], stream[1:])
    soft = b.soft_BT
    assert soft.sum() == sum(len(r["topk_ids"]) for r in rows) and not (soft & ~b.mask_BT).any()
    np.testing.assert_array_equal(b.topk_ids_BTK[soft][:, 0], b.targets_BT[soft])
    np.testing.assert_array_equal(b.topk_ids_BTK[soft][:, 1], b.targets_BT[soft] + 900)
    assert (b.tail_logmass_BT[soft] == -2.5).all() and np.isinf(b.tail_logmass_BT[~soft]).all()
    assert not b.mask_BT.reshape(-1)[total - 1 :].any()  # padding of the last window never counts
