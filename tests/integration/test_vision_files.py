"""The tiny vision-language models the tests write (tests/vision_files.py), run by the engines
themselves: llama.cpp's multimodal library (libmtmd, through llama-cpp-python's mtmd_cpp) on the
converted GGUF and mmproj, and transformers on the safetensors directory.

With random weights the text an image leads to means nothing, so each test shows the picture
reaching the model through the next-token logits: the same picture twice gives the same numbers,
a different picture different ones.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import jinja2
import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np
import pytest

from tests.model_files import smollm2_path
from tests.vision_files import (
    FAMILIES,
    IDEFICS3_TOKENS,
    GgufVlm,
    data_url,
    gguf_vlms,
    hf_vlm,
    picture_png,
    read_gguf_metadata,
    write_hf_vlm,
)

RED = picture_png((255, 0, 0))
BLUE = picture_png((0, 0, 255))
NOISE = picture_png(seed=1)
QUESTION = "What is in the picture?"
N_SEQ = 3
N_CTX = 512  # per sequence


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vision")


@pytest.fixture(scope="module")
def converted(cache) -> dict[str, GgufVlm]:
    """Every family written and converted once (one converter run for all of them)."""
    return gguf_vlms(cache)


# -- llama.cpp: libmtmd on one llama_context of several sequences -----------------------------------


class Mtmd:
    """A converted model in one llama_context of ``N_SEQ`` sequences (a KV stream each, as allm's
    batcher has them), with the projector's mtmd context beside it."""

    def __init__(self, files: GgufVlm) -> None:
        self.family = files.model.stem
        self.model = llama_cpp.llama_model_load_from_file(
            str(files.model).encode(), llama_cpp.llama_model_default_params()
        )
        assert self.model, f"llama.cpp could not load {files.model}"
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = N_SEQ * N_CTX
        params.n_seq_max = N_SEQ
        params.n_batch = params.n_ubatch = N_CTX
        # one thread: two OpenMP threads on a busy 2-core machine stall for hundreds of ms
        params.n_threads = params.n_threads_batch = 1
        params.kv_unified = False
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        assert self.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(N_CTX, 0, 1)
        mparams = mtmd.mtmd_context_params_default()
        mparams.use_gpu = False
        mparams.n_threads = 1
        mparams.print_timings = False
        mparams.warmup = False
        self.mctx = mtmd.mtmd_init_from_file(str(files.mmproj).encode(), self.model, mparams)
        assert self.mctx, f"libmtmd could not load {files.mmproj}"
        self.marker = mtmd.mtmd_default_marker().decode()
        template = read_gguf_metadata(files.model, {"tokenizer.chat_template"})["tokenizer.chat_template"]
        self.template = jinja2.Environment().from_string(template)

    def close(self) -> None:
        mtmd.mtmd_free(self.mctx)
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def prompt(self, n_pictures: int = 1) -> str:
        """The model's own chat template with each picture as a text part holding the media
        marker, as llama-cpp-python's MTMDChatHandler renders an image_url part."""
        parts = [{"type": "text", "text": self.marker}] * n_pictures + [{"type": "text", "text": QUESTION}]
        return self.template.render(messages=[{"role": "user", "content": parts}], add_generation_prompt=True)

    def bitmap(self, data: bytes) -> int | None:
        """libmtmd's own decoding of an image file (stb_image); None where it cannot."""
        buf = (ctypes.c_uint8 * max(1, len(data))).from_buffer_copy(data or b"\0")
        return mtmd.mtmd_helper_bitmap_init_from_buf(self.mctx, buf, len(data), False)

    def tokenize(self, prompt: str, pictures: list[bytes]) -> tuple[int, int]:
        """(mtmd_tokenize's status, the chunks: free them with mtmd_input_chunks_free)."""
        bitmaps = [self.bitmap(p) for p in pictures]
        assert all(bitmaps)
        text = mtmd.mtmd_input_text()
        raw = prompt.encode()
        text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), True, True
        chunks = mtmd.mtmd_input_chunks_init()
        array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
        status = mtmd.mtmd_tokenize(self.mctx, chunks, ctypes.byref(text), array, len(bitmaps))
        for bitmap in bitmaps:
            mtmd.mtmd_bitmap_free(bitmap)  # the chunks hold what they need
        return status, chunks

    def tokenize_parts(self, pieces: list[str | bytes]) -> tuple[int, int]:
        """mtmd_tokenize_from_parts: text and pictures in order, no media marker anywhere."""
        keep: list[object] = []
        parts = []
        for piece in pieces:
            part = mtmd.mtmd_input_part()
            if isinstance(piece, str):
                text = mtmd.mtmd_input_text()
                raw = piece.encode()
                text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), True, True
                part.text = ctypes.pointer(text)
                keep += [text, raw]
            else:
                part.bitmap = self.bitmap(piece)
                assert part.bitmap
            parts.append(ctypes.pointer(part))
            keep.append(part)
        chunks = mtmd.mtmd_input_chunks_init()
        array = (ctypes.POINTER(mtmd.mtmd_input_part) * len(parts))(*parts)
        status = mtmd.mtmd_tokenize_from_parts(self.mctx, chunks, array, len(parts), True)
        for part_pointer in parts:
            if part_pointer.contents.bitmap:
                mtmd.mtmd_bitmap_free(part_pointer.contents.bitmap)
        return status, chunks

    def eval_chunks(self, seq: int, chunks: int) -> tuple[np.ndarray, int]:
        """``chunks`` into ``seq`` from position 0: the next token's logits and the position after."""
        self.forget(seq)
        n_past = llama_cpp.llama_pos(0)
        status = mtmd.mtmd_helper_eval_chunks(
            self.mctx, self.ctx, chunks, 0, seq, N_CTX, True, ctypes.byref(n_past)
        )
        assert status == 0
        return self.logits(-1), n_past.value

    def logits(self, index: int) -> np.ndarray:
        out = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(out, shape=(self.n_vocab,)).copy()

    def forget(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def eval_helper(self, seq: int, pictures: list[bytes]) -> np.ndarray:
        """The prompt with ``pictures`` into sequence ``seq`` by mtmd_helper_eval_chunks: the
        logits of the next token."""
        status, chunks = self.tokenize(self.prompt(len(pictures)), pictures)
        assert status == 0
        try:
            return self.eval_chunks(seq, chunks)[0]
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (sequence, position, token, wants logits) entries."""
        batch = self.batch
        for n, (seq, pos, token, wants) in enumerate(entries):
            batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos, 1, wants
            batch.seq_id[n][0] = seq
        batch.n_tokens = len(entries)
        assert llama_cpp.llama_decode(self.ctx, batch) == 0


def chunk_list(chunks: int) -> Iterator[int]:
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        yield mtmd.mtmd_input_chunks_get(chunks, i)


def text_tokens(chunk: int) -> list[int]:
    n = ctypes.c_size_t()
    tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
    return [tokens[i] for i in range(n.value)]


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request, converted) -> Iterator[Mtmd]:
    engine = Mtmd(converted[request.param])
    yield engine
    engine.close()


def test_written_files_are_small_and_what_llama_cpp_expects(cache, converted):
    for family, files in converted.items():
        hf = hf_vlm(cache, family)
        for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
            assert (hf / name).is_file(), f"{family}: no {name}"
        assert (hf / "model.safetensors").stat().st_size < 16 << 20
        assert files.mmproj == files.model.parent / f"mmproj-{family}.gguf"
        text = read_gguf_metadata(files.model, {"tokenizer.ggml.pre", "tokenizer.chat_template"})
        assert text["tokenizer.ggml.pre"] == "smollm"  # SmolLM2's tokenizer, recognised by the converter
        assert text["tokenizer.chat_template"] == (hf / "chat_template.jinja").read_text()
        projector = read_gguf_metadata(files.mmproj, {"general.architecture", "clip.has_vision_encoder"})
        assert projector == {"general.architecture": "clip", "clip.has_vision_encoder": True}


def test_the_same_family_is_written_the_same(cache, tmp_path):
    again = write_hf_vlm(tmp_path / "again", "idefics3")
    first = hf_vlm(cache, "idefics3")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name


def test_tokenizer_is_smollm2s_with_the_image_tokens_after_it(cache):
    spec = json.loads((hf_vlm(cache, "idefics3") / "tokenizer.json").read_text())
    vocab = read_gguf_metadata(smollm2_path(), {"tokenizer.ggml.tokens"})["tokenizer.ggml.tokens"]
    assert all(spec["model"]["vocab"][token] == i for i, token in enumerate(vocab[:1000]))
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    assert [added[t] for t in IDEFICS3_TOKENS] == list(range(len(vocab), len(vocab) + len(IDEFICS3_TOKENS)))


def test_llama_cpp_logits_follow_the_picture(engine):
    red = engine.eval_helper(0, [RED])
    assert np.array_equal(engine.eval_helper(1, [RED]), red)  # another sequence, the same numbers
    assert not np.array_equal(engine.eval_helper(0, [BLUE]), red)
    assert not np.array_equal(engine.eval_helper(2, [NOISE]), red)
    assert not np.isnan(red).any()


def test_llama_cpp_image_chunks_decode_beside_other_sequences(engine):
    """What allm's batcher would do: text chunks go into its own llama_batch beside another
    sequence's next token; an image chunk is encoded and decoded alone between two steps, at the
    sequence's position, which then moves by the chunk's n_pos (fewer than its tokens with M-RoPE)."""
    expected = engine.eval_helper(0, [NOISE])
    status, chunks = engine.tokenize(engine.prompt(), [RED])
    assert status == 0
    try:
        other, other_pos = engine.eval_chunks(1, chunks)  # a sequence generating beside it
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
    other_token = int(np.argmax(other))
    engine.forget(2)
    status, chunks = engine.tokenize(engine.prompt(), [NOISE])
    assert status == 0
    pos, last = 0, None
    try:
        chunks_seen = list(chunk_list(chunks))
        for i, chunk in enumerate(chunks_seen):
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                tokens = text_tokens(chunk)
                final = i == len(chunks_seen) - 1
                entries = [(1, other_pos, other_token, True)]
                entries += [(2, pos + k, t, final and k == len(tokens) - 1) for k, t in enumerate(tokens)]
                engine.decode(entries)
                other_pos += 1
                pos += len(tokens)
                if final:
                    last = engine.logits(len(entries) - 1)
            else:
                assert mtmd.mtmd_encode_chunk(engine.mctx, chunk) == 0
                embd = mtmd.mtmd_get_output_embd(engine.mctx)
                n_past = llama_cpp.llama_pos(0)
                no_callback = mtmd.mtmd_helper_post_decode_callback()
                status = mtmd.mtmd_helper_decode_image_chunk(
                    engine.mctx,
                    engine.ctx,
                    chunk,
                    embd,
                    pos,
                    2,
                    N_CTX,
                    ctypes.byref(n_past),
                    no_callback,
                    None,
                )
                assert status == 0
                assert n_past.value == pos + mtmd.mtmd_input_chunk_get_n_pos(chunk)
                pos = n_past.value
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
    assert last is not None
    assert np.array_equal(last, expected)


#: per family: image tokens decoded with non-causal attention, M-RoPE positions, the image chunks
#: of a 64-pixel picture as (tokens, positions)
TRAITS = {
    "idefics3": (False, False, [(4, 4), (4, 4)]),  # a 1 x 1 grid of slices, then the overview
    "gemma3": (True, False, [(4, 4)]),
    "qwen2vl": (False, True, [(9, 3)]),  # 84 x 84 pixels: 3 x 3 tokens, 3 positions
}


def test_llama_cpp_family_traits_the_batcher_must_follow(engine):
    non_causal, mrope, shapes = TRAITS[engine.family]
    assert mtmd.mtmd_decode_use_mrope(engine.mctx) == mrope
    status, chunks = engine.tokenize(engine.prompt(), [RED])
    assert status == 0
    try:
        images = [
            c
            for c in chunk_list(chunks)
            if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE
        ]
        assert [mtmd.mtmd_decode_use_non_causal(engine.mctx, c) for c in images] == [non_causal] * len(images)
        assert [
            (mtmd.mtmd_input_chunk_get_n_tokens(c), mtmd.mtmd_input_chunk_get_n_pos(c)) for c in images
        ] == shapes
    finally:
        mtmd.mtmd_input_chunks_free(chunks)


def test_llama_cpp_parts_place_pictures_without_a_marker(engine):
    """mtmd_tokenize_from_parts takes the prompt's text around each picture: the same chunks as
    the marker, and a marker a user typed stays text."""
    before, after = engine.prompt().split(engine.marker)
    expected = engine.eval_helper(0, [RED])
    status, chunks = engine.tokenize_parts([before, RED, after])
    assert status == 0
    try:
        assert np.array_equal(engine.eval_chunks(1, chunks)[0], expected)
        n_chunks = mtmd.mtmd_input_chunks_size(chunks)
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
    status, chunks = engine.tokenize_parts([before, RED, f"{engine.marker} {after}"])
    try:
        assert status == 0
        assert mtmd.mtmd_input_chunks_size(chunks) == n_chunks  # no second picture
    finally:
        mtmd.mtmd_input_chunks_free(chunks)


def test_llama_cpp_sequence_holding_a_picture_saves_and_restores(engine):
    """allm's prefix cache keeps a sequence's state in host memory: with a picture in it, the
    restored copy goes on exactly as the original."""
    status, chunks = engine.tokenize(engine.prompt(), [NOISE])
    assert status == 0
    try:
        _, n_past = engine.eval_chunks(0, chunks)
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
    size = llama_cpp.llama_state_seq_get_size(engine.ctx, 0)
    state = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data(engine.ctx, state, size, 0) == size
    engine.forget(2)
    assert llama_cpp.llama_state_seq_set_data(engine.ctx, state, size, 2) == size
    engine.decode([(0, n_past, 42, True), (2, n_past, 42, True)])
    assert np.array_equal(engine.logits(0), engine.logits(1))


def test_llama_cpp_image_chunk_id_is_the_sha256_of_the_file(engine):
    """The id a prefix cache can key a picture by: libmtmd's helper hashes the file's bytes."""
    status, chunks = engine.tokenize(engine.prompt(), [RED])
    assert status == 0
    try:
        images = [
            c
            for c in chunk_list(chunks)
            if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE
        ]
        assert images
        assert {mtmd.mtmd_input_chunk_get_id(c) for c in images} == {hashlib.sha256(RED).hexdigest().encode()}
    finally:
        mtmd.mtmd_input_chunks_free(chunks)


@pytest.mark.parametrize(
    "data",
    [b"", b"not a picture" * 20, RED[:60], b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40)],
    ids=["empty", "text", "truncated-png", "wav"],
)
def test_llama_cpp_refuses_what_is_not_a_picture(engine, data):
    assert engine.bitmap(data) is None


def test_llama_cpp_refuses_markers_and_pictures_that_do_not_pair(engine):
    for prompt, pictures in [(engine.prompt(2), [RED]), (QUESTION, [RED])]:
        status, chunks = engine.tokenize(prompt, pictures)
        mtmd.mtmd_input_chunks_free(chunks)
        assert status != 0


def test_llama_cpp_chat_handler_answers_a_picture_in_a_data_url(converted):
    """llama-cpp-python's own high-level path: MTMDChatHandler renders the GGUF's template with an
    image_url part as the media marker; the first token's top logprobs follow the picture."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    files = converted["idefics3"]
    handler = MTMDChatHandler(clip_model_path=str(files.mmproj), verbose=False, use_gpu=False)
    llm = llama_cpp.Llama(
        str(files.model), chat_handler=handler, n_ctx=N_CTX, n_threads=1, logits_all=True, verbose=False
    )

    def top(png: bytes) -> dict[str, float]:
        content = [
            {"type": "image_url", "image_url": {"url": data_url(png)}},
            {"type": "text", "text": QUESTION},
        ]
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": content}],
            max_tokens=1,
            temperature=0,
            logprobs=True,
            top_logprobs=5,
        )
        return {e["token"]: e["logprob"] for e in out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}

    try:
        red = top(RED)
        assert top(RED) == red
        assert top(BLUE) != red
    finally:
        llm.close()


