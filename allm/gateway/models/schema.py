"""The model routes' request bodies and query strings: what the handlers check and /openapi.json shows."""

from __future__ import annotations

from allm.gateway.spec import Bool, Enum, Int, Map, Num, Obj, Str
from allm.hub import PARTS
from allm.image_names import SAMPLERS
from allm.kernel.registry import MANAGERS

#: a pulled model's id, and a source's length (OWNER/REPO:TAG after hf.co/), as allm/hub bounds them
ID_CHARS = 200
SOURCE_CHARS = 300
PART_CHARS = SOURCE_CHARS + 500  # OWNER/REPO:FILE

#: a model id in a path: any catalog id, slashes included (OWNER/REPO:QUANT)
MODEL_ID = Str(min_length=1, max_length=ID_CHARS, description="a model id; it may hold slashes")
PULL = Obj(
    fields={
        "source": Str(
            min_length=1,
            max_length=SOURCE_CHARS,
            description="OWNER/REPO or OWNER/REPO:QUANT on the Hugging Face Hub (or HF_ENDPOINT's "
            "mirror), optionally after hf.co/ or hf://",
        ),
        "id": Str(
            min_length=1, max_length=ID_CHARS, description="the id to serve it under (default: the source)"
        ),
        "revision": Str(min_length=1, max_length=256, description="a branch, tag or commit (default: main)"),
        "modality": Enum(values=tuple(MANAGERS), description="default: told from the files"),
        "parts": Map(
            keys=Str(min_length=1, max_length=32, description=", ".join(PARTS)),
            values=Str(min_length=1, max_length=PART_CHARS, description="FILE of source, or OWNER/REPO:FILE"),
            max_properties=len(PARTS),
            description="an image model made of parts, by stable-diffusion.cpp's names: each a file of "
            "source or OWNER/REPO:FILE of another repository; diffusion_model (or model) left out: the "
            "file source chooses",
        ),
        "options": Obj(
            fields={
                "steps": Int(minimum=1, maximum=150, description="sampling steps by default"),
                "cfg_scale": Num(minimum=0, maximum=30, description="the guidance scale by default"),
                "sampler": Enum(
                    values=SAMPLERS, description="stable-diffusion.cpp's sample method by default"
                ),
                "n_threads": Int(minimum=1, maximum=1024, description="CPU threads"),
            },
            description="an image model's defaults, with parts or alone (a single-file model)",
        ),
        "stream": Bool(description="server-sent progress events, then the model; default false"),
    },
)
DELETE_QUERY = Obj(
    fields={"force": Enum(values=("true", "false"), description="true: unload a loaded model first")}
)
