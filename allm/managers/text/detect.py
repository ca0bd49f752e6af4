"""Which engine a text model needs, from what is on disk.

The rule of docs/design.md: a ``.gguf`` file (or a directory holding one) → llama.cpp;
a directory with ``*.safetensors`` and ``config.json`` → the safetensors engine;
a directory with ``genai_config.json`` → ONNX Runtime GenAI, served as it is;
several → the format given at registration, else safetensors, then onnx, then gguf;
none → FORMAT_MISMATCH naming what was found. A GGUF file's header is then read
(``read_header``) as llama.cpp will read it, and its architecture checked.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

from gguf.constants import MODEL_ARCH_NAMES

from allm import catalog_names
from allm.kernel.codes import FormatMismatchError, LoadFailedError, ModelCorruptError, UnsupportedError
from allm.managers.files.gguf import GGUFHeader, read_gguf
from allm.managers.files.sniff import GGUF_MAGIC, open_model, read_opening

KNOWN_ARCHITECTURES = frozenset(MODEL_ARCH_NAMES.values())


class Format(enum.StrEnum):
    GGUF = catalog_names.GGUF
    SAFETENSORS = catalog_names.SAFETENSORS
    ONNX = catalog_names.ONNX  # an ONNX Runtime GenAI directory: genai_config.json, model.onnx, the tokenizer


#: which format a directory holding several is served as, when the catalog names none
PREFERENCE = (Format.SAFETENSORS, Format.ONNX, Format.GGUF)


@dataclasses.dataclass(frozen=True, slots=True)
class Detected:
    format: Format
    path: Path  # the .gguf file, or the safetensors or ONNX directory


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
        if path.suffix.lower() == ".gguf" or read_opening(path, 4) == GGUF_MAGIC:
            if registered not in (None, Format.GGUF):
                raise FormatMismatchError(f"{path} is registered as {registered} but is a GGUF file")
            return Detected(Format.GGUF, path)
        if path.suffix.lower() == ".safetensors":
            raise FormatMismatchError(
                f"{path} is a lone .safetensors file: a safetensors model is a directory "
                "with config.json, the tokenizer and the weights"
            )
        if path.suffix.lower() == ".onnx":
            raise FormatMismatchError(
                f"{path} is a lone .onnx file: an ONNX model is a directory with genai_config.json "
                "(ONNX Runtime GenAI's layout), the tokenizer and the model"
            )
        raise FormatMismatchError(
            f"{path} is not a model: expected a .gguf file or a directory with *.safetensors and config.json"
        )

    ggufs = sorted(path.glob("*.gguf"))
    has_weights = any(path.glob("*.safetensors"))
    has_config = (path / "config.json").is_file()
    found = {
        Format.SAFETENSORS: has_weights and has_config,
        Format.ONNX: (path / "genai_config.json").is_file(),
        Format.GGUF: bool(ggufs),
    }
    held = [f for f in PREFERENCE if found[f]]
    if not held and has_weights:
        raise FormatMismatchError(f"{path} holds *.safetensors but no config.json")
    if not held:
        raise FormatMismatchError(
            f"{path} holds no model (no .gguf file, no *.safetensors with config.json, "
            f"no genai_config.json): {_listing(path)}"
        )
    chosen = registered if registered in held else held[0]
    if registered is not None and registered is not chosen:
        raise FormatMismatchError(f"{path} is registered as {registered} but holds only {' and '.join(held)}")
    if chosen is not Format.GGUF:
        return Detected(chosen, path)
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs)
        raise FormatMismatchError(f"{path} holds several GGUF files ({names}): name one file as the path")
    return Detected(Format.GGUF, ggufs[0])


def read_header(path: Path) -> GGUFHeader:
    """A GGUF file's header, checked as llama.cpp will read it; raises the AllmError naming what is wrong."""
    with open_model(path) as r:
        magic = r.opening(4)
        if magic != GGUF_MAGIC:
            shown = magic.hex() if magic else "an empty file"
            raise FormatMismatchError(f"{path.name} is not a GGUF file (starts with {shown}, not 'GGUF')")
        header = read_gguf(r, "llama.cpp")
    arch = header.architecture
    if not arch:
        raise ModelCorruptError(f"{path.name}: no general.architecture in the header: damaged")
    if arch not in KNOWN_ARCHITECTURES:
        raise UnsupportedError(f"{path.name}: model architecture {arch!r} is not supported by llama.cpp")
    return header
