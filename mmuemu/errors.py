"""Errors raised by mmuemu.

Every class also subclasses the builtin it resembles, so ``except ValueError`` keeps working
for callers who do not know mmuemu.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "InvalidArgument",
    "InvariantError",
    "MmuEmuError",
    "OutOfMemory",
    "SegmentationFault",
]


class MmuEmuError(Exception):
    """Base class of every error mmuemu raises on purpose."""


class InvalidArgument(MmuEmuError, ValueError):
    """A request the kernel would refuse with -EINVAL (misaligned, unknown flag, ...)."""


class ConfigError(MmuEmuError, ValueError):
    """A configuration value is wrong; the message names the file, key and fix."""


class SegmentationFault(MmuEmuError, RuntimeError):
    """A CPU access that no VMA allows (SIGSEGV)."""


class OutOfMemory(MmuEmuError, MemoryError):
    """The emulated machine ran out of physical pages (-ENOMEM)."""


class InvariantError(MmuEmuError, AssertionError):
    """Machine.check() found a broken invariant."""
