"""The job store: one SQLite table of jobs, result files under ``data_dir/jobs/<id>/``.

A job's files are written (atomically, file by file) before its row says ``succeeded``, so a
finished job always has its files. On open, a job left ``running`` by a process that died is
marked ``failed`` (its partial files removed); ``queued`` jobs are returned to be queued again.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
RESTART_ERROR = "the server stopped while this job was running"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    images INTEGER NOT NULL DEFAULT 0,
    error TEXT
)
"""


@dataclass(frozen=True)
class JobRow:
    id: str
    seq: int
    state: str
    model: str
    request: dict[str, Any]
    created: float
    started: float | None
    finished: float | None
    step: int
    steps: int
    images: int
    error: str | None

    def public(self) -> dict[str, Any]:
        """The job as ``GET /v1/jobs/{id}`` answers it."""
        out: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "model": self.model,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "progress": {"step": self.step, "steps": self.steps},
            "images": self.images,
            "error": self.error,
            "request": self.request,
        }
        if self.state == "succeeded":
            base = f"/v1/jobs/{self.id}"
            out["files"] = {
                "images": [f"{base}/images/{i}" for i in range(self.images)],
                "latents": f"{base}/latents",
                "manifest": f"{base}/manifest",
            }
            if self.request.get("trace"):
                out["files"]["trace"] = f"{base}/trace"
        return out


class JobStore:
    """Thread-safe access to the jobs table (one connection, one lock)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def folder(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def recover(self) -> list[JobRow]:
        """After a restart: running jobs failed (partial files removed); queued jobs, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE state = 'running'").fetchall()
        for (job_id,) in rows:
            shutil.rmtree(self.folder(job_id), ignore_errors=True)
            self.update(job_id, state="failed", error=RESTART_ERROR, finished=time.time())
        return self.list(states=("queued",), limit=1_000_000)

    def add(self, job_id: str, model: str, request: dict[str, Any], steps: int) -> JobRow:
        with self._lock:
            (seq,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()
            self._db.execute(
                "INSERT INTO jobs (id, seq, state, model, request, created, steps) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, seq, "queued", model, json.dumps(request), time.time(), steps),
            )
        row = self.get(job_id)
        assert row is not None
        return row

    def update(self, job_id: str, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def finish_if(self, job_id: str, expected: tuple[str, ...], **fields: Any) -> bool:
        """Update only if the job's state is one of ``expected`` (a compare-and-set)."""
        cols = ", ".join(f"{k} = ?" for k in fields)
        marks = ", ".join("?" for _ in expected)
        with self._lock:
            cur = self._db.execute(
                f"UPDATE jobs SET {cols} WHERE id = ? AND state IN ({marks})",
                (*fields.values(), job_id, *expected),
            )
            return cur.rowcount == 1

    def get(self, job_id: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _row(row)

    def list(self, states: tuple[str, ...] = STATES, limit: int = 1000) -> list[JobRow]:
        """The ``limit`` most recent jobs in ``states``, oldest first."""
        marks = ", ".join("?" for _ in states)
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq DESC LIMIT ?", (*states, limit)
            ).fetchall()
        return [_row(r) for r in reversed(rows)]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({state: n for state, n in rows})
        return out


def _row(r: tuple[Any, ...]) -> JobRow:
    return JobRow(r[0], r[1], r[2], r[3], json.loads(r[4]), *r[5:])
