"""The allm command line.

``allm serve`` runs the gateway, the supervisor and the managers on this host; ``allm
check`` and ``allm models`` read the catalog without starting anything; ``allm pull`` and
``allm rm`` fetch and remove models from the Hugging Face Hub (allm/hub).  This module is
the one place that knows every layer: it asks each manager module (through the static
registry) what it can tell of its models, so a model whose engine is missing is refused
before the server starts, and the gateway itself never imports a manager.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from allm import __version__
from allm.gateway.config import Config, ConfigError, ModelConfig
from allm.gateway.config_read import load, read
from allm.kernel import logs
from allm.kernel.logs import FORMAT_ENV, FORMATS
from allm.kernel.registry import MANAGERS, module_for

log = logging.getLogger("allm")

CONFIG_HELP = (
    "TOML file: [server], [text], [[models]]… (default: ALLM_CONFIG, else the embedded models alone)"
)


def describe(model: ModelConfig) -> Any:
    """The manager's report on one catalog entry (format, engine, size, problems); loads nothing."""
    module = importlib.import_module(module_for(model.modality))
    return module.describe(model.settings())


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _load(path: Path | None, flags: dict[str, Any] | None = None) -> Config | None:
    try:
        return load(path, flags=flags)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"allm: {problem}", file=sys.stderr)
        return None


def engines_ready(config: Config, modality: str | None = None) -> bool:
    """Print each model (of one modality, or all) whose engine is missing; warn of other problems."""
    missing = missing_engines(config, modality)
    for line in missing:
        print(f"allm: {line}", file=sys.stderr)
    return not missing


def missing_engines(config: Config, modality: str | None = None) -> list[str]:
    """Each model (of one modality, or all) whose engine is not installed; warns of other problems."""
    missing = []
    for model in config.models:
        if modality is not None and model.modality != modality:
            continue
        report = describe(model)
        for problem in report.problems:
            # A pulled model never stops the server (a pull over HTTP would stop the next reload):
            # it is named, and its requests say what it needs.
            if (
                report.engine is not None
                and problem.field == "format"
                and not report.engine.installed()
                and model.source is None
            ):
                missing.append(f"model {model.id!r} {problem.message}")
            else:  # the files may yet appear; requests for the model say what is wrong until then
                log.warning("model %r: field %r: %s", model.id, problem.field, problem.message)
    return missing


def serve(args: argparse.Namespace) -> int:
    flags = {"host": args.host, "port": args.port, "data_dir": args.data_dir}
    config = _load(args.config, flags)
    if config is None or not engines_ready(config) or not _store_ready(config):
        return 2
    return _run_http(config, _rereader(args.config, flags), supervise=True, what="serving")


def gateway(args: argparse.Namespace) -> int:
    flags = {"host": args.host, "port": args.port, "data_dir": args.data_dir}
    config = _load(args.config, flags)
    if config is None or not _store_ready(config):
        return 2
    return _run_http(config, _rereader(args.config, flags), supervise=False, what="gateway for")


def _store_ready(config: Config) -> bool:
    """False (said why) when the stored responses' database needs what this install lacks."""
    from allm.gateway import store

    try:
        store.check(config)
    except ConfigError as exc:
        print(f"allm: {exc}", file=sys.stderr)
        return False
    return True


def _rereader(path: Path | None, flags: dict[str, Any]) -> Callable[[], Config]:
    """What SIGHUP reloads: the same file and variables, the same flags on top, and the same
    refusal of a model whose engine is missing; every problem in one ConfigError."""

    def reread() -> Config:
        from allm.gateway import store

        config = load(path, flags=flags)
        store.check(config)
        missing = missing_engines(config)
        if missing:
            raise ConfigError(*missing)
        return config

    return reread


def _banner(line: str) -> None:
    """What a server says as it starts: on stdout for people; a log line among the JSON ones."""
    if logs.log_format() == "json":
        log.info("%s", line)
    else:
        print(line, flush=True)


def _run_http(config: Config, reread: Callable[[], Config], *, supervise: bool, what: str) -> int:
    from allm.gateway.app import create_app

    app = create_app(config, supervise=supervise, reread=reread)
    _banner(
        f"allm {__version__}: {what} {', '.join(m.id for m in config.models)} "
        f"on http://{config.host}:{config.port}"
    )
    app.run(host=config.host, port=config.port, single_process=True, access_log=False, motd=False)
    return 0


