"""Where the training workers read the soft targets: in place on one node; on several, copied once beside the
checkpoints (the storage every worker reaches), reused by a rerun, and redone whole when a copy was cut short."""

from __future__ import annotations

import pytest

from pipeline.stages.train import training_input
from pipeline.train.parquet_rows import RankRows
from tests.pipeline.train.test_parquet_rows import ids, write_shards

pytestmark = pytest.mark.timeout(60)


def test_one_node_reads_the_stage_copy_in_place(tmp_path):
    source = write_shards(tmp_path / "soft_targets", 30)
    assert training_input(source, str(tmp_path / "ckpt"), "train-x", nodes=1) == str(source)
    assert not (tmp_path / "ckpt").exists()


def test_several_nodes_read_a_copy_beside_the_checkpoints_made_once(tmp_path):
    source = write_shards(tmp_path / "soft_targets", 30)
    (source / "tokenizer").mkdir()
    (source / "tokenizer" / "vocab.json").write_text("{}")
    data = training_input(source, f"file://{tmp_path}/ckpt", "train-x", nodes=2)
    assert data == str(tmp_path / "ckpt" / "train-x" / "soft_targets")
    assert sorted(ids(RankRows(data))) == sorted(ids(RankRows(str(source))))  # every row, nothing else
    copied = tmp_path / "ckpt" / "train-x" / "soft_targets" / "part-00000.parquet"
    stamp = copied.stat().st_mtime_ns
    assert training_input(source, str(tmp_path / "ckpt"), "train-x", nodes=2) == data
    assert copied.stat().st_mtime_ns == stamp  # a rerun reuses the finished copy


def test_a_copy_cut_short_is_redone(tmp_path):
    source = write_shards(tmp_path / "soft_targets", 30)
    partial = tmp_path / "ckpt" / "train-x" / "soft_targets"
    partial.mkdir(parents=True)
    (partial / "part-00000.parquet").write_bytes(b"PAR1 cut short")  # no _COPIED marker: the copy died
    data = training_input(source, str(tmp_path / "ckpt"), "train-x", nodes=2)
    assert sorted(ids(RankRows(data))) == sorted(ids(RankRows(str(source))))
    assert (partial / "_COPIED").exists()
