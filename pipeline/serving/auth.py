"""API-key authentication of the OpenAI-compatible app: where the key comes from and how a request proves it."""

from __future__ import annotations

import hmac
import ipaddress

from pipeline.config import ConfigError, ServeConfig, read_api_key
from pipeline.serving.protocol import ApiError


def load_api_key(settings: ServeConfig) -> str | None:
    """The key clients must send: the mounted secret file if configured, else the environment variable."""
    return read_api_key(settings.api_key_env, settings.api_key_file, "serve")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def require_key(settings: ServeConfig, api_key: str | None) -> None:
    """Fail closed: refuse to serve without a key on a host others can reach, unless explicitly allowed."""
    if api_key is None and not is_loopback(settings.host) and not settings.allow_unauthenticated:
        raise ConfigError(
            f"serve.host is {settings.host!r}, reachable from other machines, and no API key is configured: set "
            f"serve.api_key_file (a file holding the key) or ${settings.api_key_env}, or bind serve.host=127.0.0.1; "
            "to serve without authentication anyway, set serve.allow_unauthenticated=true"
        )


def check_api_key(api_key: str | None, authorization: str | None) -> None:
    """Raise a 401 `ApiError` unless `authorization` is `Bearer <api_key>` (constant-time compare); no key: open."""
    if api_key is None:
        return
    if not authorization or not authorization.startswith("Bearer "):
        raise ApiError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.", code="invalid_api_key")
    if not hmac.compare_digest(authorization[len("Bearer ") :].strip().encode(), api_key.encode()):
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


def deployer_key(settings: ServeConfig) -> str | None:
    """Where the app is deployed from: the key to hand to replicas, checked to fail closed.

    A key file is read by each replica (it is mounted there, e.g. from a Kubernetes Secret), so none is handed over;
    otherwise the key in this process's `serve.api_key_env`, which a public host must have.
    """
    if settings.api_key_file:
        return None
    key = load_api_key(settings)
    require_key(settings, key)
    return key
