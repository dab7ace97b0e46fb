"""ComfyUI-compatible endpoints of ``diffguide serve``: ``POST /prompt``, ``GET /history`` (all
prompts, ``max_items`` / ``offset`` as ComfyUI), ``GET /history/{id}``, ``GET /view`` and the
``/ws`` progress socket, so an existing ComfyUI API client works unchanged.

A prompt (API-format workflow) is translated by :mod:`diffguide.comfy_workflow` into one run, which
becomes an ordinary :class:`~.schema.JobRequest` job (same queue, store and files as ``/v1/jobs``;
the prompt id is the job id). ``CheckpointLoaderSimple``'s ``ckpt_name`` names a service model
(``tiny-sd`` or ``tiny-sd.safetensors``), never a path. ``LoraLoader`` / ``LoraLoaderModelOnly``'s
``lora_name`` names a file sent to ``POST /v1/uploads`` (``<id>.safetensors``, the id the upload
answered; the job's ``loras``), never a path. A workflow that diffguide cannot run, or whose run
is not a plain service job (ModelSampling overrides, other files), is answered 400 with ComfyUI's
``node_errors`` shape and the one-line error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from ..errors import DiffguideError
from ..io import replace_atomic
from . import comfy_info
from .comfy_info import uploaded
from .files import job_row
from .schema import JobRequest
from .worker import NotCancellable, QueueFull, Worker, one_line

WS_POLL_S = 0.05
_NODE = re.compile(r"^node (\S+) \(([^)]+)\): ")
_CKPT_SUFFIXES = (".safetensors", ".ckpt", ".pt")
#: Nodes that name files (transformers, text encoders, VAEs, conditioning): not served.
_FILE_NODES = ("UNETLoader", "CLIPLoader", "DualCLIPLoader", "VAELoader", "DiffguideLoadConditioning")
#: Nodes whose ``lora_name`` names an upload (``<sha256>.safetensors``).
LORA_NODES = ("LoraLoader", "LoraLoaderModelOnly")
_UPLOAD_NAME = re.compile(r"^([0-9a-f]{64})(\.safetensors)?$")
#: The states of a prompt in ComfyUI's history (ended).
ENDED = ("succeeded", "failed", "cancelled")
#: GenerateConfig fields a JobRequest carries under the same name.
_SAME = ("steps", "width", "height", "seed", "scheduler", "eta", "noise", "schedule", "shift")


@dataclass(frozen=True)
class ComfyPrompt:
    """What the ComfyUI side of a job needs besides the job: its workflow and node ids."""

    prompt: dict[str, Any]
    client_id: str | None
    number: int
    sampler_node: str
    output_node: str | None  # the SaveImage (or VAEDecode) node, if any

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def model_name(ckpt_name: str) -> str:
    """``tiny-sd.safetensors`` -> ``tiny-sd``: a checkpoint name is a service model's name."""
    for suffix in _CKPT_SUFFIXES:
        if ckpt_name.endswith(suffix):
            return ckpt_name[: -len(suffix)]
    return ckpt_name


def uploaded_loras(uploads: Path) -> list[str]:
    """The ``lora_name`` values a workflow may give: every file sent to ``POST /v1/uploads``."""
    return sorted(p.name for p in uploads.glob("*.safetensors") if _UPLOAD_NAME.match(p.name))


def _lora_upload(node: Any, uploads: Path | None) -> str:
    """The upload id a LoRA node's ``lora_name`` names (WorkflowError unless it was uploaded)."""
    from ..comfy_workflow.graph import WorkflowError

    name = str(node.inputs.get("lora_name", ""))
    found = _UPLOAD_NAME.match(name)
    if found is None or uploads is None or not (uploads / f"{found[1]}.safetensors").is_file():
        raise WorkflowError(
            f"{node.label}: LoRA '{name[:80]}' is not a file uploaded to this service; send it to "
            "POST /v1/uploads?kind=lora and give lora_name '<id>.safetensors'"
        )
    return found[1]


