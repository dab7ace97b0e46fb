"""What the CLI does before and around a run so that it fails early and leaves nothing behind:
output locations checked before the model is loaded, and SIGINT/SIGTERM turned into one
exception that unwinds through every ``finally`` (temporary files removed, hooks uninstalled).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from ..io import MAX_SUFFIX, check_file_target, check_prefix, check_writable


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so that cleanup runs as for Ctrl-C."""

    signum = signal.SIGTERM


class Interrupted(Exception):
    """A command stopped by SIGINT or SIGTERM (not a KeyboardInterrupt, so click leaves it alone)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}; no partial files were left")
        self.signum = signum


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (restored after); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted(err: KeyboardInterrupt) -> Interrupted:
    return Interrupted(getattr(err, "signum", signal.SIGINT))


def check_outputs(opts: Any, num_images: int, seed: int) -> None:
    """Every location ``generate`` will write is checked before the model is loaded: the file
    prefix, the output folder (created, probed with the longest file name, removed again) and
    the trace file."""
    check_prefix(opts.prefix)
    last = num_images - 1
    longest = f"{opts.prefix}-{last:03d}-{seed + last}_{MAX_SUFFIX - 1}.safetensors"
    check_writable(Path(opts.out), longest)
    if opts.trace is not None:
        check_file_target(opts.trace, "--trace")
