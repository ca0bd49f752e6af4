"""The protocol's error codes (0-9) and the typed exceptions that carry them."""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """The ten codes of docs/design.md, exactly; the wire carries the integer."""

    OK = 0
    OOM_VRAM = 1
    OOM_RAM = 2
    MODEL_CORRUPT = 3
    TIMEOUT = 4
    CANCELLED = 5
    UNSUPPORTED = 6
    INTERNAL = 7
    FORMAT_MISMATCH = 8
    LOAD_FAILED = 9


class AllmError(Exception):
    """An error that carries a protocol code.

    ``reason`` is an optional machine-readable refinement that the gateway may
    render differently from the code's default (``queue_full`` becomes 429,
    ``context_length_exceeded`` and ``invalid_request`` become 400); ``param``
    names the request field at fault, when one is.  ``restart`` says the
    process that raised it may be damaged (an engine failed inside C): the
    manager answers, then restarts once idle instead of serving on.
    """

    code: Code = Code.INTERNAL

    def __init__(self, message: str, *, reason: str = "", param: str = "", restart: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.param = param
        self.restart = restart

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code.name})"


class OomVramError(AllmError):
    code = Code.OOM_VRAM


class OomRamError(AllmError):
    code = Code.OOM_RAM


class ModelCorruptError(AllmError):
    code = Code.MODEL_CORRUPT


class DeadlineError(AllmError):
    """TIMEOUT: the deadline passed, or the manager stopped answering."""

    code = Code.TIMEOUT


class CancelledError(AllmError):
    code = Code.CANCELLED


class UnsupportedError(AllmError):
    code = Code.UNSUPPORTED


class InternalError(AllmError):
    code = Code.INTERNAL


class FormatMismatchError(AllmError):
    code = Code.FORMAT_MISMATCH


class LoadFailedError(AllmError):
    code = Code.LOAD_FAILED


_BY_CODE: dict[Code, type[AllmError]] = {
    cls.code: cls
    for cls in (
        OomVramError,
        OomRamError,
        ModelCorruptError,
        DeadlineError,
        CancelledError,
        UnsupportedError,
        InternalError,
        FormatMismatchError,
        LoadFailedError,
    )
}


def error_for(code: Code, message: str, *, reason: str = "", param: str = "") -> AllmError:
    """The typed exception for a code received from a peer."""
    if code is Code.OK:
        raise ValueError("Code.OK is not an error")
    return _BY_CODE[code](message, reason=reason, param=param)


# Reasons the kernel itself produces; managers may add their own.
REASON_QUEUE_FULL = "queue_full"
REASON_DRAINING = "draining"
REASON_BAD_FRAME = "bad_frame"
REASON_BAD_VERSION = "bad_version"
REASON_SLOW_CONSUMER = "slow_consumer"
REASON_LOST_FRAMES = "lost_frames"
REASON_MANAGER_FAILED = "manager_failed"
REASON_INVALID_REQUEST = "invalid_request"
