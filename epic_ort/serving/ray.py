"""Scale-out on Ray Serve (the `ray` extra): N replicas of the same OpenAI app, one engine each.

    serve run epic_ort.serving.ray:app model_dir=models/smollm2-135m num_replicas=2

Every argument after the import path is a `ServeSettings` field (max_running=16, alpha=auto,
api_key=..., ...) or one of the deployment's: num_replicas, num_cpus (per replica, default 1).
Ray's proxy spreads requests over the replicas; each answer names its replica in the
`x-epic-ort-replica` header and in /health. Replicas batch independently: a replica's engine
decides alone, so a request's tokens are the same whichever replica serves it.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from ..settings import parse_alpha
from .app import create_app
from .state import ServeSettings

DEPLOYMENT_OPTIONS = ("num_replicas", "num_cpus")


@serve.deployment(name="epic-ort", max_ongoing_requests=256)
@serve.ingress()
class EpicOrtDeployment:
    """One replica: the app of `create_app`, built after the constructor (Ray runs its lifespan)."""

    def __init__(self, **settings: Any):
        context = serve.get_replica_context()
        self.settings = ServeSettings(**{**settings, "replica_id": context.replica_id.unique_id})

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.settings)


def settings_from_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`key=value` strings of `serve run` -> (ServeSettings fields, deployment options)."""
    fields = ServeSettings.__dataclass_fields__
    settings, options = {}, {}
    for key, value in args.items():
        if key in DEPLOYMENT_OPTIONS:
            options[key] = float(value) if key == "num_cpus" else int(value)
        elif key not in fields or key == "replica_id":
            raise ValueError(f"unknown argument {key!r}; use {', '.join([*fields, *DEPLOYMENT_OPTIONS])}")
        else:
            settings[key] = _typed(key, value, fields[key].type)
    if "model_dir" not in settings:
        raise ValueError("model_dir=... is required")
    return settings, options


def _typed(key: str, value: Any, kind: Any) -> Any:
    if not isinstance(value, str):
        return value
    if key == "alpha":
        return parse_alpha(value)
    if "int" in str(kind):
        return int(value)
    if "float" in str(kind):
        return float(value)
    return value


def app(args: dict[str, Any]) -> Any:
    """The application builder `serve run epic_ort.serving.ray:app key=value ...` calls."""
    settings, options = settings_from_args(dict(args))
    deployment = EpicOrtDeployment.options(num_replicas=options.get("num_replicas", 1),
                                           ray_actor_options={"num_cpus": options.get("num_cpus", 1)})
    return deployment.bind(**settings)
