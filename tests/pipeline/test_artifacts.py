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


def _race_to_publish(dest, writers: int = 6) -> tuple[list, int]:
    """`writers` threads publish one folder at once while a reader checks it stays: (errors, times it was gone)."""
    import threading

    barrier, errors, gone, published = threading.Barrier(writers), [], [], threading.Event()

    def write(n: int) -> None:
        try:
            with artifacts.atomic_path(dest) as tmp:
                tmp.mkdir()
                for i in range(20):
                    (tmp / f"w{i}.bin").write_bytes(bytes([n]) * 1000)
                (tmp / "config.json").write_text(json.dumps({"writer": n}))
                barrier.wait()
            published.set()
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    def read() -> None:
        published.wait(10)
        gone.extend(1 for _ in range(2000) if not (dest / "config.json").is_file())

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors, len(gone)


def test_concurrent_publishers_of_one_folder_all_succeed_and_it_never_disappears(tmp_path):
    """Several actors on one node converting the same teacher / downloading the same model into one cache folder:
    the first to finish publishes it, the others keep that copy, and a reader never finds it gone."""
    for round_ in range(10):
        dest = tmp_path / f"model-{round_}"
        errors, gone = _race_to_publish(dest)
        assert not errors and not gone, (errors, gone)
        writer = json.loads((dest / "config.json").read_text())["writer"]
        assert {(dest / f"w{i}.bin").read_bytes() for i in range(20)} == {bytes([writer]) * 1000}  # one whole copy
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the losers' copies are gone


def test_a_published_file_and_its_folder_entry_are_flushed_to_disk(tmp_path, monkeypatch):
    import os

    real, flushed = os.fsync, []

    def spy(fd):
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    artifacts.write_json(tmp_path / "out.json", {"a": 1})
    tmp_file = next(p for p in flushed if ".out.json.tmp-" in p)
    assert flushed.index(tmp_file) < flushed.index(str(tmp_path))  # the data, then the rename's folder entry
    flushed.clear()
    root, _ = _dataset(tmp_path / "ds")
    assert any(".data.parquet.tmp-" in p for p in flushed) and str(root) in flushed  # Parquet data, then its dir


def test_manifest_entries_that_leave_the_artifact_and_links_are_refused(tmp_path):
    root, _ = _dataset(tmp_path)
    (tmp_path / "outside.txt").write_text("not part of the artifact")
    manifest = json.loads((root / artifacts.MANIFEST).read_text())
    for rel in ("../outside.txt", str(tmp_path / "outside.txt"), "./data.parquet"):
        files = {**manifest["files"], rel: {"bytes": 24, "sha256": artifacts.file_sha256(tmp_path / "outside.txt")}}
        forged = {**manifest, "files": files, "content_hash": artifacts._listing_hash(files)}
        (root / artifacts.MANIFEST).write_text(json.dumps(forged))
        with pytest.raises(ArtifactError, match="not a plain relative path inside the artifact"):
            artifacts.verify(root, "rows")
    (root / artifacts.MANIFEST).unlink()
    (root / "link.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(ArtifactError, match=r"holds symbolic links: link\.txt"):
        artifacts.commit(root, SPEC)


def test_a_nested_file_named_like_the_manifest_is_hashed_like_any_other(tmp_path):
    root, _ = _dataset(tmp_path)
    (root / "sub").mkdir()
    (root / "sub" / artifacts.MANIFEST).write_text("{}")
    digest = artifacts.commit(root, SPEC)
    (root / "sub" / artifacts.MANIFEST).write_text('{"changed": true}')
    with pytest.raises(ArtifactError, match=r"sub/MANIFEST\.json is"):
        artifacts.verify(root, "rows", digest)
