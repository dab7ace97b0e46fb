"""The FastAPI app of ``diffguide serve``: routes over a :class:`~.worker.Worker`.

Errors are JSON ``{"error": "<one line>"}``: 401 (API key), 404 (unknown job, model or file),
409 (the job is not in a state that has it), 413 (body too large), 422 (bad request, bad model
name, bad guidance), 429 (queue full, with Retry-After).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import DiffguideError
from .compare import compare_jobs, heatmap_png
from .config import ServiceConfig
from .files import finished_folder, image_path, job_row
from .models import ModelCache, find_models
from .schema import JobRequest
from .store import JobStore
from .uploads import Staged, UploadTooLarge, request_json, stage, store_upload
from .worker import NotCancellable, QueueFull, Runner, Worker, one_line

RETRY_AFTER_S = 2
MAX_PARTS = 16
JOB_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"request": {"type": "string", "description": "the job's JSON"}},
                    "additionalProperties": {"type": "string", "format": "binary"},
                }
            },
        },
    }
}
EVENT_POLL_S = 0.05


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


#: Routes that take files: their multipart bodies may reach the upload limit.
UPLOAD_PATHS = ("/v1/jobs", "/v1/uploads", "/upload/image")


class BodyLimit:
    """413 for a request body over ``limit`` bytes (declared or streamed), before the route reads it;
    ``upload_limit`` for a multipart body to a route that takes files."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int | None = None) -> None:
        self.app, self.plain, self.upload = app, limit, upload_limit or limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/form-data")
        limit = self.upload if multipart and scope.get("path") in UPLOAD_PATHS else self.plain
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(scope, receive, send, limit)
        body: list[bytes] = []
        size = 0
        more = True
        while more:  # read the body up front (it is small: at most the limit)
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._refuse(scope, receive, send, limit)
            body.append(chunk)
            more = message.get("more_body", False)
        data = b"".join(body)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = error(413, f"request body larger than {limit} bytes")
        await response(scope, receive, send)


KEY_COOKIE = "diffguide_api_key"


def _authorised(request: Request, key: str) -> bool:
    given = request.query_params.get("api_key") or request.cookies.get(KEY_COOKIE)
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return given is not None and secrets.compare_digest(given.encode(), key.encode())


