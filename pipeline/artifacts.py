"""Artifacts: what flows between stages.

An artifact is a folder of files plus a `MANIFEST.json` that lists every file's size and sha256 and the
artifact's content hash (a hash of that listing). The manifest is written last, so a folder without one was never
committed. Readers verify sizes and hashes against the manifest, and the manifest against the hash the consumer
expects, so a corrupt or truncated artifact is an error that names it, never a silently wrong result.

Datasets are Parquet with a schema declared per artifact type (`ArtifactSpec`); checkpoints are safetensors plus a
JSON config. Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt, truncated or of the wrong schema; the message names it and the file."""


@dataclass(frozen=True)
class ArtifactSpec:
    """The declared type of an artifact that a stage produces.

    Attributes:
        name: the artifact's name, unique in a pipeline (a stage output and the matching downstream input).
        kind: `dataset` (Parquet files with `schema`), `checkpoint` (safetensors + config.json) or `files`.
        schema: for datasets, the exact Arrow schema every Parquet file must have.
        variants: other exact schemas a file may have instead (a column type chosen by config, e.g. float16 or
            float32 log-probabilities); every file of one artifact is still checked against the declared set.
        description: one line for `moeforge stages`.
    """

    name: str
    kind: Literal["dataset", "checkpoint", "files"] = "files"
    schema: pa.Schema | None = None
    description: str = ""
    variants: tuple[pa.Schema, ...] = ()

    def accepts(self, schema: pa.Schema) -> bool:
        return any(schema.equals(s, check_metadata=False) for s in (self.schema, *self.variants) if s is not None)

    @property
    def dataset_schema(self) -> pa.Schema:
        """The declared schema of a dataset artifact (every dataset has one: checked at construction)."""
        if self.schema is None:
            raise ArtifactError(f"artifact {self.name!r} is {self.kind}, not a dataset: it has no Parquet schema")
        return self.schema

    def __post_init__(self) -> None:
        if self.kind == "dataset" and self.schema is None:
            raise ValueError(f"dataset artifact {self.name!r} needs a declared schema")


@dataclass(frozen=True)
class ArtifactRef:
    """A committed artifact: where it lives (an MLflow artifact URI), its content hash, and the stage run that
    produced it (so a consumer can reach what that run logged beside it, e.g. the MLflow model of `train`)."""

    name: str
    uri: str
    hash: str
    run_id: str = ""


# ---------------------------------------------------------------------------------------------------- hashing


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _listing(root: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p != root / MANIFEST):
        rel = path.relative_to(root).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return files


def _listing_hash(files: dict[str, dict[str, Any]]) -> str:
    blob = json.dumps(files, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def content_hash(root: Path) -> str:
    """The content hash of a folder as it is now: every file's path, size and sha256 (a manifest excluded)."""
    return _listing_hash(_listing(Path(root)))


# ---------------------------------------------------------------------------------------------------- atomic writes


def fsync_tree(path: Path) -> None:
    """Flush a file, or a folder's files and folders, to disk (so a rename published after it never exposes a
    zero-length or partly written file after a crash or power loss)."""
    path = Path(path)
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file() and not child.is_symlink():
                _fsync(child)
        for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _fsync(d)
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is flushed to disk and renamed onto `dest`, on error removed.

    Works for a file or a folder written at the yielded path. The rename is atomic on one filesystem, so a reader
    sees either nothing or the whole thing, and the parent folder is flushed after it so the rename survives a crash.
    A file replaces an older `dest`. A folder is published first-writer-wins: if another writer (an actor on the
    same node converting the same teacher, downloading the same model) published `dest` meanwhile, that copy is
    kept and this one discarded, so a reader never sees `dest` disappear. A caller that wants to replace a stale
    folder removes it first.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        fsync_tree(tmp)
        if tmp.is_dir():
            try:
                os.rename(tmp, dest)  # fails on a non-empty folder: it is never replaced
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not dest.is_dir():
                    raise
                log.info("%s was published by another writer first; keeping that copy", dest)
        else:
            os.replace(tmp, dest)
        _fsync(dest.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: Path, data: Any) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))


