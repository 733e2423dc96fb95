"""API-key authentication of the OpenAI-compatible app: where the key comes from and how a request proves it."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from pipeline.config import ServeConfig
from pipeline.serving.protocol import ApiError


def load_api_key(settings: ServeConfig) -> str | None:
    """The key clients must send: the mounted secret file if configured, else the environment variable."""
    if settings.api_key_file:
        path = Path(settings.api_key_file)
        if not path.is_file():
            raise FileNotFoundError(f"serve.api_key_file {path} does not exist")
        key = path.read_text().strip()
        if not key:
            raise ValueError(f"serve.api_key_file {path} is empty")
        return key
    return os.environ.get(settings.api_key_env) or None


def check_api_key(api_key: str | None, authorization: str | None) -> None:
    """Raise a 401 `ApiError` unless `authorization` is `Bearer <api_key>` (constant-time compare); no key: open."""
    if api_key is None:
        return
    if not authorization or not authorization.startswith("Bearer "):
        raise ApiError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.", code="invalid_api_key")
    if not hmac.compare_digest(authorization[len("Bearer "):].strip().encode(), api_key.encode()):
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
