"""Secrets kept out of what a run shows: MLflow params and the config artifact, `config show`, the dashboard, the
CLI's and the job's output.

A config can carry secrets in three shapes, and each is redacted wherever the config (or a URI from it) is shown:
- `job.env_vars` values: any of them may be a token, so every value is hidden and only the names remain;
- credentials in a URL (`https://user:password@host/...`): the `user:password@` part is hidden;
- a field named like a secret (`password`, `token`, `api_key`, `secret`, `credentials`, ...): its value is hidden,
  except for fields that say where a secret lives rather than holding it (`api_key_env`, `api_key_file`).

What runs uses the real values; only what is displayed or recorded is redacted. Cache keys hash the real config.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"
# words of a snake_case / UPPER_CASE / kebab name that mark a secret (HF_TOKEN, AWS_SECRET_ACCESS_KEY, db_password,
# api_key, auth); whole words only, so max_tokens or a tokenizer's name is not one
_SECRET_WORDS = {
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "credential",
    "credentials",
    "apikey",
    "auth",
    "authorization",
    "cookie",
}
_SECRET_PAIRS = {("api", "key"), ("private", "key"), ("access", "key"), ("session", "key")}
_WHERE_NOT_WHAT = {"env", "file", "path", "dir", "header"}  # a last word that names where the secret is kept
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@", re.I)


def secret_name(name: str) -> bool:
    """Whether a field or variable called `name` holds a secret."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    if not words or words[-1] in _WHERE_NOT_WHAT:
        return False
    return any(w in _SECRET_WORDS for w in words) or any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))


def redact_url(text: str) -> str:
    """`text` with the credentials of every URL in it hidden (`scheme://<redacted>@host`)."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)


def redact_uri(uri: str | None) -> str | None:
    """A single URI with its credentials removed (for links a browser opens: no user info at all)."""
    if not uri or "@" not in uri:
        return uri
    parts = urlsplit(uri)
    if not parts.netloc or "@" not in parts.netloc:
        return redact_url(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def redact(value: Any, key: str = "") -> Any:
    """A JSON-like value with secrets hidden; `key` is the dotted path it sits at (`job.env_vars.HF_TOKEN`)."""
    if isinstance(value, dict):
        if key == "job.env_vars":
            return dict.fromkeys(value, REDACTED)
        return {k: redact(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if secret_name(key.rsplit(".", 1)[-1]) and value:
            return REDACTED
        return redact_url(value)
    return value


def quiet_mlflow_links() -> None:
    """Stop MLflow printing "View run ... at: <tracking URI>" when a run ends: it prints the URI as given, with any
    `user:password@` in it, into the terminal, the job's log and the run log. moeforge prints its own links, without
    credentials (`pipeline.tracking.run_url`)."""
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
