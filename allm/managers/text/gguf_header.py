"""Read and check a GGUF file's header before llama.cpp sees it.

llama-cpp-python answers every bad file with the same "Failed to load model"
(the reason is only in its log).  This reader tells the causes apart, each as its code:

    not there / unreadable                     LOAD_FAILED
    does not start with the GGUF magic         FORMAT_MISMATCH
    GGUF version llama.cpp cannot read         UNSUPPORTED
    architecture llama.cpp does not know       UNSUPPORTED
    header cut short, nonsense sizes,          MODEL_CORRUPT
    tensor data past the end of the file

Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64
key/value count, the key/value pairs, the tensor infos (name, dims, type,
offset), padding to ``general.alignment``, then the tensor data.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from gguf.constants import GGML_QUANT_SIZES, MODEL_ARCH_NAMES, GGMLQuantizationType

from allm.kernel.codes import FormatMismatchError, LoadFailedError, ModelCorruptError, UnsupportedError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
KNOWN_ARCHITECTURES = frozenset(MODEL_ARCH_NAMES.values())
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_DIMS = 4

# value type → struct format for scalars
_SCALAR = {
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
_STRING, _ARRAY = 8, 9
# Metadata arrays that are only skipped (tokenizer vocabularies): not kept in memory.
_KEEP_ARRAYS = frozenset({"tokenizer.ggml.eos_token_ids"})


@dataclasses.dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int
    size_bytes: int


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


class _Reader:
    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f = f
        self.path = path
        self.size = size

    def read(self, n: int) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise ModelCorruptError(
                f"{self.path.name}: header runs past the end of the file ({self.size} bytes): "
                "truncated or damaged"
            )
        return self.f.read(n)

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def u32(self) -> int:
        value: int = self.scalar("<I")
        return value

    def u64(self) -> int:
        value: int = self.scalar("<Q")
        return value

    def string(self) -> str:
        n = self.u64()
        raw = self.read(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelCorruptError(f"{self.path.name}: a header string is not UTF-8: damaged") from None

    def skip_string(self) -> None:
        n = self.u64()
        self.read_skip(n)

    def read_skip(self, n: int) -> None:
        if n < 0 or self.f.tell() + n > self.size:
            self.read(n)  # raises the truncation error
        self.f.seek(n, os.SEEK_CUR)

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.u32(), self.u64()
            if count > self.size:
                raise ModelCorruptError(f"{self.path.name}: an array claims {count} items: damaged")
            if not keep:
                self._skip_array(itype, count)
                return None
            return [self.value(itype, True) for _ in range(count)]
        raise ModelCorruptError(f"{self.path.name}: unknown metadata value type {vtype}: damaged")

    def _skip_array(self, itype: int, count: int) -> None:
        if itype in _SCALAR:
            self.read_skip(struct.calcsize(_SCALAR[itype]) * count)
        elif itype == _STRING:
            for _ in range(count):
                self.skip_string()
        else:
            for _ in range(count):
                self.value(itype, False)


def read_header(path: Path) -> GGUFHeader:
    """Parse and check the header; raises the AllmError that names what is wrong."""
    try:
        size = path.stat().st_size
        f = path.open("rb")
    except FileNotFoundError:
        raise LoadFailedError(f"model file not found: {path}") from None
    except OSError as exc:
        raise LoadFailedError(f"cannot read model file {path}: {exc.strerror}") from exc
    with f:
        magic = f.read(4)
        if magic != MAGIC:
            shown = magic.hex() if magic else "an empty file"
            raise FormatMismatchError(f"{path.name} is not a GGUF file (starts with {shown}, not 'GGUF')")
        r = _Reader(f, path, size)
        version = r.u32()
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedError(
                f"{path.name}: GGUF version {version} is not supported "
                f"(llama.cpp reads versions {' and '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        n_tensors, n_kv = r.u64(), r.u64()
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise ModelCorruptError(f"{path.name}: header claims {n_tensors} tensors, {n_kv} keys: damaged")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            vtype = r.u32()
            value = r.value(vtype, keep=key in _KEEP_ARRAYS or vtype != _ARRAY)
            if value is not None:
                metadata[key] = value
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.u32()
            if n_dims > MAX_DIMS:
                raise ModelCorruptError(f"{path.name}: tensor {name!r} has {n_dims} dimensions: damaged")
            shape = tuple(r.u64() for _ in range(n_dims))
            ttype, offset = r.u32(), r.u64()
            infos.append((name, shape, ttype, offset))
        alignment = int(metadata.get("general.alignment", 32)) or 32
        data_offset = -(-f.tell() // alignment) * alignment

    tensors = []
    for name, shape, ttype, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise ModelCorruptError(
                f"{path.name}: tensor {name!r} has unknown type {ttype}: damaged"
            ) from None
        elements = 1
        for dim in shape:
            elements *= dim
        nbytes = elements // block * type_size
        end = data_offset + offset + nbytes
        if end > size:
            raise ModelCorruptError(
                f"{path.name}: tensor {name!r} ends at byte {end}, past the end of the file "
                f"({size} bytes): truncated"
            )
        tensors.append(TensorInfo(name, shape, ttype, offset, nbytes))

    header = GGUFHeader(path, version, metadata, tuple(tensors), data_offset, size)
    arch = header.architecture
    if not arch:
        raise ModelCorruptError(f"{path.name}: no general.architecture in the header: damaged")
    if arch not in KNOWN_ARCHITECTURES:
        raise UnsupportedError(f"{path.name}: model architecture {arch!r} is not supported by llama.cpp")
    return header
