from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from pipeline import artifacts
from pipeline.artifacts import ArtifactError, ArtifactSpec

SPEC = ArtifactSpec("rows", "dataset", pa.schema([("id", pa.int64()), ("text", pa.string())]))


def _dataset(tmp_path, n=100):
    root = tmp_path / "rows"
    table = pa.table({"id": list(range(n)), "text": [f"t{i}" for i in range(n)]})
    artifacts.write_table(root / "data.parquet", table, SPEC)
    return root, artifacts.commit(root, SPEC)


def test_round_trip_and_stable_hash(tmp_path):
    root, digest = _dataset(tmp_path)
    table = artifacts.read_table(root, SPEC, digest)
    assert table.column("id").to_pylist() == list(range(100))
    assert artifacts.commit(root, SPEC) == digest  # content-addressed: same bytes, same hash
    other, _ = _dataset(tmp_path / "b", n=99)
    assert artifacts.verify(other, "rows")["content_hash"] != digest


def test_corrupt_byte_is_detected_and_named(tmp_path):
    root, digest = _dataset(tmp_path)
    path = root / "data.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"artifact 'rows': file data.parquet is corrupt"):
        artifacts.read_table(root, SPEC, digest)


def test_truncation_is_detected(tmp_path):
    root, digest = _dataset(tmp_path)
    path = root / "data.parquet"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"data.parquet is truncated"):
        artifacts.verify(root, "rows", digest)


def test_uncommitted_missing_or_foreign_files_are_refused(tmp_path):
    root = tmp_path / "rows"
    artifacts.write_table(root / "data.parquet", pa.table({"id": [1], "text": ["a"]}), SPEC)
    with pytest.raises(ArtifactError, match="never committed"):
        artifacts.verify(root, "rows")
    digest = artifacts.commit(root, SPEC)
    (root / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"files not in its manifest: extra.bin"):
        artifacts.verify(root, "rows", digest)
    (root / "extra.bin").unlink()
    with pytest.raises(ArtifactError, match="is not the"):
        artifacts.verify(root, "rows", "0" * 64)
    manifest = json.loads((root / artifacts.MANIFEST).read_text())
    manifest["files"]["data.parquet"]["bytes"] += 1  # a manifest edited by hand no longer matches its own hash
    (root / artifacts.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not match its own content hash"):
        artifacts.verify(root, "rows")


def test_schema_is_enforced_on_write_and_commit(tmp_path):
    with pytest.raises(ArtifactError, match="does not fit the declared schema"):
        artifacts.write_table(tmp_path / "x.parquet", pa.table({"id": ["not an int"], "text": ["a"]}), SPEC)
    import pyarrow.parquet as pq

    root = tmp_path / "rows"
    root.mkdir()
    pq.write_table(pa.table({"id": [1], "other": [2.0]}), root / "data.parquet")
    with pytest.raises(ArtifactError, match=r"does not match the declared schema \(other: expected absent"):
        artifacts.commit(root, SPEC)
    assert not (root / artifacts.MANIFEST).exists()


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    dest = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError), artifacts.atomic_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with artifacts.atomic_path(dest) as tmp:
        tmp.write_bytes(b"whole")
    assert dest.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_checkpoint_round_trip(tmp_path):
    spec = ArtifactSpec("student", "checkpoint")
    tensors = {"w": torch.randn(4, 3), "b": torch.arange(3, dtype=torch.int32)}
    artifacts.write_checkpoint(tmp_path / "ck", tensors, {"dim": 4})
    digest = artifacts.commit(tmp_path / "ck", spec)
    loaded, config = artifacts.read_checkpoint(tmp_path / "ck", "student", digest)
    assert config == {"dim": 4} and torch.equal(loaded["w"], tensors["w"]) and torch.equal(loaded["b"], tensors["b"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"needs config.json and"):
        artifacts.commit(tmp_path / "bad", spec)
