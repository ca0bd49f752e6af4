"""whisper.cpp's model file format (the legacy "ggml" container) in one place.

whisper.cpp (src/whisper.cpp, ``whisper_model_load``) reads, all little-endian:

    u32   magic 0x67676d6c ("ggml"; on disk the bytes b"lmgg")
    i32 x 11  hyper-parameters, in the order of ``Hparams``'s fields
    i32 n_mel, i32 n_fft (= 201 frequency bins), f32 x n_mel*n_fft   the mel filterbank
    i32 n_tokens, then per token: u32 length, the token's raw bytes
    tensor records up to the end of the file, each:
        i32 n_dims, i32 name length, i32 ggml type,
        i32 x n_dims dimensions, fastest-varying first (numpy's shape reversed),
        the name (UTF-8, no NUL), the data (no alignment padding)

The loader makes every tensor of ``tensor_shapes`` beforehand and matches the file's records
to them by name; the vocabulary holds only the ordinary tokens (the special ones, whose ids are
fixed by n_vocab, are named by the loader). The layout, names, shapes and types here follow
whisper.cpp v1.8.5 (the one pywhispercpp 1.5.1 bundles) and its models/convert-pt-to-ggml.py.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from allm.managers.files.sniff import GGML_MAGIC

MAGIC = 0x67676D6C
MAGIC_BYTES = GGML_MAGIC  # MAGIC as a little-endian u32: b"lmgg"
HPARAMS_STRUCT = struct.Struct("<11i")
RECORD_STRUCT = struct.Struct("<3i")  # n_dims, name length, ggml type

SAMPLE_RATE = 16000
N_FFT = 400
N_FREQ_BINS = N_FFT // 2 + 1  # what the file calls the filterbank's n_fft
# ggml's quantization version rides in ftype's thousands (GGML_QNT_VERSION_FACTOR);
# whisper.cpp keeps only ftype % 1000.
QNT_VERSION_FACTOR = 1000
QNT_VERSION = 2  # ggml's current block layouts; older quantized files do not load


class GGMLType(enum.IntEnum):
    """The ggml tensor types a whisper model file can hold (ggml.h's ``ggml_type`` numbers)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


# (elements per block, bytes per block): ggml.c's type_traits for these types.
TYPE_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q2_K: (256, 84),
    GGMLType.Q3_K: (256, 110),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
}

# ftype (ggml.h's ``ggml_ftype``, after % 1000) → the type of the big matrices
# (ggml_ftype_to_ggml_type). ftypes ggml knows but that are left out here (the IQ, MXFP4,
# NVFP4 and Q1_0 families) are reported as unsupported rather than checked; any other
# value trips a GGML_ASSERT inside whisper.cpp, so it is damage.
FTYPE_WEIGHT_TYPE: dict[int, GGMLType] = {
    0: GGMLType.F32,
    1: GGMLType.F16,
    2: GGMLType.Q4_0,
    3: GGMLType.Q4_1,
    7: GGMLType.Q8_0,
    8: GGMLType.Q5_0,
    9: GGMLType.Q5_1,
    10: GGMLType.Q2_K,
    11: GGMLType.Q3_K,
    12: GGMLType.Q4_K,
    13: GGMLType.Q5_K,
    14: GGMLType.Q6_K,
    24: GGMLType.BF16,
}
FTYPES_NOT_CHECKED = frozenset({*range(15, 24), 25, 26, 27})

# n_vocab fixes the special tokens' ids: English-only, multilingual, large-v3's extra language.
KNOWN_N_VOCAB = (51864, 51865, 51866)
KNOWN_N_MELS = (80, 128)


