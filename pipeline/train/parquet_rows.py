"""Each training rank reads its own rows of the soft-target Parquet shards, straight from the store.

The shards (every `*.parquet` file under the artifact's folder, in path order) are numbered row by row; rank r of
W owns the contiguous range `[n*r/W, n*(r+1)/W)` of the n rows, so every row belongs to exactly one rank, shards
differ by at most one row and the split depends on nothing but the files and W. A rank's range is cut into
*pieces*, one per row group it overlaps (a row group is Parquet's unit of reading); each epoch the rank reads its
pieces in an order drawn from (seed, rank, epoch), a few hundred rows at a time. Nothing is gathered on the driver
or put in Ray's object store: a worker holds one record batch, plus what its shuffle buffer holds
(`stream.py`). The resume position is the window count of `WindowStream`: the same (seed, rank, epoch) give the
same piece order, so a restarted rank skips to exactly the row it stopped at.

The files are opened through pyarrow's filesystems (`pyarrow.fs.FileSystem.from_uri`): a local folder, or an
`s3://` (MinIO, AWS), `gs://` or `hdfs://` URI with the credentials of the worker's environment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq


@dataclass(frozen=True)
class Piece:
    """Rows `[start, stop)` of row group `row_group` of file `path`."""

    path: str
    row_group: int
    start: int
    stop: int


def _files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    fs, base = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(
            f"soft targets not found at {uri} (on this node: a local folder must be on storage every worker sees)"
        )
    if info.type == pafs.FileType.File:
        return fs, [base]
    found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    paths = sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
    if not paths:
        raise FileNotFoundError(f"no .parquet files under {uri}")
    return fs, paths


def row_groups(uri: str) -> tuple[pafs.FileSystem, list[tuple[str, int, int]]]:
    """The filesystem and every (file, row group, rows) of the shards, in path order (footers only are read)."""
    fs, paths = _files(uri)
    groups = []
    for path in paths:
        meta = pq.ParquetFile(path, filesystem=fs).metadata
        groups += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    return fs, groups


def rank_pieces(groups: list[tuple[str, int, int]], rank: int, world: int) -> list[Piece]:
    """Rank `rank`'s contiguous share of the rows, as slices of the row groups it overlaps."""
    n = sum(rows for _, _, rows in groups)
    if n < world:
        raise ValueError(
            f"the soft targets have {n} rows, fewer than train.num_workers ({world}): "
            "every worker needs at least one sample"
        )
    lo, hi = n * rank // world, n * (rank + 1) // world
    pieces, offset = [], 0
    for path, group, rows in groups:
        start, stop = max(lo, offset), min(hi, offset + rows)
        if start < stop:
            pieces.append(Piece(path, group, start - offset, stop - offset))
        offset += rows
    return pieces


class RankRows:
    """One rank's rows of the shards under `uri`, one epoch per call, in a seeded piece order.

    Args:
        uri: the soft-target folder (local path or a pyarrow filesystem URI).
        rank, world: this worker's rank and the number of workers.
        seed: with (rank, epoch), the order the rank's pieces are read in.
        keep: rows it returns False for are skipped (the held-out share; `split.is_held_out`).
        rows_per_read: rows decoded at a time.
    """

    def __init__(
        self,
        uri: str,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        keep: Callable[[dict], bool] | None = None,
        rows_per_read: int = 256,
    ):
        self.uri, self.rank, self.seed, self.keep, self.rows_per_read = uri, rank, seed, keep, rows_per_read
        self.fs, groups = row_groups(uri)
        self.pieces = rank_pieces(groups, rank, world)
        self.rows_read = 0  # rows decoded so far, skipped ones included (observable in tests and benchmarks)

    def order(self, epoch: int) -> list[Piece]:
        rng = np.random.default_rng([self.seed, self.rank, epoch, 0x5EED])
        return [self.pieces[i] for i in rng.permutation(len(self.pieces))]

    def __call__(self, epoch: int = 0) -> Iterator[dict]:
        for piece in self.order(epoch):
            yield from self._read(piece)

    def _read(self, piece: Piece) -> Iterator[dict]:
        file = pq.ParquetFile(piece.path, filesystem=self.fs)
        offset = 0
        for batch in file.iter_batches(batch_size=self.rows_per_read, row_groups=[piece.row_group]):
            lo, hi = max(piece.start - offset, 0), min(piece.stop - offset, batch.num_rows)
            offset += batch.num_rows
            if lo < hi:
                rows = batch.slice(lo, hi - lo).to_pylist()
                self.rows_read += len(rows)
                yield from (r for r in rows if self.keep is None or self.keep(r))
            if offset >= piece.stop:
                return


def first_rows(uri: str, keep: Callable[[dict], bool], limit: int) -> list[dict]:
    """Up to `limit` rows `keep` accepts, in file order (rank 0's held-out rows for the validation loss)."""
    out: list[dict] = []
    reader = RankRows(uri, keep=keep)
    for piece in reader.pieces:
        for row in reader._read(piece):
            out.append(row)
            if len(out) >= limit:
                return out
    return out
