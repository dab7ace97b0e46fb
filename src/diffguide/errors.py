"""Errors that diffguide raises for bad input.

Every error says what was wrong and how to fix it; the CLI prints the message on one line
and exits with a non-zero code.
"""

from __future__ import annotations


class DiffguideError(Exception):
    """A user-facing error: bad input, missing file, unknown layer, and the like."""


class LayerSpecError(DiffguideError):
    """A layer specification selected nothing, or named a module that does not exist."""


class ConfigError(DiffguideError):
    """A parameter is out of range or inconsistent with another one."""


class BlockIndexError(LayerSpecError, ConfigError):
    """A layer spec named a transformer block index past the last block of its stack."""
