"""The checks a safetensors directory passes before any backend sees it, on damaged copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from allm.kernel.codes import AllmError, Code
from allm.managers.text.safetensors_engine import (
    DirectoryInfo,
    check_directory,
    choose_backend,
    kv_cache_bytes_of,
)
from tests.model_files import truncated_copy, write_hf_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_hf_model(tmp_path_factory.mktemp("st") / "llama", "llama")


@pytest.fixture
def model(good, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(good, copy)
    return copy


def _fails(path):
    with pytest.raises(AllmError) as info:
        check_directory(path)
    return info.value


def test_a_good_directory_passes(model):
    info = check_directory(model)
    assert info.model_type == "llama"
    assert info.weight_bytes > 100_000
    assert not info.mxfp4


def test_config_that_is_not_json_is_model_corrupt(model):
    (model / "config.json").write_text("{not json")
    err = _fails(model)
    assert err.code is Code.MODEL_CORRUPT
    assert "config.json" in err.message
    assert "not valid JSON" in err.message


def test_an_unknown_model_type_is_unsupported_and_named(model):
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "mamba9"}))
    err = _fails(model)
    assert err.code is Code.UNSUPPORTED
    assert "'mamba9'" in err.message


def test_a_missing_tokenizer_is_load_failed_naming_it(model):
    (model / "tokenizer.json").unlink()
    err = _fails(model)
    assert err.code is Code.LOAD_FAILED
    assert "tokenizer.json" in err.message


def test_a_damaged_tokenizer_is_model_corrupt(model):
    (model / "tokenizer.json").write_text('{"model": ')
    assert _fails(model).code is Code.MODEL_CORRUPT


@pytest.mark.parametrize("keep", [4, 200, 40_000])
def test_truncated_weights_are_model_corrupt(model, keep):
    weights = model / "model.safetensors"
    truncated_copy(weights, model / "cut.tmp", keep)
    (model / "cut.tmp").replace(weights)
    err = _fails(model)
    assert err.code is Code.MODEL_CORRUPT
    assert "model.safetensors" in err.message


def test_a_shard_named_in_the_index_but_missing_is_load_failed(model):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    err = _fails(model)
    assert err.code is Code.LOAD_FAILED
    assert "model-00001-of-00002.safetensors" in err.message


def test_no_weight_files_is_load_failed(model):
    (model / "model.safetensors").unlink()
    assert _fails(model).code is Code.LOAD_FAILED


def test_backend_choice():
    assert choose_backend("transformers", "llama") == "transformers"
    assert choose_backend("mlx", "qwen") == "mlx"
    assert choose_backend("auto", "qwen") == "mlx"  # the only backend that runs it
    with pytest.raises(AllmError) as info:
        choose_backend("transformers", "qwen")
    assert info.value.code is Code.UNSUPPORTED
    assert choose_backend("onnx", "llama") == "onnx"
    with pytest.raises(AllmError) as info:
        choose_backend("onnx", "qwen")  # the builder reads it through transformers, which lacks it
    assert info.value.code is Code.UNSUPPORTED
    with pytest.raises(AllmError):
        choose_backend("tensorrt", "llama")


def test_memory_estimate_widens_what_transformers_expands():
    from allm.managers.text.manager import widening
    from allm.managers.text.safetensors_engine import DirectoryInfo

    def info(dtype: str, mxfp4: bool = False) -> DirectoryInfo:
        return DirectoryInfo(Path("/m"), "llama", {"torch_dtype": dtype}, 1000, mxfp4)

    assert widening(info("bfloat16"), "transformers", {}) == 2.0  # bf16 on disk, float32 in memory
    assert widening(info("float32"), "transformers", {}) == 1.0
    assert widening(info("bfloat16"), "transformers", {"dtype": "bfloat16"}) == 1.0
    assert widening(info("bfloat16", mxfp4=True), "transformers", {}) == 8.0  # 4 bits to 32
    assert widening(info("bfloat16", mxfp4=True), "mlx", {}) == 1.0


def test_the_key_value_cache_of_a_full_context_is_counted():
    config = {
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 2048,
        "max_position_embeddings": 131072,
    }
    info = DirectoryInfo(Path("/m"), "llama", config, 1000, False)
    # keys and values, layers, context, KV heads, head size, float32: multiplied
    assert kv_cache_bytes_of(info, {}) == 2 * 16 * 4096 * 8 * 64 * 4  # the default context: 4096
    assert kv_cache_bytes_of(info, {"n_ctx": 8192, "dtype": "bfloat16"}) == 2 * 16 * 8192 * 8 * 64 * 2
    small = DirectoryInfo(Path("/m"), "llama", {**config, "max_position_embeddings": 512}, 1000, False)
    assert kv_cache_bytes_of(small, {"n_ctx": 8192}) == 2 * 16 * 512 * 8 * 64 * 4  # never past its training
