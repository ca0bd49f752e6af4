"""The manager process's entry point: ``python -m allm.kernel.runtime <modality> --module …``.

It reads its arguments and settings, names itself in ``ps``, binds its life to the
supervisor's, sets up logging and signals, creates the manager, and runs the loop
(allm/kernel/loop.py) until a drain ends it.  ``allm manager`` execs this same command.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from allm.kernel import curve, logs, loop
from allm.kernel.contract import Manager, ManagerInfo
from allm.kernel.loop import Runtime
from allm.kernel.process import (
    PARENT_ENV,
    PR_SET_NAME,
    SETTINGS_ENV,
    bind_to_parent,
    lifeline_fd,
    linux_prctl,
)
from allm.kernel.transport import Router

log = logging.getLogger("allm.runtime")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="allm-manager", description=loop.__doc__)  # what the process runs
    parser.add_argument("modality", help="the modality this manager serves (shows in ps)")
    parser.add_argument("--module", required=True, help="the manager module, from the registry")
    parser.add_argument("--endpoint", required=True, help="ipc://path or tcp://host:port to bind")
    parser.add_argument("--instance", type=int, default=0)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--heartbeat-interval-s", type=float, default=0.5)
    parser.add_argument("--drain-timeout-s", type=float, default=10.0)
    parser.add_argument(
        "--step-limit-s", type=float, default=0.0, help="longest a running request may go without progress"
    )
    parser.add_argument("--max-message-bytes", type=int, help="a peer's bigger message closes its connection")
    parser.add_argument("--curve-secret", help="tcp://: this manager's CURVE .key_secret file")
    parser.add_argument(
        "--curve-allow",
        action="append",
        default=[],
        help="tcp://: a client public key (Z85 or .key file) to let in",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    name = f"{args.modality}#{args.instance}"
    logs.setup(name)
    bind_to_parent()
    linux_prctl(PR_SET_NAME, f"allm-{args.modality}-{args.instance}".encode()[:15])  # its name in ps
    settings: dict[str, Any] = json.loads(os.environ.get(SETTINGS_ENV) or "{}")
    module = importlib.import_module(args.module)
    info = ManagerInfo(args.modality, args.instance, args.slots, settings)
    manager: Manager = module.create(info)
    keys = curve.load_pair(args.curve_secret) if args.curve_secret else None
    allowed = [curve.load_public(key) for key in args.curve_allow]
    router = Router(args.endpoint, keys=keys, allowed=allowed, max_message_bytes=args.max_message_bytes)
    runtime = Runtime(
        manager,
        router,
        modality=args.modality,
        instance=args.instance,
        slots=args.slots,
        queue_size=args.queue_size,
        heartbeat_interval_s=args.heartbeat_interval_s,
        drain_timeout_s=args.drain_timeout_s,
        step_limit_s=args.step_limit_s or None,
        lifeline_fd=lifeline_fd(),
    )

    def on_signal(signum: int, _frame: object) -> None:
        runtime.begin_drain()

    signal.signal(signal.SIGTERM, on_signal)
    # A reload is the gateway's: it sends the new catalog over the protocol (the configure op).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Under our supervisor, Ctrl-C reaches the whole process group: the
    # supervisor decides when we stop, not the terminal.
    if os.environ.get(PARENT_ENV):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, on_signal)
    # Wake the poll at once on a signal instead of at the next heartbeat.
    signal.set_wakeup_fd(runtime.wake_fd)
    log.info("serving %s on %s (pid %d)", args.module, args.endpoint, os.getpid())
    try:
        runtime.serve()
    finally:
        signal.set_wakeup_fd(-1)
        if runtime.busy_workers():
            # A worker still runs (stuck in C, or deaf to cancel): closing the engine
            # under it could crash or block.  Send what is queued, then leave at once.
            runtime.farewell()
            router.close()
            log.error("exiting with a worker still busy")
            os._exit(runtime.exit_status or 1)
        runtime.farewell()
        runtime.close()
        manager.close()
        router.close()
    log.info("stopped")
    return runtime.exit_status


if __name__ == "__main__":
    sys.exit(main())
