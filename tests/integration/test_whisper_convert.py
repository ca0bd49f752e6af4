"""The real whisper tiny.en, converted from CTranslate2, transcribing real speech through pywhispercpp.

pywhispercpp runs in a subprocess in every test here: a file it cannot load takes the process
down (SIGSEGV, SIGABRT), which is what ``check_model`` exists to prevent and what the last
tests show.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from allm.kernel.codes import AllmError
from allm.managers.audio.model_check import check_model
from allm.managers.files.ggml import Hparams
from tests.whisper_files import damaged_models, section_offsets, speech_samples, tiny_en, write_tiny_whisper

pytestmark = pytest.mark.slow

SENTENCE = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
KEY_WORDS = ("fox", "lazy", "dog", "paris", "capital", "france")

# Loads a model with pywhispercpp and prints its segments as JSON. It refuses anything but an
# absolute path to an existing file: pywhispercpp would take any other string for the name of
# a model to download.
TRANSCRIBE = r"""
import json, os, sys
path = sys.argv[1]
if not (os.path.isabs(path) and os.path.isfile(path)):
    sys.exit(3)
import numpy as np
from pywhispercpp.model import Model
model = Model(path, redirect_whispercpp_logs_to=None, n_threads=2, print_progress=False, print_realtime=False)
audio = np.load(sys.argv[2]) if len(sys.argv) > 2 else np.zeros(2 * 16000, dtype=np.float32)
segments = model.transcribe(audio)
print(json.dumps([{"t0": s.t0, "t1": s.t1, "text": s.text} for s in segments]))
"""


def run_whisper(
    model: Path, audio: Path | None = None, timeout_s: float = 90
) -> subprocess.CompletedProcess[str]:
    assert model.is_absolute()
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", GGML_NO_BACKTRACE="1")
    args = [sys.executable, "-c", TRANSCRIBE, str(model)] + ([str(audio)] if audio else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, env=env)


def segments_of(result: subprocess.CompletedProcess[str]) -> list[dict]:
    assert result.returncode == 0, result.stderr[-2000:]
    segments = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(segments, list)
    return segments


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("whisper")


@pytest.fixture(scope="module")
def tiny_en_model(whisper_dir) -> Path:
    return tiny_en(whisper_dir)


@pytest.fixture(scope="module")
def speech(whisper_dir) -> tuple[Path, float]:
    samples = speech_samples(whisper_dir / "speech.wav", SENTENCE)
    path = whisper_dir / "speech.npy"
    np.save(path, samples)
    return path, len(samples) / 16000


def test_converted_tiny_en_passes_the_check(tiny_en_model):
    info = check_model(tiny_en_model)
    assert info.hparams == Hparams(51864, 1500, 384, 6, 4, 448, 384, 6, 4, 80, 1)
    assert not info.multilingual
    assert info.n_tensors == 7 + 15 * 4 + 4 + 24 * 4
    assert 70_000_000 < info.weights_bytes < info.size_bytes < 80_000_000


def test_converted_tiny_en_vocabulary_holds_raw_bytes(tiny_en_model):
    data = tiny_en_model.read_bytes()[: section_offsets(tiny_en_model)["tensors"]]
    pos = section_offsets(tiny_en_model)["vocab"]
    (n_tokens,) = struct.unpack_from("<i", data, pos)
    pos += 4
    tokens = []
    for _ in range(n_tokens):
        (length,) = struct.unpack_from("<I", data, pos)
        tokens.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    assert n_tokens == 50256  # the ordinary tokens; whisper.cpp names <|endoftext|> and the rest
    assert tokens[0] == b"!"
    assert tokens[220] == b" "
    assert tokens[50255] == b" gazed"


def test_tiny_en_transcribes_speech(tiny_en_model, speech):
    audio, duration_s = speech
    segments = segments_of(run_whisper(tiny_en_model, audio))
    text = " ".join(s["text"] for s in segments).lower()
    missed = [word for word in KEY_WORDS if word not in text]
    assert len(missed) <= 1, f"missed {missed} in {text!r}"
    assert all(0 <= s["t0"] <= s["t1"] for s in segments)
    assert segments[-1]["t1"] <= duration_s * 100 + 100  # centiseconds, within the audio


def test_tiny_random_model_loads_and_transcribes(whisper_dir):
    model = write_tiny_whisper(whisper_dir / "tiny.bin")
    check_model(model)
    segments_of(run_whisper(model))  # random weights: any text, but a list and no crash


def test_multilingual_tiny_random_model_loads(whisper_dir):
    model = write_tiny_whisper(whisper_dir / "tiny-ml.bin", multilingual=True, n_layer=4, seed=1)
    assert check_model(model).multilingual
    segments_of(run_whisper(model))


@pytest.fixture(scope="module")
def damaged(whisper_dir) -> dict[str, Path]:
    return damaged_models(write_tiny_whisper(whisper_dir / "good.bin"), whisper_dir / "damaged")


# Each of these takes pywhispercpp down when loaded directly: a NULL context used by the first
# transcription (SIGSEGV), or GGML_ASSERT (SIGABRT) for an ftype ggml does not know.
CRASHING = (
    "empty",
    "cut_in_tensor_record",
    "cut_in_first_tensor",
    "state_mismatch",
    "unknown_ftype",
    "missing_tensor",
)


@pytest.mark.parametrize("kind", CRASHING)
def test_damaged_file_crashes_pywhispercpp_and_check_model_refuses_it(damaged, kind):
    with pytest.raises(AllmError):
        check_model(damaged[kind])
    result = run_whisper(damaged[kind], timeout_s=60)
    assert result.returncode < 0, f"expected a crash, got {result.returncode}: {result.stdout[-500:]}"


def test_truncated_files_pywhispercpp_takes_silently_are_refused(damaged):
    """Cut before the tensors: an empty model that hears nothing. Cut in the last tensor: it runs."""
    assert segments_of(run_whisper(damaged["cut_before_tensors"])) == []
    segments_of(run_whisper(damaged["cut_in_last_tensor"]))
    for kind in ("cut_before_tensors", "cut_in_last_tensor"):
        with pytest.raises(AllmError, match="truncated"):
            check_model(damaged[kind])
