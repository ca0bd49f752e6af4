"""The process that holds a stable-diffusion.cpp context and generates images for the image engine.

stable-diffusion.cpp has no way to stop a generation once it started (0.4.7: a progress
callback that cannot abort, no abort callback).  So the context lives in this child of the
image manager, and a cancelled or late generation is stopped by killing the child between
two steps; the manager itself serves on and starts a new child for the next request.
The child dies with its parent (PR_SET_PDEATHSIG), so no engine outlives its manager.

Messages over the pipe, parent → child: ``("generate", params)``; child → parent:
``("ready", None)``, ``("failed", reason)`` (the load did not produce a context),
``("progress", (image, step, steps))``, ``("image", (index, seed, encoded bytes))``,
``("done", None)``, ``("error", message)``.
"""

from __future__ import annotations

import ctypes
import io
import os
import signal
import warnings
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

from allm.kernel.process import PR_SET_PDEATHSIG, linux_prctl


def serve(conn: Connection, paths: dict[str, str], options: dict[str, Any]) -> None:
    """Load the model, say whether it loaded, then generate on request until the pipe closes."""
    linux_prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))  # not Linux: the parent's close() is the only guard
    # The binding leaves the /dev/null it silences the C library with open: its warning, not ours.
    warnings.simplefilter("ignore", ResourceWarning)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    import stable_diffusion_cpp.stable_diffusion_cpp as sd_cpp
    from stable_diffusion_cpp import StableDiffusion

    log: deque[str] = deque(maxlen=40)

    @sd_cpp.sd_log_callback  # type: ignore[untyped-decorator]
    def on_log(level: int, text: bytes, _data: Any) -> None:
        line = text.decode("utf-8", "replace").strip()
        if line:
            log.append(line)

    sd_cpp.sd_set_log_callback(on_log, ctypes.c_void_p(0))
    model = StableDiffusion(
        model_path=paths.get("model", ""),
        diffusion_model_path=paths.get("diffusion_model", ""),
        clip_l_path=paths.get("clip_l", ""),
        clip_g_path=paths.get("clip_g", ""),
        t5xxl_path=paths.get("t5xxl", ""),
        vae_path=paths.get("vae", ""),
        taesd_path=paths.get("taesd", ""),
        vae_decode_only=True,  # text to image never encodes an image
        n_threads=int(options.get("n_threads") or os.cpu_count() or 1),
        verbose=False,
    )
    if not model._model.model:  # the binding does not notice a failed load: a NULL context
        reasons = [
            line for line in log if any(w in line.lower() for w in ("error", "fail", "invalid", "not"))
        ]
        conn.send(("failed", reasons[-1] if reasons else (log[-1] if log else "no reason logged")))
        os._exit(0)  # never free_sd_ctx(NULL): it segfaults at exit
    conn.send(("ready", None))
    while True:
        try:
            kind, params = conn.recv()
        except EOFError:
            return
        if kind != "generate":
            continue
        try:
            _generate(conn, model, params)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _generate(conn: Connection, model: Any, params: dict[str, Any]) -> None:
    for index in range(int(params["n"])):
        seed = int(params["seeds"][index])

        def progress(step: int, steps: int, _time: float, index: int = index) -> None:
            conn.send(("progress", (index, step, steps)))

        images = model.generate_image(
            prompt=params["prompt"],
            negative_prompt=params.get("negative_prompt") or "",
            width=int(params["width"]),
            height=int(params["height"]),
            sample_steps=int(params["steps"]),
            cfg_scale=float(params["cfg_scale"]),
            sample_method=params.get("sampler") or "default",
            seed=seed,
            progress_callback=progress,
        )
        conn.send(
            (
                "image",
                (index, seed, encode(images[0], params["output_format"], params.get("output_compression"))),
            )
        )
    conn.send(("done", None))


def encode(image: Any, fmt: str, compression: int | None) -> bytes:
    """The image in the format asked for: PNG keeps alpha, JPEG has none, WebP is lossy by quality.

    ``compression`` is OpenAI's 0-100 (more is smaller): the quality is 100 minus it.
    """
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, format="PNG")
    elif fmt == "jpeg":
        quality = 95 if compression is None else 100 - compression
        image.convert("RGB").save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format="WEBP", quality=90 if compression is None else 100 - compression)
    return out.getvalue()
