"""``diffguide serve --ray``: jobs sampled by Ray Serve replicas.

The HTTP front (routes, job store, queue, files) is the same app; each job is sent to a Ray
Serve deployment whose replicas each hold a :class:`~.models.ModelCache` and run one job at a
time (``max_ongoing_requests=1``), so the front runs one worker thread per replica. A replica
answers the whole :class:`~diffguide.pipeline.GenerationResult`: progress events carry only the
job's states, and a running job cannot be cancelled (a queued one can).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import app
from ..errors import ConfigError
from ..pipeline import GenerationResult
from .models import ModelCache
from .schema import JobRequest

DEPLOYMENT = "diffguide-sampler"


class Replica:
    """One Ray Serve replica: models by name, loaded on first use, sampled one job at a time."""

    def __init__(self, models: dict[str, str], budget_mb: float, device: str, threads: int | None) -> None:
        self.cache = ModelCache({k: Path(v) for k, v in models.items()}, budget_mb, device)
        self.threads = threads

    def generate(self, request: dict[str, Any]) -> GenerationResult:
        req = JobRequest.model_validate(request)
        path = str(self.cache.path(req.model))
        run = app.GenerateRequest(app.ModelRequest(path), req.to_config(), None, self.threads)
        return app.generate(run, self.cache.get(req.model))

    def pid(self) -> int:
        return os.getpid()


class RayRunner:
    """Sends a job to the deployment and waits for its result (a replica's error re-raised as is)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def __call__(self, req: JobRequest) -> GenerationResult:
        try:
            result: GenerationResult = self.handle.generate.remote(req.model_dump(mode="json")).result()
        except Exception as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        return result


def start(
    models: dict[str, Path],
    budget_mb: float,
    device: str,
    threads: int | None,
    replicas: int,
    max_replicas: int | None = None,
    address: str | None = None,
) -> RayRunner:
    """Start (or join, with ``address``) Ray, deploy the replicas, and return their runner."""
    if replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {replicas}")
    if max_replicas is not None and max_replicas < replicas:
        raise ConfigError(f"--max-replicas ({max_replicas}) must be >= --replicas ({replicas})")
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise ConfigError(f"--ray needs the 'ray' extra (pip install 'diffguide[ray]'): {err}") from None
    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    scaling: dict[str, Any] = (
        {"num_replicas": replicas}
        if max_replicas is None
        else {"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas,
                                     "target_ongoing_requests": 1}}
    )  # fmt: skip
    deployment = serve.deployment(
        name=DEPLOYMENT,
        max_ongoing_requests=1,
        ray_actor_options={"num_cpus": 0.5 if threads in (None, 1) else float(threads)},
        **scaling,
    )(Replica)
    bound = deployment.bind({k: str(v) for k, v in models.items()}, budget_mb, device, threads)
    handle = serve.run(bound, name="diffguide", route_prefix=None)
    return RayRunner(handle)


def stop() -> None:
    from ray import serve

    serve.shutdown()
