"""The in-process worker: a bounded queue of job ids, worker threads running them in order
(one thread by default; with Ray Serve, one per replica, each job run by a replica).

Each job gets its own sampling state (config, generators, scheduler); the model's weights are
shared through the :class:`~.models.ModelCache`, and :meth:`GuidedPipeline.generate` holds the
pipeline's lock for a whole run, so jobs on one model never interleave their perturbations.
Cancelling a running job makes its step callback raise: it stops within one step, the engine
removes its perturbations in ``finally``, and the next job runs on a clean model.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DiffguideError
from ..io import replace_atomic, save_result
from ..pipeline import GenerationResult
from .config import ServiceConfig
from .jobrun import Emit, JobCancelled, JobRun, run_job
from .models import ModelCache
from .schema import JobRequest
from .store import FINISHED, RESTART_ERROR, JobRow, JobStore
from .uploads import Staged, job_files

KEEP_LIVE = 256  # finished jobs whose event history stays in memory


#: Runs a job elsewhere (a Ray Serve replica): (request, its files by id, preview interval, emit,
#: cancelled) -> run.
Runner = Callable[[JobRequest, dict[str, bytes], int, Emit, Callable[[], bool]], JobRun]


class QueueFull(Exception):
    """The queue holds ``queue_size`` waiting jobs."""


class NotCancellable(Exception):
    """The job already ended."""


def one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass
class LiveJob:
    """A job's in-memory side: its cancel flag and its event history (for the event stream)."""

    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    events: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def emit(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)

    def since(self, index: int) -> list[dict[str, Any]]:
        with self.lock:
            return self.events[index:]


@dataclass
class Metrics:
    step_seconds_sum: float = 0.0
    step_count: int = 0
    callbacks_sent: int = 0
    callbacks_failed: int = 0


