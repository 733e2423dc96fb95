"""Each rank's own rows of the soft-target shards, read straight from the Parquet files: every row to exactly one
rank, once per epoch, in an order fixed by (seed, rank, epoch); a stream restored at a position continues at the
same row; too few rows or a missing folder is a clear error."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.stages.parquet_schemas import soft_targets_schema
from pipeline.train.parquet_rows import RankRows, first_rows, rank_pieces, row_groups
from pipeline.train.stream import WindowStream
from tests.pipeline.train.test_replica import rows


def write_shards(folder: Path, n: int, files: int = 3, row_group_size: int = 7) -> Path:
    """`n` soft-target rows in `files` Parquet shards of row groups of `row_group_size` (plus a non-Parquet file
    the reader must ignore), the layout `distill` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    data = rows(n)
    for f in range(files):
        part = data[n * f // files : n * (f + 1) // files]
        table = pa.Table.from_pylist(part, schema=soft_targets_schema("float32"))
        pq.write_table(table, folder / f"part-{f:05d}.parquet", row_group_size=row_group_size)
    (folder / "meta.json").write_text("{}")
    return folder


def ids(source, epoch: int = 0) -> list[str]:
    return [r["sample_id"] for r in source(epoch)]


def test_every_row_goes_to_exactly_one_rank_and_shares_differ_by_at_most_one(tmp_path):
    folder = write_shards(tmp_path / "st", 100)
    _, groups = row_groups(str(folder))
    assert len(groups) > 3  # several row groups per file: ranks' shares cut through them
    for world in (1, 2, 3, 7):
        shares = [ids(RankRows(str(folder), rank, world)) for rank in range(world)]
        assert sorted(i for share in shares for i in share) == [f"s{i:04d}" for i in range(100)]
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_the_piece_order_is_fixed_by_seed_rank_and_epoch(tmp_path):
    folder = str(write_shards(tmp_path / "st", 100, row_group_size=5))
    a, b = RankRows(folder, 1, 2, seed=3), RankRows(folder, 1, 2, seed=3)
    assert ids(a, 0) == ids(b, 0) and ids(a, 1) == ids(b, 1)  # a restarted worker reads the same order
    assert ids(a, 0) != ids(a, 1) and sorted(ids(a, 0)) == sorted(ids(a, 1))  # each epoch its own order, same rows
    assert ids(RankRows(folder, 1, 2, seed=4), 0) != ids(a, 0)


def test_skipped_rows_are_read_but_not_returned(tmp_path):
    folder = str(write_shards(tmp_path / "st", 60))
    held = {f"s{i:04d}" for i in range(0, 60, 5)}
    train = [ids(RankRows(folder, r, 2, keep=lambda row: row["sample_id"] not in held)) for r in range(2)]
    assert sorted(train[0] + train[1]) == sorted({f"s{i:04d}" for i in range(60)} - held)
    val = first_rows(folder, lambda row: row["sample_id"] in held, limit=4)
    assert [r["sample_id"] for r in val] == sorted(held)[:4]


def test_a_stream_restored_at_a_position_continues_at_the_same_row(tmp_path):
    folder = str(write_shards(tmp_path / "st", 80, row_group_size=4))
    straight = WindowStream(RankRows(folder, 0, 2, seed=1), seq_len=16, k=3, buffer_windows=3, seed=1)
    windows, positions = [], []
    for _ in range(40):  # past the end of epoch 0
        windows.append(straight.next_window().sample_ids)
        positions.append((straight.epoch, straight.position))
    assert straight.epoch >= 1
    for i in (5, 33):  # a checkpoint in epoch 0, and one in epoch 1
        resumed = WindowStream(RankRows(folder, 0, 2, seed=1), seq_len=16, k=3, buffer_windows=3, seed=1)
        resumed.seek(*positions[i])
        assert [resumed.next_window().sample_ids for _ in range(6)] == windows[i + 1 : i + 7]


def test_fewer_rows_than_ranks_and_a_missing_folder_are_named(tmp_path):
    folder = str(write_shards(tmp_path / "st", 2, files=1))
    with pytest.raises(ValueError, match=r"2 rows, fewer than train.num_workers \(3\)"):
        rank_pieces(row_groups(folder)[1], 0, 3)
    with pytest.raises(FileNotFoundError, match="soft targets not found"):
        RankRows(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.parquet files"):
        RankRows(str(tmp_path / "empty"))
