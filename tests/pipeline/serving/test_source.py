"""Which model a deployment serves: registry alias (pinned to its version now), version, or a local directory."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from pipeline.model import Transformer
from pipeline.serving.source import ModelSourceError, materialize, resolve


def test_an_alias_is_pinned_to_the_version_it_points_at(registered_student):
    s = registered_student
    src = resolve(f"models:/{s.name}@champion", s.tracking_uri)
    assert (src.name, src.version, src.alias) == (s.name, "1", "champion") and src.run_id
    assert src.pinned_uri == f"models:/{s.name}/1"
    by_version = resolve(f"models:/{s.name}/1", s.tracking_uri)
    assert (by_version.version, by_version.alias, by_version.run_id) == ("1", None, src.run_id)


def test_a_registry_version_downloads_once_into_the_cache_and_loads(registered_student, tmp_path):
    s = registered_student
    src = resolve(f"models:/{s.name}/1", s.tracking_uri)
    path = materialize(src, s.tracking_uri, tmp_path)
    assert path == tmp_path / "models" / s.name / "1" / "artifacts" / "student"
    assert (path.parent.parent / "MLmodel").is_file()
    reference, loaded = Transformer.from_pretrained(s.directory), Transformer.from_pretrained(path)
    pairs = zip(reference.state_dict().values(), loaded.state_dict().values(), strict=True)
    assert all((a == b).all() for a, b in pairs)
    assert materialize(src, s.tracking_uri, tmp_path) == path
    assert not [p for p in (tmp_path / "models" / s.name).iterdir() if p.name.startswith(".")]  # no temp left


def test_a_local_directory_is_served_as_is(registered_student):
    src = resolve(str(registered_student.directory))
    assert src.path == str(registered_student.directory) and src.version is None and src.name == "student"


@pytest.mark.parametrize("uri, message", [
    ("models:/test-student@nope", "has no alias 'nope'"),
    ("models:/test-student/7", "no version 7"),
    ("models:/test-student", "expected models:/NAME@ALIAS or models:/NAME/VERSION"),
    ("/does/not/exist", "no such directory"),
])
def test_a_source_that_names_nothing_is_a_clear_error(registered_student, uri, message):
    with pytest.raises(ModelSourceError, match=message):
        resolve(uri, registered_student.tracking_uri)


def test_a_directory_without_a_student_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="not a saved student"):
        resolve(str(tmp_path))


def test_the_registry_entry_names_its_train_run(registered_student):
    s = registered_student
    assert MlflowClient(s.tracking_uri).get_model_version(s.name, "1").run_id == resolve(
        f"models:/{s.name}@champion", s.tracking_uri).run_id