@dataclasses.dataclass(frozen=True, slots=True)
class Hparams:
    """The header's eleven integers, in file order."""

    n_vocab: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int
    n_mels: int
    ftype: int

    @property
    def multilingual(self) -> bool:
        return self.n_vocab >= 51865

    @property
    def base_ftype(self) -> int:
        """ftype without the quantization version, as whisper.cpp uses it."""
        return self.ftype % QNT_VERSION_FACTOR

    @property
    def weight_type(self) -> GGMLType:
        """The type of the big matrices; KeyError for an ftype this module does not know."""
        return FTYPE_WEIGHT_TYPE[self.base_ftype]

    def pack(self) -> bytes:
        return HPARAMS_STRUCT.pack(*dataclasses.astuple(self))

    @classmethod
    def unpack(cls, raw: bytes) -> Hparams:
        return cls(*HPARAMS_STRUCT.unpack(raw))


def _layer_shapes(prefix: str, n_state: int, cross: bool) -> dict[str, tuple[int, ...]]:
    """One transformer block: self-attention (+ cross-attention for the decoder) and the MLP.

    whisper.cpp has no key biases: a bias on the keys adds the same amount to every score of
    a query, which softmax cancels, so OpenAI's model has none either.
    """
    attentions = ("attn", "cross_attn") if cross else ("attn",)
    shapes: dict[str, tuple[int, ...]] = {}
    for attn in attentions:
        shapes[f"{prefix}.{attn}_ln.weight"] = (n_state,)
        shapes[f"{prefix}.{attn}_ln.bias"] = (n_state,)
        for proj in ("query", "key", "value", "out"):
            shapes[f"{prefix}.{attn}.{proj}.weight"] = (n_state, n_state)
            if proj != "key":
                shapes[f"{prefix}.{attn}.{proj}.bias"] = (n_state,)
    shapes[f"{prefix}.mlp_ln.weight"] = (n_state,)
    shapes[f"{prefix}.mlp_ln.bias"] = (n_state,)
    shapes[f"{prefix}.mlp.0.weight"] = (4 * n_state, n_state)
    shapes[f"{prefix}.mlp.0.bias"] = (4 * n_state,)
    shapes[f"{prefix}.mlp.2.weight"] = (n_state, 4 * n_state)
    shapes[f"{prefix}.mlp.2.bias"] = (n_state,)
    return shapes


def tensor_shapes(hparams: Hparams) -> dict[str, tuple[int, ...]]:
    """Every tensor whisper.cpp's loader creates, by name, in numpy shape order.

    The file must hold each exactly once (with ``tensor_types``'s type): a missing one
    fails the load, an unknown one too.
    """
    a, t = hparams.n_audio_state, hparams.n_text_state
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.positional_embedding": (hparams.n_audio_ctx, a),
        "encoder.conv1.weight": (a, hparams.n_mels, 3),
        "encoder.conv1.bias": (a, 1),
        "encoder.conv2.weight": (a, a, 3),
        "encoder.conv2.bias": (a, 1),
        "encoder.ln_post.weight": (a,),
        "encoder.ln_post.bias": (a,),
    }
    for i in range(hparams.n_audio_layer):
        shapes.update(_layer_shapes(f"encoder.blocks.{i}", a, cross=False))
    shapes["decoder.positional_embedding"] = (hparams.n_text_ctx, t)
    shapes["decoder.token_embedding.weight"] = (hparams.n_vocab, t)
    shapes["decoder.ln.weight"] = (t,)
    shapes["decoder.ln.bias"] = (t,)
    for i in range(hparams.n_text_layer):
        shapes.update(_layer_shapes(f"decoder.blocks.{i}", t, cross=True))
    return shapes


# Two-dimensional, yet always f32 (whisper.cpp creates them so; its converters write them so).
_ALWAYS_F32 = frozenset(
    {
        "encoder.conv1.bias",
        "encoder.conv2.bias",
        "encoder.positional_embedding",
        "decoder.positional_embedding",
    }
)


def tensor_type(name: str, shape: tuple[int, ...], hparams: Hparams) -> GGMLType:
    """The ggml type whisper.cpp gives a tensor: vectors, biases and positional embeddings f32,
    the convolutions f16 (f32 in an all-f32 model), the other matrices ftype's weight type."""
    if len(shape) == 1 or name in _ALWAYS_F32:
        return GGMLType.F32
    weight_type = hparams.weight_type
    if len(shape) == 3:
        return GGMLType.F32 if weight_type is GGMLType.F32 else GGMLType.F16
    return weight_type


