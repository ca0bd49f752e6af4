"""GGUF headers: the metadata, the tensor table and the data bounds, checked as ggml reads them.

Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 key/value count,
the key/value pairs (a u64-counted string key, a u32 value type, the value), the tensor
infos (name, u32 dimension count, u64 dimensions fastest-varying first, u32 ggml type, u64
offset into the data), padding to ``general.alignment``, then the tensor data.

llama.cpp and stable-diffusion.cpp both read a GGUF with ggml's ``gguf_init_from_file``;
what it refuses (or aborts on) is refused here first, each cause as its code: a version it
cannot read is UNSUPPORTED; nonsense counts, a non-u32 or non-power-of-2 alignment, a name
twice, a gap between tensors, rows that do not fill whole blocks, an unknown type, data past
the end of the file are MODEL_CORRUPT. The engine's own rules (which architectures, which
types its ggml knows) are its manager's.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from allm.kernel.codes import UnsupportedError
from allm.managers.files.sniff import Reader

VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_TENSORS = 1 << 20  # Flux dev has 780, SD 3.5 large under 1200, a 405B llama about 1100
MAX_KEYS = 1 << 20
MAX_NAME_BYTES = 4096  # a key or tensor name; stable-diffusion.cpp's fallback reader aborts on a huge one
MAX_DIMS = 4

# value type → struct format, for the scalar types
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY, _U32 = 8, 9, 4
# Arrays kept in the metadata; the others (tokenizer vocabularies, up to megabytes) are only skipped.
KEPT_ARRAYS = frozenset({"tokenizer.ggml.eos_token_ids"})


@dataclasses.dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order, fastest-varying first, as the file lists it
    type: int  # ggml's type number
    offset: int  # into the tensor data
    size_bytes: int

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.type).name


@dataclasses.dataclass(frozen=True, slots=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    file_size: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_int(self, key: str, default: int = 0) -> int:
        value = self.metadata.get(f"{self.architecture}.{key}", default)
        return int(value) if isinstance(value, int | float) else default


def _string(r: Reader, where: str, limit: int | None = None) -> str:
    n = r.u64(where)
    if limit is not None and n > limit:
        raise r.corrupt(f"a string in {where} claims {n} bytes")
    try:
        return r.read(n, where).decode("utf-8")
    except UnicodeDecodeError:
        raise r.corrupt(f"a string in {where} is not UTF-8") from None


def _value(r: Reader, vtype: int, key: str, keep: bool) -> Any:
    """A metadata value; an array not kept is skipped, and None is returned for it."""
    where = f"the metadata (key {key!r})"
    if vtype in _SCALARS:
        return r.unpack(_SCALARS[vtype], where)[0]
    if vtype == _STRING:
        return _string(r, where)
    if vtype != _ARRAY:
        raise r.corrupt(f"key {key!r} has unknown type {vtype}")
    itype, count = r.u32(where), r.u64(where)
    if itype in _SCALARS:
        fmt = _SCALARS[itype]
        if keep:  # the read is bounded by the file's size before anything is allocated
            return list(r.unpack(f"<{count}{fmt[1:]}", where))
        r.skip(struct.calcsize(fmt) * count, where)
        return None
    if itype != _STRING:
        # ggml refuses arrays of arrays
        raise r.corrupt(f"key {key!r} is an array of type {itype}")
    if count > r.size:
        raise r.corrupt(f"key {key!r} claims {count} strings")
    if keep:
        return [_string(r, where) for _ in range(count)]
    for _ in range(count):
        r.skip(r.u64(where), where)
    return None


def read_gguf(r: Reader, engine: str) -> GGUFHeader:
    """The header of the GGUF file ``r`` reads, checked as ggml's gguf_init_from_file does.

    ``engine`` (who reads the file: llama.cpp, stable-diffusion.cpp) is named when the
    version is one it cannot read.
    """
    r.seek(4)
    version = r.u32("the header")
    if version not in VERSIONS:
        raise UnsupportedError(
            f"{r.label}: GGUF version {version} is not supported ({engine} reads versions 2 and 3)"
        )
    n_tensors, n_kv = r.u64("the header"), r.u64("the header")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KEYS:
        raise r.corrupt(f"the header claims {n_tensors} tensors and {n_kv} metadata keys")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = _string(r, "the metadata", MAX_NAME_BYTES)
        vtype = r.u32("the metadata")
        if key == "general.alignment" and vtype != _U32:
            # ggml reads it with gguf_get_val_u32, which aborts on any other type
            raise r.corrupt(f"general.alignment has type {vtype}, not u32")
        value = _value(r, vtype, key, keep=vtype != _ARRAY or key in KEPT_ARRAYS)
        if value is not None:
            metadata[key] = value
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment == 0 or alignment & (alignment - 1):
        raise r.corrupt(f"general.alignment {alignment} is not a power of 2")

    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        where = f"the tensor table (tensor {i})"
        n = r.u64(where)
        if n > MAX_NAME_BYTES:
            raise r.corrupt(f"a string in {where} claims {n} bytes")
        try:
            name = r.read(n, where).decode("utf-8")
        except UnicodeDecodeError:
            raise r.corrupt(f"tensor {i}'s name is not UTF-8") from None
        if name in seen:
            raise r.corrupt(f"tensor {name!r} appears twice")
        seen.add(name)
        n_dims = r.u32(where)
        if n_dims > MAX_DIMS:
            raise r.corrupt(f"tensor {name!r} claims {n_dims} dimensions")
        shape = tuple(r.u64(where) for _ in range(n_dims))
        ttype, offset = r.u32(where), r.u64(where)
        infos.append((name, shape, ttype, offset))
    data_offset = -(-r.tell() // alignment) * alignment

    tensors: list[TensorInfo] = []
    expected_offset = end = 0
    for name, shape, ttype, offset in infos:
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise r.corrupt(f"tensor {name!r} has unknown type {ttype}") from None
        elements = 1
        for d in shape:
            elements *= d
        if any(d >= 1 << 63 for d in shape) or elements >= 1 << 63:
            raise r.corrupt(f"tensor {name!r} claims {list(shape)} elements")
        row = shape[0] if shape else 1
        if row % block:
            raise r.corrupt(
                f"tensor {name!r} of type {qtype.name} has rows of {row}, not a multiple of {block}"
            )
        if offset != expected_offset:
            raise r.corrupt(f"tensor {name!r} is at data offset {offset}, expected {expected_offset}")
        nbytes = elements // block * type_size
        end = data_offset + offset + nbytes
        expected_offset += -(-nbytes // alignment) * alignment
        tensors.append(TensorInfo(name, shape, ttype, offset, nbytes))
    if end > r.size:
        raise r.truncated(end, "tensor data")
    return GGUFHeader(r.path, version, metadata, tuple(tensors), data_offset, r.size)
