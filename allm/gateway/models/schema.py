"""The model routes' request bodies and query strings: what the handlers check and /openapi.json shows."""

from __future__ import annotations

from allm.gateway.spec import Bool, Enum, Obj, Str
from allm.kernel.registry import MANAGERS

#: a pulled model's id, and a source's length (OWNER/REPO:TAG after hf.co/), as allm/hub bounds them
ID_CHARS = 200
SOURCE_CHARS = 300

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
        "stream": Bool(description="server-sent progress events, then the model; default false"),
    },
    required=("source",),
)
DELETE_QUERY = Obj(
    fields={"force": Enum(values=("true", "false"), description="true: unload a loaded model first")}
)
