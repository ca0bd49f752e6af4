"""Which of a repository's files a pull fetches, from their names alone (nothing is downloaded yet).

- GGUF: the one file, or the split parts (``-00001-of-00003.gguf``) of one quant, whose name
  carries the tag as a whole token (``Q4_K_M``, ``Q8_0``, ``IQ4_XS``; any case), and the
  ``mmproj`` projector when the repository has one. Without a tag: ``DEFAULT_QUANTS`` in
  order, then the smallest quant. An unknown tag is refused, listing the tags there are.
- safetensors (``config.json`` and ``*.safetensors`` at the top): the config, tokenizer,
  generation and chat-template files and the weights with their index (``SAFETENSORS_FILES``),
  never a pickle. A repository whose weights are pickles only is refused.
- whisper.cpp: the ``ggml-NAME.bin`` file the tag names (``tiny.en``, ``base-q5_1``); a
  CTranslate2 whisper: ``model.bin``, ``config.json``, the tokenizer and vocabulary.
- an image model as a single file: a lone ``.safetensors`` (or a GGUF, chosen as above). An
  image model of several files is pulled by its parts instead (allm/hub/parts.py).

Where a repository has both GGUF files and safetensors weights, a tag chooses a GGUF quant;
without one the GGUF default is taken, as the core install serves it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath

from allm.hub.errors import PullError

#: the quant taken when the source names none, in this order; then the smallest there is
DEFAULT_QUANTS = ("Q4_K_M", "Q4_0", "Q8_0")
SAFETENSORS_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "model.safetensors.index.json",
    }
)
CT2_FILES = frozenset({"model.bin", "config.json", "tokenizer.json", "preprocessor_config.json"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# a quant tag: Q4_K_M, IQ4_XS, TQ1_0, Q8_0, F16, BF16, MXFP4 (short underscore-joined pieces)
_QUANT = re.compile(
    r"(?<![A-Za-z0-9])((?:I?Q|TQ)\d+(?:_[A-Za-z0-9]{1,3})*|BF16|F16|F32|MXFP4)(?![A-Za-z0-9])", re.I
)
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.I)
_WHISPER_GGML = re.compile(r"ggml-(.+)\.bin")


@dataclasses.dataclass(frozen=True, slots=True)
class RemoteFile:
    """One file of the repository, as the Hub lists it."""

    name: str  # the path in the repository
    size: int
    sha256: str | None  # an LFS file's, which the download is checked against
    blob_id: str | None  # its git blob id (a small file's check)


@dataclasses.dataclass(frozen=True, slots=True)
class Selection:
    kind: str  # gguf, safetensors, ggml, ctranslate2 or image (a lone .safetensors)
    files: tuple[RemoteFile, ...]
    main: str | None  # the file the catalog path names; None: the model's directory
    tag: str | None  # the quant or whisper model chosen

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


def quant_of(name: str) -> str | None:
    """The quant tag a GGUF file's name carries (the last one), upper-cased."""
    found = _QUANT.findall(_SPLIT.sub(".gguf", name))
    return found[-1].upper() if found else None


def is_projector(name: str) -> bool:
    return "mmproj" in PurePosixPath(name).name.lower()


def _top(files: Iterable[RemoteFile]) -> dict[str, RemoteFile]:
    return {f.name: f for f in files if "/" not in f.name}


def select(files: Sequence[RemoteFile], tag: str | None, repo_id: str) -> Selection:
    """The files to fetch for ``tag`` (or the default); PullError saying why there are none."""
    ggufs = [f for f in files if f.name.lower().endswith(".gguf")]
    models = [f for f in ggufs if not is_projector(f.name)]
    top = _top(files)
    whisper = {m.group(1): f for n, f in top.items() if (m := _WHISPER_GGML.fullmatch(n))}
    has_safetensors = "config.json" in top and any(n.endswith(".safetensors") for n in top)
    if tag is not None:
        return _tagged(models, ggufs, whisper, tag, repo_id)
    if models:
        return _gguf(models, ggufs, None, repo_id)
    if has_safetensors:
        return _safetensors(top)
    if whisper:
        if len(whisper) > 1:
            raise PullError(
                f"{repo_id} holds several whisper.cpp models: name one as {repo_id}:NAME, "
                f"one of {', '.join(sorted(whisper))}",
                status=404,
            )
        (name, only), *_ = whisper.items()
        return Selection("ggml", (only,), only.name, name)
    if "model.bin" in top and "config.json" in top and any(n.startswith("vocabulary.") for n in top):
        wanted = [f for n, f in top.items() if n in CT2_FILES or n.startswith("vocabulary.")]
        return Selection("ctranslate2", tuple(sorted(wanted, key=lambda f: f.name)), None, None)
    return _single_file(files, repo_id)


