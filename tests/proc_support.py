"""Run Python code in a fresh interpreter that imports this checkout's diffguide."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import diffguide


def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    src = str(Path(diffguide.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
