"""The Serve builder and config file, without a cluster: what `serve deploy` / a RayService would build."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from actors.server import build_app, deployment_options
from pipeline.config import ConfigError, ServeConfig

REPO = Path(__file__).resolve().parents[2]


def deployment_of(app):
    return app._bound_deployment


def test_the_shipped_serve_config_validates_and_builds(registered_student):
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((REPO / "infra" / "serve" / "serve-config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    (app_cfg,) = schema.applications
    module, _, name = app_cfg.import_path.partition(":")
    builder = getattr(__import__(module, fromlist=[name]), name)
    assert builder is build_app
    # the file names a cluster registry; here the same args point at the test registry
    args = {
        **app_cfg.args,
        "model": f"models:/{registered_student.name}@champion",
        "tracking_uri": registered_student.tracking_uri,
    }
    d = deployment_of(builder(args))
    assert d.name == "OpenAIServer"
    assert d._deployment_config.autoscaling_config.max_replicas == 4
    assert d.ray_actor_options["num_cpus"] == 1
    source, settings, tracking_uri, api_key = d.init_args
    assert (source["name"], source["version"], source["alias"]) == (registered_student.name, "1", "champion")
    assert settings["max_batch_size"] == 16 and tracking_uri == registered_student.tracking_uri
    # it binds 0.0.0.0, so it names a key file, which each replica reads where the Secret is mounted
    assert data["http_options"]["host"] == settings["host"] == "0.0.0.0"
    assert settings["api_key_file"] and api_key is None and not settings["allow_unauthenticated"]


def test_a_public_app_without_a_key_fails_closed_and_an_env_key_reaches_replicas_as_an_argument(
    registered_student, monkeypatch
):
    monkeypatch.delenv("MOEFORGE_API_KEY", raising=False)
    args = {"model": str(registered_student.directory), "host": "0.0.0.0"}
    with pytest.raises(ConfigError, match=r"serve\.api_key_file"):
        build_app(args)
    monkeypatch.setenv("MOEFORGE_API_KEY", "sk-from-the-deployer")
    d = deployment_of(build_app(args))
    key = d.init_args[3]
    assert key.get_secret_value() == "sk-from-the-deployer"
    assert "sk-from" not in repr(d.init_args) and "sk-from" not in str(d.ray_actor_options)  # not in runtime_env


def test_deployment_options_follow_the_serve_section():
    fixed = deployment_options(
        ServeConfig(
            num_replicas=3, max_ongoing_requests=5, max_queued_requests=7, num_gpus=0.5, health_check_period_s=2
        )
    )
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert (fixed["max_ongoing_requests"], fixed["max_queued_requests"]) == (5, 7)
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5} and fixed["health_check_period_s"] == 2
    scaled = deployment_options(ServeConfig.model_validate({"autoscaling": {"min_replicas": 0, "max_replicas": 3}}))
    assert scaled["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in scaled


def test_bad_builder_args_are_a_clear_error(registered_student):
    with pytest.raises(ConfigError, match="max_batch_size"):
        build_app({"model": str(registered_student.directory), "max_batch_size": 0})
    with pytest.raises(ConfigError, match=r"unknown key|extra"):
        build_app({"model": str(registered_student.directory), "max_batch_sise": 8})
