"""The safetensors engine's backends behind one interface: transformers + torch, and mlx-lm.

``Backend`` is all the engine asks of one: the tokenizer's ids and text, and
``tokens(prompt, picker)``, which yields one token per step, each picked by
``sampling.TokenPicker`` from the raw logits. The onnx backend (onnx_engine.py)
is the third.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from allm.kernel.codes import LoadFailedError
from allm.managers.text.options import default_threads
from allm.managers.text.sampling import TokenPicker

if TYPE_CHECKING:
    from allm.managers.text.safetensors_engine import DirectoryInfo


class Backend(Protocol):
    """What the engine needs of a backend: its tokenizer's text and its tokens, one at a time."""

    name: str
    n_ctx: int
    eos: set[int]

    @property
    def hf_tokenizer(self) -> Any:
        """The Hugging Face fast tokenizer: its chat template, and the vocabulary grammars see."""
        ...

    def chat_text(self, messages: list[dict[str, Any]], **extra: Any) -> str: ...

    def chat_ids(self, messages: list[dict[str, Any]], **extra: Any) -> list[int]: ...

    def text_ids(self, prompt: str) -> list[int]: ...

    def decode(self, ids: list[int], special: bool = False) -> str:
        """``special``: special tokens are kept as their text (the markers tool calls use)."""
        ...

    def piece(self, token: int) -> bytes: ...

    def tokens(self, prompt: list[int], picker: TokenPicker) -> Iterator[int]:
        """Token after token after ``prompt``, each ``picker.pick``ed from the next logits."""
        ...


class HfTokenizerText:
    """Text through the directory's Hugging Face tokenizer (transformers' AutoTokenizer)."""

    tokenizer: Any

    @property
    def hf_tokenizer(self) -> Any:
        return self.tokenizer

    def chat_text(self, messages: list[dict[str, Any]], **extra: Any) -> str:
        return str(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        )

    def chat_ids(self, messages: list[dict[str, Any]], **extra: Any) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
        if isinstance(ids, Mapping):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def text_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def decode(self, ids: list[int], special: bool = False) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=not special))

    def piece(self, token: int) -> bytes:
        return str(self.tokenizer.decode([token], skip_special_tokens=False)).encode("utf-8")


class _Transformers(HfTokenizerText):
    name = "transformers"

    def __init__(self, info: DirectoryInfo, options: Mapping[str, Any]) -> None:
        import torch
        import transformers

        self.torch = torch
        torch.set_num_threads(int(options.get("n_threads") or default_threads()))
        dtype = options.get("dtype", "float32")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(info.path), local_files_only=True)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(info.path), local_files_only=True, dtype=getattr(torch, dtype) if dtype != "auto" else "auto"
        )
        self.model.eval()
        self.n_ctx = int(getattr(self.model.config, "max_position_embeddings", 4096) or 4096)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}

    def tokens(self, prompt: list[int], picker: TokenPicker) -> Iterator[int]:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
            while True:
                token = picker.pick(out.logits[0, -1].float().numpy())
                yield token
                out = self.model(
                    input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
                )


class _Mlx:
    name = "mlx"

    def __init__(self, info: DirectoryInfo, options: Mapping[str, Any]) -> None:
        import mlx.core as mx
        from mlx_lm import load

        self.mx = mx
        if info.model_type == "gpt_oss" and not info.mxfp4:
            self.model, self.tokenizer = _load_mlx_gpt_oss_dequantized(info.path)
        else:
            self.model, self.tokenizer = load(str(info.path))
        self.n_ctx = int(info.config.get("max_position_embeddings") or 4096)
        self.eos = set(self.tokenizer.eos_token_ids)

    @property
    def hf_tokenizer(self) -> Any:
        return self.tokenizer._tokenizer  # mlx-lm's TokenizerWrapper holds the HF one

    def chat_text(self, messages: list[dict[str, Any]], **extra: Any) -> str:
        return str(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        )

    def chat_ids(self, messages: list[dict[str, Any]], **extra: Any) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra))

    def text_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt))

    def decode(self, ids: list[int], special: bool = False) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=not special))

    def piece(self, token: int) -> bytes:
        return str(self.tokenizer.decode([token], skip_special_tokens=False)).encode("utf-8")

    def tokens(self, prompt: list[int], picker: TokenPicker) -> Iterator[int]:
        from mlx_lm.generate import generate_step

        mx = self.mx

        def pick(_tokens: Any, logits: Any) -> Any:
            # The whole order runs in the picker; mlx-lm's sampler then takes its token.
            token = picker.pick(np.array(logits[0].astype(mx.float32)))
            return mx.where(mx.arange(logits.shape[-1]) == token, 0.0, float("-inf"))[None]

        # generate_step computes one token ahead: the picker pairs logprobs with tokens in order.
        for token, _logprobs in generate_step(
            mx.array(prompt),
            self.model,
            max_tokens=-1,
            sampler=lambda logprobs: mx.argmax(logprobs, axis=-1),
            logits_processors=[pick],
        ):
            yield int(token)


def _load_mlx_gpt_oss_dequantized(path: Path) -> tuple[Any, Any]:
    """gpt-oss in the de-quantised bf16 layout, which mlx-lm reads only as MXFP4.

    transformers stores each layer's experts as ``gate_up_proj`` [experts, in, 2·out]
    (gate and up interleaved) and ``down_proj`` [experts, in, out]; mlx-lm wants
    separate [experts, out, in] matrices.  Everything else loads as it is.
    """
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    model, _config = load_model(path, strict=False)
    experts = []
    for file in sorted(path.glob("*.safetensors")):
        for name, value in mx.load(str(file)).items():
            if name.endswith("mlp.experts.gate_up_proj"):
                stem = name.removesuffix("gate_up_proj")
                experts.append((stem + "gate_proj.weight", value[..., ::2].transpose(0, 2, 1)))
                experts.append((stem + "up_proj.weight", value[..., 1::2].transpose(0, 2, 1)))
            elif name.endswith("mlp.experts.down_proj"):
                experts.append((name + ".weight", value.transpose(0, 2, 1)))
    if not experts:
        raise LoadFailedError(f"{path}: no gpt-oss expert weights (gate_up_proj, down_proj) found")
    model.load_weights(experts, strict=False)
    mx.eval(model.parameters())
    return model, load_tokenizer(path)


def open_backend(name: str, info: DirectoryInfo, options: Mapping[str, Any]) -> Backend:
    """Load ``info``'s model on the backend ``name`` (mlx or transformers)."""
    return _Mlx(info, options) if name == "mlx" else _Transformers(info, options)
