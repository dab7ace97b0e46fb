"""A finished job's result files (404 / 409 as HTTP errors)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import HTTPException

if TYPE_CHECKING:
    from .store import JobRow
    from .worker import Worker


def job_row(worker: Worker, job_id: str) -> JobRow:
    row = worker.store.get(job_id)
    if row is None:
        raise HTTPException(404, f"no job '{job_id[:40]}'")
    return row


def finished_folder(worker: Worker, job_id: str) -> Path:
    row = job_row(worker, job_id)
    if row.state != "succeeded":
        raise HTTPException(409, f"job '{job_id}' is {row.state}: it has no results")
    return worker.store.folder(job_id)


def image_path(worker: Worker, job_id: str, index: int) -> Path:
    folder = finished_folder(worker, job_id)
    found = sorted(folder.glob(f"image-{index:03d}-*.png")) if index >= 0 else []
    if not found:
        raise HTTPException(404, f"job '{job_id}' has no image {index}")
    return found[0]
