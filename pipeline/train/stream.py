"""A replica's training input as a stream: its rows, packed on the fly, through a bounded shuffle buffer.

The rows of one replica come in an order fixed by its epoch (its share of the soft-target shards, read row group
by row group in a seeded order by `parquet_rows.RankRows`; a list in tests). They are packed into windows as they
arrive (`packing.Packer`), and windows pass through a shuffle buffer of at most `buffer_windows`: once it is full,
each window handed out is drawn at random from it (seeded by (seed, rank, epoch)) and its place taken by the next
window packed; at the end of the rows the buffer drains in random order. Memory is bounded by the buffer, the rows
of one window and one input block, not by the dataset. An epoch ends when rows and buffer are exhausted; the next
epoch reads the rows again, in that epoch's order, with the next seed. No window is dropped (the last partial one
is padded), so every row is trained on once per epoch.

The position is (epoch, windows handed out in it), part of the checkpoint: a replica restored from it reads its
epoch again from the start and skips that many windows through the same buffer without training on them, so it
continues at exactly the window, and the rows, it would have trained on next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from pipeline.train.packing import PackedBatch, Packer, Window, stack

RowSource = Callable[[int], Iterable[dict]]  # one pass over the rows for an epoch, the same for the same epoch


def window_bytes(seq_len: int, k: int) -> int:
    """Bytes one packed window holds (what the shuffle buffer's memory cap is counted in)."""
    per_position = 8 + 8 + 1 + 1 + 8 * k + 4 * k + 4  # tokens, targets, mask, soft, top-k ids, log-probs, tail
    return seq_len * per_position


def buffer_windows(buffer_bytes: int, seq_len: int, k: int, batch_size: int) -> int:
    """Windows a buffer of `buffer_bytes` holds; at least one batch, whatever the cap."""
    return max(batch_size, buffer_bytes // window_bytes(seq_len, k))


class WindowStream:
    """Batches of windows from `rows`, epoch after epoch, with a resumable position.

    Args:
        rows: a function of the epoch returning one pass over this replica's rows (the same for the same epoch).
        seq_len, k: window length and the soft targets' top-k.
        buffer_windows: the shuffle buffer's capacity, in windows.
        seed, rank: the shuffle's seed, per replica.
    """

    def __init__(self, rows: RowSource, seq_len: int, k: int, buffer_windows: int, seed: int = 0, rank: int = 0):
        if buffer_windows < 1:
            raise ValueError(f"the shuffle buffer must hold at least one window, not {buffer_windows}")
        self.rows, self.seq_len, self.k = rows, seq_len, k
        self.capacity, self.seed, self.rank = buffer_windows, seed, rank
        self.epoch, self.position = 0, 0
        self.peak_buffered = 0  # most windows held at once (the memory bound is observable)
        self.last_batch: list[tuple[int, tuple[str, ...]]] = []  # (epoch, rows starting in it) per window
        self.rows_trained: dict[int, int] = {}  # per epoch, rows starting in the windows handed out by this process
        self._windows: Iterator[Window] | None = None

    def _epoch_windows(self, epoch: int) -> Iterator[Window]:
        rng = np.random.default_rng([self.seed, self.rank, epoch])
        packer, buffer = Packer(self.seq_len, self.k), list[Window]()

        def packed() -> Iterator[Window]:
            for row in self.rows(epoch):
                yield from packer.add(row)
            yield from packer.finish()

        for window in packed():
            if len(buffer) < self.capacity:
                buffer.append(window)
                self.peak_buffered = max(self.peak_buffered, len(buffer))
                continue
            i = int(rng.integers(len(buffer)))
            out, buffer[i] = buffer[i], window
            yield out
        while buffer:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()

    def seek(self, epoch: int, position: int) -> None:
        """Continue at window `position` of `epoch` (what a checkpoint recorded)."""
        self.epoch, self.position = epoch, 0
        self._windows = self._epoch_windows(epoch)
        for _ in range(position):
            if next(self._windows, None) is None:
                raise ValueError(
                    f"cannot resume at window {position} of epoch {epoch}: this replica's rows give "
                    f"only {self.position} windows per epoch (a different dataset or split?)"
                )
            self.position += 1

    def next_window(self) -> Window:
        if self._windows is None:
            self.seek(self.epoch, self.position)
        assert self._windows is not None  # seek set it
        window = next(self._windows, None)
        if window is None:  # the epoch is over: the rows again, with the next epoch's shuffle
            if self.position == 0:
                raise ValueError(f"training replica {self.rank} received no soft-target rows")
            self.epoch, self.position = self.epoch + 1, 0
            self._windows = self._epoch_windows(self.epoch)
            window = next(self._windows)
        self.position += 1
        return window

    @property
    def last_sample_ids(self) -> tuple[str, ...]:
        """The rows starting in the last batch's windows."""
        return tuple(s for _, ids in self.last_batch for s in ids)

    def next_batch(self, size: int) -> PackedBatch:
        windows, self.last_batch = [], []
        for _ in range(size):
            windows.append(self.next_window())
            self.last_batch.append((self.epoch, windows[-1].sample_ids))
            self.rows_trained[self.epoch] = self.rows_trained.get(self.epoch, 0) + len(windows[-1].sample_ids)
        return stack(windows)
