"""Which model a deployment serves: registry alias (pinned to its version now), version, or a local directory."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from pipeline.model import Transformer
from pipeline.serving.source import ModelSource, ModelSourceError, materialize, resolve


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


def test_a_student_logged_from_the_train_stages_folder_is_found_where_its_mlmodel_says(registered_student, tmp_path):
    """`train` logs its output folder `trained_student`, which MLflow keeps under that name (`artifacts/
    trained_student`), not under the artifact's key `student`: the default run (refine off) registers such a model,
    and serving it must find the student there."""
    import shutil

    from mlflow import MlflowClient

    from pipeline.student.registry import log_student

    s = registered_student
    shutil.copytree(s.directory, tmp_path / "trained_student")
    client = MlflowClient(s.tracking_uri)
    run = client.create_run(client.get_experiment_by_name("serve").experiment_id)
    version = log_student(tmp_path / "trained_student", run.info.run_id, s.tracking_uri, "test-trained-student")
    src = resolve(f"models:/test-trained-student/{version.version}", s.tracking_uri)
    path = materialize(src, s.tracking_uri, tmp_path / "cache")
    assert path.name == "trained_student" and path.parent.name == "artifacts"
    assert (path / "config.json").read_text() == (s.directory / "config.json").read_text()
    assert materialize(src, s.tracking_uri, tmp_path / "cache") == path  # the cached copy is found again


def test_a_local_directory_is_served_as_is(registered_student):
    src = resolve(str(registered_student.directory))
    assert src.path == str(registered_student.directory) and src.version is None and src.name == "student"


@pytest.mark.parametrize(
    "uri, message",
    [
        ("models:/test-student@nope", "has no alias 'nope'"),
        ("models:/test-student/7", "no version 7"),
        ("models:/test-student", "expected models:/NAME@ALIAS or models:/NAME/VERSION"),
        ("/does/not/exist", "no such directory"),
    ],
)
def test_a_source_that_names_nothing_is_a_clear_error(registered_student, uri, message):
    with pytest.raises(ModelSourceError, match=message):
        resolve(uri, registered_student.tracking_uri)


def test_a_directory_without_a_student_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="not a saved student"):
        resolve(str(tmp_path))


def test_an_unresolved_registry_source_is_refused_before_any_download(registered_student, tmp_path):
    """`materialize` serves one registry version; a source that was never `resolve`d names none."""
    unresolved = ModelSource(f"models:/{registered_student.name}@champion", registered_student.name)
    with pytest.raises(ModelSourceError, match="resolve"):
        materialize(unresolved, registered_student.tracking_uri, tmp_path)
    assert not (tmp_path / "models").exists()


def test_the_registry_entry_names_its_train_run(registered_student):
    s = registered_student
    assert (
        MlflowClient(s.tracking_uri).get_model_version(s.name, "1").run_id
        == resolve(f"models:/{s.name}@champion", s.tracking_uri).run_id
    )


def test_the_version_records_the_students_content_hash_and_a_changed_store_is_refused(registered_student, tmp_path):
    """What the registry stores can be changed behind its back; serving checks the download against the hash the
    version recorded when it was registered, and a tampered cache is downloaded again."""
    import shutil

    from pipeline.artifacts import content_hash
    from pipeline.student.registry import CONTENT_HASH_TAG

    s = registered_student
    client = MlflowClient(s.tracking_uri)
    mv = client.get_model_version(s.name, "1")
    assert mv.tags[CONTENT_HASH_TAG] == content_hash(s.directory)
    src = resolve(f"models:/{s.name}/1", s.tracking_uri)
    assert src.content_hash == mv.tags[CONTENT_HASH_TAG]

    # a cached copy changed after download: detected on the next load, and replaced by a good download
    path = materialize(src, s.tracking_uri, tmp_path / "cache")
    (path / "config.json").write_text((path / "config.json").read_text().replace('"dim": 64', '"dim": 64 '))
    assert materialize(src, s.tracking_uri, tmp_path / "cache") == path
    assert content_hash(path) == src.content_hash

    # the stored model changed in the artifact store: refused, nothing left in the cache
    (stored,) = (s.directory.parent / "artifacts").rglob("student/config.json")  # the experiment's artifact store
    backup = tmp_path / "config.json"
    shutil.copy(stored, backup)
    try:
        stored.write_text(stored.read_text() + " ")
        with pytest.raises(ModelSourceError, match=r"content hash .* is not the .* recorded when it was registered"):
            materialize(src, s.tracking_uri, tmp_path / "fresh")
        assert not (tmp_path / "fresh" / "models" / s.name / "1").exists()
    finally:
        shutil.copy(backup, stored)


def test_a_version_without_a_recorded_hash_is_refused(registered_student):
    from pipeline.student.registry import CONTENT_HASH_TAG

    s = registered_student
    client = MlflowClient(s.tracking_uri)
    client.delete_model_version_tag(s.name, "1", CONTENT_HASH_TAG)
    try:
        with pytest.raises(ModelSourceError, match="records no content hash"):
            resolve(f"models:/{s.name}/1", s.tracking_uri)
    finally:
        from pipeline.artifacts import content_hash

        client.set_model_version_tag(s.name, "1", CONTENT_HASH_TAG, content_hash(s.directory))


def test_an_mlmodel_that_points_out_of_its_folder_names_no_student(tmp_path):
    """What a downloaded model says about where its student is, is followed inside its own folder only."""
    from pipeline.serving.source import student_in

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    model = tmp_path / "model"
    (model / "artifacts" / "trained_student").mkdir(parents=True)
    (model / "artifacts" / "trained_student" / "config.json").write_text("{}")
    mlmodel = "flavors:\n  python_function:\n    artifacts:\n      student:\n        path: {}\n"
    (model / "MLmodel").write_text(mlmodel.format("artifacts/trained_student"))
    assert student_in(model) == model / "artifacts" / "trained_student"
    (model / "MLmodel").write_text(mlmodel.format("../outside"))
    assert student_in(model) is None
    (model / "MLmodel").write_text("not: [yaml")
    assert student_in(model) is None
