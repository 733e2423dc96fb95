"""The streamed input of a replica: rows packed on the fly through a bounded shuffle buffer, every row once per
epoch, and a resumed stream continuing at exactly the window (and rows) it stopped at. Without Ray here; the Ray
Data shard feeding it: tests/actors/test_trainer.py."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from pipeline.train.packing import pack
from pipeline.train.stream import WindowStream, buffer_windows, window_bytes


def rows(n: int, seed: int = 0) -> list[dict]:
    """Rows of varying length, some spanning several windows, each with its id."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(4, 40))
        start = int(rng.integers(1, length - 1))
        mask = [False] * start + [True] * (length - start)
        out.append(
            {
                "sample_id": f"s{i:04d}",
                "token_ids": rng.integers(0, 97, length).tolist(),
                "loss_mask": mask,
                "topk_ids": [[1, 2, 3]] * sum(mask),
                "topk_logprobs": [[-0.1, -3.0, -4.0]] * sum(mask),
                "tail_logmass": [-2.5] * sum(mask),
            }
        )
    return out


def test_every_row_once_per_epoch_through_a_buffer_many_times_smaller_than_the_data():
    data = rows(300)
    stream = WindowStream(lambda epoch: data, seq_len=16, k=3, buffer_windows=4, seed=1)
    total_windows = len(pack(data, 16, 3).tokens_BT)
    assert total_windows >= 25 * stream.capacity  # the data is far larger than what the buffer may hold
    for _ in range(3):  # three epochs: each row exactly once in each, in a different order
        counts = collections.Counter()
        while True:  # windows of this epoch, one at a time
            w = stream.next_window()
            counts.update(w.sample_ids)
            if stream.position == total_windows:
                break
        assert counts == collections.Counter(r["sample_id"] for r in data)
    assert stream.epoch == 2 and stream.peak_buffered == stream.capacity


def test_the_windows_are_the_packed_rows_in_a_shuffled_order():
    data = rows(60)
    packed = pack(data, 16, 3)
    stream = WindowStream(lambda epoch: data, seq_len=16, k=3, buffer_windows=3)
    streamed = [stream.next_window() for _ in range(len(packed.tokens_BT))]
    key = lambda tokens, mask: (tuple(tokens), tuple(mask))
    assert sorted(key(w.tokens_T, w.mask_T) for w in streamed) == sorted(
        key(t, m) for t, m in zip(packed.tokens_BT, packed.mask_BT, strict=True)
    )
    assert [w.tokens_T.tolist() for w in streamed] != packed.tokens_BT.tolist()  # shuffled within the buffer


def test_a_stream_restored_at_its_position_continues_exactly():
    data = rows(120, seed=3)
    first = WindowStream(lambda epoch: data, seq_len=16, k=3, buffer_windows=5, seed=7, rank=1)
    per_epoch = len(pack(data, 16, 3).tokens_BT)
    for _ in range(3 * per_epoch // 4):  # 1.5 epochs of windows, two a batch: mid-way through the second epoch
        first.next_batch(2)
    at = (first.epoch, first.position)
    assert at[0] == 1 and at[1] > 0
    rest = [(first.next_batch(2), first.last_sample_ids) for _ in range(10)]
    again = WindowStream(lambda epoch: data, seq_len=16, k=3, buffer_windows=5, seed=7, rank=1)  # a new process
    again.seek(*at)
    for batch, ids in rest:
        replay = again.next_batch(2)
        for f in vars(batch):
            np.testing.assert_array_equal(getattr(batch, f), getattr(replay, f))
        assert again.last_sample_ids == ids  # the same rows, not merely the same shapes
    assert (again.epoch, again.position) == (first.epoch, first.position)


def test_a_position_the_rows_cannot_reach_is_a_clear_error_and_no_rows_is_one_too():
    stream = WindowStream(lambda epoch: rows(3), seq_len=16, k=3, buffer_windows=2)
    with pytest.raises(ValueError, match="cannot resume at window 99 of epoch 0"):
        stream.seek(0, 99)
    with pytest.raises(ValueError, match="received no soft-target rows"):
        WindowStream(lambda epoch: [], seq_len=16, k=3, buffer_windows=2).next_window()


def test_the_buffer_cap_counts_window_bytes_and_holds_at_least_a_batch():
    assert window_bytes(256, 20) == 256 * (18 + 12 * 20 + 4)
    stream = WindowStream(lambda epoch: rows(20), seq_len=16, k=3, buffer_windows=2)
    assert stream.next_window().nbytes == window_bytes(16, 3)
    assert buffer_windows(64 * 2**20, 256, 20, 8) == 64 * 2**20 // (256 * 262)
    assert buffer_windows(1, 256, 20, 8) == 8
