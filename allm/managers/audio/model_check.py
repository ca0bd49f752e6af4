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

The file layout is ``files/ggml.py``'s; the rules are whisper.cpp's ``whisper_model_load``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from allm.kernel.codes import FormatMismatchError, LoadFailedError, ModelCorruptError, UnsupportedError
from allm.managers.files import ggml
from allm.managers.files.ggml import GGMLType, Hparams
from allm.managers.files.sniff import Reader, looks_like, open_model

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

    if hparams.n_vocab not in ggml.KNOWN_N_VOCAB:
        known = ", ".join(map(str, ggml.KNOWN_N_VOCAB))
        raise corrupt(f"n_vocab is {hparams.n_vocab}, whisper's is one of {known}")
    if hparams.n_mels not in ggml.KNOWN_N_MELS:
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
    if ftype < 0 or ftype >= (ggml.QNT_VERSION + 1) * ggml.QNT_VERSION_FACTOR:
        raise corrupt(f"ftype is {ftype}")
    if base in ggml.FTYPES_NOT_CHECKED:
        raise UnsupportedError(
            f"{where}: ftype {base} (an IQ/FP4 quantization) is not supported; use f16 or q4-q8"
        )
    if base not in ggml.FTYPE_WEIGHT_TYPE:
        # whisper.cpp's ggml_ftype_to_ggml_type answers these with GGML_ASSERT: an abort
        raise corrupt(f"ftype {base} is no ggml file type")
    if base == 0:
        # all-f32 whisper files abort inside this ggml build's convolution, then hang
        raise UnsupportedError(
            f"{where}: an all-f32 (ftype 0) whisper model is not supported; use an f16 one"
        )
    quantized = hparams.weight_type not in (GGMLType.F16, GGMLType.BF16)
    if quantized and ftype // ggml.QNT_VERSION_FACTOR != ggml.QNT_VERSION:
        raise UnsupportedError(
            f"{where}: quantized with ggml quantization version {ftype // ggml.QNT_VERSION_FACTOR}; "
            f"whisper.cpp reads version {ggml.QNT_VERSION}: re-quantize the model"
        )


# What to do with a file that is not a whisper.cpp model, by what it looks like.
_ADVICE = {
    "gguf": "a llama.cpp-style model; whisper.cpp reads its own ggml-*.bin files",
    "zip": "a PyTorch checkpoint? convert it with whisper.cpp's convert-pt-to-ggml.py",
    "pickle": "an old PyTorch checkpoint?",
    "ctranslate2": "convert its directory with python -m allm.managers.audio.ct2_convert SOURCE_DIR TARGET",
}


def _check_filters(r: Reader, hparams: Hparams) -> None:
    n_mel, n_fft = r.unpack("<2i", "the mel filters")
    if n_mel != hparams.n_mels or n_fft != ggml.N_FREQ_BINS:
        raise ModelCorruptError(
            f"{r.label}: the mel filters are {n_mel} × {n_fft}, whisper's are "
            f"{hparams.n_mels} × {ggml.N_FREQ_BINS}: damaged"
        )
    r.skip(4 * n_mel * n_fft, "the mel filters")


def _check_vocab(r: Reader, hparams: Hparams) -> None:
    (n_tokens,) = r.unpack("<i", "the vocabulary")
    if not 0 <= n_tokens <= hparams.n_vocab:
        raise ModelCorruptError(
            f"{r.label}: the vocabulary claims {n_tokens} tokens (n_vocab is {hparams.n_vocab}): damaged"
        )
    for i in range(n_tokens):
        (length,) = r.unpack("<I", "the vocabulary")
        if length > MAX_TOKEN_BYTES:
            raise ModelCorruptError(f"{r.label}: token {i} claims {length} bytes: damaged")
        r.skip(length, "the vocabulary")