def create_app(
    config: ServiceConfig, cache: ModelCache | None = None, runner: Runner | None = None, concurrency: int = 1
) -> FastAPI:
    """The service's app; ``cache`` may be shared between apps (tests keep models loaded).
    ``runner``: jobs run there (Ray Serve replicas), ``concurrency`` at a time."""
    cache = cache or ModelCache(
        find_models(config.model_dirs, config.bundled_model), config.memory_budget_mb, config.device
    )
    store = JobStore(config.data_dir)
    worker = Worker(config, store, cache, runner, concurrency)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)
            store.close()

    api = FastAPI(
        title="diffguide",
        version=__version__,
        description="Guided sampling (CFG, PAG, TPG, SLG) as a service: jobs, progress, cancellation.",
        lifespan=lifespan,
    )
    api.state.worker = worker
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        api.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    if config.api_key is not None:
        key = config.api_key

        @api.middleware("http")
        async def require_key(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            if request.method != "OPTIONS" and not _authorised(request, key):
                return error(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    {"WWW-Authenticate": "Bearer"},
                )
            response = await call_next(request)
            if request.url.path == "/" and "api_key" in request.query_params:  # the page's own files
                response.set_cookie(KEY_COOKIE, key, httponly=True, samesite="strict")
            return response

    api.add_middleware(BodyLimit, limit=config.max_request_bytes, upload_limit=config.max_upload_bytes)
    _handlers(api)
    _document_job_body(api)
    _job_routes(api, worker, config)
    _other_routes(api, worker, cache)
    from .comfy import add_routes

    add_routes(api, worker, config.api_key)
    return api


def _document_job_body(api: FastAPI) -> None:
    """The OpenAPI page shows ``POST /v1/jobs``'s JSON body (the route reads it itself)."""
    generate = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema:
            return api.openapi_schema
        schema = generate()
        job = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(job.pop("$defs", {}))
        schemas["JobRequest"] = job
        return schema

    api.openapi = openapi  # type: ignore[method-assign]


def _handlers(api: FastAPI) -> None:
    @api.exception_handler(UploadTooLarge)
    async def too_large(_: Request, err: UploadTooLarge) -> JSONResponse:
        return error(413, str(err))

    @api.exception_handler(DiffguideError)
    async def diffguide_error(_: Request, err: DiffguideError) -> JSONResponse:
        return error(422, str(err))

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{where}: {str(e.get('msg', '')).removeprefix('Value error, ')}")
        return error(422, "; ".join(parts))

    @api.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return error(err.status_code, str(err.detail), dict(err.headers or {}))


def prepare(worker: Worker, body: dict[str, Any], parts: dict[str, bytes]) -> tuple[JobRequest, Staged]:
    """The request, its files checked and staged (422 / 413 before anything is kept)."""
    try:
        JobRequest.model_validate(body)  # the fields first, before reading any file
        staged = stage(body, parts, worker.uploads, worker.config.max_upload_bytes)
    except ValidationError as err:
        raise RequestValidationError(err.errors()) from None
    try:
        return JobRequest.model_validate(body), staged
    except BaseException:
        staged.discard()
        raise


async def read_body(
    request: Request, field_limit: int, files: tuple[str, ...] | None = None
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A JSON body, or a multipart one: its ``request`` part (JSON) and its file parts by name."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        if files is not None:
            raise HTTPException(422, f"send multipart/form-data with the part(s) {', '.join(files)}")
        return request_json(await request.body()), {}
    form = await request.form(max_files=MAX_PARTS, max_fields=MAX_PARTS, max_part_size=field_limit)
    text: str | bytes | None = None
    parts: dict[str, bytes] = {}
    for name, value in form.multi_items():
        data: str | bytes = await value.read() if isinstance(value, UploadFile) else value
        if name == "request" and files is None:
            text = data
        elif name in parts:
            raise HTTPException(422, f"the multipart body has two parts named '{name[:40]}'")
        elif isinstance(data, bytes):
            parts[name] = data
        else:
            raise HTTPException(422, f"part '{name[:40]}' must be a file")
    if files is None and text is None:
        raise HTTPException(422, "a multipart job needs a 'request' part (the job's JSON)")
    return ({} if text is None else request_json(text)), parts


def _job_routes(api: FastAPI, worker: Worker, config: ServiceConfig) -> None:
    @api.post("/v1/jobs", status_code=202, openapi_extra=JOB_BODY)
    async def submit(request: Request, wait: bool = False) -> JSONResponse:
        """Queue a job; ``?wait=true`` answers when it has ended (200). The body is the job's JSON
        (``JobRequest``), or multipart/form-data: a ``request`` part with that JSON and file parts
        that it names with ``{"part": NAME}``."""
        body, parts = await read_body(request, config.max_request_bytes)
        req, staged = await asyncio.to_thread(prepare, worker, body, parts)
        try:
            row = await asyncio.to_thread(worker.submit, req, staged)
        except QueueFull:
            return error(
                429,
                f"the queue is full ({config.queue_size} jobs waiting); retry later",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        finally:
            staged.discard()  # what was not committed (the job was refused)
        if not wait:
            return JSONResponse(row.public(), status_code=202, headers={"Location": f"/v1/jobs/{row.id}"})
        await asyncio.to_thread(worker.live[row.id].done.wait, config.wait_timeout_s)
        return JSONResponse(job_row(worker, row.id).public(), status_code=200)

    @api.post("/v1/uploads", status_code=201)
    async def upload(request: Request, kind: str | None = None) -> JSONResponse:
        """Store one .safetensors file (multipart part ``file``), checked as ``kind`` (conditioning,
        negative_conditioning, lora) when given; jobs name it by the answer's ``id``
        (``{"upload": ID}``). The same file twice is one upload."""
        _, parts = await read_body(request, config.max_request_bytes, files=("file",))
        if set(parts) != {"file"}:
            raise HTTPException(422, "send the file as the multipart part 'file'")
        found = await asyncio.to_thread(
            store_upload, parts["file"], kind, worker.uploads, config.max_upload_bytes
        )
        return JSONResponse(found, status_code=201)

    @api.get("/v1/jobs/{job_id}/trace", response_class=FileResponse)
    def trace(job_id: str) -> FileResponse:
        """The step trace (safetensors, as ``diffguide generate --trace`` writes it) of a job that
        asked for one (``"trace": true``)."""
        path = finished_folder(worker, job_id) / "trace.safetensors"
        if not path.is_file():
            raise HTTPException(404, f"job '{job_id}' has no trace: ask for one with \"trace\": true")
        return FileResponse(
            path, media_type="application/octet-stream", filename=f"{job_id}-trace.safetensors"
        )

    @api.get("/v1/jobs")
    def jobs(limit: int = Query(100, ge=1, le=1000)) -> list[dict[str, Any]]:
        """The most recent jobs, oldest first."""
        return [r.public() for r in worker.store.list(limit=limit)]

    @api.get("/v1/jobs/{job_id}")
    def job(job_id: str) -> dict[str, Any]:
        return job_row(worker, job_id).public()

    @api.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str) -> dict[str, Any]:
        """Cancel: a queued job at once, a running one within one step (409 once it has ended)."""
        row = job_row(worker, job_id)
        try:
            row = worker.cancel(job_id)
        except NotCancellable:
            raise HTTPException(
                409, f"job '{job_id}' has already ended ({job_row(worker, job_id).state})"
            ) from None
        return {**row.public(), "cancel_requested": True}

    @api.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str) -> StreamingResponse:
        """Server-sent events: ``state``, one ``step`` per step (``preview`` every few), ``end``."""
        job_row(worker, job_id)
        return StreamingResponse(
            _stream(worker, job_id), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @api.get("/v1/jobs/{job_id}/images/{index}", response_class=FileResponse)
    def image(job_id: str, index: int) -> FileResponse:
        """Image ``index`` as PNG; its manifest is in the PNG's 'diffguide' text chunk."""
        return FileResponse(image_path(worker, job_id, index), media_type="image/png")

    @api.get("/v1/jobs/{job_id}/latents", response_class=FileResponse)
    def latents(job_id: str) -> FileResponse:
        """The final latents of the batch (safetensors, key 'latents'; manifests in the metadata)."""
        path = finished_folder(worker, job_id) / "latents.safetensors"
        return FileResponse(path, media_type="application/octet-stream", filename=f"{job_id}.safetensors")

    @api.get("/v1/jobs/{job_id}/manifest")
    def manifest(job_id: str) -> Response:
        """One manifest per image (JSON list)."""
        path = finished_folder(worker, job_id) / "manifest.json"
        return Response(path.read_bytes(), media_type="application/json")

    @api.get("/v1/compare")
    def compare(a: str, b: str, image: int = 0) -> dict[str, Any]:
        """The diff report of two jobs' image ``image``: latents and pixels (diffguide.repro.diff)."""
        return compare_jobs(worker, a, b, image)

    @api.get("/v1/compare/heatmap", response_class=Response)
    def heatmap(a: str, b: str, image: int = 0) -> Response:
        """|a - b| of the two images, per pixel (max over channels), as a PNG heatmap."""
        return Response(heatmap_png(worker, a, b, image), media_type="image/png")


async def _stream(worker: Worker, job_id: str) -> AsyncIterator[str]:
    live = worker.live.get(job_id)
    if live is None:  # ended before this process started (or long ago): its final state only
        row = job_row(worker, job_id)
        yield _sse({"event": "end", "state": row.state, "error": row.error})
        return
    seen = 0
    while True:
        new = live.since(seen)
        seen += len(new)
        for event in new:
            yield _sse(event)
            if event["event"] == "end":
                return
        await asyncio.sleep(EVENT_POLL_S)


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"


def _other_routes(api: FastAPI, worker: Worker, cache: ModelCache) -> None:
    @api.get("/v1/models")
    def models() -> dict[str, Any]:
        """The models by name, and what the cache holds."""
        held = {m.name: m.bytes for m in cache.held()}
        return {
            "models": [{"name": n, "loaded": n in held, "bytes": held.get(n)} for n in sorted(cache.models)],
            "cache": cache.describe(),
        }

    @api.get("/v1/models/{name}/layers")
    def layers(
        name: str, pag: str | None = None, tpg: str | None = None, slg: str | None = None
    ) -> dict[str, Any]:
        """The model's attention units and presets; with pag/tpg/slg, the modules each spec selects."""
        from .layers import layer_report

        return layer_report(cache.get(name), {"pag": pag, "tpg": tpg, "slg": slg})

    @api.get("/v1/options")
    def options() -> dict[str, Any]:
        """Schedulers, noise policies and the defaults (the page's choices)."""
        from ..defaults import DEFAULTS, NOISE_POLICIES, SCHEDULER_NAMES

        return {
            "schedulers": list(SCHEDULER_NAMES),
            "noise_policies": list(NOISE_POLICIES),
            "defaults": {"steps": DEFAULTS.steps, "cfg": DEFAULTS.cfg, "scheduler": DEFAULTS.scheduler},
        }

    @api.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "queue": worker.waiting()}

    @api.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        from .metrics import prometheus

        return prometheus(worker)

    static = Path(str(resources.files("diffguide") / "service" / "static"))

    @api.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(static / "index.html", media_type="text/html")

    api.mount("/static", StaticFiles(directory=static), name="static")
