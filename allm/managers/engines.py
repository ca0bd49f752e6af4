"""The engines allm runs, the pip extra that installs each, and whether it is installed here.

A static table, like the registry of managers.  The command line reads it to refuse a
catalog entry whose engine is missing before anything starts; a manager reads it before
it imports an engine, so a missing one is a message with the exact ``pip install``, never
an ImportError in the middle of a request.  Nothing here imports an engine:
``importlib.util.find_spec`` only looks for it, until a manager preloads its engines.

The extras themselves are declared in pyproject.toml; this table and that file name the
same extras.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Final, TypeVar

from allm.kernel.codes import AllmError, UnsupportedError

log = logging.getLogger("allm.engines")
Entry = TypeVar("Entry")


@dataclasses.dataclass(frozen=True, slots=True)
class Engine:
    name: str  # as its users know it
    modules: tuple[str, ...]  # the top-level modules it imports
    extra: str | None  # the extra of allm that installs it; None: allm's core install

    def missing(self) -> tuple[str, ...]:
        """The modules of this engine that are not installed here."""
        return tuple(m for m in self.modules if importlib.util.find_spec(m) is None)

    def installed(self) -> bool:
        return not self.missing()

    def install_command(self) -> str:
        if self.extra is None:
            return "pip install --force-reinstall allm"  # core: only a broken install lacks it
        return f"pip install 'allm[{self.extra}]'"

    def not_installed(self) -> str:
        """The problem ``allm check`` reports for a model whose engine is missing."""
        return f"needs the {self.name} engine, which is not installed: run {self.install_command()}"

    def preload(self) -> None:
        """Import the engine's modules now (ImportError if one fails).

        A manager does this before it serves: importing a big native library holds the GIL
        while it is linked (``import torch`` held it 0.4 s here, longer from a cold disk),
        and the I/O thread's heartbeats wait for the GIL.  At start the supervisor's start
        timeout covers it; in the middle of a load it could be taken for a hang.
        """
        for module in self.modules:
            importlib.import_module(module)

    def require(self, model_id: str) -> None:
        """Raise UNSUPPORTED, with the command that installs it, if this engine is missing."""
        missing = self.missing()
        if missing:
            raise UnsupportedError(
                f"model {model_id!r} needs the {self.name} engine, which is not installed "
                f"(no module {', '.join(missing)}): run {self.install_command()}",
                reason="engine_not_installed",
            )


LLAMA_CPP: Final = Engine("llama.cpp", ("llama_cpp",), None)
TRANSFORMERS: Final = Engine(
    "transformers", ("torch", "transformers", "accelerate", "safetensors"), "safetensors"
)
MLX_LM: Final = Engine("mlx-lm", ("mlx", "mlx_lm"), "safetensors")
# Its model builder converts with torch and transformers (and onnx-ir); the tokenizer is transformers'.
ONNX_GENAI: Final = Engine(
    "onnxruntime-genai", ("onnxruntime_genai", "onnx_ir", "onnx", "torch", "transformers"), "onnx"
)
WHISPER_CPP: Final = Engine("whisper.cpp", ("pywhispercpp", "_pywhispercpp", "soundfile", "soxr"), "audio")
STABLE_DIFFUSION_CPP: Final = Engine("stable-diffusion.cpp", ("stable_diffusion_cpp", "PIL"), "image")

ENGINES: Final[Mapping[str, Engine]] = MappingProxyType(
    {e.name: e for e in (LLAMA_CPP, TRANSFORMERS, MLX_LM, ONNX_GENAI, WHISPER_CPP, STABLE_DIFFUSION_CPP)}
)


def preload_engines(entries: Iterable[Entry], engine_of: Callable[[Entry], Engine | None]) -> None:
    """Import the engines these catalog entries need, each once; a failure is left to the load to report.

    A manager calls it at start (Engine.preload says why); a catalog reloaded later imports a
    new engine in its first load.
    """
    needed: dict[str, Engine] = {}
    for entry in entries:
        try:
            engine = engine_of(entry)
        except (AllmError, OSError):  # a missing or broken file: its load says so, with its code
            continue
        if engine is not None and engine.installed():
            needed.setdefault(engine.name, engine)
    for engine in needed.values():
        started = time.monotonic()
        try:
            engine.preload()
        except Exception:  # an engine that fails to import fails each load with the reason
            log.warning("could not import the %s engine before serving", engine.name, exc_info=True)
            continue
        log.info("imported the %s engine in %.2f s", engine.name, time.monotonic() - started)