def _check_tensors(r: Reader, hparams: Hparams) -> tuple[int, int]:
    """Walk the tensor records to the end of the file; returns (tensors, data bytes)."""
    shapes = ggml.tensor_shapes(hparams)
    seen: set[str] = set()
    weights_bytes = 0
    name = ""
    while r.tell() < r.size:
        where = f"the tensor table (after {name!r})" if name else "the tensor table"
        n_dims, name_len, ttype = r.unpack("<3i", where)
        if not 1 <= n_dims <= MAX_DIMS or not 1 <= name_len <= MAX_NAME_BYTES:
            raise ModelCorruptError(
                f"{r.label}: tensor record at byte {r.tell() - 12} claims {n_dims} dimensions "
                f"and a {name_len}-byte name: damaged"
            )
        ne = r.unpack(f"<{n_dims}i", where)
        try:
            name = r.read(name_len, where).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelCorruptError(f"{r.label}: a tensor name is not UTF-8: damaged") from None
        if name in seen:
            raise ModelCorruptError(f"{r.label}: tensor {name!r} appears twice: damaged")
        expected = shapes.get(name)
        if expected is None:
            raise ModelCorruptError(
                f"{r.label}: unknown tensor {name!r} (not in a whisper model of these sizes): damaged"
            )
        seen.add(name)
        # The loader compares dimensions fastest-first, with absent ones counted as 1.
        got_ne, want_ne = [*ne, 1, 1, 1][:MAX_DIMS], [*reversed(expected), 1, 1, 1][:MAX_DIMS]
        if got_ne != want_ne:
            raise ModelCorruptError(
                f"{r.label}: tensor {name!r} has shape {list(reversed(ne))}, the header's sizes make it "
                f"{list(expected)}: damaged"
            )
        want_type = ggml.tensor_type(name, expected, hparams)
        if ttype != want_type:
            shown = GGMLType(ttype).name.lower() if ttype in GGMLType._value2member_map_ else f"type {ttype}"
            raise ModelCorruptError(
                f"{r.label}: tensor {name!r} is {shown}, whisper.cpp expects {want_type.name.lower()} "
                f"(ftype {hparams.ftype}): damaged"
            )
        try:
            nbytes = ggml.tensor_nbytes(expected, want_type)
        except ValueError as exc:
            raise ModelCorruptError(f"{r.label}: tensor {name!r}: {exc}: damaged") from None
        r.skip(nbytes, f"tensor {name!r}")
        weights_bytes += nbytes
    if not seen:
        raise ModelCorruptError(
            f"{r.label}: truncated: no tensors after the vocabulary (whisper.cpp would load "
            "an empty model that transcribes nothing)"
        )
    missing = [n for n in shapes if n not in seen]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ModelCorruptError(
            f"{r.label}: {len(missing)} of {len(shapes)} tensors are missing ({shown}): truncated or damaged"
        )
    return len(seen), weights_bytes


def check_model(path: Path) -> WhisperModelInfo:
    """Check a whisper.cpp ggml file's headers; raises the AllmError that names what is wrong."""
    if not path.is_absolute():
        raise LoadFailedError(
            f"model path must be absolute, not {str(path)!r} (pywhispercpp takes any other "
            "string for the name of a model to download)"
        )
    with open_model(path) as r:
        head = r.opening()
        if not head:
            raise FormatMismatchError(f"{path.name} is empty (0 bytes): not a whisper.cpp model")
        if head[:4] != ggml.MAGIC_BYTES:
            raise FormatMismatchError(
                f"{path.name} is not a whisper.cpp ggml model: it looks like {looks_like(head, _ADVICE)}"
            )
        r.seek(4)
        hparams = Hparams.unpack(r.read(ggml.HPARAMS_STRUCT.size, "the hyper-parameters"))
        check_hparams(hparams, path.name)
        _check_filters(r, hparams)
        _check_vocab(r, hparams)
        n_tensors, weights_bytes = _check_tensors(r, hparams)
    return WhisperModelInfo(path, hparams, r.size, weights_bytes, n_tensors)
