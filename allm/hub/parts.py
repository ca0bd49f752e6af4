"""An image model made of parts: the description ``allm pull`` is given, checked before anything is fetched.

stable-diffusion.cpp loads Flux, SD3 and their kin from one file per part, named after its
own parameters (``--diffusion-model``, ``--clip_l``, ``--t5xxl``, ``--vae``), and the image
manager's catalog options take the same names. A description names each part's file, in
SOURCE's repository or in another one (a Flux's text encoders and VAE usually live apart),
and may give the model's generation defaults::

    [parts]
    diffusion_model = "flux1-schnell-q4_0.gguf"                      # a file of SOURCE's repository
    clip_l = "comfyanonymous/flux_text_encoders:clip_l.safetensors"  # OWNER/REPO:FILE: another's
    [options]
    steps = 4

The main file is ``diffusion_model`` (its text encoders and a VAE are then parts too) or
``model`` (a single-file checkpoint, with a VAE beside it at most); left out, it is the file
SOURCE chooses as a plain pull would (its tag the quant). The same description comes as
``--part NAME=FILE`` flags or a TOML file (allm/hub/asked.py), or as POST /v1/models's
``parts`` and ``options``. Each file is stored under the model's directory as ``PART/NAME``:
two repositories may both hold an ``ae.safetensors``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

from allm.hub.errors import PullError
from allm.hub.fetching import Wanted
from allm.hub.select import RemoteFile, Selection, is_projector, select
from allm.hub.source import Source, parse_source
from allm.image_names import SAMPLERS

MAIN_PARTS = ("diffusion_model", "model")
TEXT_ENCODERS = ("clip_l", "clip_g", "t5xxl")
VAES = ("vae", "taesd")
#: stable-diffusion.cpp's names of a model's files, as the image manager's options take them
PARTS = (*MAIN_PARTS, *TEXT_ENCODERS, *VAES)
#: the generation defaults a description may give: whole numbers and numbers with their bounds
WHOLE_OPTIONS = {"steps": (1, 150), "n_threads": (1, 1024)}
NUMBER_OPTIONS = {"cfg_scale": (0.0, 30.0)}
OPTIONS = (*WHOLE_OPTIONS, *NUMBER_OPTIONS, "sampler")
MAX_FILE_CHARS = 500
MODEL_SUFFIXES = (".gguf", ".safetensors", ".sft")


@dataclasses.dataclass(frozen=True, slots=True)
class PartFile:
    repo_id: str | None  # None: SOURCE's repository
    file: str  # its path in that repository


@dataclasses.dataclass(frozen=True, slots=True)
class Parts:
    """A checked description."""

    main: str  # diffusion_model or model: the file the catalog entry's path names
    files: Mapping[str, PartFile]  # by part; the main one is absent where SOURCE chooses it
    options: Mapping[str, Any]

    def same_as(
        self, source: Source, pulled: Mapping[str, Mapping[str, str]], options: Mapping[str, Any]
    ) -> bool:
        """Whether a model pulled by parts (its record's ``parts`` and ``options``) is this one."""
        if set(pulled) != {self.main, *self.files}:
            return False
        if {k: v for k, v in options.items() if k not in PARTS} != dict(self.options):
            return False
        return all(
            (pulled[part]["source"], pulled[part]["file"]) == (ref.repo_id or source.repo_id, ref.file)
            for part, ref in self.files.items()
        )


def describe(parts: Mapping[str, Any], options: Mapping[str, Any] | None, source: Source | None) -> Parts:
    """The description checked: known part names, file names, the parts the main file needs."""
    if not isinstance(parts, Mapping):
        raise PullError("parts must map part names to files", status=400, param="parts")
    unknown = [name for name in parts if name not in PARTS]
    if unknown:
        raise PullError(
            f"unknown part {unknown[0]!r}: the parts are {', '.join(PARTS)} (stable-diffusion.cpp's names)",
            status=400,
            param=f"parts.{unknown[0]}",
        )
    files = {name: _part_file(name, value, source) for name, value in parts.items()}
    main = _main(files, source)
    _check_set(main, files)
    checked = {name: _option(name, value) for name, value in (options or {}).items()}
    return Parts(main, files, checked)


def checked(
    source: str | None,
    parts: Mapping[str, Any] | None,
    options: Mapping[str, Any] | None,
    modality: str | None,
) -> tuple[Source, Parts]:
    """SOURCE (or the main part's repository) and the description, checked: the first step of a pull
    by parts, before anything is asked of the Hub."""
    parsed = parse_source(home(source, parts))
    if modality not in (None, "image"):
        raise PullError(
            f"a model described by its parts is an image model, not {modality}", status=400, param="modality"
        )
    return parsed, describe(parts or {}, options, parsed if source else None)


def home(source: str | None, parts: Mapping[str, Any] | None) -> str:
    """SOURCE as written or, without one, the repository of the main part (written OWNER/REPO:FILE):
    what the model is registered as coming from, and its id by default."""
    if source and source.strip():
        return source.strip()
    for name in MAIN_PARTS:
        value = (parts or {}).get(name)
        if isinstance(value, str) and ":" in value:
            return value.rpartition(":")[0].strip()
    raise PullError(
        "no SOURCE and no diffusion model: give OWNER/REPO, or the part diffusion_model (or model, a "
        "single-file checkpoint) as OWNER/REPO:FILE",
        status=400,
        param="source",
    )


def _part_file(part: str, value: Any, source: Source | None) -> PartFile:
    """``FILE`` (in SOURCE's repository) or ``OWNER/REPO:FILE``."""
    where = f"parts.{part}"
    if not isinstance(value, str) or not value.strip():
        raise PullError(f"part {part}: give a file name, not {value!r}", status=400, param=where)
    repo, colon, file = value.strip().rpartition(":")
    repo_id = None
    if colon:
        if "/" not in repo:
            raise PullError(f"part {part}: {value!r} is no OWNER/REPO:FILE", status=400, param=where)
        try:
            named = parse_source(repo)
        except PullError as exc:
            raise PullError(f"part {part}: {exc.message}", status=400, param=where) from None
        repo_id = named.repo_id
    elif source is None:
        raise PullError(
            f"part {part}: {value!r} names no repository: give a SOURCE, or write it OWNER/REPO:FILE",
            status=400,
            param=where,
        )
    pure = PurePosixPath(file)
    if (
        len(file) > MAX_FILE_CHARS
        or not file.isprintable()
        or "\\" in file
        or pure.is_absolute()
        or any(piece in ("", ".", "..") for piece in file.split("/"))
    ):
        raise PullError(
            f"part {part}: {file!r} is no file name in a repository (a path such as vae/ae.safetensors, "
            "without '..', a backslash or a leading '/')",
            status=400,
            param=where,
        )
    return PartFile(repo_id, file)


def _main(files: Mapping[str, PartFile], source: Source | None) -> str:
    named = [name for name in MAIN_PARTS if name in files]
    if len(named) == 2:
        raise PullError(
            "give diffusion_model (the diffusion model, its other parts beside it) or model (a single-file "
            "checkpoint), not both",
            status=400,
            param="parts.model",
        )
    if named and source is not None and source.tag is not None:
        raise PullError(
            f"the tag of {source} chooses the main file, and the part {named[0]} names it too: give one",
            status=400,
            param=f"parts.{named[0]}",
        )
    if named:
        return named[0]
    if source is None:
        raise PullError(
            "no diffusion model: give the part diffusion_model=FILE (or model=FILE for a single-file "
            "checkpoint), or a SOURCE that holds it",
            status=400,
            param="parts.diffusion_model",
        )
    return "diffusion_model" if any(name in files for name in TEXT_ENCODERS) else "model"


def _check_set(main: str, files: Mapping[str, PartFile]) -> None:
    """The parts the main file needs beside it, as the image manager will read them."""
    encoders = [name for name in TEXT_ENCODERS if name in files]
    if main == "model" and encoders:
        raise PullError(
            f"a single-file checkpoint (model) holds its text encoders: to give {encoders[0]} apart, "
            "name the diffusion model as diffusion_model",
            status=400,
            param=f"parts.{encoders[0]}",
        )
    if main == "diffusion_model" and not encoders:
        raise PullError(
            "a diffusion model needs its text encoder as a part too: clip_l (Flux, SD3), t5xxl (Flux, "
            "SD3, Chroma) or clip_g (SD3)",
            status=400,
            param="parts.clip_l",
        )
    if main == "diffusion_model" and not any(name in files for name in VAES):
        raise PullError(
            "a diffusion model needs a VAE as a part too: vae (or taesd, the tiny one)",
            status=400,
            param="parts.vae",
        )


def _option(name: str, value: Any) -> Any:
    where = f"options.{name}"
    if name in WHOLE_OPTIONS:
        low, high = WHOLE_OPTIONS[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise PullError(
                f"option {name} must be a whole number from {low} to {high}, got {value!r}",
                status=400,
                param=where,
            )
        return value
    if name in NUMBER_OPTIONS:
        lowest, highest = NUMBER_OPTIONS[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not lowest <= value <= highest:
            raise PullError(
                f"option {name} must be a number from {lowest:g} to {highest:g}, got {value!r}",
                status=400,
                param=where,
            )
        return float(value)
    if name == "sampler":
        if value not in SAMPLERS:
            raise PullError(
                f"option sampler must be one of stable-diffusion.cpp's: {', '.join(SAMPLERS)}; got {value!r}",
                status=400,
                param=where,
            )
        return value
    hint = " (the files are parts)" if name in PARTS else ""
    raise PullError(
        f"unknown option {name!r}{hint}: the options are {', '.join(OPTIONS)}", status=400, param=where
    )


def chosen_main(selection: Selection, source: Source, main: str) -> RemoteFile:
    """The file SOURCE chooses, as the main part: a single GGUF or .safetensors file."""
    models = [f for f in selection.files if not is_projector(f.name)]
    if selection.kind in ("gguf", "image") and len(models) == 1:
        return models[0]
    raise PullError(
        f"{source} holds no single model file allm could take as the {main}: name it, "
        f"as the part {main}=FILE",
        status=422,
        param=f"parts.{main}",
    )


def remote_files(
    parts: Parts, source: Source, listings: Mapping[str, Sequence[RemoteFile]]
) -> dict[str, RemoteFile]:
    """Each named part's file, as its repository (``listings``, by repository id) lists it."""
    found = {}
    for part, ref in parts.files.items():
        repo_id = ref.repo_id or source.repo_id
        there = {f.name: f for f in listings[repo_id]}
        if ref.file not in there:
            models = sorted(n for n in there if n.lower().endswith(MODEL_SUFFIXES))
            listed = f"its model files: {', '.join(models[:8])}" if models else "it holds no model file"
            raise PullError(
                f"part {part}: {repo_id} has no file {ref.file!r} ({listed})",
                status=404,
                param=f"parts.{part}",
            )
        found[part] = there[ref.file]
    return found


def planned_parts(
    parts: Parts,
    source: Source,
    listed: tuple[str, Sequence[RemoteFile]],
    list_repo: Callable[[str], tuple[str, Sequence[RemoteFile]]],
) -> dict[str, Wanted]:
    """Each part's file, the main one first: ``listed`` is SOURCE's commit and files, ``list_repo``
    asks the Hub for another repository's."""
    listings = {source.repo_id: listed}
    for part, ref in parts.files.items():
        if ref.repo_id is not None and ref.repo_id not in listings:
            try:
                listings[ref.repo_id] = list_repo(ref.repo_id)
            except PullError as exc:
                raise PullError(
                    f"part {part}: {exc.message}", status=exc.status, param=f"parts.{part}"
                ) from None
    found = remote_files(parts, source, {repo_id: files for repo_id, (_, files) in listings.items()})
    if parts.main not in found:
        found[parts.main] = chosen_main(select(listed[1], source.tag, source.repo_id), source, parts.main)
    wanted = {}
    for part in PARTS:
        if part in found:
            named = parts.files.get(part)
            repo_id = named.repo_id if named is not None and named.repo_id is not None else source.repo_id
            name = f"{part}/{PurePosixPath(found[part].name).name}"
            wanted[part] = Wanted(repo_id, listings[repo_id][0], found[part], name)
    return wanted
