"""The onnx backend's pure parts: options, detection of ONNX GenAI directories, the cache key,
and how a failed model builder is classified."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from allm.kernel.codes import AllmError, Code
from allm.managers.text.detect import Format, detect
from allm.managers.text.onnx_engine import (
    builder_failure,
    cache_name,
    check_genai_directory,
    check_onnx_files,
    exception_of,
)
from allm.managers.text.options import OnnxOptions, onnx_problems, safetensors_problems
from allm.managers.text.safetensors_engine import DirectoryInfo, choose_backend

GENAI = {
    "model": {
        "type": "llama",
        "context_length": 512,
        "vocab_size": 384,
        "eos_token_id": 2,
        "decoder": {
            "filename": "model.onnx",
            "head_size": 16,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
        },
    }
}


def _genai_dir(path, config=GENAI):
    path.mkdir()
    (path / "genai_config.json").write_text(json.dumps(config))
    (path / "model.onnx").write_bytes(b"")
    (path / "tokenizer.json").write_text("{}")
    return path


def _problems(check, options):
    return {e.param: e.message for e in check("m", options)}


# -- options -------------------------------------------------------------------------------


def test_the_cpu_defaults_to_float32_and_a_gpu_to_int4():
    assert OnnxOptions.from_settings("m", {}) == OnnxOptions(
        "cpu", "fp32", OnnxOptions.from_settings("m", {}).n_threads
    )
    assert OnnxOptions.from_settings("m", {"execution_provider": "dml"}).precision == "int4"
    assert OnnxOptions.from_settings("m", {"execution_provider": "cuda"}).precision == "int4"
    assert OnnxOptions.from_settings("m", {"precision": "int4"}).precision == "int4"


def test_windows_takes_onnx_on_directml_by_default(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    assert choose_backend("auto", "llama") == "onnx"
    assert choose_backend("auto", "qwen") == "mlx"  # where the architecture allows
    assert OnnxOptions.from_settings("m", {}) == OnnxOptions(
        "dml", "int4", OnnxOptions.from_settings("m", {}).n_threads
    )
    assert _problems(safetensors_problems, {"precision": "fp16"}) == {}  # auto is onnx here


def test_linux_keeps_transformers_by_default(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert choose_backend("auto", "llama") == "transformers"


@pytest.mark.parametrize(
    ("options", "param", "needle"),
    [
        ({"backend": "onnx", "execution_provider": "tpu"}, "options.execution_provider", "'tpu'"),
        ({"backend": "onnx", "precision": "int8"}, "options.precision", "'int8'"),
        ({"backend": "onnx", "precision": "fp16"}, "options.precision", "fp32 or int4"),  # fp16 on the CPU
        ({"backend": "onnx", "execution_provider": "dml", "precision": "fp32"}, "options.precision", "dml"),
        ({"backend": "onnx", "dtype": "float16"}, "options.dtype", "precision"),
        ({"backend": "transformers", "precision": "int4"}, "options.precision", "onnx backend only"),
        ({"backend": "mlx", "execution_provider": "cpu"}, "options.execution_provider", "onnx backend only"),
    ],
)
def test_bad_onnx_options_name_the_option(monkeypatch, options, param, needle):
    monkeypatch.setattr(sys, "platform", "linux")
    problems = _problems(safetensors_problems, options)
    assert param in problems, problems
    assert needle in problems[param]


def test_good_onnx_options_pass():
    for options in (
        {"backend": "onnx"},
        {"backend": "onnx", "precision": "int4", "n_threads": 1},
        {"backend": "onnx", "execution_provider": "cuda", "precision": "fp16"},
        {"backend": "onnx", "execution_provider": "dml", "precision": "int4"},
    ):
        assert _problems(safetensors_problems, options) == {}, options


def test_a_converted_directory_takes_no_precision():
    assert _problems(onnx_problems, {"execution_provider": "cpu", "n_threads": 2}) == {}
    assert "options.precision" in _problems(onnx_problems, {"precision": "int4"})
    assert "options.backend" in _problems(onnx_problems, {"backend": "transformers"})


# -- detection and checks --------------------------------------------------------------------


def test_a_genai_directory_is_onnx(tmp_path):
    d = _genai_dir(tmp_path / "g")
    assert detect(d).format is Format.ONNX
    assert detect(d, Format.ONNX).format is Format.ONNX
    with pytest.raises(AllmError) as info:
        detect(d, Format.SAFETENSORS)
    assert info.value.code is Code.FORMAT_MISMATCH
    assert "holds only onnx" in info.value.message


def test_safetensors_beside_a_genai_config_is_safetensors_unless_registered(tmp_path):
    d = _genai_dir(tmp_path / "both")
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert detect(d).format is Format.SAFETENSORS
    assert detect(d, Format.ONNX).format is Format.ONNX


def test_a_lone_onnx_file_is_format_mismatch(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(AllmError) as info:
        detect(tmp_path / "model.onnx")
    assert info.value.code is Code.FORMAT_MISMATCH
    assert "genai_config.json" in info.value.message


def test_a_genai_directory_reads_as_its_config_says(tmp_path):
    info = check_genai_directory(_genai_dir(tmp_path / "g"))
    assert info.model_type == "llama"
    assert info.config["max_position_embeddings"] == 512
    assert info.config["head_dim"] == 16


@pytest.mark.parametrize(
    ("damage", "code", "needle"),
    [
        (lambda d: (d / "genai_config.json").write_text("{no"), Code.MODEL_CORRUPT, "not valid JSON"),
        (lambda d: (d / "genai_config.json").write_text("[]"), Code.MODEL_CORRUPT, "'model'"),
        (lambda d: (d / "model.onnx").unlink(), Code.LOAD_FAILED, "model.onnx"),
        (lambda d: (d / "tokenizer.json").unlink(), Code.LOAD_FAILED, "no tokenizer"),
    ],
)
def test_a_damaged_genai_directory_names_the_cause(tmp_path, damage, code, needle):
    d = _genai_dir(tmp_path / "g")
    damage(d)
    with pytest.raises(AllmError) as info:
        check_genai_directory(d)
    assert info.value.code is code
    assert needle in info.value.message


def _onnx_with_external_data(directory):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 64), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        [weight],
    )
    onnx.save(
        helper.make_model(graph),
        str(directory / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )


def test_external_weights_cut_short_are_model_corrupt(tmp_path):
    d = _genai_dir(tmp_path / "g")
    _onnx_with_external_data(d)
    check_onnx_files(d)
    data = d / "model.onnx.data"
    with data.open("r+b") as f:
        f.truncate(data.stat().st_size - 100)
    with pytest.raises(AllmError) as info:
        check_onnx_files(d)
    assert info.value.code is Code.MODEL_CORRUPT
    assert "truncated" in info.value.message
    (d / "model.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(AllmError) as info:
        check_onnx_files(d)
    assert info.value.code is Code.MODEL_CORRUPT


# -- the cache key -----------------------------------------------------------------------------


def test_the_cache_key_follows_the_files_the_precision_and_the_provider(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"12345678")
    info = DirectoryInfo(d, "llama", {}, 8, False)
    fp32 = cache_name(info, OnnxOptions("cpu", "fp32", 1))
    assert fp32 == cache_name(info, OnnxOptions("cpu", "fp32", 7))  # threads do not change the model
    assert fp32.startswith("src-fp32-cpu-")
    assert fp32 != cache_name(info, OnnxOptions("cpu", "int4", 1))
    assert fp32 != cache_name(info, OnnxOptions("cuda", "fp32", 1))
    stat = (d / "model.safetensors").stat()
    os.utime(d / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert fp32 != cache_name(info, OnnxOptions("cpu", "fp32", 1))


# -- the builder's failures ---------------------------------------------------------------------

TRACEBACK = """Valid precision + execution provider combinations are: FP32 CPU, ...
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File ".../builder.py", line 768, in create_model
    raise NotImplementedError(f"The {hf_name} model is not currently supported.")
{kind}: {message}
"""


def _builder_died(kind, message, returncode=1):
    info = DirectoryInfo(Path("/m"), "llama", {"architectures": ["LlamaForMadeUpLM"]}, 0, False)
    output = TRACEBACK.replace("{kind}", kind).replace("{message}", message)
    return builder_failure("m", info, OnnxOptions("cpu", "fp32", 1), returncode, output)


def test_a_refused_architecture_is_unsupported_and_named():
    err = _builder_died("NotImplementedError", "The /m model is not currently supported.")
    assert isinstance(err, AllmError)
    assert err.code is Code.UNSUPPORTED
    assert "'LlamaForMadeUpLM'" in err.message
    assert "'llama'" in err.message


def test_other_builder_failures_quote_its_last_words():
    err = _builder_died("KeyError", "'multi_cache'")
    assert isinstance(err, AllmError)
    assert err.code is Code.LOAD_FAILED
    assert "KeyError: 'multi_cache'" in err.message
    assert _builder_died("MemoryError", "").code is Code.OOM_RAM
    killed = builder_failure(
        "m", DirectoryInfo(Path("/m"), "llama", {}, 0, False), OnnxOptions("cpu", "fp32", 1), -9, ""
    )
    assert killed.code is Code.OOM_RAM


def test_the_exception_is_read_from_the_last_traceback():
    assert exception_of("no traceback here") is None
    assert exception_of(TRACEBACK.replace("{kind}: {message}", "AssertionError")) == ("AssertionError", "")
    dotted = TRACEBACK.replace("{kind}", "onnx.checker.ValidationError").replace("{message}", "bad")
    assert exception_of(dotted) == ("ValidationError", "bad")