def to_job(
    prompt: dict[str, Any], known: dict[str, Path], uploads: Path | None = None
) -> tuple[JobRequest, str, str | None]:
    """The job of an API-format workflow, its sampler node and its output node (WorkflowError).
    LoRA nodes name files in the service's upload folder ``uploads``."""
    from ..comfy_workflow.graph import WorkflowError, parse_workflow
    from ..comfy_workflow.translate import translate

    graph = parse_workflow({"prompt": prompt})
    for node in graph.values():
        if node.class_type in _FILE_NODES:
            raise WorkflowError(
                f"{node.label}: not run by the service, which runs its own models by name "
                "(CheckpointLoaderSimple) and LoRAs sent to POST /v1/uploads, no other files"
            )
    with tempfile.TemporaryDirectory() as tmp:  # ckpt names -> service models, no files read
        names: dict[str, str] = {}
        lora_ids: dict[str, str] = {}  # lora_name -> upload id
        for node in graph.values():
            if node.class_type in LORA_NODES:
                lora_name = str(node.inputs.get("lora_name", ""))
                lora_ids[lora_name] = _lora_upload(node, uploads)
                (Path(tmp) / "loras").mkdir(exist_ok=True)
                (Path(tmp) / "loras" / lora_name).touch()
        for node in graph.values():
            if node.class_type == "CheckpointLoaderSimple":
                ckpt = str(node.inputs.get("ckpt_name", ""))
                name = model_name(ckpt)
                if name not in known or "/" in ckpt or "\\" in ckpt:
                    raise WorkflowError(
                        f"{node.label}: checkpoint '{ckpt[:80]}' is not a model of this service; "
                        f"available: {', '.join(sorted(known)) or 'none'}"
                    )
                (Path(tmp) / "checkpoints").mkdir(exist_ok=True)
                (Path(tmp) / "checkpoints" / ckpt).touch()
                names[ckpt] = name
        run = translate(graph, Path(tmp), Path(tmp))
    if run.conditioning is not None or run.config.comfy_sampling is not None:
        raise WorkflowError(
            f"node {run.sampler_node} (KSampler): the service runs prompts through the checkpoint's "
            "text encoder, without ModelSampling overrides"
        )
    cfg = run.config
    fields = {
        "model": names[run.model.path.name],
        "prompt": list(cfg.prompts),
        "negative_prompt": list(cfg.negative_prompts),
        "guidance": [t.describe() for t in cfg.guidance],
        "loras": [{"file": {"upload": lora_ids[p.name]}, "scale": s} for p, s in run.model.loras],
        **{k: getattr(cfg, k) for k in _SAME},
    }
    try:
        req = JobRequest.model_validate(fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise WorkflowError(
            f"node {run.sampler_node} (KSampler): the run's {where}: "
            + str(first.get("msg", "")).removeprefix("Value error, ")
        ) from None
    if req.to_config() != cfg:
        raise WorkflowError(f"node {run.sampler_node} (KSampler): this run is not expressible as a job")
    output = run.decode_node if run.save_prefix is None else _save_node(graph)
    return req, run.sampler_node, output


def _save_node(graph: Any) -> str | None:
    return next((n.id for n in graph.values() if n.class_type == "SaveImage"), None)


def node_errors(prompt: Any, message: str) -> dict[str, Any]:
    """ComfyUI's answer to an invalid prompt: ``error`` and ``node_errors`` keyed by node id."""
    message = one_line(message)
    found = _NODE.match(message)
    errors: dict[str, Any] = {}
    if found:
        nid, cls = found.groups()
        if isinstance(prompt, dict) and isinstance(prompt.get(nid), dict):
            cls = str(prompt[nid].get("class_type", cls))
        entry = {"type": "diffguide_unsupported", "message": message, "details": "", "extra_info": {}}
        errors[nid] = {"errors": [entry], "dependent_outputs": [], "class_type": cls}
    error: dict[str, Any] = {
        "type": "prompt_outputs_failed_validation" if found else "invalid_prompt",
        "message": message,
        "details": "",
        "extra_info": {},
    }
    return {"error": error, "node_errors": errors}


class ComfyState:
    """The ComfyUI side of the service: prompt records next to the jobs, clients' prompt ids."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.root = worker.store.root / "comfy"
        self.root.mkdir(parents=True, exist_ok=True)
        self.number = 0
        self.clients: dict[str, list[str]] = {}

    def record(self, job_id: str) -> ComfyPrompt | None:
        path = self.root / f"{job_id}.json"
        if not re.fullmatch(r"[0-9a-f]{16}", job_id) or not path.is_file():
            return None
        return ComfyPrompt(**json.loads(path.read_text(encoding="utf-8")))

    def submit(self, body: dict[str, Any]) -> JSONResponse:
        prompt = body.get("prompt")
        if not isinstance(prompt, dict):
            return JSONResponse(
                {"error": {"type": "no_prompt", "message": "No prompt provided", "details": "", "extra_info": {}},
                 "node_errors": {}},
                status_code=400,
            )  # fmt: skip
        try:
            req, sampler, output = to_job(prompt, self.worker.cache.models, self.worker.uploads)
            row = self.worker.submit(req)
        except QueueFull:
            raise HTTPException(429, "the queue is full; retry later", {"Retry-After": "2"}) from None
        except DiffguideError as err:
            return JSONResponse(node_errors(prompt, str(err)), status_code=400)
        client = body.get("client_id")
        self.number += 1
        rec = ComfyPrompt(prompt, None if client is None else str(client), self.number, sampler, output)
        replace_atomic(self.root / f"{row.id}.json", json.dumps(rec.to_json()))
        if rec.client_id is not None:  # kept while the worker keeps the job's events
            ids = self.clients.setdefault(rec.client_id, [])
            ids[:] = [i for i in ids if i in self.worker.live] + [row.id]
        return JSONResponse({"prompt_id": row.id, "number": rec.number, "node_errors": {}})

    def outputs(self, job_id: str, rec: ComfyPrompt) -> dict[str, Any]:
        folder = self.worker.store.folder(job_id)
        images = [
            {"filename": p.name, "subfolder": job_id, "type": "output"}
            for p in sorted(folder.glob("image-*.png"))
        ]
        return {rec.output_node: {"images": images}} if rec.output_node and images else {}

    def history_all(self, max_items: int | None, offset: int) -> dict[str, Any]:
        """ComfyUI's ``GET /history``: the ended prompts (posted to /prompt) in the order they
        ended, from ``offset`` (-1: the start, or the last ``max_items`` when that is given) and at
        most ``max_items`` of them (ComfyUI's ``PromptQueue.get_history``)."""
        rows = [r for r in self.worker.store.list(states=ENDED, limit=1_000_000) if self.record(r.id)]
        rows.sort(key=lambda r: (r.finished or 0.0, r.created))
        if offset < 0 and max_items is not None:
            offset = len(rows) - max_items
        chosen = rows[max(offset, 0) :][: max_items if max_items is not None else None]
        out: dict[str, Any] = {}
        for row in chosen:
            out.update(self.history(row.id, row))
        return out

    def history(self, job_id: str, row: Any = None) -> dict[str, Any]:
        """ComfyUI's history entry; ``{}`` while the prompt is queued or running (as ComfyUI)."""
        row = row if row is not None else job_row(self.worker, job_id)
        rec = self.record(job_id)
        if rec is None:
            raise HTTPException(404, f"no prompt '{job_id[:40]}'")
        if row.state in ("queued", "running"):
            return {}
        ok = row.state == "succeeded"
        messages: list[Any] = [["execution_start", {"prompt_id": job_id, "timestamp": _ms(row.started)}]]
        if ok:
            messages.append(["execution_success", {"prompt_id": job_id, "timestamp": _ms(row.finished)}])
        elif row.state == "cancelled":
            messages.append(["execution_interrupted", self._interrupted(job_id, rec, row.finished)])
        else:
            messages.append(["execution_error", self._error(job_id, rec, row.error or row.state)])
        outputs = self.outputs(job_id, rec) if ok else {}
        return {
            job_id: {
                "prompt": [rec.number, job_id, rec.prompt, {"client_id": rec.client_id}, [rec.output_node]],
                "outputs": outputs,
                "status": {"status_str": "success" if ok else "error", "completed": ok, "messages": messages},
                "meta": {n: {"node_id": n, "display_node": n} for n in outputs},
            }
        }

    @staticmethod
    def _interrupted(job_id: str, rec: ComfyPrompt, when: float | None = None) -> dict[str, Any]:
        node = rec.sampler_node
        kind = rec.prompt.get(node, {}).get("class_type", "KSampler")
        return {
            "prompt_id": job_id,
            "node_id": node,
            "node_type": kind,
            "executed": [],
            "timestamp": _ms(when or time.time()),
        }

    @staticmethod
    def _error(job_id: str, rec: ComfyPrompt, message: str) -> dict[str, Any]:
        return {
            "prompt_id": job_id,
            "node_id": rec.sampler_node,
            "node_type": rec.prompt.get(rec.sampler_node, {}).get("class_type", "KSampler"),
            "exception_message": message,
            "exception_type": "DiffguideError",
            "traceback": [],
        }

    def queue(self) -> dict[str, Any]:
        """ComfyUI's ``GET /queue``: the prompts (posted to /prompt) running and waiting, each as
        ``[number, prompt_id, prompt, {"client_id"}, [output node]]``."""

        def items(state: str) -> list[list[Any]]:
            out = []
            for row in self.worker.store.list(states=(state,), limit=1_000_000):
                rec = self.record(row.id)
                if rec is not None:
                    out.append(
                        [rec.number, row.id, rec.prompt, {"client_id": rec.client_id}, [rec.output_node]]
                    )
            return out

        return {"queue_running": items("running"), "queue_pending": items("queued")}

    def interrupt(self, prompt_id: str | None) -> None:
        """ComfyUI's ``POST /interrupt``: stop the running prompt (only ``prompt_id`` if given) within
        one step; jobs posted to /v1/jobs are not touched."""
        for row in self.worker.store.list(states=("running",), limit=1_000_000):
            if self.record(row.id) is not None and prompt_id in (None, row.id):
                with contextlib.suppress(NotCancellable):
                    self.worker.cancel(row.id)

    def delete(self, body: dict[str, Any]) -> None:
        """ComfyUI's ``POST /queue``: ``{"clear": true}`` cancels every waiting prompt,
        ``{"delete": [prompt_id, ...]}`` those (a running one is not touched)."""
        waiting = [r.id for r in self.worker.store.list(states=("queued",), limit=1_000_000)]
        chosen = waiting if body.get("clear") else [i for i in body.get("delete") or [] if i in waiting]
        for job_id in chosen:
            if self.record(job_id) is not None:
                with contextlib.suppress(NotCancellable):
                    self.worker.cancel(job_id)

    def view(self, filename: str, subfolder: str, kind: str) -> Path:
        """The file of ``/view``: an image of a finished prompt (the subfolder is its id), or an
        image sent to ``/upload/image``."""
        found = uploaded(self.root, filename, subfolder, kind)
        if found is not None:
            return found
        if kind != "output" or not re.fullmatch(r"image-[\w.-]+\.png", filename) or ".." in filename:
            raise HTTPException(404, f"no file '{filename[:80]}' of type '{kind[:20]}'")
        if self.record(subfolder) is None:
            raise HTTPException(404, f"no prompt '{subfolder[:40]}'")
        path = self.worker.store.folder(subfolder) / filename
        if not path.is_file():
            raise HTTPException(404, f"no file '{filename}' in prompt '{subfolder}'")
        return path

    def messages(self, job_id: str, event: dict[str, Any]) -> list[dict[str, Any]]:
        """ComfyUI's websocket messages for one job event."""
        rec = self.record(job_id)
        if rec is None:
            return []
        kind = event["event"]
        if kind == "state" and event["state"] == "running":
            return [
                _msg("execution_start", prompt_id=job_id, timestamp=_ms(time.time())),
                _msg("execution_cached", nodes=[], prompt_id=job_id, timestamp=_ms(time.time())),
                _msg("executing", node=rec.sampler_node, display_node=rec.sampler_node, prompt_id=job_id),
            ]
        if kind == "step":
            node = rec.sampler_node
            return [_msg("progress", value=event["step"], max=event["steps"], prompt_id=job_id, node=node)]
        if kind != "end":
            return []
        if event["state"] == "cancelled":
            return [{"type": "execution_interrupted", "data": self._interrupted(job_id, rec)}]
        if event["state"] != "succeeded":
            return [
                {
                    "type": "execution_error",
                    "data": self._error(job_id, rec, event["error"] or event["state"]),
                }
            ]
        out: list[dict[str, Any]] = []
        shown = rec.output_node
        if shown is not None:
            out.append(_msg("executing", node=shown, display_node=shown, prompt_id=job_id))
            output = self.outputs(job_id, rec).get(shown, {})
            out.append(_msg("executed", node=shown, display_node=shown, output=output, prompt_id=job_id))
        out.append(_msg("execution_success", prompt_id=job_id, timestamp=_ms(time.time())))
        out.append(_msg("executing", node=None, display_node=None, prompt_id=job_id))
        return out


def _msg(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


def _ms(t: float | None) -> int | None:
    return None if t is None else int(t * 1000)


def add_routes(api: FastAPI, worker: Worker, api_key: str | None) -> None:
    state = ComfyState(worker)

    @api.post("/prompt")
    async def prompt(request: Request) -> JSONResponse:
        """ComfyUI's ``POST /prompt``: ``{"prompt": API-format workflow, "client_id": ...}``."""
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "the body must be a JSON object with a 'prompt'")
        return await asyncio.to_thread(state.submit, body)

    @api.get("/history")
    def history_all(
        max_items: int | None = Query(None, ge=0), offset: int = Query(-1, ge=-1)
    ) -> dict[str, Any]:
        """ComfyUI's history of every ended prompt (``max_items``: the last that many; ``offset``:
        from that index on, as ComfyUI)."""
        return state.history_all(max_items, offset)

    @api.get("/history/{prompt_id}")
    def history(prompt_id: str) -> dict[str, Any]:
        """ComfyUI's history of one prompt (``{}`` until it has ended; 404 for an unknown id)."""
        return state.history(prompt_id)

    @api.get("/queue")
    def queue() -> dict[str, Any]:
        """ComfyUI's queue: ``queue_running`` and ``queue_pending`` (prompts posted to /prompt)."""
        return state.queue()

    @api.post("/queue")
    async def delete(request: Request) -> Response:
        """ComfyUI's ``{"clear": true}`` / ``{"delete": [prompt_id, ...]}`` for waiting prompts."""
        body = await _json_object(request)
        await asyncio.to_thread(state.delete, body)
        return Response(status_code=200)

    @api.post("/interrupt")
    async def interrupt(request: Request) -> Response:
        """Stop the running prompt (``{"prompt_id": ID}``: only that one) within one step; its
        history and socket report ``execution_interrupted``."""
        body = await _json_object(request, empty_ok=True)
        prompt_id = body.get("prompt_id")
        await asyncio.to_thread(state.interrupt, None if prompt_id is None else str(prompt_id))
        return Response(status_code=200)

    @api.get("/object_info")
    def object_info() -> dict[str, Any]:
        """ComfyUI's node descriptions, for the nodes the service runs."""
        return comfy_info.object_info(sorted(worker.cache.models), loras=uploaded_loras(worker.uploads))

    @api.get("/object_info/{node_class}")
    def object_info_node(node_class: str) -> dict[str, Any]:
        return comfy_info.object_info(sorted(worker.cache.models), node_class, uploaded_loras(worker.uploads))

    @api.post("/upload/image")
    async def upload_image(request: Request) -> dict[str, str]:
        """ComfyUI's image upload (multipart ``image``, ``subfolder``, ``type`` input/temp,
        ``overwrite``): ``{"name", "subfolder", "type"}``; the image is served by ``/view``."""
        form = await request.form(max_files=1, max_fields=8)
        image = form.get("image")
        if not isinstance(image, UploadFile) or not image.filename:
            raise HTTPException(400, "send the image as the multipart part 'image' (with a file name)")
        data = await image.read()
        fields = {k: str(form.get(k) or "") for k in ("subfolder", "type", "overwrite")}
        return await asyncio.to_thread(
            comfy_info.upload_image,
            state.root,
            data,
            image.filename,
            fields["subfolder"],
            fields["type"] or "input",
            fields["overwrite"] in ("true", "1"),
        )

    @api.get("/view", response_class=FileResponse)
    def view(filename: str, subfolder: str = "", type: str = "output") -> FileResponse:
        """An output image, as ComfyUI's ``/view`` (``subfolder`` is the prompt id)."""
        return FileResponse(state.view(filename, subfolder, type), media_type="image/png")

    @api.websocket("/ws")
    async def ws(socket: WebSocket, clientId: str | None = None) -> None:
        if api_key is not None and not _ws_authorised(socket, api_key):
            await socket.close(code=1008, reason="missing or wrong API key")
            return
        await socket.accept()
        sid = clientId or secrets.token_hex(16)
        await socket.send_json(
            _msg("status", status={"exec_info": {"queue_remaining": worker.waiting()}}, sid=sid)
        )
        try:
            await _forward(socket, state, sid)
        except WebSocketDisconnect:
            return


async def _forward(socket: WebSocket, state: ComfyState, sid: str) -> None:
    """Send the client's prompts' messages as their events arrive, until it disconnects."""
    closed = asyncio.create_task(socket.receive())
    seen: dict[str, int] = {}
    try:
        while not closed.done():
            for job_id in list(state.clients.get(sid, ())):
                live = state.worker.live.get(job_id)
                if live is None:
                    continue
                new = live.since(seen.get(job_id, 0))
                seen[job_id] = seen.get(job_id, 0) + len(new)
                for event in new:
                    for message in state.messages(job_id, event):
                        await socket.send_json(message)
            await asyncio.wait([closed], timeout=WS_POLL_S)
    finally:
        closed.cancel()


async def _json_object(request: Request, empty_ok: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if empty_ok and not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body


def _ws_authorised(socket: WebSocket, key: str) -> bool:
    given = socket.query_params.get("api_key")
    auth = socket.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return given is not None and secrets.compare_digest(given.encode(), key.encode())
