"""What a model file is, from its first bytes; opening one; the bounded reader every header parser uses.

Every manager reads a model's headers before its engine sees the file, because the engines
answer a bad file with a crash or a vague "failed to load". The three steps they share are
here: open the file (a missing or unreadable one is LOAD_FAILED), tell from its opening what
it is (a file of the wrong kind is FORMAT_MISMATCH saying what it looks like), and read its
header through a ``Reader`` that never reads past the end of the file (a header that claims
more than the file holds is MODEL_CORRUPT, saying where and how many bytes it needed).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from allm.kernel.codes import LoadFailedError, ModelCorruptError

GGUF_MAGIC = b"GGUF"
GGML_MAGIC = b"lmgg"  # whisper.cpp's ggml files: the u32 0x67676d6c ("ggml") little-endian
HEAD_BYTES = 64  # enough of a file's opening to tell every kind below apart
CT2_MAX_BINARY_VERSION = 16  # a CTranslate2 model.bin opens with its binary version (6 today)

# What a file is, by how it opens; a reader adds its own advice per kind (see ``looks_like``).
_OPENINGS = (
    ("gguf", GGUF_MAGIC, "a GGUF file"),
    ("ggml", GGML_MAGIC, "a whisper.cpp ggml model"),
    ("ggjt", b"tjgg", "an old llama.cpp GGJT file"),
    ("ggmf", b"fmgg", "an old llama.cpp GGMF file"),
    ("zip", b"PK\x03\x04", "a zip archive"),
    ("pickle", b"\x80", "a Python pickle"),
    ("hdf5", b"\x89HDF", "an HDF5 file"),
    ("riff", b"RIFF", "a RIFF (WAV) file"),
    ("lfs", b"version https://git-lfs", "a Git LFS pointer (the download fetched the pointer, not the file)"),
    ("png", b"\x89PNG", "a PNG image"),
    ("jpeg", b"\xff\xd8\xff", "a JPEG image"),
    ("html", b"<", "an HTML or XML page (a failed download?)"),
    ("json", b"{", "a JSON file"),
)
_WHAT = {kind: what for kind, _, what in _OPENINGS} | {
    "ctranslate2": "a CTranslate2 model.bin",
    "safetensors": "a safetensors file",
}


def safetensors_header_length(head: bytes) -> int | None:
    """The header length if ``head`` opens a safetensors file (a u64 length, then a JSON object)."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    length: int = struct.unpack_from("<Q", head)[0]
    return length if length > 2 else None


def is_ctranslate2(head: bytes) -> bool:
    """Whether ``head`` opens a CTranslate2 model.bin: a small binary version, then a spec's name."""
    if len(head) < 10 or not 1 <= int.from_bytes(head[:4], "little") <= CT2_MAX_BINARY_VERSION:
        return False
    n = int.from_bytes(head[4:6], "little")
    return head[6 : 6 + n].rstrip(b"\0").endswith(b"Spec")


def kind_of(head: bytes) -> str | None:
    """The kind of file that opens with ``head`` (a key of ``looks_like``'s advice), if known."""
    for kind, magic, _ in _OPENINGS:
        if head.startswith(magic):
            return kind
    if is_ctranslate2(head):
        return "ctranslate2"
    if safetensors_header_length(head) is not None:
        return "safetensors"
    return None


def looks_like(head: bytes, advice: Mapping[str, str] | None = None) -> str:
    """What a file that opens with ``head`` looks like, for an error message.

    ``advice`` maps a kind to what to do with such a file ("convert it to GGUF"): the reader
    refusing it knows what it takes, the table does not.
    """
    kind = kind_of(head)
    if kind is None:
        return f"a file that starts with {head[:8].hex()}"
    note = (advice or {}).get(kind)
    return f"{_WHAT[kind]} ({note})" if note else _WHAT[kind]


def read_opening(path: Path, n: int = HEAD_BYTES) -> bytes:
    """A file's first ``n`` bytes; none when it cannot be read (it is then no model anyone can tell)."""
    try:
        with path.open("rb") as f:
            return f.read(n)
    except OSError:
        return b""


class Reader:
    """A model file open for reading its header, every read bounded by the file's size.

    ``label`` starts every message: the file's name, or what it is to its reader
    ("clip_l (clip.gguf)"). A read past the end is MODEL_CORRUPT naming where it was and
    how many bytes it needed, so a cut file is told apart from a damaged one.
    """

    def __init__(self, f: BinaryIO, path: Path, label: str, size: int) -> None:
        self.f = f
        self.path = path
        self.label = label
        self.size = size

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.f.close()

    def opening(self, n: int = HEAD_BYTES) -> bytes:
        """The file's first ``n`` bytes (fewer if it is shorter), for telling what it is."""
        self.f.seek(0)
        return self.f.read(n)

    def corrupt(self, what: str) -> ModelCorruptError:
        return ModelCorruptError(f"{self.label}: {what}: damaged")

    def truncated(self, needed: int, where: str) -> ModelCorruptError:
        return ModelCorruptError(
            f"{self.label}: truncated in {where}: needs {needed} bytes, file has {self.size}"
        )

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, offset: int) -> None:
        self.f.seek(offset)

    def read(self, n: int, where: str) -> bytes:
        at = self.f.tell()
        if at + n > self.size:
            raise self.truncated(at + n, where)
        return self.f.read(n)

    def skip(self, n: int, where: str) -> None:
        at = self.f.tell()
        if at + n > self.size:
            raise self.truncated(at + n, where)
        self.f.seek(at + n)

    def unpack(self, fmt: str, where: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), where))

    def u32(self, where: str) -> int:
        value: int = self.unpack("<I", where)[0]
        return value

    def u64(self, where: str) -> int:
        value: int = self.unpack("<Q", where)[0]
        return value


def open_model(path: Path, label: str = "") -> Reader:
    """Open a model file to read its header; LOAD_FAILED when it is a directory, absent or unreadable.

    With a ``label``, these messages start with it; without one, the reader's messages
    start with the file's name.
    """
    prefix = f"{label}: " if label else ""
    try:
        if path.is_dir():
            raise LoadFailedError(f"{prefix}{path} is a directory, not a model file")
        size = path.stat().st_size
        f = path.open("rb")
    except FileNotFoundError:
        raise LoadFailedError(f"{prefix}model file not found: {path}") from None
    except OSError as exc:
        raise LoadFailedError(f"{prefix}cannot read model file {path}: {exc.strerror}") from exc
    return Reader(f, path, label or path.name, size)