def _inside(root: Path, rel: str, name: str) -> Path:
    """`root / rel` for a manifest entry, refused unless it is a plain relative path that stays inside `root`."""
    pure = Path(rel)
    if not rel or pure.is_absolute() or ".." in pure.parts or rel != pure.as_posix():
        raise ArtifactError(
            f"artifact {name!r} at {root}: manifest entry {rel!r} is not a plain relative path inside the artifact"
        )
    path = root / pure
    if path.is_symlink() or not path.resolve().is_relative_to(root.resolve()):
        raise ArtifactError(f"artifact {name!r} at {root}: manifest entry {rel!r} leads outside the artifact")
    return path


def commit(root: Path, spec: ArtifactSpec) -> str:
    """Validate a finished artifact folder against its spec, write its manifest last; return its content hash."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"artifact {spec.name!r}: {root} was not written")
    links = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_symlink())
    if links:  # a link's target is outside what the manifest can vouch for
        raise ArtifactError(f"artifact {spec.name!r}: {root} holds symbolic links: {', '.join(links)}")
    files = _listing(root)
    if not files:
        raise ArtifactError(f"artifact {spec.name!r}: {root} is empty")
    if spec.kind == "dataset":
        parquet = [f for f in files if f.endswith(".parquet")]
        if not parquet:
            raise ArtifactError(f"dataset artifact {spec.name!r} holds no Parquet file")
        for rel in parquet:
            _check_schema(spec, root / rel)
    elif spec.kind == "checkpoint":
        missing = [f for f in ("config.json",) if f not in files]
        if missing or not any(f.endswith(".safetensors") for f in files):
            raise ArtifactError(f"checkpoint artifact {spec.name!r} needs config.json and *.safetensors")
    content_hash = _listing_hash(files)
    write_json(
        root / MANIFEST, {"artifact": spec.name, "kind": spec.kind, "content_hash": content_hash, "files": files}
    )
    return content_hash


def verify(root: Path, name: str, expected_hash: str | None = None) -> dict[str, Any]:
    """Check a committed artifact folder file by file; return its manifest or raise `ArtifactError`."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"artifact {name!r} at {root}: no {MANIFEST}, so it was never committed")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise ArtifactError(f"artifact {name!r} at {root}: unreadable {MANIFEST} ({e})") from None
    if _listing_hash(files) != manifest.get("content_hash"):
        raise ArtifactError(f"artifact {name!r} at {root}: {MANIFEST} does not match its own content hash")
    if expected_hash is not None and manifest["content_hash"] != expected_hash:
        raise ArtifactError(
            f"artifact {name!r} at {root}: content hash {manifest['content_hash'][:12]} is not the "
            f"{expected_hash[:12]} recorded when it was produced"
        )
    for rel, meta in files.items():
        path = _inside(root, rel, name)
        if not path.is_file():
            raise ArtifactError(f"artifact {name!r}: file {rel} is missing from {root}")
        size = path.stat().st_size
        if size != meta["bytes"]:
            state = "truncated" if size < meta["bytes"] else "grown"
            raise ArtifactError(f"artifact {name!r}: file {rel} is {state}: {size} bytes, expected {meta['bytes']}")
        if file_sha256(path) != meta["sha256"]:
            raise ArtifactError(f"artifact {name!r}: file {rel} is corrupt: its sha256 differs from the manifest")
    extra = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p != root / MANIFEST and p.relative_to(root).as_posix() not in files
    )
    if extra:
        raise ArtifactError(f"artifact {name!r} at {root}: files not in its manifest: {', '.join(extra)}")
    return manifest


# ---------------------------------------------------------------------------------------------------- datasets


