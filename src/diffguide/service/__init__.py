"""``diffguide serve``: an HTTP service over the application layer (:mod:`diffguide.app`).

FastAPI app (:func:`create_app`), an in-process worker, a SQLite job store with result files
written atomically, an LRU model cache with a memory budget. Nothing else in diffguide imports
this package; it needs the ``serve`` extra (fastapi, uvicorn).
"""

from __future__ import annotations

from .config import ServiceConfig

__all__ = ["ServiceConfig"]
