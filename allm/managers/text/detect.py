"""Which engine a text model needs, from what is on disk.

The rule of docs/design.md: a ``.gguf`` file (or a directory holding one) → llama.cpp;
a directory with ``*.safetensors`` and ``config.json`` → the safetensors engine;
both → the format given at registration, safetensors when none was given;
neither → FORMAT_MISMATCH naming what was found.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

from allm.kernel.codes import FormatMismatchError, LoadFailedError

GGUF_MAGIC = b"GGUF"


class Format(enum.StrEnum):
    GGUF = "gguf"
    SAFETENSORS = "safetensors"


@dataclasses.dataclass(frozen=True, slots=True)
class Detected:
    format: Format
    path: Path  # the .gguf file, or the safetensors directory


def _starts_with_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _listing(directory: Path, limit: int = 6) -> str:
    names = sorted(p.name for p in directory.iterdir())
    if not names:
        return "it is empty"
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"found {shown}"


def detect(path: Path, registered: Format | None = None) -> Detected:
    """Decide the format; raises LOAD_FAILED for a missing path, FORMAT_MISMATCH otherwise."""
    if not path.exists():
        raise LoadFailedError(f"model path not found: {path}")
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _starts_with_gguf_magic(path):
            if registered is Format.SAFETENSORS:
                raise FormatMismatchError(f"{path} is registered as safetensors but is a GGUF file")
            return Detected(Format.GGUF, path)
        if path.suffix.lower() == ".safetensors":
            raise FormatMismatchError(
                f"{path} is a lone .safetensors file: a safetensors model is a directory "
                "with config.json, the tokenizer and the weights"
            )
        raise FormatMismatchError(
            f"{path} is not a model: expected a .gguf file or a directory with *.safetensors and config.json"
        )

    ggufs = sorted(path.glob("*.gguf"))
    has_weights = any(path.glob("*.safetensors"))
    has_config = (path / "config.json").is_file()
    safetensors = has_weights and has_config
    if ggufs and safetensors:
        chosen = registered or Format.SAFETENSORS
    elif ggufs:
        chosen = Format.GGUF
    elif safetensors:
        chosen = Format.SAFETENSORS
    elif has_weights:
        raise FormatMismatchError(f"{path} holds *.safetensors but no config.json")
    else:
        raise FormatMismatchError(
            f"{path} holds no model (no .gguf file, no *.safetensors with config.json): {_listing(path)}"
        )
    if registered is not None and registered is not chosen:
        raise FormatMismatchError(f"{path} is registered as {registered} but holds only {chosen}")
    if chosen is Format.SAFETENSORS:
        return Detected(Format.SAFETENSORS, path)
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs)
        raise FormatMismatchError(f"{path} holds several GGUF files ({names}): name one file as the path")
    return Detected(Format.GGUF, ggufs[0])
