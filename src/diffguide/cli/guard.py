"""What the CLI does before and around a run so that it fails early and leaves nothing behind:
output locations checked before the model is loaded, and SIGINT/SIGTERM turned into one
exception that unwinds through every ``finally`` (temporary files removed, hooks uninstalled).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import typer

from ..checks import DiffguideWarning
from ..io import MAX_SUFFIX, check_file_target, check_prefix, check_writable

T = TypeVar("T")


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


def _show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    typer.echo(f"warning: {' '.join(str(message).split())}", err=True)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """While the block runs, warnings print as one line ``warning: ...`` on stderr (also with -q),
    and diffguide's own every time they occur (restored after)."""
    with warnings.catch_warnings():
        warnings.showwarning = _show
        warnings.simplefilter("always", DiffguideWarning)
        yield


_abandoned: list[threading.Event] = []  # "done" events of interrupted workers


def exit_now_if_abandoned(code: int) -> None:
    """After an interrupt that abandoned a worker still inside a tensor operation, exit at once:
    a normal interpreter shutdown would wait for that operation (seconds to minutes)."""
    if not all(done.is_set() for done in _abandoned):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def interruptible(fn: Callable[[], T]) -> T:
    """``fn()`` run in a worker thread while the main thread waits for it, so that Ctrl-C and
    SIGTERM stop the command at once, even inside one long tensor operation (a single attention
    call on a far too large image can take minutes; Python handles signals only between
    operations). The interrupted worker is abandoned: the process exits without saving."""
    box: dict[str, Any] = {}
    done = threading.Event()  # not Thread.is_alive(): an interrupted join() can make it lie

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # re-raised in the calling thread
            box["error"] = err
        finally:
            done.set()

    worker = threading.Thread(target=work, name="diffguide-sampling", daemon=True)
    worker.start()
    try:
        while not done.wait(0.05):
            pass
    except KeyboardInterrupt:
        _abandoned.append(done)
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


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