def tensor_types(hparams: Hparams) -> dict[str, GGMLType]:
    return {name: tensor_type(name, shape, hparams) for name, shape in tensor_shapes(hparams).items()}


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLType) -> int:
    """Bytes of data a tensor takes; ValueError when its rows do not fill whole blocks."""
    block, block_bytes = TYPE_SIZES[ggml_type]
    row = shape[-1] if shape else 1
    if row % block:
        raise ValueError(f"rows of {row} elements do not fill {ggml_type.name} blocks of {block}")
    return int(np.prod(shape, dtype=np.int64)) // block * block_bytes


# -- the mel filterbank ---------------------------------------------------------------


def _hz_to_mel(freqs: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa's htk=False)."""
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    mels = freqs / f_sp
    log_region = freqs >= min_log_hz
    mels[log_region] = min_log_mel + np.log(freqs[log_region] / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    freqs = f_sp * mels
    log_region = mels >= min_log_mel
    freqs[log_region] = min_log_hz * np.exp(logstep * (mels[log_region] - min_log_mel))
    return freqs


def mel_filters(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The filterbank OpenAI's whisper ships (whisper/assets/mel_filters.npz), shape (n_mels, n_fft/2+1).

    That file is ``librosa.filters.mel(sr=16000, n_fft=400, n_mels=...)``: triangles evenly
    spaced on Slaney's mel scale from 0 Hz to Nyquist, each scaled to unit area ("slaney"
    norm). Computed here in float64 the way librosa does, returned as float32.
    """
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = np.array([0.0, sample_rate / 2])
    mel_edges = _hz_to_mel(edges.copy())
    mel_f = _mel_to_hz(np.linspace(mel_edges[0], mel_edges[1], n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    filters: np.ndarray = weights.astype(np.float32)
    return filters


# -- writing ------------------------------------------------------------------------------

_DTYPE_TYPES = {np.dtype(np.float32): GGMLType.F32, np.dtype(np.float16): GGMLType.F16}


def write_ggml(
    path: Path,
    hparams: Hparams,
    filters: np.ndarray,
    vocab: Sequence[bytes],
    tensors: Iterable[tuple[str, np.ndarray]],
) -> None:
    """Write a whisper.cpp model file, one tensor at a time (never the whole file in memory).

    Tensors must be float32 or float16 numpy arrays in numpy shape order; each is written with
    the type of its dtype, as given: this writes the format, ``audio/model_check.py`` judges the content.
    """
    filters = np.ascontiguousarray(filters, dtype="<f4")
    if filters.ndim != 2:
        raise ValueError(f"mel filters must be 2-D (n_mel, n_fft bins), not {filters.shape}")
    with path.open("wb") as f:
        f.write(MAGIC_BYTES)
        f.write(hparams.pack())
        f.write(struct.pack("<2i", *filters.shape))
        f.write(filters.tobytes())
        f.write(struct.pack("<i", len(vocab)))
        for token in vocab:
            f.write(struct.pack("<I", len(token)))
            f.write(token)
        for name, array in tensors:
            ggml_type = _DTYPE_TYPES.get(array.dtype)
            if ggml_type is None:
                raise ValueError(f"tensor {name!r}: dtype {array.dtype} is neither float32 nor float16")
            if not 1 <= array.ndim <= 4:
                raise ValueError(f"tensor {name!r}: {array.ndim} dimensions (ggml holds 1 to 4)")
            raw_name = name.encode("utf-8")
            f.write(RECORD_STRUCT.pack(array.ndim, len(raw_name), ggml_type))
            f.write(struct.pack(f"<{array.ndim}i", *reversed(array.shape)))
            f.write(raw_name)
            f.write(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).data)