def manager(args: argparse.Namespace) -> int:
    """Become one manager instance: the same command ``allm serve`` runs, for a process manager."""
    config = _load(args.config, {"data_dir": args.data_dir})
    if config is None or not engines_ready(config, args.modality):
        return 2
    from allm.gateway.app import manager_specs, shared_runtime_dir
    from allm.kernel.process import SETTINGS_ENV
    from allm.kernel.supervisor import runtime_command

    runtime_dir = shared_runtime_dir(config)
    runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    runtime_dir.chmod(0o700)
    specs = manager_specs(config, runtime_dir)
    spec = next((s for s in specs if s.modality == args.modality and s.instance == args.instance), None)
    if spec is None:
        count = sum(1 for s in specs if s.modality == args.modality)
        why = (
            f"the catalog has no {args.modality} model"
            if not count
            else f"[{args.modality}] instances = {count}: instance {args.instance} does not exist"
        )
        print(f"allm: nothing for `allm manager {args.modality}` to serve: {why}", file=sys.stderr)
        return 2
    if args.bind is not None:
        spec = _bound(spec, args)
        if spec is None:
            return 2
    command = runtime_command(spec, sys.executable, config.heartbeat_interval_s, config.drain_timeout_s)
    env = {**os.environ, SETTINGS_ENV: json.dumps(dict(spec.settings))}
    _banner(f"allm {__version__}: {spec.name} on {spec.endpoint}")
    os.execve(sys.executable, command, env)  # noqa: S606 - our own interpreter and module


def _bound(spec: Any, args: argparse.Namespace) -> Any:
    """The spec at ``--bind``'s endpoint, with its CURVE keys for tcp://; None (said why) if unusable."""
    from allm.kernel import curve
    from allm.kernel.transport import check_endpoint

    try:
        check_endpoint(args.bind)
        if args.bind.startswith("tcp://"):
            if not args.secret_key:
                raise ValueError(
                    "a tcp:// endpoint needs this manager's key pair: --secret-key FILE.key_secret"
                )
            if not args.allow:
                raise ValueError(
                    "a tcp:// endpoint lets in only known gateways: --allow GATEWAY.key (repeatable)"
                )
            curve.load_pair(args.secret_key)
            for key in args.allow:
                curve.load_public(key)
    except (ValueError, curve.BadKey) as exc:
        print(f"allm: manager --bind {args.bind}: {exc}", file=sys.stderr)
        return None
    return dataclasses.replace(
        spec,
        endpoint=args.bind,
        curve_secret=str(Path(args.secret_key).expanduser().resolve()) if args.secret_key else None,
        curve_allow=tuple(str(Path(k).expanduser().resolve()) if Path(k).exists() else k for k in args.allow),
    )


def keys(args: argparse.Namespace) -> int:
    from allm.kernel import curve

    try:
        public, secret = curve.make_keys(args.dir, args.name)
    except curve.BadKey as exc:
        print(f"allm: {exc}", file=sys.stderr)
        return 1
    print(f"public key:  {public}  (give it to the other side)")
    print(f"secret key:  {secret}  (mode 0600: keep it on this host)")
    print(f"Z85:         {curve.load_public(str(public)).decode()}")
    return 0


