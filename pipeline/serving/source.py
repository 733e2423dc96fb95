"""Where a served model comes from: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, or a saved student directory.

`resolve` runs once where the application is built (driver, or Serve's build task): it turns an alias into the
version it points at *now*, so every replica of one deployment serves the same version even if the alias moves
meanwhile (moving it takes a redeploy, as in any registry-pinned rollout). `materialize` runs in each replica:
it downloads that version once into a local cache and returns the saved student directory inside it.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.student.registry import CONTENT_HASH_TAG, STUDENT_ARTIFACT

log = logging.getLogger(__name__)

_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")


class ModelSourceError(ValueError):
    """The model URI is malformed, or names nothing that exists."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: what to load, and how `/v1/models` describes it."""

    uri: str  # as given
    name: str  # the model id clients send
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None  # the train run that logged it
    path: str | None = None  # a local directory (local sources only)
    content_hash: str | None = None  # what the registry recorded for the version; a download must match it

    @property
    def pinned_uri(self) -> str:
        return self.path if self.path else f"models:/{self.name}/{self.version}"

    def to_dict(self) -> dict:
        return asdict(self)


def resolve(uri: str, tracking_uri: str | None = None) -> ModelSource:
    """Pin `uri` to one concrete model: a registry version, or an existing student directory."""
    if uri.startswith("models:/"):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(tracking_uri)
        if m := _ALIAS.match(uri):
            try:
                mv = client.get_model_version_by_alias(m["name"], m["alias"])
            except MlflowException:
                raise ModelSourceError(_no_alias(client, m["name"], m["alias"], tracking_uri)) from None
            return ModelSource(
                uri, m["name"], str(mv.version), m["alias"], mv.run_id, content_hash=_recorded_hash(uri, mv)
            )
        if m := _VERSION.match(uri):
            try:
                mv = client.get_model_version(m["name"], m["version"])
            except MlflowException as e:
                raise ModelSourceError(
                    f"{uri}: no version {m['version']} of registered model {m['name']!r} ({e.message})"
                ) from None
            return ModelSource(uri, m["name"], str(mv.version), None, mv.run_id, content_hash=_recorded_hash(uri, mv))
        raise ModelSourceError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    path = Path(uri).expanduser()
    if not path.is_dir():
        raise ModelSourceError(f"{uri}: not a models:/ URI and no such directory")
    from pipeline.model.transformer import CONFIG, WEIGHTS

    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ModelSourceError(f"{uri}: not a saved student ({CONFIG} and {WEIGHTS} expected)")
    return ModelSource(uri, path.resolve().name, path=str(path.resolve()))


def _no_alias(client, name: str, alias: str, tracking_uri: str | None) -> str:
    """Why `models:/NAME@ALIAS` does not resolve, naming what does: the aliases and versions that exist and the
    `--model` (or `serve.model_uri`) that would serve one."""
    from mlflow.exceptions import MlflowException

    where = tracking_uri or "the default tracking store"
    head = f"models:/{name}@{alias}: registered model {name!r} has no alias {alias!r} in {where}"
    try:
        model = client.get_registered_model(name)
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        return f"{head}: no registered model {name!r} at all (a `moeforge run` that reaches `register` makes one)"
    aliases = dict(sorted((model.aliases or {}).items()))
    if aliases:
        listed = ", ".join(f"{a} -> version {v}" for a, v in aliases.items())
        first = next(iter(aliases))
        return f"{head}; it has {listed}: serve it with --model models:/{name}@{first} (or serve.model_uri)"
    if versions:
        return (
            f"{head}; it has no aliases, versions {', '.join(map(str, versions))}: serve one with "
            f"--model models:/{name}/{versions[-1]} (or serve.model_uri)"
        )
    return f"{head}: it has no versions yet"


def _recorded_hash(uri: str, mv) -> str:
    """The content hash the registry recorded for version `mv`; a version without one is refused (fail closed)."""
    digest = (mv.tags or {}).get(CONTENT_HASH_TAG)
    if not digest:
        raise ModelSourceError(
            f"{uri}: version {mv.version} of {mv.name!r} records no content hash (tag "
            f"{CONTENT_HASH_TAG}), so what is downloaded cannot be checked; register it again "
            "with this moeforge (the register stage, or pipeline.student.registry.log_student)"
        )
    return digest


def materialize(source: ModelSource, tracking_uri: str | None, cache_dir: str | Path) -> Path:
    """The saved student directory of `source`: local as is, a registry version downloaded once (atomically) and
    checked against the content hash the registry recorded, both after the download and when reused from the cache.
    """
    if source.path:
        return Path(source.path)
    if source.version is None:
        raise ModelSourceError(f"{source.uri}: a registry source is served at one version; resolve() it first")
    import mlflow.artifacts

    from pipeline.artifacts import atomic_path, content_hash

    dest = Path(cache_dir) / "models" / _safe(source.name) / str(source.version)  # the logged model's root
    student = student_in(dest)
    if student is not None and content_hash(student) != source.content_hash:
        log.warning(
            "model %s version %s: the cached copy at %s does not match its content hash; downloading again",
            source.name,
            source.version,
            dest,
        )
        shutil.rmtree(dest)
        student = None
    if student is None:
        import tempfile

        from mlflow import MlflowClient

        # the version's own storage location: `models:/` URIs resolve against the process-global registry URI,
        # this one against the store we were given
        location = MlflowClient(tracking_uri).get_model_version_download_uri(source.name, source.version)
        shutil.rmtree(dest, ignore_errors=True)  # a copy without its student (an older layout): fetched again
        dest.parent.mkdir(parents=True, exist_ok=True)
        log.info("model %s version %s: downloading into %s", source.name, source.version, dest)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as staging, atomic_path(dest) as tmp:
            downloaded = Path(
                mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=staging, tracking_uri=tracking_uri)
            )
            got = student_in(downloaded)
            if got is None:
                raise ModelSourceError(
                    f"{source.pinned_uri} is not a moeforge student model (its MLmodel names no "
                    f"`{STUDENT_ARTIFACT}` artifact with a config.json)"
                )
            if (digest := content_hash(got)) != source.content_hash:
                raise ModelSourceError(
                    f"{source.pinned_uri}: the downloaded student's content hash {digest[:12]} is not the "
                    f"{str(source.content_hash)[:12]} recorded when it was registered: the stored model was changed "
                    "or damaged; refusing to serve it"
                )
            downloaded.rename(tmp)
        student = dest / got.relative_to(downloaded)
    return student


def student_in(model_root: Path) -> Path | None:
    """The saved student directory inside a downloaded pyfunc model (`log_student`), where its MLmodel says: MLflow
    keeps an artifact under its source folder's name (`artifacts/trained_student` when train logged it,
    `artifacts/student` from refine), not under the artifact's key. None when there is no such student."""
    import yaml

    try:
        mlmodel = yaml.safe_load((model_root / "MLmodel").read_text())
        relative = mlmodel["flavors"]["python_function"]["artifacts"][STUDENT_ARTIFACT]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    student = model_root / relative
    if not student.resolve().is_relative_to(model_root.resolve()) or not (student / "config.json").is_file():
        return None  # a path out of the model's own folder is not followed
    return student


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "model"
