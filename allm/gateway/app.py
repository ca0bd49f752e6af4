"""create_app(config): the Sanic app, its routes, auth, CORS, and the kernel's lifecycle.

In ``allm serve`` the supervisor and the kernel client run in the gateway's
event loop: the supervisor starts one subprocess per manager instance and
tells the client of every death, so requests in flight end with its code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sanic import HTTPResponse, Request, Sanic
from sanic.response import BaseHTTPResponse, empty

from allm import __version__
from allm.gateway import admin, errors, metrics, openapi, ops, page, reload
from allm.gateway.anthropic import handlers as anthropic
from allm.gateway.audio import handlers as audio
from allm.gateway.chat import handlers as chat
from allm.gateway.config import Config
from allm.gateway.errors import ApiError
from allm.gateway.images import handlers as images
from allm.gateway.images.files import SWEEP_INTERVAL_S, image_files
from allm.gateway.models import handlers as models
from allm.gateway.models.pins import Pins
from allm.gateway.ollama import handlers as ollama
from allm.gateway.ollama import pulls as ollama_pulls
from allm.gateway.responses import handlers as responses
from allm.gateway.spec import IGNORED
from allm.gateway.store import open_store
from allm.kernel import curve
from allm.kernel.client import KernelClient
from allm.kernel.codes import REASON_DRAINING, InternalError
from allm.kernel.registry import MANAGERS
from allm.kernel.restarts import RestartPolicy
from allm.kernel.supervisor import ManagerSpec, Supervisor

log = logging.getLogger("allm.gateway")

#: room beside the largest body a request may carry (its header, params, other frames)
MESSAGE_MARGIN_BYTES = 1 << 20
#: how long before the drain's end the requests still running are ended with a coded error
DRAIN_MARGIN_S = 0.5
OPEN_PATHS = frozenset({"/health", "/ready"}) | openapi.OPEN_PATHS


def manager_specs(config: Config, runtime_dir: Path) -> list[ManagerSpec]:
    """One spec per manager instance of every modality that has models."""
    specs = []
    for modality, module in MANAGERS.items():
        models = [m.settings() for m in config.models if m.modality == modality]
        if not models:
            continue
        options = config.modality(modality)
        budget = options.memory_budget_bytes
        settings = {
            "models": models,
            # The budget is the host's: its instances share it.
            "memory_budget_bytes": None if budget is None else budget // max(1, options.instances),
            "idle_unload_s": options.idle_unload_s,
            "load_stall_s": options.load_stall_s,
            # where a manager keeps what it makes from a model once (a converted copy)
            "cache_dir": str(config.data_dir.expanduser() / "models"),
        }
        for instance in range(options.instances):
            specs.append(
                ManagerSpec(
                    modality,
                    module,
                    f"ipc://{runtime_dir}/{modality}-{instance}.sock",
                    instance=instance,
                    slots=config.slots(modality),
                    queue_size=options.queue_size,
                    settings=settings,
                    memory_cap_bytes=options.memory_cap_bytes,
                    step_limit_s=options.step_limit_s,
                    max_message_bytes=config.max_body_bytes + MESSAGE_MARGIN_BYTES,
                )
            )
    return specs


@dataclasses.dataclass(frozen=True, slots=True)
class Remote:
    """A manager instance on another host, as /status and the kernel client see it."""

    modality: str
    endpoint: str
    public_key: str
    instance: int  # its place among its modality's remote instances

    @property
    def name(self) -> str:
        return f"{self.modality}@{self.endpoint.removeprefix('tcp://')}"


def remote_managers(config: Config) -> list[Remote]:
    """Every remote instance of the config, in order."""
    return [
        Remote(modality, remote.endpoint, remote.public_key, i)
        for modality in MANAGERS
        for i, remote in enumerate(config.modality(modality).remote)
    ]


def shared_runtime_dir(config: Config) -> Path:
    """Where ``allm gateway`` and ``allm manager`` meet: the configured runtime directory, else
    one under the data directory (a temporary one would differ between the processes)."""
    return (config.runtime_dir or config.data_dir / "run").expanduser()


def create_app(
    config: Config,
    name: str = "allm",
    *,
    supervise: bool = True,
    reread: Callable[[], Config] | None = None,
) -> Sanic[Any, Any]:
    """The HTTP app.  ``supervise``: start and watch the managers (``allm serve``); otherwise
    connect to managers something else runs (``allm gateway`` beside ``allm manager``).
    ``reread``: the configuration read again, or ConfigError naming every problem; given, a
    SIGHUP reloads it (allm/gateway/reload.py)."""
    app = Sanic(name, configure_logging=False, request_class=errors.EdgeRequest)
    app.config.REQUEST_MAX_SIZE = config.max_body_bytes
    app.config.RESPONSE_TIMEOUT = int(config.request_timeout_s) + 30
    # A client whose headers or body stop coming gets 408 after REQUEST_TIMEOUT (the body's wait is
    # EdgeRequest's); seconds as given, fractions too: Sanic annotates these int but compares numbers.
    app.config.update(REQUEST_TIMEOUT=config.body_timeout_s, KEEP_ALIVE_TIMEOUT=config.keep_alive_timeout_s)
    # SIGTERM: in-flight requests (streams too) get this long to finish before connections close.
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = config.drain_timeout_s
    app.ctx.config = config
    app.blueprint(chat.bp)
    app.blueprint(responses.bp)
    app.blueprint(anthropic.bp)
    app.blueprint(audio.bp)
    app.blueprint(images.bp)
    app.blueprint(ollama.bp)
    app.blueprint(ollama_pulls.bp)
    app.blueprint(models.bp)
    app.blueprint(ops.bp)
    app.blueprint(openapi.bp)
    app.blueprint(page.bp)
    app.error_handler.add(Exception, errors.handle)
    app.ctx.api_keys = [key.encode() for key in config.api_keys]  # a reload replaces them
    observed = metrics.Metrics(lambda: ops.managers_of(app), version=__version__)
    app.ctx.metrics = observed
    app.ctx.started_at = time.monotonic()
    app.ctx.draining = False  # SIGTERM came: finishing what runs, taking nothing new
    app.ctx.last_reload = None  # what the last SIGHUP did

    @app.on_request
    async def open_exchange(request: Request) -> None:
        # First of all, so that every answer (a 401, a 404) has its id, its line and its count.
        endpoint = f"/{request.route.path}" if request.route is not None else "unmatched"
        request.ctx.exchange = observed.begin(
            metrics.request_id_for(request.headers.get(metrics.REQUEST_ID_HEADER)),
            request.method,
            request.path,
            endpoint,
        )
        IGNORED.set(request.ctx.exchange.ignored)
        if app.ctx.draining:  # one that slipped in on an open connection after SIGTERM
            raise ApiError(
                503,
                "the server is shutting down: send the request again, to another server or later",
                code="draining",
                type="server_error",
                headers={"Retry-After": "1"},
            )

    @app.on_request
    async def authorize(request: Request) -> HTTPResponse | None:
        if request.method == "OPTIONS" and app.ctx.config.cors_origins:
            return empty(status=204)
        if request.method == errors.UNREAD:
            # Sanic's stand-in for a request it could not read runs the middleware too: a 401
            # would hide the 400 or 413 that says what was wrong with it.
            return None
        keys = app.ctx.api_keys
        if not keys or request.path in OPEN_PATHS:
            return None
        # OpenAI's clients send a bearer token, Anthropic's an x-api-key: either one will do; an
        # admin key is an API key too. Every key is compared: no early exit leaks which matched.
        admin_keys = (key.encode() for key in app.ctx.config.admin_keys)
        if not admin.matches(admin.supplied_key(request), [*keys, *admin_keys]):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                code="invalid_api_key",
                type="authentication_error",
            )
        return None

    async def cors(request: Request, response: BaseHTTPResponse) -> None:
        origin = request.headers.get("origin")
        origins = app.ctx.config.cors_origins
        if origin and ("*" in origins or origin in origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Allow-Headers"] = (
                "Authorization, Content-Type, x-api-key, anthropic-version, anthropic-beta"
            )
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            response.headers["Access-Control-Expose-Headers"] = metrics.REQUEST_ID_HEADER

    app.register_middleware(cors, "response")

    async def stamp(request: Request, response: BaseHTTPResponse) -> None:
        exchange = getattr(request.ctx, "exchange", None)
        if exchange is not None:
            response.headers[metrics.REQUEST_ID_HEADER] = exchange.request_id

    app.register_middleware(stamp, "response")

    @app.signal("http.lifecycle.response")
    async def close_exchange(request: Request, response: BaseHTTPResponse) -> None:
        # Dispatched when the response is done: a stream's last event included.
        exchange = getattr(request.ctx, "exchange", None)
        if exchange is not None:
            observed.finish(exchange, response.status)

    @app.before_server_start
    async def start_kernel(app: Sanic[Any, Any]) -> None:
        # first: a store that cannot open stops start-up before anything else is started
        app.ctx.store = await asyncio.to_thread(open_store, config)
        if supervise:
            runtime_dir = config.runtime_dir or Path(tempfile.mkdtemp(prefix="allm-"))
        else:
            runtime_dir = shared_runtime_dir(config)
        runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        runtime_dir.chmod(0o700)
        app.ctx.runtime_dir = runtime_dir
        specs = manager_specs(config, runtime_dir)
        routes: dict[str, list[str]] = {}
        for spec in specs:
            routes.setdefault(spec.modality, []).append(spec.endpoint)
        remotes = remote_managers(config)
        for remote in remotes:
            routes.setdefault(remote.modality, []).append(remote.endpoint)
        app.ctx.remotes = remotes
        client = KernelClient(
            routes,
            heartbeat_timeout_s=config.heartbeat_timeout_s,
            hello_interval_s=config.heartbeat_interval_s,
            # Unsupervised, a manager nobody hears from is failed or not running: say so at once.
            absent_after_s=None if supervise else 2 * config.heartbeat_timeout_s,
            observer=observed,
            keys=curve.load_pair(config.curve_secret_key) if config.curve_secret_key else None,
            server_keys={r.endpoint: r.public_key.encode() for r in remotes},
        )
        supervisor = (
            Supervisor(
                specs,
                client,
                policy=RestartPolicy(failed_retry_s=config.restart_cooldown_s),
                heartbeat_timeout_s=config.heartbeat_timeout_s,
                heartbeat_interval_s=config.heartbeat_interval_s,
                drain_timeout_s=config.drain_timeout_s,
            )
            if supervise
            else None
        )
        await client.start()
        if supervisor is not None:
            await supervisor.start()
        app.ctx.client = client
        app.ctx.supervisor = supervisor
        app.ctx.specs = specs
        app.ctx.images = image_files(config)
        interval_s = min(SWEEP_INTERVAL_S, config.images.url_ttl_s)
        app.ctx.image_sweeps = asyncio.create_task(app.ctx.images.sweep_every(interval_s))
        app.ctx.pins = Pins(config.data_dir)
        app.ctx.pin_keeper = asyncio.create_task(app.ctx.pins.keep(app, config.heartbeat_interval_s))
        log.info("managers: %s", ", ".join(s.name for s in specs) or "none")
        if reread is not None:
            reloading = asyncio.Lock()  # one at a time: a second SIGHUP waits for the first

            async def on_hangup() -> None:
                async with reloading:
                    app.ctx.last_reload = await reload.reload(app, reread)

            def hangup() -> None:
                task = asyncio.get_running_loop().create_task(on_hangup())
                app.ctx.reloads.add(task)
                task.add_done_callback(app.ctx.reloads.discard)

            app.ctx.reloads = set()
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hangup)

    @app.before_server_stop
    async def drain(app: Sanic[Any, Any]) -> None:
        # Sanic now stops listening and waits up to GRACEFUL_SHUTDOWN_TIMEOUT for the requests
        # in flight. Just before it gives up, end what still runs with a coded error, so a
        # stream's client reads why it ends instead of a cut connection.
        app.ctx.draining = True
        if app.ctx.supervisor is not None:
            # From now on a manager that ends stays down: a SIGTERM sent to the whole process
            # group (systemd, `kill -- -PGID`) drains and ends the managers with us.
            app.ctx.supervisor.begin_stop()
        log.info(
            "draining: %d request(s) in flight, up to %g s (drain_timeout_s)",
            observed.serving,
            config.drain_timeout_s,
        )

        async def deadline() -> None:
            await asyncio.sleep(max(0.0, config.drain_timeout_s - DRAIN_MARGIN_S))
            left = app.ctx.client.cancel_all(
                InternalError(
                    f"the server is shutting down and its drain time ({config.drain_timeout_s:g} s) ran out",
                    reason=REASON_DRAINING,
                )
            )
            if left:
                log.warning("drain time ran out: ended %d request(s) still running", left)

        app.ctx.drain_deadline = asyncio.get_running_loop().create_task(deadline())

    @app.after_server_stop
    async def stop_kernel(app: Sanic[Any, Any]) -> None:
        with contextlib.suppress(AttributeError):  # no drain if it never served
            app.ctx.drain_deadline.cancel()
        for task in (app.ctx.image_sweeps, app.ctx.pin_keeper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if app.ctx.supervisor is not None:
            await app.ctx.supervisor.stop()
        await app.ctx.client.close()
        app.ctx.store.close()
        if supervise and config.runtime_dir is None:
            shutil.rmtree(app.ctx.runtime_dir, ignore_errors=True)

    return app