def _tagged(
    models: list[RemoteFile],
    ggufs: list[RemoteFile],
    whisper: dict[str, RemoteFile],
    tag: str,
    repo_id: str,
) -> Selection:
    if any(quant_of(f.name) == tag.upper() for f in models):
        return _gguf(models, ggufs, tag.upper(), repo_id)
    chosen = next((f for name, f in whisper.items() if name.lower() == tag.lower()), None)
    if chosen is not None:
        return Selection("ggml", (chosen,), chosen.name, tag)
    there = sorted({q for f in models if (q := quant_of(f.name))}) + sorted(whisper)
    listed = f"it has {', '.join(there)}" if there else "it has no tagged GGUF or whisper.cpp files"
    raise PullError(f"{repo_id} has no files tagged {tag!r}: {listed}", status=404)


def _gguf(models: list[RemoteFile], ggufs: list[RemoteFile], tag: str | None, repo_id: str) -> Selection:
    by_quant: dict[str | None, list[RemoteFile]] = {}
    for f in models:
        by_quant.setdefault(quant_of(f.name), []).append(f)
    if tag is None:
        tag = next((q for q in DEFAULT_QUANTS if q in by_quant), None)
        if tag is None:
            tag = min(by_quant, key=lambda q: sum(f.size for f in by_quant[q]))
    parts = sorted(by_quant[tag], key=lambda f: f.name)
    first = _first_of_split(parts, tag, repo_id)
    projectors = [f for f in ggufs if is_projector(f.name)]
    if projectors:
        same = [p for p in projectors if quant_of(p.name) == tag]
        f16 = [p for p in projectors if quant_of(p.name) in ("F16", "BF16")]
        parts.append((same or f16 or sorted(projectors, key=lambda f: f.size))[0])
    return Selection("gguf", tuple(parts), first.name, tag)


def _first_of_split(parts: list[RemoteFile], tag: str | None, repo_id: str) -> RemoteFile:
    """The file the catalog names: the only one, or part 1 of a split model (all its parts there)."""
    if len(parts) == 1:
        return parts[0]
    splits = [m for f in parts if (m := _SPLIT.search(f.name))]
    stems = {_SPLIT.sub("", f.name) for f in parts}
    if len(splits) == len(parts) and len(stems) == 1 and len(parts) == int(splits[0].group(2)):
        return parts[0]
    names = ", ".join(f.name for f in parts)
    raise PullError(
        f"{repo_id}: the files tagged {tag or 'without a quant tag'} are not one model's split parts "
        f"({names}); allm cannot tell which to take",
        status=422,
    )


def _safetensors(top: dict[str, RemoteFile]) -> Selection:
    weights = [f for n, f in top.items() if n.endswith(".safetensors")]
    if "model.safetensors.index.json" in top:  # Mistral's repositories add a consolidated copy
        weights = [f for f in weights if not f.name.startswith("consolidated")]
    extra = [f for n, f in top.items() if n in SAFETENSORS_FILES]
    return Selection("safetensors", tuple(sorted(weights + extra, key=lambda f: f.name)), None, None)


def _single_file(files: Sequence[RemoteFile], repo_id: str) -> Selection:
    lone = [f for f in files if f.name.endswith(".safetensors")]
    if len(lone) == 1:
        return Selection("image", (lone[0],), lone[0].name, None)
    pickles = sorted(f.name for f in files if f.name.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise PullError(
            f"{repo_id} holds its weights only as PyTorch pickles ({', '.join(pickles[:4])}): allm does "
            "not load pickles, which can run code when they are opened; look for a safetensors or GGUF "
            "version of the model",
            status=422,
        )
    if lone:
        names = ", ".join(f.name for f in lone[:6])
        raise PullError(
            f"{repo_id} holds several .safetensors files and no config.json ({names}): allm pulls "
            "single-file image models and safetensors directories with a config.json; name the file "
            "as the part model=FILE, or an image model's parts (diffusion_model=FILE, clip_l=..., vae=...)",
            status=422,
        )
    names = ", ".join(sorted(f.name for f in files)[:8]) or "nothing"
    raise PullError(
        f"{repo_id} holds no model allm serves (no GGUF, no safetensors, no whisper.cpp or "
        f"CTranslate2 files): it has {names}",
        status=422,
    )
