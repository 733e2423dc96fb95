"""The serve role: the OpenAI-compatible API of `pipeline/serving/` as a Ray Serve deployment with a FastAPI ingress.

`OpenAIServer` is a thin Serve wrapper around `ModelServer` (a plain class: tests and `create_app` use it without
Ray). `build_app(args)` is the application builder: the same function is the `import_path` of a Serve config file
(`serve deploy`, KubeRay's `serveConfigV2`)::

    applications:
      - name: moeforge
        route_prefix: /
        import_path: actors.server:build_app
        args: {model: "models:/moeforge-student@champion", tracking_uri: "http://mlflow:5000", num_replicas: 2}

`start(settings, model, tracking_uri)` deploys it from Python (`moeforge serve`, the `serve` stage).
"""

from __future__ import annotations

from typing import Any, cast

from pydantic import BaseModel, ConfigDict, SecretStr
from ray import serve
from ray.serve import Application, Deployment

from pipeline.config import MoeforgeConfig, RegistryConfig, ServeConfig, format_validation_error, load_config
from pipeline.serving.app import create_app
from pipeline.serving.auth import deployer_key
from pipeline.serving.model_server import ModelServer
from pipeline.serving.source import ModelSource, resolve

APP_NAME = "moeforge"
DEPLOYMENT_NAME = "OpenAIServer"


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class OpenAIServer:
    """One replica: the model loaded once, its continuous-batching engine, the FastAPI app around them.

    Args:
        source: a resolved `ModelSource` (as a dict), pinned to one version by the builder.
        settings: the `serve` config section (as a dict).
        tracking_uri: MLflow store of registry sources.
        api_key: the key read from the deployer's environment (`serve.api_key_env`), handed over as an init argument
            rather than a runtime_env variable, which Ray's dashboard would display; None: the replica reads
            `serve.api_key_file`.
    """

    def __init__(
        self,
        source: dict[str, Any],
        settings: dict[str, Any],
        tracking_uri: str | None,
        api_key: SecretStr | None = None,
    ):
        from pipeline.teacher.hf import default_cache_dir

        self.server = ModelServer(
            ModelSource(**source),
            ServeConfig.model_validate(settings),
            tracking_uri,
            default_cache_dir(),
            api_key=api_key.get_secret_value() if api_key else None,
        )

    def __serve_build_asgi_app__(self):
        return create_app(self.server)

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose engine thread died is replaced."""
        self.server.stats()  # raises EngineError (naming the engine's last error) when the engine is gone

    def __del__(self):
        server = getattr(self, "server", None)
        if server is not None:
            server.engine.stop()


class ServeArgs(BaseModel):
    """`args` of `build_app`: which config and model, plus any `serve` section field (e.g. num_replicas)."""

    model_config = ConfigDict(extra="allow")

    config: str = "tiny"  # preset name or YAML path, for the serve and registry sections
    model: str | None = None  # default: serve.model_uri, else models:/<registry.model_name>@champion
    tracking_uri: str | None = None  # default: tracking section / $MLFLOW_TRACKING_URI


def deployment_options(s: ServeConfig) -> dict[str, Any]:
    """Serve deployment options from the `serve` section: scale, back-pressure, resources, health checks."""
    opts: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": s.health_check_timeout_s,
    }
    if s.autoscaling is not None:
        opts["autoscaling_config"] = {
            "min_replicas": s.autoscaling.min_replicas,
            "max_replicas": s.autoscaling.max_replicas,
            "target_ongoing_requests": s.autoscaling.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = s.num_replicas
    return opts


def default_model_uri(settings: ServeConfig, registry: RegistryConfig) -> str:
    """serve.model_uri, else the registry's champion."""
    return settings.model_uri or f"models:/{registry.model_name}@champion"


def application(settings: ServeConfig, model: str, tracking_uri: str | None) -> Application:
    """The Serve application for `model`, pinned now (an alias resolves to its current version).

    The API key is settled here, where the deployer runs, so that it reaches replicas on any cluster (see
    `deployer_key`); no key on a public host refuses before anything is resolved.
    """
    key = deployer_key(settings)
    source = resolve(model, tracking_uri)
    # `@serve.deployment` made the class a Deployment; mypy does not apply class decorators' return types
    deployment = cast(Deployment, OpenAIServer).options(**deployment_options(settings))
    return deployment.bind(
        source.to_dict(), settings.model_dump(mode="json"), tracking_uri, SecretStr(key) if key else None
    )


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve's application builder (`import_path: actors.server:build_app`)."""
    from pipeline.tracking import resolve_tracking_uri

    a, cfg, settings = parse_args(args)
    return application(
        settings,
        a.model or default_model_uri(settings, cfg.registry),
        a.tracking_uri or resolve_tracking_uri(cfg.tracking),
    )


def parse_args(args: dict[str, Any] | None) -> tuple[ServeArgs, MoeforgeConfig, ServeConfig]:
    """`build_app`'s args checked without building anything: the args, the config they name, the serve settings."""
    from pydantic import ValidationError

    from pipeline.config import ConfigError

    try:
        a = ServeArgs.model_validate(args or {})
        cfg = load_config(a.config)
        settings = ServeConfig.model_validate({**cfg.serve.model_dump(), **(a.model_extra or {})})
    except ValidationError as e:
        raise ConfigError(f"build_app args: {format_validation_error(e)}") from None
    return a, cfg, settings


def start(settings: ServeConfig, model: str, tracking_uri: str | None) -> str:
    """Deploy (or update) the application on the connected Ray cluster; return its base URL once it is up.

    The model is resolved first, so a bad URI starts nothing. Serve's HTTP host and port are fixed when Serve first
    starts on a cluster: where it already runs, the app joins it there and the URL says where that is.
    """
    app = application(settings, model, tracking_uri)
    serve.start(proxy_location=settings.proxy_location, http_options={"host": settings.host, "port": settings.port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return url()


def url() -> str:
    """Base URL of the running Serve proxy (its HTTP options are fixed when Serve first starts on a cluster)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise RuntimeError("Ray Serve is not running on this cluster")
    http = client.http_config
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    return f"http://{host}:{http.port}"
