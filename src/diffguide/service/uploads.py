"""Files sent with a job: conditioning (diffguide's or ComfyUI's form), LoRAs and initial latents, as
safetensors.

A file field of a request (``conditioning``, ``negative_conditioning``, ``loras[i].file``,
``initial_latents``) is a
:class:`FileRef`: ``{"upload": ID}`` (a file sent before to ``POST /v1/uploads``), ``{"base64":
DATA}`` (in the JSON body) or ``{"part": NAME}`` (a file part of a multipart body). Files are
checked before anything is stored (safetensors only: a pickle is refused, it could run code),
then kept by content under ``data_dir/uploads/<sha256>.safetensors``, each written atomically,
and the stored request names them by id only: a refused request leaves nothing behind.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..conditioning import ConditioningFile, load_conditioning
from ..errors import DiffguideError
from ..sampling.init import InitLatents, load_init_latents

if TYPE_CHECKING:
    from .schema import JobRequest

#: What every refusal of a file's format says to send instead.
SEND_INSTEAD = "send a .safetensors file instead (safetensors.torch.save_file(dict_of_tensors, path))"
KINDS = ("conditioning", "negative_conditioning", "lora", "initial_latents")


class UploadTooLarge(DiffguideError):
    """A file over the upload limit (413)."""


def check_safetensors(data: bytes, what: str) -> None:
    """``data`` is a safetensors file, or a one-line error that says what to send instead. (A pickle is
    named only once the file does not read as safetensors: a safetensors header of 128 bytes starts
    with the byte 0x80 too, as a pickle does.)"""
    try:
        from safetensors.torch import load

        load(data)
    except Exception as err:
        if data[:2] == b"PK" or data[:1] == b"\x80":
            raise DiffguideError(
                f"{what} is a pickle (torch.save / .pt / .ckpt), which can run code when loaded: the service "
                f"reads only safetensors; {SEND_INSTEAD}"
            ) from None
        reason = " ".join(str(err).split())[:120]
        raise DiffguideError(f"{what} is not a safetensors file ({reason}); {SEND_INSTEAD}") from None


def metadata_of(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def is_comfy_form(path: Path) -> bool:
    from ..comfy_workflow.conditioning import META_KEY

    return META_KEY in metadata_of(path)


def check_kind(path: Path, kind: str, what: str) -> None:
    """A stored or staged file read as ``kind`` (conditioning files are loaded and checked)."""
    from ..comfy_workflow.conditioning import load_comfy_conditioning, to_diffguide

    try:
        if kind == "negative_conditioning" or (kind == "conditioning" and is_comfy_form(path)):
            to_diffguide(load_comfy_conditioning(path)[0], what)
        elif kind == "conditioning":
            load_conditioning(path)
        elif kind == "initial_latents":
            load_init_latents(path)
    except DiffguideError as err:
        raise DiffguideError(f"{what}: {str(err).replace(str(path), 'the file')}") from None


@dataclass
class Staged:
    """Files of one request, checked and written to temporary names; :meth:`commit` gives them their
    final names (just before the job is queued), :meth:`discard` removes them."""

    folder: Path
    temps: dict[str, Path] = field(default_factory=dict)  # sha256 -> temporary file

    def add(self, data: bytes, kind: str, what: str, limit: int) -> str:
        if len(data) > limit:
            raise UploadTooLarge(f"{what} is {len(data)} bytes, more than the upload limit ({limit} bytes)")
        check_safetensors(data, what)
        sha = hashlib.sha256(data).hexdigest()
        if sha not in self.temps and not self.path(sha).is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".staged-{os.getpid()}-{id(self)}-{len(self.temps)}.safetensors"
            tmp.write_bytes(data)
            self.temps[sha] = tmp
        check_kind(self.temps.get(sha, self.path(sha)), kind, what)
        return sha

    def path(self, sha: str) -> Path:
        return self.folder / f"{sha}.safetensors"

    def commit(self) -> None:
        for sha, tmp in self.temps.items():
            os.replace(tmp, self.path(sha))
        self.temps = {}

    def discard(self) -> None:
        for tmp in self.temps.values():
            tmp.unlink(missing_ok=True)
        self.temps = {}


def stage(body: dict[str, Any], parts: dict[str, bytes], folder: Path, limit: int) -> Staged:
    """Check the request's files, stage the new ones, and replace every FileRef in ``body`` (in
    place) by ``{"upload": ID}``. DiffguideError (nothing staged) for a bad or missing file."""
    staged = Staged(folder)
    named = {r.get("part") for _, r, _ in _refs(body)}
    try:
        for where, ref, kind in _refs(body):
            ref_id = _stage_one(staged, ref, kind, where, parts, limit)
            ref.clear()
            ref["upload"] = ref_id
        _check_pair(body, staged)
        unused = sorted(set(parts) - named)
        if unused:
            raise DiffguideError(f"file part(s) {', '.join(unused)} are not referenced by the request")
    except BaseException:
        staged.discard()
        raise
    return staged


def _check_pair(body: dict[str, Any], staged: Staged) -> None:
    pos, neg = body.get("conditioning"), body.get("negative_conditioning")
    if isinstance(pos, dict) and isinstance(neg, dict):
        path = staged.temps.get(pos["upload"], staged.path(pos["upload"]))
        if not is_comfy_form(path):
            raise DiffguideError(
                "negative_conditioning goes with a ComfyUI-form conditioning; diffguide's conditioning "
                "file holds its own negative_prompt_embeds"
            )


def _refs(body: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """(field name, FileRef dict, kind) of every file field in a request body."""
    out = []
    for key in ("conditioning", "negative_conditioning", "initial_latents"):
        if isinstance(body.get(key), dict):
            out.append((key, body[key], key))
    loras = body.get("loras")
    if isinstance(loras, list):
        for i, lora in enumerate(loras):
            if isinstance(lora, dict) and isinstance(lora.get("file"), dict):
                out.append((f"loras.{i}.file", lora["file"], "lora"))
    return out


def _stage_one(
    staged: Staged, ref: dict[str, Any], kind: str, where: str, parts: dict[str, bytes], limit: int
) -> str:
    given = [k for k in ("upload", "base64", "part") if ref.get(k) is not None]
    if len(given) != 1 or set(ref) - {"upload", "base64", "part"}:
        raise DiffguideError(f"{where}: give exactly one of 'upload' (an id), 'base64' or 'part'")
    how = given[0]
    value = ref[how]
    if not isinstance(value, str):
        raise DiffguideError(f"{where}.{how} must be a string")
    if how == "upload":
        if not (len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
            raise DiffguideError(f"{where}: '{value[:80]}' is not an upload id (64 hex digits)")
        if not staged.path(value).is_file():
            raise DiffguideError(f"{where}: no upload '{value}' (send the file to POST /v1/uploads first)")
        check_kind(staged.path(value), kind, where)
        return value
    if how == "part":
        if value not in parts:
            raise DiffguideError(f"{where}: the multipart body has no file part '{value[:80]}'")
        data = parts[value]
    else:
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise DiffguideError(f"{where}.base64 is not valid base64") from None
    return staged.add(data, kind, where, limit)


@dataclass(frozen=True)
class JobFiles:
    """A job's files, resolved for its run."""

    conditioning: ConditioningFile | None
    loras: tuple[tuple[str, float], ...]
    init_latents: InitLatents | None = None

    @property
    def prompt(self) -> str | None:
        """The conditioning file's ``prompt`` metadata (the CLI's prompt for a conditioning run)."""
        return None if self.conditioning is None else self.conditioning.metadata.get("prompt")


