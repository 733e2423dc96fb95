"""Where a served model comes from: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, or a saved student directory.

`resolve` runs once where the application is built (driver, or Serve's build task): it turns an alias into the
version it points at *now*, so every replica of one deployment serves the same version even if the alias moves
meanwhile (moving it takes a redeploy, as in any registry-pinned rollout). `materialize` runs in each replica:
it downloads that version once into a local cache and returns the saved student directory inside it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.student.registry import STUDENT_ARTIFACT

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
            except MlflowException as e:
                raise ModelSourceError(f"{uri}: registered model {m['name']!r} has no alias {m['alias']!r} "
                                       f"in {tracking_uri or 'the default tracking store'} ({e.message})") from None
            return ModelSource(uri, m["name"], str(mv.version), m["alias"], mv.run_id)
        if m := _VERSION.match(uri):
            try:
                mv = client.get_model_version(m["name"], m["version"])
            except MlflowException as e:
                raise ModelSourceError(f"{uri}: no version {m['version']} of registered model {m['name']!r} "
                                       f"({e.message})") from None
            return ModelSource(uri, m["name"], str(mv.version), None, mv.run_id)
        raise ModelSourceError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    path = Path(uri).expanduser()
    if not path.is_dir():
        raise ModelSourceError(f"{uri}: not a models:/ URI and no such directory")
    from pipeline.model.transformer import CONFIG, WEIGHTS

    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ModelSourceError(f"{uri}: not a saved student ({CONFIG} and {WEIGHTS} expected)")
    return ModelSource(uri, path.resolve().name, path=str(path.resolve()))


def materialize(source: ModelSource, tracking_uri: str | None, cache_dir: str | Path) -> Path:
    """The saved student directory of `source`: local as is, a registry version downloaded once (atomically)."""
    if source.path:
        return Path(source.path)
    import mlflow.artifacts

    from pipeline.artifacts import atomic_path

    dest = Path(cache_dir) / "models" / _safe(source.name) / str(source.version)  # the logged model's root
    student = dest / "artifacts" / STUDENT_ARTIFACT
    if not (student / "config.json").is_file():
        import tempfile

        from mlflow import MlflowClient

        # the version's own storage location: `models:/` URIs resolve against the process-global registry URI,
        # this one against the store we were given
        location = MlflowClient(tracking_uri).get_model_version_download_uri(source.name, source.version)
        dest.parent.mkdir(parents=True, exist_ok=True)
        log.info("model %s version %s: downloading into %s", source.name, source.version, dest)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as staging, atomic_path(dest) as tmp:
            downloaded = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=staging,
                                                             tracking_uri=tracking_uri)
            Path(downloaded).rename(tmp)
    if not (student / "config.json").is_file():
        raise ModelSourceError(f"{source.pinned_uri} is not a moeforge student model (no artifacts/{STUDENT_ARTIFACT})")
    return student


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "model"
