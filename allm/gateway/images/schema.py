"""The images room's request bodies: a generation's body and a stored image's file name, as nodes.

OpenAI's POST /v1/images/generations (openai-python's types/image_generate_params.py), on
stable-diffusion.cpp: what it cannot do (a transparent background, gif and svg, partial
images) is refused by name; what only steers OpenAI's own models (quality, style,
moderation) is accepted and changes nothing.

Why each bound exists: OpenAI's bounds (a prompt of 32000 characters, ``n`` 1 to 10,
compression 0 to 100); ``steps`` to 150 and ``cfg_scale`` to 30, past any use a diffusion
model has; the size's limits are the server's (``[image]`` in the config), checked in
allm/gateway/images/handlers.py, which names ``size``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from allm.gateway.bounds import ACCEPTED, HABITS, MODEL, USER, Body
from allm.gateway.errors import bad_field
from allm.gateway.spec import INT64_MAX, INT64_MIN, Bool, Checked, Enum, Int, Neutral, Num, Obj, Str
from allm.image_names import OUTPUT_FORMATS, SAMPLERS


@dataclasses.dataclass(frozen=True, kw_only=True)
class Whole(Int):
    """An integer, also when a client writes it as a JSON number with nothing after the point (2.0).

    JSON Schema counts 2.0 as an integer too, so the published type is unchanged;
    2.5 is refused as not an integer.
    """

    def check(self, value: Any, path: str) -> Any:
        if isinstance(value, float) and value.is_integer():
            if not self.minimum <= value <= self.maximum:  # before int(): 1e300 has 301 digits
                raise bad_field(
                    path, f"'{path}' must be from {self.minimum} to {self.maximum}, got {value:g}"
                )
            value = int(value)
        return super().check(value, path)


IMAGE_FORMATS = OUTPUT_FORMATS
IMAGE_PROMPT = 32000  # characters, OpenAI's bound
#: "auto" or WIDTHxHEIGHT, x or X, auto in any case; the server's limits are checked after this
IMAGE_SIZE = Str(
    max_length=11,
    pattern=r"(?:[Aa][Uu][Tt][Oo]|[0-9]{1,5}[Xx][0-9]{1,5})",
    description="WIDTHxHEIGHT in pixels, each a multiple of 8 from 64 to the server's [image] max_width "
    "and max_height (1024 by default); auto (the default): the server's [image] default_size (512x512)",
)


def _image_agrees(body: Body, path: str) -> Body:
    """What a field's type cannot say: compression is jpeg's and webp's; a stream carries b64_json."""
    fmt = body.get("output_format", "png")
    if "output_compression" in body and fmt == "png":
        raise bad_field(
            "output_compression", "output_compression is for output_format jpeg or webp, not 'png'"
        )
    if body.get("stream") and body.get("response_format") == "url":
        raise bad_field(
            "stream", "a stream carries each image as b64_json: response_format url cannot stream"
        )
    return body


IMAGES = Checked(
    node=Obj(
        fields={
            "prompt": Str(min_length=1, max_length=IMAGE_PROMPT, description="what the image shows"),
            "model": MODEL,
            "n": Whole(minimum=1, maximum=10, description="how many images (default 1)"),
            "size": IMAGE_SIZE,
            "response_format": Enum(
                values=("b64_json", "url"),
                description="b64_json (the default): the image in the answer; url: a link to "
                "GET /v1/images/files/{name}, kept for the server's [image] url_ttl_s (an hour by default)",
            ),
            "output_format": Enum(values=IMAGE_FORMATS, description="png (the default), jpeg or webp"),
            "output_compression": Whole(
                minimum=0, maximum=100, description="jpeg and webp: 100 is the best quality (the default)"
            ),
            "stream": Bool(
                description="server-sent events: allm's image_generation.progress after each sampling step, "
                "then image_generation.completed for each image, in order"
            ),
            "partial_images": Neutral(value=0, description="0 only: allm sends no partial images"),
            "background": Enum(
                values=("auto", "opaque"), description="auto or opaque: the images are opaque"
            ),
            "quality": Enum(
                values=("low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"),
                description=ACCEPTED + "; steps sets the work done",
            ),
            "style": Enum(values=("vivid", "natural"), description=ACCEPTED),
            "moderation": Enum(values=("low", "auto"), description=ACCEPTED),
            "complexity": Enum(values=("low", "medium", "high"), description=ACCEPTED),
            "user": USER,
            "safety_identifier": HABITS["safety_identifier"],
            # allm's own: stable-diffusion.cpp's settings
            "negative_prompt": Str(
                max_length=IMAGE_PROMPT, description="allm: what the image should not show"
            ),
            "seed": Whole(
                minimum=INT64_MIN,
                maximum=INT64_MAX,
                description="allm: the same seed, prompt and settings make the same image; "
                "left out, one is drawn (each answer's data items tell it)",
            ),
            "steps": Whole(
                minimum=1, maximum=150, description="allm: sampling steps; left out, the model's default"
            ),
            "cfg_scale": Num(
                minimum=0,
                maximum=30,
                description="allm: how closely the image follows the prompt; left out, the model's default",
            ),
            "sampler": Enum(
                values=SAMPLERS,
                description="allm: stable-diffusion.cpp's sample method; left out, the model's default",
            ),
        },
        required=("prompt", "model"),
    ),
    then=_image_agrees,
    description="output_compression needs jpeg or webp; a stream, b64_json",
)
#: a stored image's file name, as allm/gateway/images/files.py makes them: anything else is no file
IMAGE_FILE = Str(
    min_length=1,
    max_length=64,
    pattern=r"[A-Za-z0-9_-]{32}\.(?:png|jpeg|webp)",
    description="an image's name, from the url a generation answered",
)
