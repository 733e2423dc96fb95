"""Shards: one file per partition, overwritten on retry, skipped on resume, published in partition order."""

from __future__ import annotations

import pyarrow as pa

from pipeline.artifacts import ArtifactSpec
from pipeline.stages.shards import Shards, shard_name

SPEC = ArtifactSpec("t", "dataset", pa.schema([("partition", pa.int32()), ("x", pa.int64())]))


def table(partition, *xs):
    return pa.table({"partition": pa.array([partition] * len(xs), pa.int32()), "x": pa.array(xs, pa.int64())})


def test_retry_overwrites_resume_skips_publish_orders(tmp_path):
    shards = Shards(tmp_path / "resume", SPEC)
    shards.write(1, table(1, 10, 11))
    shards.write(1, table(1, 10, 11))  # a retried partition: the same file again, not a second one
    assert shards.missing([0, 1, 2]) == [0, 2]
    again = Shards(tmp_path / "resume", SPEC)  # a later attempt of the same stage sees what is done
    again.write(2, table(2, 20))
    again.write(0, table(0, 0))
    assert again.missing([0, 1, 2]) == []
    out = tmp_path / "out"
    out.mkdir()
    size = again.publish([0, 1, 2], out)
    assert sorted(p.name for p in out.iterdir()) == [shard_name(i) for i in range(3)]
    assert size == sum(p.stat().st_size for p in out.iterdir())
    assert again.read([0, 1, 2])["x"].to_pylist() == [0, 10, 11, 20]


def test_a_damaged_shard_is_not_counted_as_done_on_resume(tmp_path):
    """What a crash can leave on some filesystems: a zero-length file, a cut-off one, or a file of another schema."""
    import pyarrow.parquet as pq

    shards = Shards(tmp_path / "resume", SPEC)
    for i in range(4):
        shards.write(i, table(i * 10, 10))
    (shards.dir / shard_name(0)).write_bytes(b"")
    whole = (shards.dir / shard_name(1)).read_bytes()
    (shards.dir / shard_name(1)).write_bytes(whole[: len(whole) // 2])
    pq.write_table(pa.table({"other": [1]}), shards.dir / shard_name(2))
    again = Shards(tmp_path / "resume", SPEC)
    assert again.missing(list(range(4))) == [0, 1, 2]
    assert sorted(p.name for p in again.dir.iterdir()) == [shard_name(3)]  # the damaged ones are gone