def _check_schema(spec: ArtifactSpec, path: Path) -> None:
    schema = pq.read_schema(path)
    if not spec.accepts(schema):
        want = {f.name: str(f.type) for f in spec.dataset_schema}
        got = {f.name: str(f.type) for f in schema}
        diffs = [
            f"{k}: expected {want.get(k, 'absent')}, found {got.get(k, 'absent')}"
            for k in sorted(set(want) | set(got))
            if want.get(k) != got.get(k)
        ]
        raise ArtifactError(
            f"dataset artifact {spec.name!r}: {path.name} does not match the declared schema"
            + (f" ({'; '.join(diffs)})" if diffs else " (field order or nullability differs)")
        )


def write_table(path: Path, table: pa.Table, spec: ArtifactSpec) -> None:
    """Write one Parquet file of a dataset artifact atomically, after checking the declared schema."""
    if spec.schema is not None and not spec.accepts(table.schema):
        try:
            table = table.cast(spec.schema)
        except (pa.ArrowInvalid, ValueError) as e:
            raise ArtifactError(
                f"dataset artifact {spec.name!r}: table does not fit the declared schema: {e}"
            ) from None
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, tmp)


def read_table(root: Path, spec: ArtifactSpec, expected_hash: str | None = None) -> pa.Table:
    """Verify a dataset artifact and read all its Parquet files as one table."""
    manifest = verify(root, spec.name, expected_hash)
    parts = sorted(f for f in manifest["files"] if f.endswith(".parquet"))
    tables = []
    for rel in parts:
        _check_schema(spec, Path(root) / rel)
        tables.append(pq.read_table(Path(root) / rel))
    return pa.concat_tables(tables) if tables else spec.dataset_schema.empty_table()


# ---------------------------------------------------------------------------------------------------- checkpoints


def write_checkpoint(
    root: Path, tensors: dict[str, Any], config: dict[str, Any], filename: str = "model.safetensors"
) -> None:
    """Write safetensors weights and a JSON config into `root`, each file atomically."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(root / filename) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    write_json(root / "config.json", config)


def read_checkpoint(
    root: Path, name: str = "checkpoint", expected_hash: str | None = None, filename: str = "model.safetensors"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify a checkpoint artifact and return (tensors, config)."""
    from safetensors.torch import load_file

    verify(root, name, expected_hash)
    return load_file(str(Path(root) / filename)), json.loads((Path(root) / "config.json").read_text())


# ---------------------------------------------------------------------------------------------------- stores


def local_path(uri: str) -> Path | None:
    """The folder behind a `file:` URI or a plain path; None for remote stores."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "":
        return Path(uri)
    return None


def fetch(ref: ArtifactRef, tracking_uri: str, workdir: Path) -> Path:
    """Make artifact `ref` readable locally and verify it against its content hash.

    Local stores are read in place; remote ones (mlflow-artifacts:, s3:, …) are downloaded once into a cache
    folder keyed by the content hash, so any node can read any artifact.
    """
    import mlflow.artifacts

    path = local_path(ref.uri)
    if path is not None:
        if not path.is_dir():
            raise ArtifactError(f"artifact {ref.name!r}: {ref.uri} does not exist (deleted from the store?)")
        verify(path, ref.name, ref.hash)
        return path
    cached = Path(workdir) / "cache" / "artifacts" / ref.hash
    if cached.is_dir():
        try:
            verify(cached, ref.name, ref.hash)
            return cached
        except ArtifactError:
            shutil.rmtree(cached, ignore_errors=True)
    log.info("artifact %s: downloading %s into %s", ref.name, ref.uri, cached)
    with atomic_path(cached) as tmp:
        tmp.mkdir(parents=True)
        try:
            downloaded = Path(
                mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=str(tmp), tracking_uri=tracking_uri)
            )
        except Exception as e:  # any store error becomes an artifact error naming the artifact
            raise ArtifactError(f"artifact {ref.name!r}: cannot download {ref.uri}: {e}") from e
        verify(downloaded, ref.name, ref.hash)
        for child in downloaded.iterdir():
            child.rename(tmp / child.name)
        downloaded.rmdir()
    return cached
