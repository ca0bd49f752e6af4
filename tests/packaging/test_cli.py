"""The operator commands: `allm --version`, `allm check`, `allm models`, and every command's help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from allm import __version__
from allm.cli import main
from tests.model_files import smollm2_path, truncated_copy, write_gguf

ALLM = Path(sys.executable).parent / "allm"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "allm.toml"
    path.write_text(text)
    return path


def test_version_is_the_installed_distributions():
    shown = subprocess.run([ALLM, "--version"], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == f"allm {__version__}"
    assert __version__ == "0.1.0"


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        ([], ("serve", "gateway", "manager", "keys", "check", "models", "--version")),
        (
            ["serve"],
            ("--config", "--host", "--port", "--data-dir", "--log-format", "engine is not installed"),
        ),
        (["check"], ("CONFIG", "every problem", "exits 1")),
        (["models"], ("CONFIG", "--json", "installed")),
        (["gateway"], ("--config", "--host", "--port", "heartbeats", "allm manager")),
        (
            ["manager"],
            (
                "MODALITY",
                "text, audio, image",
                "--instance",
                "--config",
                "exec",
                "SIGTERM drains",
                "--bind",
                "--secret-key",
                "--allow",
                "--log-format",
            ),
        ),
        (["keys"], ("NAME", "NAME.key", "NAME.key_secret", "0600", "--dir", "overwrite")),
    ],
)
def test_every_command_has_complete_help(argv, needles):
    shown = subprocess.run([ALLM, *argv, "--help"], capture_output=True, text=True, check=True)
    text = " ".join(shown.stdout.split())
    for needle in needles:
        assert needle in text, (needle, text)


def test_check_passes_a_good_catalog_and_says_so(capsys, tmp_path):
    write_gguf(tmp_path / "m.gguf")
    config = write(
        tmp_path, f'[[models]]\nid = "m"\npath = "{tmp_path / "m.gguf"}"\noptions = {{ n_ctx = 512 }}\n'
    )
    status, out, err = run(capsys, "check", str(config))
    assert (status, err) == (0, "")
    assert out == f"allm check: {config} is valid: 1 model(s)\n"


def test_check_reports_every_problem_at_once_each_naming_its_entry_and_field(capsys, tmp_path):
    truncated_copy(smollm2_path(), tmp_path / "cut.gguf", 1_000_000)
    (tmp_path / "notes.txt").write_text("not a model")
    config = write(
        tmp_path,
        "[server]\nport = 'eighty'\ncolour = 'blue'\n"
        "[text]\nqueue_size = -1\n"
        '[[models]]\nid = "gone"\npath = "/nonexistent/m.gguf"\noptions = { n_ctx = 2, bogus = 1 }\n'
        f'[[models]]\nid = "cut"\npath = "{tmp_path / "cut.gguf"}"\n'
        f'[[models]]\nid = "text"\npath = "{tmp_path / "notes.txt"}"\n'
        '[[models]]\nid = "odd"\npath = "/x"\nformat = "pytorch"\n'
        '[[models]]\nid = "tuned"\npath = "/y"\nformat = "safetensors"\noptions = { dtype = "int3" }\n',
    )
    status, out, err = run(capsys, "check", str(config))
    assert status == 1
    assert out == ""
    lines = err.splitlines()
    assert lines[-1] == "allm check: 11 problem(s)"
    expected = [
        "[server] has unknown setting(s) ['colour']",
        "setting port must be int, got 'eighty'",
        "setting text.queue_size must be at least 0, got -1",
        "model 'odd': field 'format' must be one of",
        "model 'gone': field 'path': model path not found: /nonexistent/m.gguf",
        "model 'gone': field 'options.bogus': unknown llama.cpp option(s) ['bogus']",
        "model 'gone': field 'options.n_ctx': option n_ctx must be an integer ≥ 16, got 2",
        "model 'cut': field 'path':",
        "model 'text': field 'path':",
        "model 'tuned': field 'path': model path not found: /y",
        "model 'tuned': field 'options.dtype': option dtype must be one of",
    ]
    for needle in expected:
        assert sum(needle in line for line in lines) == 1, (needle, lines)
    assert "truncated" in next(line for line in lines if "model 'cut'" in line)


def test_check_exits_non_zero_on_a_file_it_cannot_read(capsys, tmp_path):
    assert run(capsys, "check", str(tmp_path / "nope.toml"))[0] == 1
    assert run(capsys, "check", str(write(tmp_path, "= =")))[0] == 1


def test_models_lists_format_engine_size_and_whether_installed(capsys, tmp_path):
    write_gguf(tmp_path / "m.gguf")
    config = write(
        tmp_path,
        f'[[models]]\nid = "m"\npath = "{tmp_path / "m.gguf"}"\n'
        '[[models]]\nid = "later"\npath = "/not/yet"\nformat = "safetensors"\n'
        'options = { backend = "mlx" }\n',
    )
    status, out, _ = run(capsys, "models", "--json", str(config))
    assert status == 0
    rows = {row["id"]: row for row in json.loads(out)}
    size = (tmp_path / "m.gguf").stat().st_size
    assert {k: rows["m"][k] for k in ("format", "engine", "size_bytes", "installed", "problems")} == {
        "format": "gguf",
        "engine": "llama.cpp",
        "size_bytes": size,
        "installed": True,
        "problems": [],
    }
    assert (rows["later"]["engine"], rows["later"]["size_bytes"]) == ("mlx-lm", None)
    assert rows["later"]["problems"] == ["path: model path not found: /not/yet"]

    status, out, _ = run(capsys, "models", str(config))
    header, first, second, _, note = out.splitlines()
    assert header.split() == ["ID", "MODALITY", "FORMAT", "ENGINE", "SIZE", "INSTALLED"]
    assert first.split()[:4] == ["m", "text", "gguf", "llama.cpp"]
    assert first.split()[-1] == "yes"
    assert second.split() == ["later", "text", "safetensors", "mlx-lm", "-", "yes"]
    assert note == "1 model(s) with problems, 0 bad setting(s): run allm check"


def test_the_default_catalog_is_the_embedded_models(capsys, monkeypatch):
    monkeypatch.delenv("ALLM_CONFIG", raising=False)
    status, out, _ = run(capsys, "models", "--json")
    rows = [(r["id"], r["modality"], r["format"], r["engine"], r["installed"]) for r in json.loads(out)]
    assert status == 0
    assert rows == [
        ("smollm2-135m-instruct", "text", "gguf", "llama.cpp", True),
        ("whisper-tiny.en", "audio", "ctranslate2", "whisper.cpp", True),
    ]
    assert run(capsys, "check")[:2] == (0, "allm check: the default configuration is valid: 2 model(s)\n")
