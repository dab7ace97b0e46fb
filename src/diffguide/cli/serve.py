"""``diffguide serve``: the HTTP service (diffguide.service) on uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError


def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free port).")] = 8000,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Job store (SQLite) and result files; created.")
    ] = Path("diffguide-service"),
    models_dir: Annotated[
        list[Path] | None,
        typer.Option(
            "--models-dir",
            help="Folder whose diffusers sub-folders are served, by folder name; repeatable.",
        ),
    ] = None,
    no_bundled_model: Annotated[
        bool, typer.Option("--no-bundled-model", help="Do not serve the bundled tiny-sd.")
    ] = False,
    queue_size: Annotated[
        int, typer.Option("--queue-size", help="Jobs waiting before POST answers 429.")
    ] = 16,
    max_request_kb: Annotated[
        int, typer.Option("--max-request-kb", help="Larger request bodies are answered 413.")
    ] = 1024,
    max_upload_mb: Annotated[
        int,
        typer.Option(
            "--max-upload-mb", help="Limit of a multipart body with files, and of each file (413 above)."
        ),
    ] = 256,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="DIFFGUIDE_API_KEY",
            help="Require 'Authorization: Bearer KEY' on every endpoint (the page: ?api_key=KEY).",
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None, typer.Option("--cors-origin", help="Allow this origin (CORS is off by default).")
    ] = None,
    memory_budget_mb: Annotated[
        float, typer.Option("--memory-budget-mb", help="The model cache never holds more (LRU eviction).")
    ] = 4096.0,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="Torch threads per job (as generate's --threads).")
    ] = None,
    preview_every: Annotated[
        int, typer.Option("--preview-every", help="A preview in the event stream every N steps (0: none).")
    ] = 2,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray", help="Sample on Ray Serve replicas (the 'ray' extra); the HTTP front stays here."
        ),
    ] = False,
    replicas: Annotated[
        int, typer.Option("--replicas", help="With --ray: replicas (the minimum when autoscaling).")
    ] = 2,
    max_replicas: Annotated[
        int | None, typer.Option("--max-replicas", help="With --ray: autoscale up to this many replicas.")
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="With --ray: join this Ray cluster (default: start one)."),
    ] = None,
) -> None:
    """Serve the HTTP API and web page: jobs, progress events, cancellation, results (docs/service.md)."""
    try:
        import uvicorn

        from ..service.config import ServiceConfig
        from ..service.server import create_app
    except ImportError as err:
        raise ConfigError(
            f"diffguide serve needs the 'serve' extra (pip install 'diffguide[serve]'): {err}"
        ) from None
    from .common import resolve_device

    config = ServiceConfig(
        data_dir=data_dir,
        model_dirs=tuple(models_dir or ()),
        bundled_model=not no_bundled_model,
        queue_size=queue_size,
        max_request_bytes=max_request_kb * 1024,
        max_upload_bytes=max_upload_mb * 1024 * 1024,
        api_key=api_key,
        cors_origins=tuple(cors_origin or ()),
        memory_budget_mb=memory_budget_mb,
        device=resolve_device(device),
        threads=threads,
        preview_every=preview_every,
    )
    if not ray:
        uvicorn.run(create_app(config), host=host, port=port, log_level="info")
        return
    from ..service import ray_backend
    from ..service.models import ModelCache, find_models

    models = find_models(config.model_dirs, config.bundled_model)
    runner = ray_backend.start(
        models, config.memory_budget_mb, config.device, threads, replicas, max_replicas, ray_address
    )
    cache = ModelCache(models, config.memory_budget_mb, config.device)  # the front's layer dry runs
    try:
        app = create_app(config, cache, runner=runner, concurrency=max_replicas or replicas)
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        ray_backend.stop()
