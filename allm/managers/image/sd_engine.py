"""stable-diffusion.cpp models: one generation at a time, in a worker process that can be stopped.

The image manager's side of worker.py.  A load starts the worker and waits for its word
(a context, or the reason stable-diffusion.cpp logged for a NULL one).  A generation sends
the request, forwards each step as progress (and as stream chunks when asked), and checks
cancel and deadline as the steps come: a request that must stop kills the worker at once
(stable-diffusion.cpp cannot be told to stop), and the next request starts a new one, paying
a model load.  A worker that dies by itself is an INTERNAL error naming its signal.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from allm.image_names import OUTPUT_FORMATS, SAMPLERS
from allm.kernel.codes import (
    CancelledError,
    DeadlineError,
    InternalError,
    LoadFailedError,
    ModelCorruptError,
    OomRamError,
    UnsupportedError,
)
from allm.kernel.contract import Reply, RequestContext
from allm.kernel.process import describe_exit
from allm.managers.image import worker

log = logging.getLogger("allm.image.sd")

MIB = 1024 * 1024
LOAD_TIMEOUT_S = 600.0
POLL_S = 0.05
DEFAULT_STEPS = 20
DEFAULT_CFG = 7.0


def compute_bytes(width: int, height: int, taesd: bool) -> int:
    """Memory a generation of this size needs beside the weights: latents, attention, decoding.

    An estimate, on the safe side: a full VAE decodes at about 2 KiB a pixel in float32
    (its widest layers hold 128+ channels at full size), TAESD at a tenth of that.
    """
    pixels = width * height
    return 64 * MIB + pixels * (256 if taesd else 2048)


class ImageEngine:
    def __init__(
        self,
        model_id: str,
        paths: Mapping[str, str],
        options: Mapping[str, Any],
        weights_bytes: int,
        *,
        progress: Callable[[float], None] | None = None,
        free_bytes: Callable[[], int] | None = None,
    ) -> None:
        self.model_id = model_id
        self.paths = dict(paths)
        self.options = dict(options)
        self.weights_bytes = weights_bytes
        self.taesd = "taesd" in self.paths
        self.lock = threading.Lock()
        self._free_bytes = free_bytes
        self._proc: Any = None
        self._conn: Any = None
        self._start(progress)

    # -- the worker ---------------------------------------------------------------------------

    def _start(self, progress: Callable[[float], None] | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        proc = context.Process(
            target=worker.serve, args=(child, self.paths, self.options), name=f"allm-image-{self.model_id}"
        )
        proc.daemon = True
        proc.start()
        child.close()
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not parent.poll(POLL_S):
            if progress is not None:
                progress(0.5)  # alive and loading: the watchdog sees progress while the worker reads
            if not proc.is_alive():
                raise LoadFailedError(f"the worker loading {self.model_id} {_ended(proc)}")
            if time.monotonic() > deadline:
                proc.kill()
                raise LoadFailedError(f"{self.model_id} did not load in {LOAD_TIMEOUT_S:.0f} s")
        try:
            kind, detail = parent.recv()
        except (EOFError, ConnectionResetError):
            proc.join(5)
            raise LoadFailedError(f"the worker loading {self.model_id} {_ended(proc)}") from None
        if kind == "failed":
            proc.join(5)
            raise ModelCorruptError(f"stable-diffusion.cpp could not load {self.model_id}: {detail}")
        self._proc, self._conn = proc, parent
        if progress is not None:
            progress(1.0)

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(5)

    def close(self) -> None:
        self._stop()

    # -- a request ----------------------------------------------------------------------------

    def generate(self, ctx: RequestContext) -> Reply:
        p = ctx.params
        width, height = int(p.get("width") or 512), int(p.get("height") or 512)
        n = int(p.get("n") or 1)
        steps = int(p.get("steps") or self.options.get("steps") or DEFAULT_STEPS)
        cfg = p.get("cfg_scale")
        cfg_scale = float(cfg if cfg is not None else self.options.get("cfg_scale", DEFAULT_CFG))
        sampler = p.get("sampler") or self.options.get("sampler")
        if sampler is not None and sampler not in SAMPLERS:
            raise UnsupportedError(
                f"sampler {sampler!r} is not one of stable-diffusion.cpp's: {', '.join(SAMPLERS)}",
                reason="invalid_request",
                param="sampler",
            )
        fmt = p.get("output_format") or "png"
        if fmt not in OUTPUT_FORMATS:
            raise UnsupportedError(
                f"output_format must be one of {OUTPUT_FORMATS}",
                reason="invalid_request",
                param="output_format",
            )
        if width % 8 or height % 8 or min(width, height) < 64:
            raise UnsupportedError(
                f"size {width}x{height}: each side must be a multiple of 8, at least 64",
                reason="invalid_request",
                param="size",
            )
        need = compute_bytes(width, height, self.taesd)
        free = self._free_bytes() if self._free_bytes is not None else None
        if free is not None and need > free:
            raise OomRamError(
                f"a {width}x{height} image needs about {need / MIB:.0f} MiB beside the model; "
                f"{free / MIB:.0f} MiB of host memory is free"
            )
        seed = p.get("seed")
        first = int(seed) if seed is not None else random.randrange(2**31)  # noqa: S311 - not security
        seeds = [(first + i) % 2**63 for i in range(n)]
        job = {
            "prompt": str(p.get("prompt") or ""),
            "negative_prompt": str(p.get("negative_prompt") or ""),
            "n": n,
            "width": width,
            "height": height,
            "steps": steps,
            "cfg_scale": cfg_scale,
            "sampler": sampler,
            "seeds": seeds,
            "output_format": fmt,
            "output_compression": p.get("output_compression"),
        }
        with self.lock:
            if self._proc is None or not self._proc.is_alive():
                with ctx.phase(f"loading {self.model_id}", None):
                    self._stop()
                    self._start(ctx.progress)
            try:
                images = self._run(ctx, job)
            except BaseException:
                self._stop()  # whatever stopped the request, the worker may be mid-image: a new one next
                raise
        blobs = tuple(images[i] for i in range(n))
        data = {
            "created": int(time.time()),
            "seeds": seeds,
            "width": width,
            "height": height,
            "output_format": fmt,
            "steps": steps,
        }
        return Reply(data, blobs)

    def _run(self, ctx: RequestContext, job: dict[str, Any]) -> dict[int, bytes]:
        conn = self._conn
        conn.send(("generate", job))
        images: dict[int, bytes] = {}
        while True:
            if ctx.cancelled or (ctx.deadline is not None and time.monotonic() > ctx.deadline):
                self._stop()  # between two steps: stable-diffusion.cpp cannot be told to stop
                if ctx.cancelled:
                    raise CancelledError("image generation cancelled")
                raise DeadlineError("image generation passed its deadline")
            if not conn.poll(POLL_S):
                if not self._proc.is_alive():
                    how = _ended(self._proc)
                    self._stop()
                    raise InternalError(f"the image worker of {self.model_id} {how}")
                continue
            try:
                kind, detail = conn.recv()
            # The pipe closes as the worker dies (EOF, or a reset when it died with bytes unread):
            # wait for its status to name the cause.
            except (EOFError, ConnectionResetError):
                self._proc.join(5)
                how = _ended(self._proc)
                self._stop()
                raise InternalError(f"the image worker of {self.model_id} {how}") from None
            if kind == "progress":
                index, step, steps = detail
                n = int(job["n"])
                ctx.activity = f"generating image {index + 1} of {n}, step {step} of {steps}"
                ctx.progress((index + step / max(1, steps)) / n)  # shown in /status while it runs
                if ctx.stream:
                    ctx.emit({"progress": {"image": index, "step": step, "steps": steps}})
            elif kind == "image":
                index, _seed, data = detail
                images[index] = data
            elif kind == "done":
                return images
            elif kind == "error":
                raise InternalError(f"stable-diffusion.cpp failed: {detail}")


def _ended(proc: Any) -> str:
    """How the worker ended, as the supervisor words a manager's exit."""
    return "closed its pipe while still running" if proc.exitcode is None else describe_exit(proc.exitcode)
