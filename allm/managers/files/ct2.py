"""CTranslate2's model.bin: its variable index read and checked, each variable's values read on demand.

Binary version 6 (CTranslate2's models/model.cc ``Model::load``), little-endian::

    u32 version, string spec name ("WhisperSpec"), u32 spec revision, u32 variable count,
    per variable: string name, u8 rank, u32 x rank dims, u8 dtype, u32 byte count, data;
    u32 alias count, per alias: string alias, string target
    (a string is a u16 length that counts a trailing NUL, then the bytes and the NUL)

The index is read once, the data only sought over; ``array`` reads one variable when asked.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from allm.kernel.codes import FormatMismatchError, LoadFailedError, ModelCorruptError, UnsupportedError
from allm.managers.files.sniff import CT2_MAX_BINARY_VERSION, open_model

BINARY_VERSION = 6
SPEC = "WhisperSpec"  # the only model allm converts
MAX_RANK = 8
MAX_VARIABLES = 1 << 16

# CTranslate2's DataType: only the float ones convert; int8/int16 weights are quantized.
# bfloat16 (5) is read as its raw 16 bits and widened to float32.
FLOAT_DTYPES: dict[int, np.dtype[Any]] = {0: np.dtype("<f4"), 4: np.dtype("<f2"), 5: np.dtype("<u2")}
INT_DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype("<i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4")}
DTYPE_NAMES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}


@dataclasses.dataclass(frozen=True, slots=True)
class Variable:
    name: str
    shape: tuple[int, ...]
    dtype: int
    offset: int
    nbytes: int


class ModelBin:
    """model.bin's variable index (names, shapes, where the data lies) over an open file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            raise LoadFailedError(f"no model.bin in {path.parent}: not a CTranslate2 model directory")
        self.r = open_model(path, str(path))
        self.size = self.r.size
        try:
            self.variables, self.aliases = self._read_index()
        except BaseException:
            self.r.close()
            raise

    def close(self) -> None:
        self.r.close()

    def _string(self, where: str) -> str:
        raw = self.r.read(self.r.unpack("<H", where)[0], where)
        if not raw or raw[-1] != 0:
            raise ModelCorruptError(
                f"{self.path}: a string is not NUL-terminated at byte {self.r.tell()}: damaged"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ModelCorruptError(
                f"{self.path}: a name is not UTF-8 at byte {self.r.tell()}: damaged"
            ) from None

    def _read_index(self) -> tuple[dict[str, Variable], dict[str, str]]:
        head = self.r.opening(4)
        if len(head) < 4:
            raise FormatMismatchError(f"{self.path} is not a CTranslate2 model ({len(head)} bytes long)")
        version = int.from_bytes(head, "little")
        if version != BINARY_VERSION:
            if 1 <= version <= CT2_MAX_BINARY_VERSION:
                raise UnsupportedError(
                    f"{self.path}: CTranslate2 binary version {version}; this converter reads version "
                    f"{BINARY_VERSION} (re-export the model with a recent ctranslate2)"
                )
            raise FormatMismatchError(f"{self.path} is not a CTranslate2 model (starts with {head.hex()})")
        spec = self._string("the spec name")
        if spec != SPEC:
            raise FormatMismatchError(
                f"{self.path} is a CTranslate2 {spec or 'unnamed'} model, not a whisper one"
            )
        self.r.u32("the header")  # spec revision: the variable names below are what matter
        count = self.r.u32("the header")
        if count > MAX_VARIABLES:
            raise ModelCorruptError(f"{self.path}: claims {count} variables: damaged")
        variables: dict[str, Variable] = {}
        for i in range(count):
            where = f"the variable index (variable {i})"
            name = self._string(where)
            rank = self.r.unpack("<B", where)[0]
            if rank > MAX_RANK:
                raise ModelCorruptError(f"{self.path}: variable {name!r} has rank {rank}: damaged")
            shape = self.r.unpack(f"<{rank}I", where)
            dtype, nbytes = self.r.unpack("<BI", where)
            known = FLOAT_DTYPES.get(dtype) or INT_DTYPES.get(dtype)
            if known is None:
                raise ModelCorruptError(f"{self.path}: variable {name!r} has unknown dtype {dtype}: damaged")
            if nbytes != int(np.prod(shape, dtype=np.int64)) * known.itemsize:
                raise ModelCorruptError(
                    f"{self.path}: variable {name!r} holds {nbytes} bytes, not what shape {list(shape)} "
                    f"of {DTYPE_NAMES[dtype]} needs: damaged"
                )
            offset = self.r.tell()
            self.r.skip(nbytes, f"variable {name!r}")
            variables[name] = Variable(name, shape, dtype, offset, nbytes)
        aliases = {}
        for _ in range(self.r.u32("the aliases")):
            alias = self._string("the aliases")
            aliases[alias] = self._string("the aliases")
        return variables, aliases

    def variable(self, name: str) -> Variable:
        resolved = self.aliases.get(name, name)
        found = self.variables.get(resolved)
        if found is None:
            raise ModelCorruptError(
                f"{self.path}: variable {name!r} is missing: not a complete whisper model"
            )
        return found

    def shape(self, name: str) -> tuple[int, ...]:
        return self.variable(name).shape

    def _data(self, var: Variable) -> bytes:
        self.r.seek(var.offset)
        return self.r.read(var.nbytes, f"variable {var.name!r}")

    def scalar(self, name: str) -> int:
        var = self.variable(name)
        if var.dtype not in INT_DTYPES or var.shape:
            raise ModelCorruptError(f"{self.path}: {name!r} is not an integer scalar: damaged")
        return int(np.frombuffer(self._data(var), dtype=INT_DTYPES[var.dtype])[0])

    def array(self, name: str) -> np.ndarray:
        """The variable's values, float16 or float32 as stored (bfloat16 widened to float32)."""
        var = self.variable(name)
        if var.dtype not in FLOAT_DTYPES:
            raise UnsupportedError(
                f"{self.path}: {name!r} is {DTYPE_NAMES.get(var.dtype, var.dtype)}: quantized CTranslate2 "
                "models do not convert; use a float16 or float32 export"
            )
        data: np.ndarray = np.frombuffer(self._data(var), dtype=FLOAT_DTYPES[var.dtype])
        if var.dtype == 5:  # bfloat16 is float32's upper half
            data = (data.astype(np.uint32) << 16).view(np.float32)
        return data.reshape(var.shape)
