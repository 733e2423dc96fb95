"""API-key policy of the app (`pipeline/serving/auth.py`): where the key comes from, and failing closed."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, ServeConfig
from pipeline.serving.auth import deployer_key, is_loopback, load_api_key, require_key


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("127.8.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("serve.example.com", False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_a_public_host_without_a_key_fails_closed_naming_the_settings(monkeypatch):
    monkeypatch.delenv("MOEFORGE_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"serve.api_key_file.*\$MOEFORGE_API_KEY.*allow_unauthenticated=true"):
        deployer_key(ServeConfig(host="0.0.0.0"))
    assert deployer_key(ServeConfig(host="127.0.0.1")) is None  # loopback: open is allowed
    assert deployer_key(ServeConfig(host="0.0.0.0", allow_unauthenticated=True)) is None  # said so explicitly
    monkeypatch.setenv("MOEFORGE_API_KEY", "sk-env")
    assert deployer_key(ServeConfig(host="0.0.0.0")) == "sk-env"  # handed to replicas by the deployer


def test_a_key_file_is_read_by_the_replica_and_must_hold_a_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFORGE_API_KEY", "sk-env")
    key = tmp_path / "key"
    settings = ServeConfig(host="0.0.0.0", api_key_file=str(key))
    assert deployer_key(settings) is None  # the file is mounted where replicas run, not necessarily here
    with pytest.raises(ConfigError, match="does not exist"):
        load_api_key(settings)
    key.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_api_key(settings)
    key.write_text("sk-file\n")
    assert load_api_key(settings) == "sk-file"  # the file wins over the environment


def test_a_replica_without_a_key_on_a_public_host_refuses_before_loading_anything(monkeypatch, tmp_path):
    from pipeline.serving.model_server import ModelServer
    from pipeline.serving.source import ModelSource

    monkeypatch.delenv("MOEFORGE_API_KEY", raising=False)
    missing = ModelSource(uri=str(tmp_path / "no-such-model"), name="nothing", path=str(tmp_path / "no-such-model"))
    with pytest.raises(ConfigError, match=r"serve\.api_key_file"):
        ModelServer(missing, ServeConfig(host="0.0.0.0"), None, tmp_path)
    require_key(ServeConfig(host="0.0.0.0"), "sk-given")  # a key handed over by the deployer is enough