class Worker:
    """Queue, live state and the worker thread of one service."""

    def __init__(
        self,
        config: ServiceConfig,
        store: JobStore,
        cache: ModelCache,
        runner: Runner | None = None,
        concurrency: int = 1,
    ) -> None:
        self.config, self.store, self.cache = config, store, cache
        self.runner, self.concurrency = runner, concurrency
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.live: dict[str, LiveJob] = {}
        self.metrics = Metrics()
        self._submit = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        for row in self.store.recover():  # queued before a restart: queued again, in order
            self.live[row.id] = LiveJob()
            self.queue.put(row.id)
        for n in range(self.concurrency):
            thread = threading.Thread(target=self._loop, name=f"diffguide-worker-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the running job's current step (it is marked failed, as after a crash)."""
        self._stopping.set()
        for live in list(self.live.values()):
            live.cancel.set()
        for _ in self._threads:
            self.queue.put(None)
        for thread in self._threads:
            thread.join(timeout)

    # -- requests -------------------------------------------------------------------------
    def waiting(self) -> int:
        return self.queue.qsize()

    @property
    def uploads(self) -> Path:
        return self.store.root / "uploads"

    def submit(self, req: JobRequest, staged: Staged | None = None) -> JobRow:
        """Queue a job (ConfigError for a bad request, QueueFull when the queue is full); its
        ``staged`` files get their final names only once it is accepted."""
        cfg = req.to_config()
        self.cache.path(req.model)
        with self._submit:
            if self.queue.qsize() >= self.config.queue_size:
                raise QueueFull()
            if staged is not None:
                staged.commit()
            job_id = secrets.token_hex(8)
            row = self.store.add(job_id, req.model, req.model_dump(mode="json"), cfg.steps)
            live = self.live[job_id] = LiveJob()
            live.emit({"event": "state", "state": "queued"})
            self.queue.put(job_id)
        return row

    def cancel(self, job_id: str) -> JobRow:
        """Cancel a queued job now, a running one within one step; NotCancellable when it ended."""
        if self.store.finish_if(job_id, ("queued",), state="cancelled", finished=time.time()):
            self._finished(job_id)
        else:
            row = self.store.get(job_id)
            if row is None or row.state in FINISHED:
                raise NotCancellable()
            self.live.setdefault(job_id, LiveJob()).cancel.set()
        row = self.store.get(job_id)
        assert row is not None
        return row

    # -- the worker thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job_id = self.queue.get()
            if job_id is None or self._stopping.is_set():
                return
            if not self.store.finish_if(job_id, ("queued",), state="running", started=time.time()):
                continue  # cancelled while queued
            self.live.setdefault(job_id, LiveJob()).emit({"event": "state", "state": "running"})
            self._run(job_id)

    def _run(self, job_id: str) -> None:
        row = self.store.get(job_id)
        assert row is not None
        live = self.live[job_id]
        tmp = self.store.root / "jobs" / f".tmp-{job_id}"
        try:
            run = self._generate(row, live)
            result = run.result
            self._save(result, tmp)
            if run.trace is not None:
                run.trace.save(tmp / "trace.safetensors", result.manifests[0])
            os.replace(tmp, self.store.folder(job_id))
            self.store.finish_if(
                job_id, ("running",), state="succeeded", images=len(result.images), finished=time.time()
            )
        except JobCancelled:
            error = RESTART_ERROR if self._stopping.is_set() else None
            self.store.update(
                job_id, state="failed" if error else "cancelled", error=error, finished=time.time()
            )
        except DiffguideError as err:
            self.store.update(job_id, state="failed", error=one_line(str(err)), finished=time.time())
        except Exception as err:  # a bug or a failing model: the job fails, the service goes on
            message = one_line(f"{type(err).__name__}: {err}")
            self.store.update(job_id, state="failed", error=message, finished=time.time())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._finished(job_id)

    def _generate(self, row: JobRow, live: LiveJob) -> JobRun:
        req = JobRequest.model_validate(row.request)
        emit = self._emitter(row.id, live)
        if self.runner is not None:  # remote replicas (Ray Serve)
            files = {p.stem: p.read_bytes() for p in job_files(req, self.uploads)}
            return self.runner(req, files, self.config.preview_every, emit, live.cancel.is_set)
        return run_job(
            req,
            self.cache,
            self.uploads,
            self.config.threads,
            self.config.preview_every,
            emit,
            live.cancel.is_set,
        )

    def _emitter(self, job_id: str, live: LiveJob) -> Emit:
        """A step event's side effects: step time, the job's progress in the store, the event."""
        last = time.perf_counter()

        def emit(event: dict[str, Any]) -> None:
            nonlocal last
            now = time.perf_counter()
            self.metrics.step_seconds_sum += now - last
            self.metrics.step_count += 1
            last = now
            self.store.update(job_id, step=event["step"], steps=event["steps"])
            live.emit(event)

        return emit

    @staticmethod
    def _save(result: GenerationResult, folder: Path) -> None:
        """Images (PNG with manifest), manifests and the batch's latents, into a new folder."""
        from safetensors.torch import save

        shutil.rmtree(folder, ignore_errors=True)
        save_result(result, folder, prefix="image")
        replace_atomic(
            folder / "manifest.json", json.dumps(result.manifests, indent=2, ensure_ascii=False) + "\n"
        )
        meta = {"diffguide": json.dumps(result.manifests, ensure_ascii=False)}
        replace_atomic(
            folder / "latents.safetensors", save({"latents": result.latents.cpu().contiguous()}, meta)
        )

    def _finished(self, job_id: str) -> None:
        row = self.store.get(job_id)
        assert row is not None
        live = self.live.setdefault(job_id, LiveJob())
        live.emit({"event": "end", "state": row.state, "error": row.error})
        live.done.set()
        url = row.request.get("callback_url")
        if url:
            threading.Thread(target=self._post, args=(url, row.public()), daemon=True).start()
        finished = [k for k, v in self.live.items() if v.done.is_set()]
        for k in finished[:-KEEP_LIVE]:
            self.live.pop(k, None)

    def _post(self, url: str, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.config.callback_timeout_s):
                self.metrics.callbacks_sent += 1
        except Exception:
            self.metrics.callbacks_failed += 1
