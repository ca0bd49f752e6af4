"""Check a whisper.cpp model file before pywhispercpp ever sees it.

pywhispercpp never checks the context whisper.cpp hands back: a missing, empty, foreign or
cut-short file "loads" as NULL and the first transcription segfaults; a nonsense ftype or
mismatched state sizes trip an assertion that aborts the process; a file cut before its first
tensor loads as an empty model that silently transcribes nothing. So every file is read here
first, headers only (the tensor data is sought over, never read: large-v3 is 3 GB), and each
cause is told apart as its code:

    relative path, not there, unreadable                      LOAD_FAILED
    not the ggml magic (a GGUF, a CTranslate2 model, ...)     FORMAT_MISMATCH
    an ftype whose tensors this does not verify               UNSUPPORTED
    nonsense hyper-parameters, a short vocabulary or tensor   MODEL_CORRUPT
    table, a missing, unknown, misshapen or mistyped tensor,
    data past the end of the file

The file layout is ``ggml_format``'s; the rules are whisper.cpp's ``whisper_model_load``.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import BinaryIO

from allm.kernel.codes import FormatMismatchError, LoadFailedError, ModelCorruptError, UnsupportedError
from allm.managers.audio import ggml_format
from allm.managers.audio.ggml_format import GGMLType, Hparams

MAX_STATE = 8192  # large-v3: 1280
MAX_LAYERS = 256  # large: 32
MAX_CTX = 1 << 16  # every whisper: 1500 audio, 448 text
MAX_TOKEN_BYTES = 4096  # the longest whisper token is well under 100 bytes
MAX_NAME_BYTES = 256
MAX_DIMS = 4  # the loader reads dimensions into an int32[4]: more would overrun it


@dataclasses.dataclass(frozen=True, slots=True)
class WhisperModelInfo:
    """What a checked file holds: enough to estimate memory before loading it."""

    path: Path
    hparams: Hparams
    size_bytes: int  # the file
    weights_bytes: int  # the tensor data whisper.cpp allocates and reads
    n_tensors: int

    @property
    def multilingual(self) -> bool:
        return self.hparams.multilingual


def check_hparams(hparams: Hparams, where: str) -> None:
    """Raise the AllmError naming the first hyper-parameter whisper.cpp cannot live with."""

    def corrupt(what: str) -> ModelCorruptError:
        return ModelCorruptError(f"{where}: {what}: damaged or not a whisper model")

    if hparams.n_vocab not in ggml_format.KNOWN_N_VOCAB:
        known = ", ".join(map(str, ggml_format.KNOWN_N_VOCAB))
        raise corrupt(f"n_vocab is {hparams.n_vocab}, whisper's is one of {known}")
    if hparams.n_mels not in ggml_format.KNOWN_N_MELS:
        raise corrupt(f"n_mels is {hparams.n_mels}, whisper's is 80 or 128")
    if hparams.n_audio_state != hparams.n_text_state:
        # whisper.cpp asserts this (an abort, or worse where asserts are compiled out)
        raise corrupt(
            f"n_audio_state {hparams.n_audio_state} differs from n_text_state {hparams.n_text_state}"
        )
    for side in ("audio", "text"):
        state, head = getattr(hparams, f"n_{side}_state"), getattr(hparams, f"n_{side}_head")
        layers, ctx = getattr(hparams, f"n_{side}_layer"), getattr(hparams, f"n_{side}_ctx")
        if not 1 <= state <= MAX_STATE:
            raise corrupt(f"n_{side}_state is {state}")
        if not 1 <= head <= state or state % head:
            raise corrupt(f"n_{side}_head {head} does not divide n_{side}_state {state}")
        if not 1 <= layers <= MAX_LAYERS:
            raise corrupt(f"n_{side}_layer is {layers}")
        if not 1 <= ctx <= MAX_CTX:
            raise corrupt(f"n_{side}_ctx is {ctx}")
    ftype, base = hparams.ftype, hparams.base_ftype
    if ftype < 0 or ftype >= (ggml_format.QNT_VERSION + 1) * ggml_format.QNT_VERSION_FACTOR:
        raise corrupt(f"ftype is {ftype}")
    if base in ggml_format.FTYPES_NOT_CHECKED:
        raise UnsupportedError(
            f"{where}: ftype {base} (an IQ/FP4 quantization) is not supported; use f16 or q4-q8"
        )
    if base not in ggml_format.FTYPE_WEIGHT_TYPE:
        # whisper.cpp's ggml_ftype_to_ggml_type answers these with GGML_ASSERT: an abort
        raise corrupt(f"ftype {base} is no ggml file type")
    if base == 0:
        # all-f32 whisper files abort inside this ggml build's convolution, then hang
        raise UnsupportedError(
            f"{where}: an all-f32 (ftype 0) whisper model is not supported; use an f16 one"
        )
    quantized = hparams.weight_type not in (GGMLType.F16, GGMLType.BF16)
    if quantized and ftype // ggml_format.QNT_VERSION_FACTOR != ggml_format.QNT_VERSION:
        raise UnsupportedError(
            f"{where}: quantized with ggml quantization version {ftype // ggml_format.QNT_VERSION_FACTOR}; "
            f"whisper.cpp reads version {ggml_format.QNT_VERSION}: re-quantize the model"
        )


# A few openings worth naming when a file is not a whisper.cpp model.
_LOOKS_LIKE = (
    (b"GGUF", "a GGUF file (a llama.cpp-style model; whisper.cpp reads its own ggml-*.bin files)"),
    (b"tjgg", "an old llama.cpp GGJT file"),
    (b"fmgg", "an old llama.cpp GGMF file"),
    (
        b"PK\x03\x04",
        "a zip archive (a PyTorch checkpoint? convert it with whisper.cpp's convert-pt-to-ggml.py)",
    ),
    (b"\x80\x02", "a Python pickle (an old PyTorch checkpoint?)"),
    (b"\x89HDF", "an HDF5 file"),
    (b"RIFF", "a RIFF (WAV) file"),
    (b"<", "an HTML or XML page (a failed download?)"),
    (b"{", "a JSON file"),
)


def _looks_like(head: bytes) -> str:
    for magic, what in _LOOKS_LIKE:
        if head.startswith(magic):
            return what
    if len(head) >= 10 and 1 <= int.from_bytes(head[:4], "little") <= 16:
        n = int.from_bytes(head[4:6], "little")
        if head[6 : 6 + n].rstrip(b"\0").endswith(b"Spec"):
            return (
                "a CTranslate2 model.bin (convert its directory with "
                "python -m allm.managers.audio.ct2_convert SOURCE_DIR TARGET)"
            )
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file"
    return f"a file that starts with {head[:8].hex()}"


class _Reader:
    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f = f
        self.path = path
        self.size = size

    def truncated(self, needed: int, what: str) -> ModelCorruptError:
        return ModelCorruptError(
            f"{self.path.name}: truncated in {what}: needs {needed} bytes, file has {self.size}"
        )

    def read(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise self.truncated(self.f.tell() - len(data) + n, what)
        return data

    def skip(self, n: int, what: str) -> None:
        end = self.f.tell() + n
        if end > self.size:
            raise self.truncated(end, what)
        self.f.seek(n, os.SEEK_CUR)

    def ints(self, fmt: str, what: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))


def _open(path: Path) -> tuple[BinaryIO, int]:
    if not path.is_absolute():
        raise LoadFailedError(
            f"model path must be absolute, not {str(path)!r} (pywhispercpp takes any other "
            "string for the name of a model to download)"
        )
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise LoadFailedError(f"model path is a directory, not a file: {path}")
        return path.open("rb"), size
    except FileNotFoundError:
        raise LoadFailedError(f"model file not found: {path}") from None
    except OSError as exc:
        raise LoadFailedError(f"cannot read model file {path}: {exc.strerror}") from exc


def _check_filters(r: _Reader, hparams: Hparams) -> None:
    n_mel, n_fft = r.ints("<2i", "the mel filters")
    if n_mel != hparams.n_mels or n_fft != ggml_format.N_FREQ_BINS:
        raise ModelCorruptError(
            f"{r.path.name}: the mel filters are {n_mel} × {n_fft}, whisper's are "
            f"{hparams.n_mels} × {ggml_format.N_FREQ_BINS}: damaged"
        )
    r.skip(4 * n_mel * n_fft, "the mel filters")


def _check_vocab(r: _Reader, hparams: Hparams) -> None:
    (n_tokens,) = r.ints("<i", "the vocabulary")
    if not 0 <= n_tokens <= hparams.n_vocab:
        raise ModelCorruptError(
            f"{r.path.name}: the vocabulary claims {n_tokens} tokens (n_vocab is {hparams.n_vocab}): damaged"
        )
    for i in range(n_tokens):
        (length,) = r.ints("<I", "the vocabulary")
        if length > MAX_TOKEN_BYTES:
            raise ModelCorruptError(f"{r.path.name}: token {i} claims {length} bytes: damaged")
        r.skip(length, "the vocabulary")


def _check_tensors(r: _Reader, hparams: Hparams) -> tuple[int, int]:
    """Walk the tensor records to the end of the file; returns (tensors, data bytes)."""
    shapes = ggml_format.tensor_shapes(hparams)
    seen: set[str] = set()
    weights_bytes = 0
    name = ""
    while r.f.tell() < r.size:
        where = f"the tensor table (after {name!r})" if name else "the tensor table"
        n_dims, name_len, ttype = r.ints("<3i", where)
        if not 1 <= n_dims <= MAX_DIMS or not 1 <= name_len <= MAX_NAME_BYTES:
            raise ModelCorruptError(
                f"{r.path.name}: tensor record at byte {r.f.tell() - 12} claims {n_dims} dimensions "
                f"and a {name_len}-byte name: damaged"
            )
        ne = r.ints(f"<{n_dims}i", where)
        try:
            name = r.read(name_len, where).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelCorruptError(f"{r.path.name}: a tensor name is not UTF-8: damaged") from None
        if name in seen:
            raise ModelCorruptError(f"{r.path.name}: tensor {name!r} appears twice: damaged")
        expected = shapes.get(name)
        if expected is None:
            raise ModelCorruptError(
                f"{r.path.name}: unknown tensor {name!r} (not in a whisper model of these sizes): damaged"
            )
        seen.add(name)
        # The loader compares dimensions fastest-first, with absent ones counted as 1.
        got_ne, want_ne = [*ne, 1, 1, 1][:MAX_DIMS], [*reversed(expected), 1, 1, 1][:MAX_DIMS]
        if got_ne != want_ne:
            raise ModelCorruptError(
                f"{r.path.name}: tensor {name!r} has shape {list(reversed(ne))}, the header's sizes make it "
                f"{list(expected)}: damaged"
            )
        want_type = ggml_format.tensor_type(name, expected, hparams)
        if ttype != want_type:
            shown = GGMLType(ttype).name.lower() if ttype in GGMLType._value2member_map_ else f"type {ttype}"
            raise ModelCorruptError(
                f"{r.path.name}: tensor {name!r} is {shown}, whisper.cpp expects {want_type.name.lower()} "
                f"(ftype {hparams.ftype}): damaged"
            )
        try:
            nbytes = ggml_format.tensor_nbytes(expected, want_type)
        except ValueError as exc:
            raise ModelCorruptError(f"{r.path.name}: tensor {name!r}: {exc}: damaged") from None
        r.skip(nbytes, f"tensor {name!r}")
        weights_bytes += nbytes
    if not seen:
        raise ModelCorruptError(
            f"{r.path.name}: truncated: no tensors after the vocabulary (whisper.cpp would load "
            "an empty model that transcribes nothing)"
        )
    missing = [n for n in shapes if n not in seen]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ModelCorruptError(
            f"{r.path.name}: {len(missing)} of {len(shapes)} tensors are missing ({shown}): "
            "truncated or damaged"
        )
    return len(seen), weights_bytes


def check_model(path: Path) -> WhisperModelInfo:
    """Check a whisper.cpp ggml file's headers; raises the AllmError that names what is wrong."""
    f, size = _open(path)
    with f:
        head = f.read(64)
        if not head:
            raise FormatMismatchError(f"{path.name} is empty (0 bytes): not a whisper.cpp model")
        if head[:4] != ggml_format.MAGIC_BYTES:
            raise FormatMismatchError(
                f"{path.name} is not a whisper.cpp ggml model: it looks like {_looks_like(head)}"
            )
        f.seek(4)
        r = _Reader(f, path, size)
        hparams = Hparams.unpack(r.read(ggml_format.HPARAMS_STRUCT.size, "the hyper-parameters"))
        check_hparams(hparams, path.name)
        _check_filters(r, hparams)
        _check_vocab(r, hparams)
        n_tensors, weights_bytes = _check_tensors(r, hparams)
    return WhisperModelInfo(path, hparams, size, weights_bytes, n_tensors)
