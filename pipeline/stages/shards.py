"""Per-partition Parquet shards in a stage's resume space: the unit of retry, resume and output.

A stage that fans partitions out to actors writes each finished partition as `part-NNNNN.parquet` (atomically) in
its resume space. A partition retried after an actor died overwrites its own shard, so nothing is duplicated; a
stage re-run after a crash (same cache key, same resume space) skips the shards already written; at the end all
shards are published into the output artifact in partition order.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import artifacts
from pipeline.artifacts import ArtifactSpec

log = logging.getLogger(__name__)


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class Shards:
    def __init__(self, resume_dir: Path, spec: ArtifactSpec):
        self.dir = Path(resume_dir) / "shards"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spec = spec

    def missing(self, indices: list[int]) -> list[int]:
        """The partitions still to do: no shard, or one that is not a whole Parquet file of this artifact's schema
        (a crash can leave a zero-length or cut-off file behind on some filesystems; it is removed and redone).
        Whole means its footer is there: Parquet writes it last, so a cut-off file has none."""
        todo = []
        for i in indices:
            path = self.dir / shard_name(i)
            if not path.is_file():
                todo.append(i)
            elif (problem := self._damage(path)) is not None:
                log.warning("shard %s is damaged (%s): its partition is done again", path, problem)
                path.unlink()
                todo.append(i)
        return todo

    def _damage(self, path: Path) -> str | None:
        try:
            schema = pq.read_schema(path)  # reads the footer only: a truncated or empty file has none
        except (OSError, pa.ArrowException) as e:
            return str(e).splitlines()[0]
        return None if self.spec.accepts(schema) else "its schema is not the artifact's"

    def write(self, index: int, table: pa.Table) -> None:
        artifacts.write_table(self.dir / shard_name(index), table, self.spec)

    def publish(self, indices: list[int], out_dir: Path) -> int:
        """Copy every shard into the output folder; return their total size in bytes."""
        size = 0
        for i in indices:
            shutil.copy2(self.dir / shard_name(i), Path(out_dir) / shard_name(i))
            size += (self.dir / shard_name(i)).stat().st_size
        return size

    def read(self, indices: list[int]) -> pa.Table:
        """The shards of `indices` as one table, in partition order."""
        return pa.concat_tables([pq.read_table(self.dir / shard_name(i)) for i in indices])
