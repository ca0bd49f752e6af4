"""The tensors stable-diffusion.cpp builds for the parts checked tensor by tensor: CLIP-L, TAESD, Flux.

Each table maps a tensor's name (the loader's prefix stripped) to its shape in ggml order,
fastest-varying first, padded to four dimensions, as clip.hpp, tae.hpp and flux.hpp create
them; ``model_check`` compares a file's tensors with them. tests/fixtures/sd-tensors holds the
same tables as stable-diffusion.cpp printed them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from allm.kernel.codes import ModelCorruptError

FLUX_HEAD_DIM = 128  # the sum of Flux's rope axes: any other head size aborts while sampling
TAE_CHANNELS = 64

Ne = tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True, slots=True)
class Tensor:
    ne: Ne  # ggml order, fastest-varying first, padded with 1s
    type: str
    nbytes: int


def _linear(table: dict[str, Ne], name: str, n_in: int, n_out: int, bias: bool = True) -> None:
    table[f"{name}.weight"] = (n_in, n_out, 1, 1)
    if bias:
        table[f"{name}.bias"] = (n_out, 1, 1, 1)


def _conv(table: dict[str, Ne], name: str, n_in: int, n_out: int, bias: bool = True) -> None:
    table[f"{name}.weight"] = (3, 3, n_in, n_out)
    if bias:
        table[f"{name}.bias"] = (n_out, 1, 1, 1)


def clip_l_table() -> dict[str, Ne]:
    """CLIP-L's text model (12 layers of 768, 49408 tokens, 77 positions), as clip.hpp builds it."""
    width, mlp = 768, 3072
    table: dict[str, Ne] = {}
    table["text_model.embeddings.position_embedding.weight"] = (width, 77, 1, 1)
    table["text_model.embeddings.token_embedding.weight"] = (width, 49408, 1, 1)
    for i in range(12):
        p = f"text_model.encoder.layers.{i}"
        for norm in ("layer_norm1", "layer_norm2"):
            table[f"{p}.{norm}.weight"] = table[f"{p}.{norm}.bias"] = (width, 1, 1, 1)
        _linear(table, f"{p}.mlp.fc1", width, mlp)
        _linear(table, f"{p}.mlp.fc2", mlp, width)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(table, f"{p}.self_attn.{proj}", width, width)
    table["text_model.final_layer_norm.weight"] = table["text_model.final_layer_norm.bias"] = (width, 1, 1, 1)
    return table


def taesd_table(z_channels: int, *, encoder: bool = True) -> dict[str, Ne]:
    """TinyDecoder (and TinyEncoder) of tae.hpp: 64-channel blocks of three convolutions."""
    c = TAE_CHANNELS
    table: dict[str, Ne] = {}

    def block(name: str) -> None:
        for k in (0, 2, 4):
            _conv(table, f"{name}.conv.{k}", c, c)

    # the decoder: conv, relu, 3 blocks, then three times (upsample, conv, 3 blocks), conv
    _conv(table, "decoder.layers.0", z_channels, c)
    index = 2
    for _ in range(3):
        for _ in range(3):
            block(f"decoder.layers.{index}")
            index += 1
        _conv(table, f"decoder.layers.{index + 1}", c, c, bias=False)  # after the upsample
        index += 2
    block(f"decoder.layers.{index}")
    _conv(table, f"decoder.layers.{index + 1}", c, 3)
    if encoder:
        _conv(table, "encoder.layers.0", 3, c)
        block("encoder.layers.1")
        index = 2
        for _ in range(3):
            _conv(table, f"encoder.layers.{index}", c, c, bias=False)  # stride 2
            for i in range(3):
                block(f"encoder.layers.{index + 1 + i}")
            index += 4
        _conv(table, f"encoder.layers.{index}", c, z_channels)
    return table


@dataclasses.dataclass(frozen=True, slots=True)
class FluxSize:
    hidden: int
    depth: int
    depth_single: int
    guidance: bool
    in_channels: int = 64
    context_in_dim: int = 4096


def flux_size(label: str, tensors: Mapping[str, Tensor]) -> FluxSize:
    """Flux's sizes, read from the file as FluxRunner reads them."""
    txt_in = tensors.get("txt_in.weight")
    if txt_in is None:
        raise ModelCorruptError(
            f"{label}: tensor 'txt_in.weight' is missing (stable-diffusion.cpp reads Flux's size from it)"
        )
    if txt_in.ne[1] % FLUX_HEAD_DIM:
        raise ModelCorruptError(
            f"{label}: Flux's hidden size {txt_in.ne[1]} (txt_in.weight) is not a multiple of its head size "
            f"{FLUX_HEAD_DIM}: damaged"
        )
    img_in = tensors.get("img_in.weight")
    # FluxRunner takes in_channels from the variant get_sd_version sees in img_in's rows
    in_channels = img_in.ne[0] if img_in is not None and img_in.ne[0] in (384, 128, 196) else 64

    def depth(kind: str) -> int:
        pattern = re.compile(rf"^{kind}\.(\d+)\.")
        return 1 + max((int(m.group(1)) for n in tensors if (m := pattern.match(n))), default=-1)

    return FluxSize(
        hidden=txt_in.ne[1],
        depth=depth("double_blocks"),
        depth_single=depth("single_blocks"),
        guidance="guidance_in.in_layer.weight" in tensors,
        in_channels=in_channels,
        context_in_dim=txt_in.ne[0],
    )


def flux_table(size: FluxSize) -> dict[str, Ne]:
    """Every tensor of a Flux (dev or schnell, fill, controls) of this size, as flux.hpp builds it."""
    h, mlp, norm = size.hidden, size.hidden * 4, (FLUX_HEAD_DIM, 1, 1, 1)
    table: dict[str, Ne] = {}
    _linear(table, "img_in", size.in_channels, h)
    _linear(table, "txt_in", size.context_in_dim, h)
    for embedder, n_in in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        if embedder == "guidance_in" and not size.guidance:
            continue
        _linear(table, f"{embedder}.in_layer", n_in, h)
        _linear(table, f"{embedder}.out_layer", h, h)
    for i in range(size.depth):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            _linear(table, f"{p}_mod.lin", h, 6 * h)
            _linear(table, f"{p}_attn.qkv", h, 3 * h)
            _linear(table, f"{p}_attn.proj", h, h)
            table[f"{p}_attn.norm.query_norm.scale"] = table[f"{p}_attn.norm.key_norm.scale"] = norm
            _linear(table, f"{p}_mlp.0", h, mlp)
            _linear(table, f"{p}_mlp.2", mlp, h)
    for i in range(size.depth_single):
        p = f"single_blocks.{i}"
        _linear(table, f"{p}.linear1", h, 3 * h + mlp)
        _linear(table, f"{p}.linear2", h + mlp, h)
        _linear(table, f"{p}.modulation.lin", h, 3 * h)
        table[f"{p}.norm.query_norm.scale"] = table[f"{p}.norm.key_norm.scale"] = norm
    _linear(table, "final_layer.adaLN_modulation.1", h, 2 * h)
    _linear(table, "final_layer.linear", h, 64)
    return table
