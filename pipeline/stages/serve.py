"""Stage `serve` (optional, `serve.enabled`): deploy the registry's champion behind the OpenAI-compatible API.

The last stage of a run: it deploys the Ray Serve application (`actors/server.py`) for `serve.model_uri`, by
default `models:/<registry.model_name>@champion`, i.e. the version `register` promoted (or the previous champion
when this run's student only became challenger). Its effect is a running app, not a file, so it is never taken
from the cache; its output `endpoint` (endpoint.json) records where the app answers and exactly which version it
serves. On a local cluster the app lives as long as the driver: `moeforge run` keeps it up until Ctrl-C when
`serve.keep_running` is set.
"""

from __future__ import annotations

from pipeline.config import MoeforgeConfig
from pipeline.stage import Stage, StageContext
from pipeline.stages.artifact_specs import ENDPOINT
from pipeline.stages.results import Endpoint, Registration, read_result, write_result


class Serve(Stage):
    name = "serve"
    inputs = ("registration",)
    outputs = (ENDPOINT,)
    config_sections = ("serve", "registry")
    key_metrics = ("version",)
    description = "deploy the champion behind the OpenAI-compatible Ray Serve app"
    cacheable = False

    def enabled(self, config: MoeforgeConfig) -> bool:
        return config.serve.enabled

    def run(self, ctx: StageContext) -> None:
        from actors.server import default_model_uri, start
        from pipeline.serving.source import ModelSourceError, resolve

        settings = ctx.config.serve
        registration = read_result(ctx.input_path("registration"), Registration)
        model = default_model_uri(settings, ctx.config.registry)
        try:
            source = resolve(model, ctx.call.tracking_uri)
        except ModelSourceError as e:
            if settings.model_uri is None and registration.alias != "champion":
                raise ModelSourceError(
                    f"nothing to serve: {e}; this run's version {registration.version} became "
                    f"{registration.alias} ({registration.reason}). Serve it explicitly with "
                    f"serve.model_uri={registration.model_uri}"
                ) from None
            raise
        url = start(settings, model, ctx.call.tracking_uri)
        endpoint = Endpoint(
            url=url,
            openai_base_url=f"{url}/v1",
            model=source.name,
            model_uri=model,
            pinned_uri=source.pinned_uri,
            version=source.version,
            alias=source.alias,
        )
        write_result(ctx.output_dir("endpoint"), endpoint)
        ctx.set_tags({"moeforge.serve_url": url, "moeforge.served_model": source.pinned_uri})
        if source.version:
            ctx.log_metrics({"version": int(source.version)})
