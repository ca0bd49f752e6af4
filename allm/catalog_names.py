"""The model formats a catalog entry may name, per modality: the gateway checks them, the managers serve them.

Both sides import them from here, because the gateway may not import a manager. A
modality not in ``FORMATS`` (image) takes no format: its files say what they are.
"""

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

GGUF: Final = "gguf"  # a llama.cpp file
SAFETENSORS: Final = "safetensors"  # a directory of *.safetensors and config.json
ONNX: Final = "onnx"  # an ONNX Runtime GenAI directory
GGML: Final = "ggml"  # a whisper.cpp file
CTRANSLATE2: Final = "ctranslate2"  # a CTranslate2 whisper directory (faster-whisper's form)

TEXT_FORMATS: Final = (GGUF, SAFETENSORS, ONNX)
AUDIO_FORMATS: Final = (GGML, CTRANSLATE2)
FORMATS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {"text": TEXT_FORMATS, "audio": AUDIO_FORMATS}
)
