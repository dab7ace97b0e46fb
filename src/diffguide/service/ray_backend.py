"""``diffguide serve --ray``: jobs sampled by Ray Serve replicas.

The HTTP front (routes, job store, queue, files) is the same app; each job is sent to a Ray
Serve deployment whose replicas each hold a :class:`~.models.ModelCache` and run one job at a
time (``max_ongoing_requests=1``), so the front runs one worker thread per replica. A replica
runs the job exactly as the in-process worker does (:func:`~.jobrun.run_job`: the job's files,
sent along by id, previews, trace) and streams its ``step`` events back, then the run; cancelling
the stream stops the run at its next step.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .jobrun import Emit, JobCancelled, JobRun, run_job
from .models import ModelCache
from .schema import JobRequest
from .uploads import keep_files

DEPLOYMENT = "diffguide-sampler"


class Replica:
    """One Ray Serve replica: models by name, loaded on first use, sampled one job at a time."""

    def __init__(self, models: dict[str, str], budget_mb: float, device: str, threads: int | None) -> None:
        self.cache = ModelCache({k: Path(v) for k, v in models.items()}, budget_mb, device)
        self.threads = threads
        self.uploads = Path(tempfile.mkdtemp(prefix="diffguide-replica-")) / "uploads"

    async def run(
        self, request: dict[str, Any], files: dict[str, bytes], preview_every: int
    ) -> AsyncIterator[dict[str, Any]]:
        """The job's ``step`` events as they happen (a latent preview every ``preview_every``
        steps), then ``{"event": "run", "run": JobRun}``. Cancelling the stream stops the run at its
        next step."""
        req = JobRequest.model_validate(request)
        keep_files(files, self.uploads)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def work() -> None:
            def emit(event: dict[str, Any]) -> None:
                loop.call_soon_threadsafe(events.put_nowait, event)

            try:
                run = run_job(req, self.cache, self.uploads, self.threads, preview_every, emit, stop.is_set)
                emit({"event": "run", "run": run})
            except BaseException as err:  # re-raised in the stream, as the replica's error
                emit({"event": "error", "error": err})

        thread = threading.Thread(target=work, name="diffguide-replica-job", daemon=True)
        thread.start()
        try:
            while True:
                event = await events.get()
                if event["event"] == "error":
                    raise event["error"]
                yield event
                if event["event"] == "run":
                    return
        finally:
            stop.set()  # cancelled (or the front went away): the run stops at its next step

    def pid(self) -> int:
        return os.getpid()


class RayRunner:
    """Sends a job to the deployment and relays its step events; cancels the stream when the job
    is cancelled (at the next event); a replica's error is re-raised as is."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def __call__(
        self,
        req: JobRequest,
        files: dict[str, bytes],
        preview_every: int,
        emit: Emit,
        cancelled: Callable[[], bool],
    ) -> JobRun:
        stream = self.handle.options(stream=True).run.remote(
            req.model_dump(mode="json"), files, preview_every
        )
        try:
            for event in stream:
                if event["event"] == "run":
                    run: JobRun = event["run"]
                    return run
                emit(event)
                if cancelled():
                    stream.cancel()
                    raise JobCancelled()
        except JobCancelled:
            raise
        except Exception as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        raise RuntimeError("the replica's stream ended without the run")


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