# -- transformers: AutoModelForImageTextToText ------------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def hf_model(request, cache):
    import torch
    from transformers import AutoModelForImageTextToText

    path = hf_vlm(cache, request.param)
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    return request.param, path, model


def hf_inputs(family: str, path: Path, model, png: bytes) -> dict:
    """The processor's inputs for one user turn of a picture and a question. Qwen2-VL's processor
    needs torchvision (its video half), so its image processor and tokenizer are used on their own,
    the picture's placeholder repeated as the processor would."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    picture = Image.open(io.BytesIO(png)).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    if family != "qwen2vl":
        processor = AutoProcessor.from_pretrained(str(path))
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        return dict(processor(text=prompt, images=[picture], return_tensors="pt"))
    tokenizer, images = (
        AutoTokenizer.from_pretrained(str(path)),
        AutoImageProcessor.from_pretrained(str(path)),
    )
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pixels = images(images=[picture], return_tensors="pt")
    n_tokens = int(pixels["image_grid_thw"][0].prod()) // images.merge_size**2
    inputs = {
        **tokenizer(prompt.replace("<|image_pad|>", "<|image_pad|>" * n_tokens), return_tensors="pt"),
        **pixels,
    }
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).long()
    return inputs


def test_transformers_logits_follow_the_picture(hf_model):
    import torch

    family, path, model = hf_model

    def logits(png: bytes) -> np.ndarray:
        with torch.no_grad():
            return model(**hf_inputs(family, path, model, png)).logits[0, -1].numpy()

    red = logits(RED)
    assert np.array_equal(logits(RED), red)
    assert not np.array_equal(logits(BLUE), red)
    assert not np.isnan(red).any()


def test_transformers_generates_greedily_from_a_picture(hf_model):
    import torch

    family, path, model = hf_model
    inputs = hf_inputs(family, path, model, NOISE)
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        again = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(first, again)
    assert first.shape[1] == inputs["input_ids"].shape[1] + 4