def job_files(req: JobRequest, folder: Path) -> list[Path]:
    """The stored files a job names (to send them to a Ray Serve replica)."""
    refs = [req.conditioning, req.negative_conditioning, *(lo.file for lo in req.loras), req.initial_latents]
    return [folder / f"{r.upload}.safetensors" for r in refs if r is not None]


def keep_files(files: dict[str, bytes], folder: Path) -> None:
    """Store files received by id (a replica's copy of the front's uploads), each atomically."""
    from ..io import replace_atomic

    folder.mkdir(parents=True, exist_ok=True)
    for sha, data in files.items():
        if hashlib.sha256(data).hexdigest() != sha:
            raise DiffguideError(f"upload '{sha[:16]}' arrived damaged (its sha256 differs)")
        if not (folder / f"{sha}.safetensors").is_file():
            replace_atomic(folder / f"{sha}.safetensors", data)


def resolve(req: JobRequest, folder: Path) -> JobFiles:
    """The files of a queued job (their ids checked when it was submitted)."""
    from ..comfy_workflow.conditioning import describe_metadata, load_comfy_conditioning, to_diffguide

    def path(ref: Any) -> Path:
        return folder / f"{ref.upload}.safetensors"

    cond = None
    if req.conditioning is not None:
        p = path(req.conditioning)
        if not is_comfy_form(p):
            cond = load_conditioning(p)
        else:
            pos, meta = load_comfy_conditioning(p)
            neg = None
            if req.negative_conditioning is not None:
                neg = load_comfy_conditioning(path(req.negative_conditioning))[0]
            described = {"positive": describe_metadata(pos), **meta}
            if neg is not None:
                described["negative"] = describe_metadata(neg)
            cond = ConditioningFile(
                to_diffguide(pos, "conditioning"),
                None if neg is None else to_diffguide(neg, "negative_conditioning"),
                described,
                str(p),
                req.conditioning.upload,
            )
    loras = tuple((str(path(lo.file)), lo.scale) for lo in req.loras)
    init = None if req.initial_latents is None else load_init_latents(path(req.initial_latents))
    return JobFiles(cond, loras, init)


def request_json(text: str | bytes) -> dict[str, Any]:
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise DiffguideError(f"the request is not JSON ({err})") from None
    if not isinstance(body, dict):
        raise DiffguideError(f"the request must be a JSON object, got {type(body).__name__}")
    return body


def store_upload(data: bytes, kind: str | None, folder: Path, limit: int) -> dict[str, Any]:
    """``POST /v1/uploads``: one checked file stored by content; its id and size."""
    if kind is not None and kind not in KINDS:
        raise DiffguideError(f"unknown upload kind '{kind[:40]}'; one of: {', '.join(KINDS)}")
    staged = Staged(folder)
    try:
        sha = staged.add(data, kind or "lora", f"the file ({kind or 'safetensors'})", limit)
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    return {"id": sha, "bytes": len(data), "kind": kind}