def check(args: argparse.Namespace) -> int:
    try:
        config, settings = read(args.config)
    except ConfigError as exc:  # no file, or not TOML: nothing more to read
        print(f"allm: {exc}", file=sys.stderr)
        return 1
    problems = list(settings) + [
        f"model {model.id!r}: field {problem.field!r}: {problem.message}"
        for model in config.models
        for problem in describe(model).problems
    ]
    for line in problems:
        print(f"allm: {line}", file=sys.stderr)
    if problems:
        print(f"allm check: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    where = args.config or os.environ.get("ALLM_CONFIG") or "the default configuration"
    print(f"allm check: {where} is valid: {len(config.models)} model(s)")
    return 0


def _row(model: ModelConfig, source: str, size_bytes: int | None = None) -> dict[str, Any]:
    """One model of ``allm models``: what its manager says of it, and where it came from."""
    report = describe(model)
    engine = report.engine
    return {
        "id": model.id,
        "modality": model.modality,
        "format": report.format,
        "engine": engine.name if engine else None,
        "size_bytes": report.size_bytes if size_bytes is None else size_bytes,
        "installed": engine.installed() if engine else None,
        "install": engine.install_command() if engine and not engine.installed() else None,
        "problems": [f"{p.field}: {p.message}" for p in report.problems],
        "path": model.path,
        "source": source,
    }


def _size_on_disk(config: Config, model: ModelConfig) -> int | None:
    """A pulled model's directory as it takes the disk (None: the manager's report says)."""
    if model.source is None:
        return None
    from allm.hub import Store

    return Store(config.data_dir).disk_bytes(model.id)


def models(args: argparse.Namespace) -> int:
    try:
        config, settings = read(args.config)
    except ConfigError as exc:
        print(f"allm: {exc}", file=sys.stderr)
        return 1
    for problem in settings:
        print(f"allm: {problem}", file=sys.stderr)
    # the pulled models are in the catalog (allm/gateway/catalog.py: with_pulled), after its own
    rows = [_row(model, model.source or "config", _size_on_disk(config, model)) for model in config.models]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    pulled = any(row["source"] != "config" for row in rows)  # the SOURCE column tells them apart
    table = [("ID", "MODALITY", "FORMAT", "ENGINE", "SIZE", *(("SOURCE",) if pulled else ()), "INSTALLED")]
    for row in rows:
        installed = (
            "-" if row["installed"] is None else "yes" if row["installed"] else f"no: {row['install']}"
        )
        table.append(
            (
                row["id"],
                row["modality"],
                row["format"] or "?",
                row["engine"] or "?",
                _size(row["size_bytes"]),
                *((row["source"],) if pulled else ()),
                installed,
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[-1])
    troubled = [row for row in rows if row["problems"]]
    if troubled or settings:
        print(f"\n{len(troubled)} model(s) with problems, {len(settings)} bad setting(s): run allm check")
    return 1 if settings else 0


def pull(args: argparse.Namespace) -> int:
    """Fetch a model from the Hugging Face Hub (or HF_ENDPOINT's mirror), check it and register it."""
    from allm.hub import PullError
    from allm.hub import pull as pull_model
    from allm.hub.asked import asked
    from allm.hub.progress import ProgressLines, size_text

    config = _load(args.config, {"data_dir": args.data_dir})
    if config is None:
        return 2
    try:
        wanted = asked(args.source, args.id, args.revision, args.parts, args.part)
        if wanted.source is None and wanted.parts is None:
            print("allm pull: give SOURCE (OWNER/REPO[:QUANT]), or an image model's parts", file=sys.stderr)
            return 2
        done = pull_model(
            wanted.source,
            config.data_dir,
            config.hub,
            model_id=wanted.model_id,
            revision=wanted.revision,
            modality=args.modality,
            parts=wanted.parts,
            options=wanted.options,
            progress=ProgressLines(sys.stdout),
            on_wait=lambda: print(
                f"allm pull: waiting for another pull of {wanted.model_id or wanted.source or 'the model'}",
                flush=True,
            ),
        )
    except PullError as exc:
        print(f"allm pull: {exc.message}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(
            f"allm pull: {exc.name or 'huggingface_hub'} is not installed: pip install huggingface_hub",
            file=sys.stderr,
        )
        return 2
    model = done.model
    for warning in done.warnings:
        print(f"allm pull: {model.id}: {warning}", file=sys.stderr)
    if not done.fetched:
        print(
            f"allm pull: {model.id} is already pulled ({model.source} at {model.commit[:12]}): nothing to do"
        )
        return 0
    kind = f"{model.modality}, {model.format}" if model.format else model.modality
    print(f"pulled {model.source} as {model.id}: {kind}, {size_text(model.size_bytes)} in {model.path}")
    return 0


def remove(args: argparse.Namespace) -> int:
    """Delete a pulled model's files and its record."""
    from allm import running
    from allm.hub import PullError, Store
    from allm.hub.progress import size_text

    config = _load(args.config, {"data_dir": args.data_dir})
    if config is None:
        return 2
    try:
        url = running.server_url(config, args.server)
    except ValueError as exc:
        print(f"allm rm: {exc}", file=sys.stderr)
        return 2
    query = "?force=true" if args.force else ""
    answer = running.ask(config, url, "DELETE", running.model_path(args.id) + query)
    if answer is not None and answer[0] != 404:  # a server serves it: it removes the model
        status, body = answer
        if status != 200:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            message = error.get("message", body) if isinstance(error, dict) else error
            hint = " (allm rm --force unloads it first)" if status == 409 else ""
            print(f"allm rm: the server at {url} refused ({status}): {message}{hint}", file=sys.stderr)
            return 1
        print(f"removed {args.id} (through the server at {url})")
        return 0
    try:
        model = Store(config.data_dir).remove(args.id)
    except PullError as exc:
        print(f"allm rm: {exc.message}", file=sys.stderr)
        return 1
    print(f"removed {model.id} ({model.source}, {size_text(model.size_bytes)})")
    return 0


def _http_options(command: argparse.ArgumentParser, *, data_dir: str) -> None:
    """The options of the commands that serve HTTP (serve, gateway)."""
    command.add_argument("--config", type=Path, help=CONFIG_HELP)
    command.add_argument("--host", help="address to listen on (default 127.0.0.1; ALLM_HOST)")
    command.add_argument("--port", type=int, help="port to listen on (default 8080; ALLM_PORT)")
    command.add_argument("--data-dir", help=data_dir)
    _log_option(command)


def _log_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--log-format",
        choices=FORMATS,
        help="text lines for people (the default) or one JSON object a line for log shippers; "
        f"the managers write the same ({FORMAT_ENV})",
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="allm",
        description="A local inference server for text, speech and images behind the OpenAI HTTP APIs.",
        epilog="Each command has its own --help.",
    )
    top.add_argument("--version", action="version", version=f"allm {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "serve",
        help="serve the HTTP API, with every manager, on this host",
        description="Serve the OpenAI HTTP APIs on this host, supervising one process per manager. "
        "Refuses to start if a model's engine is not installed.",
    )
    _http_options(run, data_dir="where stored responses live (ALLM_DATA_DIR)")
    run.set_defaults(run=serve)

    front = commands.add_parser(
        "gateway",
        help="serve the HTTP API for managers something else runs (supervisord)",
        description="Serve the OpenAI HTTP APIs, connecting to the managers that `allm manager` runs "
        "(under supervisord, say) at the endpoints the configuration gives. It starts no manager: it "
        "finds each by its heartbeats, and fails a request at once, with a clear message, when no "
        "manager of its modality has answered for twice the heartbeat timeout.",
    )
    _http_options(front, data_dir="stored responses and the managers' sockets (ALLM_DATA_DIR)")
    front.set_defaults(run=gateway)

    one = commands.add_parser(
        "manager",
        help="run one manager (text, audio or image) for `allm gateway`",
        description="Run one manager instance, its runtime and engine, bound to the endpoint the "
        "configuration gives it (an ipc:// socket in the runtime directory), with the same catalog "
        "and settings as `allm gateway`. The process becomes the manager (exec): a process manager's "
        "signals reach it directly. SIGTERM drains, then stops.",
    )
    one.add_argument(
        "modality", choices=sorted(MANAGERS), metavar="MODALITY", help=f"which manager: {', '.join(MANAGERS)}"
    )
    one.add_argument("--instance", type=int, default=0, help="which instance of it, from 0 (default 0)")
    one.add_argument("--config", type=Path, help=CONFIG_HELP)
    one.add_argument("--data-dir", help="where the managers' sockets are, under run/ (ALLM_DATA_DIR)")
    one.add_argument(
        "--bind",
        metavar="ENDPOINT",
        help="serve gateways on other hosts at tcp://ADDR:PORT (CURVE: needs --secret-key and --allow), "
        "instead of the ipc:// socket in the runtime directory",
    )
    one.add_argument(
        "--secret-key", metavar="FILE", help="this manager's key pair: NAME.key_secret from allm keys"
    )
    one.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="KEY",
        help="a gateway's public key (its NAME.key file, or the 40 Z85 characters) to let in; repeatable",
    )
    _log_option(one)
    one.set_defaults(run=manager)

    pair = commands.add_parser(
        "keys",
        help="make a CURVE key pair for managers and gateways on other hosts",
        description="Write NAME.key (the public key: give it to the other side) and NAME.key_secret "
        "(both keys, mode 0600: keep it on this host) for tcp:// connections between a gateway and "
        "managers on other hosts. Refuses to overwrite.",
    )
    pair.add_argument("name", metavar="NAME", help="the files' name: gateway, host-a, …")
    pair.add_argument("--dir", type=Path, default=Path("."), help="where to write them (default: here)")
    pair.set_defaults(run=keys)

    validate = commands.add_parser(
        "check",
        help="validate a configuration and its catalog, starting nothing",
        description="Check the settings and every catalog entry (its files, format, options and engine) "
        "without starting anything. Prints every problem found, each naming its entry and field; "
        "exits 1 if there is any.",
    )
    validate.add_argument("config", nargs="?", type=Path, metavar="CONFIG", help=CONFIG_HELP)
    validate.set_defaults(run=check)

    listing = commands.add_parser(
        "models",
        help="list the catalog: format, engine, size, whether the engine is installed",
        description="List every model of the catalog with its format, engine, size on disk and whether "
        "its engine is installed (with the pip command that installs it where it is not).",
    )
    listing.add_argument("config", nargs="?", type=Path, metavar="CONFIG", help=CONFIG_HELP)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=models)

    fetch = commands.add_parser(
        "pull",
        help="fetch a model from the Hugging Face Hub (or a mirror) and register it",
        description="Fetch a model by name from the Hugging Face Hub, or the mirror HF_ENDPOINT or "
        "[hub] endpoint names, check every file against the Hub's digests and register it in the data "
        "directory. SOURCE is OWNER/REPO or OWNER/REPO:QUANT (a GGUF quant such as Q4_K_M, or a "
        "whisper.cpp model such as tiny.en), optionally after hf.co/ or hf://. Without a quant: "
        "Q4_K_M, then Q4_0, then Q8_0, then the smallest. A gated repository needs a token: HF_TOKEN "
        "or [hub] token_file. A pull cut off resumes where it stopped; a second pull is a no-op. An "
        "image model made of several files (a Flux: diffusion model, text encoders, VAE) is pulled by "
        "its parts: --part NAME=FILE for each, or a description file, --parts FILE.",
    )
    fetch.add_argument(
        "source", nargs="?", metavar="SOURCE", help="OWNER/REPO[:QUANT], after hf.co/ or hf:// too"
    )
    fetch.add_argument("--id", help="the id to serve it under (default: SOURCE as written)")
    fetch.add_argument("--revision", help="a branch, tag or commit of the repository (default: main)")
    fetch.add_argument(
        "--modality", choices=sorted(MANAGERS), help="what the model is (default: told from its files)"
    )
    fetch.add_argument(
        "--part",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="an image model's part, by stable-diffusion.cpp's name (diffusion_model, model, clip_l, "
        "clip_g, t5xxl, vae, taesd): a file of SOURCE, or OWNER/REPO:FILE of another repository",
    )
    fetch.add_argument(
        "--parts",
        type=Path,
        metavar="FILE",
        help="a TOML description of an image model: source, id, revision, [parts], [options] (the flags win)",
    )
    fetch.add_argument("--config", type=Path, help=CONFIG_HELP + "; its [hub] table")
    fetch.add_argument("--data-dir", help="where pulled models live, under models/ (ALLM_DATA_DIR)")
    fetch.set_defaults(run=pull)

    drop = commands.add_parser(
        "rm",
        help="remove a pulled model: its files and its registration",
        description="Delete a model `allm pull` fetched: its record and its files under the data directory.",
    )
    drop.add_argument("id", metavar="ID", help="the pulled model's id, as `allm models` lists it")
    drop.add_argument("--config", type=Path, help=CONFIG_HELP)
    drop.add_argument("--data-dir", help="where pulled models live, under models/ (ALLM_DATA_DIR)")
    drop.add_argument(
        "--server",
        help="the running server to remove it through (default: the configuration's host and port); "
        "where one answers, a loaded model is refused unless --force",
    )
    drop.add_argument("--force", action="store_true", help="unload it first where a server has it loaded")
    drop.set_defaults(run=remove)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "log_format", None):
        os.environ[FORMAT_ENV] = args.log_format  # the managers we start read it too
    logs.setup("gateway")
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
