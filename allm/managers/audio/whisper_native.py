"""whisper.cpp's per-segment no-speech probability, which pywhispercpp computes but does not bind.

whisper.cpp keeps, for each 30 s window, the probability that it holds no speech (OpenAI's
``no_speech_prob``), behind ``whisper_full_get_segment_no_speech_prob``. pywhispercpp 1.5.1
binds neither that function nor a way to its ``whisper_context*``, so it is reached here:

1. pybind11's cross-module conduit (``_pybind11_conduit_v1_`` on every bound object) hands
   out the C++ object under a Python one, asked with a ``std::type_info`` of its type. On
   libstdc++ pybind11 matches types by mangled name, so a type_info that carries
   pywhispercpp's ``whisper_context_wrapper`` name finds it; the wrapper's one field is the
   context pointer (pywhispercpp's src/main.cpp).
2. The function is called with ctypes in the libwhisper the binding loaded (found in
   /proc/self/maps), after a check that the pointer gives the model's own sizes there.

A step that does not fit (another binding, ABI or platform) leaves the value unknown: None,
rendered null, never made up. The pointer is the context's while the binding's object
lives: the engine asks only between its load and its ``whisper_free``.
"""

from __future__ import annotations

import ctypes
import logging
import re
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("allm.audio.whisper")

_WRAPPER_NAME = (
    b"23whisper_context_wrapper"  # mangled: struct whisper_context_wrapper { whisper_context* ptr; }
)
_ABI_ID = re.compile(rb"__pybind11_internals_v\d+_([A-Za-z0-9_]+?)__\x00")
# Bound from the C API directly, not through ctypes.pythonapi's shared function objects.
_capsule_new = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_New", ctypes.pythonapi)
)
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)


def _platform_abi_id(module: Any) -> bytes | None:
    """pybind11's platform ABI id, as the binding was built with it (the conduit checks it)."""
    try:
        found = _ABI_ID.search(Path(module.__file__).read_bytes())
    except (OSError, TypeError):
        return None
    return found.group(1) if found else None


def _context_pointer(ctx: Any, abi_id: bytes) -> int | None:
    name = ctypes.create_string_buffer(_WRAPPER_NAME)
    # a std::type_info as libstdc++ lays it out: a vtable pointer (never read here), then the name
    type_info = (ctypes.c_void_p * 2)(None, ctypes.addressof(name))
    asked = _capsule_new(ctypes.addressof(type_info), b"St9type_info", None)
    try:
        wrapper = ctx._pybind11_conduit_v1_(abi_id, asked, b"raw_pointer_ephemeral")
    except (AttributeError, TypeError, RuntimeError):
        return None
    if wrapper is None:
        return None
    address = _capsule_pointer(wrapper, _WRAPPER_NAME)
    return ctypes.c_void_p.from_address(address).value if address else None


def _loaded_libwhisper() -> Path | None:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps.splitlines() if "/libwhisper" in line}
    return Path(paths.pop()) if len(paths) == 1 else None


class NoSpeech:
    """One whisper.cpp context's no-speech probabilities, where this binding lets them be read."""

    def __init__(self, pw: Any, ctx: Any) -> None:
        self._ctx: int | None = None
        self._read: Any = None
        if not sys.platform.startswith("linux"):
            # Step 1 lays out a std::type_info as libstdc++ does; elsewhere (libc++) it would not fit.
            log.info("no_speech_prob is unknown: read only on Linux (libstdc++)")
            return
        abi_id = _platform_abi_id(pw)
        library = _loaded_libwhisper()
        pointer = _context_pointer(ctx, abi_id) if abi_id else None
        if pointer is None or library is None:
            log.info("no_speech_prob is unknown: pywhispercpp's whisper.cpp context cannot be reached")
            return
        try:
            lib = ctypes.CDLL(str(library))
            read = lib.whisper_full_get_segment_no_speech_prob
            for size in ("n_vocab", "n_audio_state"):
                theirs = getattr(lib, f"whisper_model_{size}")
                theirs.argtypes, theirs.restype = [ctypes.c_void_p], ctypes.c_int
                if theirs(pointer) != getattr(pw, f"whisper_model_{size}")(ctx):
                    log.warning(
                        "no_speech_prob is unknown: %s does not agree with pywhispercpp", library.name
                    )
                    return
        except (OSError, AttributeError) as exc:
            log.warning("no_speech_prob is unknown: %s: %s", library.name, exc)
            return
        read.argtypes, read.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_float
        self._ctx, self._read = pointer, read

    def prob(self, segment: int) -> float | None:
        """The probability that segment ``segment``'s window holds no speech; None if unknown."""
        if self._read is None:
            return None
        return float(self._read(self._ctx, segment))
