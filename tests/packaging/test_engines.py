"""A manager imports the engine its models need and no other; a missing one is named with its extra.

Read from the real processes of `allm serve` (their memory maps), in this environment where
every engine is installed: a GGUF catalog must not pull torch, mlx or the others in.
"""

from __future__ import annotations

import io
import wave

import pytest

from allm.kernel.codes import Code, UnsupportedError
from allm.managers.engines import ENGINES, Engine
from tests.integration.gateway_server import running_server
from tests.model_files import write_hf_model
from tests.packaging.processes import manager_process, mapped_libraries

pytestmark = pytest.mark.slow

#: a native library each engine maps when imported: (engine, file name prefix)
LIBRARIES = {
    "llama.cpp": "libllama",
    "torch": "libtorch_cpu",
    "mlx": "libmlx",
    "onnxruntime": "libonnxruntime",
    "whisper.cpp": "libwhisper",
    "stable-diffusion.cpp": "libstable-diffusion",
}


def engines_mapped(pid: int) -> set[str]:
    libraries = mapped_libraries(pid)
    return {engine for engine, prefix in LIBRARIES.items() if any(n.startswith(prefix) for n in libraries)}


def chat(server, model: str) -> None:
    status, reply = server.json(
        "POST",
        "/v1/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert status == 200, reply


def silence_wav(seconds: float = 0.5, rate: int = 16_000) -> bytes:
    """A WAV of silence: the smallest upload that loads the audio engine (an empty one is a 400)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(seconds * rate))
    return out.getvalue()


def transcribe(server, model: str) -> None:
    boundary = "allm-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            f"Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + silence_wav()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, _, data = server.request(
        "POST",
        "/v1/audio/transcriptions",
        raw=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert status == 200, data


def test_each_manager_of_the_default_catalog_maps_its_own_engine_and_no_other(tmp_path):
    with running_server("", tmp_path) as server:
        chat(server, "smollm2-135m-instruct")
        text, audio = manager_process(server, "text"), manager_process(server, "audio")
        assert engines_mapped(text.pid) == {"llama.cpp"}
        # its catalog's engine, imported before it served (Engine.preload), and no other
        assert engines_mapped(audio.pid) == {"whisper.cpp"}
        transcribe(server, "whisper-tiny.en")  # an empty upload: the model loads, nothing to hear
        assert engines_mapped(audio.pid) == {"whisper.cpp"}
        assert engines_mapped(text.pid) == {"llama.cpp"}
        assert engines_mapped(server.proc.pid) == set()  # the gateway runs no engine at all


def test_a_safetensors_catalog_maps_torch_and_not_llama_cpp(tmp_path):
    model = write_hf_model(tmp_path / "tiny-llama", "llama")
    catalog = f'[[models]]\nid = "tiny"\npath = "{model}"\noptions = {{ backend = "transformers" }}\n'
    with running_server(catalog, tmp_path) as server:
        chat(server, "tiny")
        assert engines_mapped(manager_process(server, "text").pid) == {"torch"}


def test_a_missing_engine_is_unsupported_with_the_command_that_installs_it():
    absent = Engine("warp-drive", ("json", "allm_no_such_module"), "warp")
    assert absent.missing() == ("allm_no_such_module",)
    with pytest.raises(UnsupportedError) as info:
        absent.require("m")
    assert info.value.code is Code.UNSUPPORTED
    assert info.value.reason == "engine_not_installed"
    assert info.value.message == (
        "model 'm' needs the warp-drive engine, which is not installed "
        "(no module allm_no_such_module): run pip install 'allm[warp]'"
    )
    for engine in ENGINES.values():  # all installed in the test environment
        engine.require("m")
