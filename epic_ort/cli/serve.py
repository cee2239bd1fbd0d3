"""`epic-ort serve`: an OpenAI-compatible HTTP server with continuous batching (the `serve` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .options import PROVIDER, AlphaType


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-running", type=click.IntRange(min=1), default=16, show_default=True,
              help="Rows (samples) decoded at once.")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting beyond those; past it a request gets 429 at once.")
@click.option("--api-key", default=None, envvar="EPIC_ORT_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 (also from $EPIC_ORT_API_KEY).")
@click.option("--alpha", type=AlphaType(), default=0.0, show_default=True,
              help="EPIC alpha of requests that do not set one; 'auto': calibrated (at startup).")
@click.option("--provider", type=PROVIDER, default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--served-model-name", default=None, help="The model id clients send [default: MODEL_DIR's name].")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True)
@click.option("--prefill-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Most prompt tokens (padded) prefilled between two decoding steps.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds the running requests get to finish after SIGTERM.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info")
def serve(model_dir: Path, host: str, port: int, log_level: str, **options: Any) -> None:
    """Serve MODEL_DIR over an OpenAI-compatible API (/v1/completions, /v1/chat/completions)."""
    try:
        from ..serving.server import run_server
        from ..serving.state import ServeSettings
    except ImportError as e:  # fastapi / uvicorn missing
        raise click.ClickException(f"{e.name} is missing; install the serve extra: pip install 'epic-ort[serve]'")
    if not Path(model_dir).is_dir():
        raise click.BadParameter(f"{model_dir} is not a model folder", param_hint="MODEL_DIR")
    run_server(ServeSettings(model_dir=str(model_dir), **options), host=host, port=port, log_level=log_level)
