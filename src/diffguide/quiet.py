"""Scoped silence for diffusers' and transformers' loading chatter.

Loading a pipeline makes both libraries log info and warnings (e.g. "requires torchvision,
falling back") and draw tqdm progress bars. diffguide's API and CLI load quietly: inside
:func:`library_noise_off` both libraries log errors only and draw no bars, and FutureWarnings
are ignored; on exit every setting is restored, so nothing global changes for the caller.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def library_noise_off() -> Iterator[None]:
    """Silence diffusers' and transformers' logs below error, loading bars and FutureWarnings."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for lib, _, _ in saved:
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        try:
            yield
        finally:
            for lib, verbosity, bars in saved:
                lib.set_verbosity(verbosity)
                if bars:
                    lib.enable_progress_bar()
