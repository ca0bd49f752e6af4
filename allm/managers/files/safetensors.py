"""safetensors headers: the tensor table, checked against the file's size as the safetensors library does.

Layout: a u64 header length, that many bytes of a JSON object (tensor name → ``dtype``,
``shape``, ``data_offsets`` [begin, end) into the data; ``__metadata__`` aside), then the
data. A header that is no JSON object, a tensor without a dtype, a shape or two offsets,
offsets that do not span its shape's bytes, data past the end of the file: MODEL_CORRUPT.
Which dtypes an engine takes is its manager's rule; this only knows their sizes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from allm.managers.files.sniff import Reader, open_model

MAX_HEADER_BYTES = 100 * 1024 * 1024
# bytes per element of the dtypes whose spans are checked; another dtype's span is taken as it is
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


@dataclasses.dataclass(frozen=True, slots=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]  # as stored: slowest-varying first
    size_bytes: int


def read_safetensors(r: Reader) -> dict[str, TensorEntry]:
    """The tensors of the safetensors file ``r`` reads, its header checked against its size."""
    r.seek(0)
    header_len = r.u64("the safetensors header")
    if header_len > MAX_HEADER_BYTES:
        raise r.corrupt(f"the safetensors header claims {header_len} bytes")
    raw = r.read(header_len, "the safetensors header")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise r.corrupt(f"the safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise r.corrupt("the safetensors header is not a JSON object")
    data_bytes = r.size - 8 - header_len
    tensors: dict[str, TensorEntry] = {}
    end = 0
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(spec, dict):
            raise r.corrupt(f"tensor {name!r} has no description")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        # a missing or mistyped field makes stable-diffusion.cpp's JSON reader throw past its handler
        if not isinstance(dtype, str):
            raise r.corrupt(f"tensor {name!r} has no dtype")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise r.corrupt(f"tensor {name!r} has no valid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise r.corrupt(f"tensor {name!r} has no valid data_offsets")
        begin, stop = offsets
        elements = 1
        for d in shape:
            elements *= d
        size = DTYPE_BYTES.get(dtype)
        if not 0 <= begin <= stop or (size is not None and stop - begin != elements * size):
            raise r.corrupt(f"tensor {name!r} spans bytes {begin}..{stop}, not {elements} {dtype} values")
        end = max(end, stop)
        tensors[name] = TensorEntry(dtype, tuple(shape), stop - begin)
    if end > data_bytes:
        raise r.truncated(8 + header_len + end, "tensor data")
    return tensors


def check_safetensors_file(path: Path) -> int:
    """Check one weight file's header against its size; returns the size in bytes."""
    with open_model(path) as r:
        read_safetensors(r)
    return r.size
