"""The names of image options that the gateway checks and the image manager passes on.

Both sides import them from here, because the gateway may not import a manager:
stable-diffusion.cpp's sample methods, by the names its command line gives them, and
the formats the manager encodes with Pillow.
"""

SAMPLERS = (
    "euler",
    "euler_a",
    "heun",
    "dpm2",
    "dpm++2s_a",
    "dpm++2m",
    "dpm++2mv2",
    "ipndm",
    "ipndm_v",
    "lcm",
    "ddim_trailing",
    "tcd",
)
OUTPUT_FORMATS = ("png", "jpeg", "webp")
