"""The service's settings (``diffguide serve`` options), checked once at start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

MB = 1024 * 1024


@dataclass(frozen=True)
class ServiceConfig:
    """Where models and results live, and the service's limits.

    ``model_dirs``: folders whose diffusers sub-folders are the models, by folder name (the
    bundled ``tiny-sd`` too unless ``bundled_model`` is False); requests name a model, never a
    path. ``queue_size``: jobs waiting (not running) before POST answers 429. ``max_request_bytes``:
    larger bodies are answered 413; ``max_upload_bytes``: the same for multipart bodies (files: ``POST
    /v1/jobs``, ``/v1/uploads``, ``/upload/image``) and for each file. ``api_key``: when set, every endpoint (the page included) needs
    ``Authorization: Bearer KEY`` (or ``?api_key=KEY``, for the page's links and event streams).
    ``cors_origins``: empty = CORS off. ``memory_budget_mb``: the model cache never holds more.
    ``threads``: torch threads per job (None: the application layer's rule, 1 for tiny models).
    ``preview_every``: a preview image in the event stream every this many steps (0 = none).
    """

    data_dir: Path
    model_dirs: tuple[Path, ...] = ()
    bundled_model: bool = True
    queue_size: int = 16
    max_request_bytes: int = 1 * MB
    max_upload_bytes: int = 256 * MB
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    memory_budget_mb: float = 4096.0
    device: str = "cpu"
    threads: int | None = None
    preview_every: int = 2
    wait_timeout_s: float = 600.0
    callback_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ConfigError(f"queue size must be >= 1, got {self.queue_size}")
        if self.max_request_bytes < 1024:
            raise ConfigError(f"request size limit must be >= 1024 bytes, got {self.max_request_bytes}")
        if self.max_upload_bytes < 1024:
            raise ConfigError(f"upload size limit must be >= 1024 bytes, got {self.max_upload_bytes}")
        if not self.memory_budget_mb > 0:
            raise ConfigError(f"model memory budget must be > 0 MB, got {self.memory_budget_mb}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.preview_every < 0:
            raise ConfigError(f"preview interval must be >= 0 steps, got {self.preview_every}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty: give a non-empty key or none")
        for folder in self.model_dirs:
            if not Path(folder).is_dir():
                raise ConfigError(f"model folder '{folder}' does not exist or is not a folder")
