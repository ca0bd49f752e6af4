"""The allm command line: ``allm serve`` runs the gateway, the supervisor and the managers."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from allm.gateway.config import ConfigError, load


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="allm", description="A local inference server behind the OpenAI APIs."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the HTTP API with every manager, on this host")
    serve.add_argument("--config", type=Path, help="TOML file: [server], [text], [[models]] (or ALLM_CONFIG)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1; ALLM_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080; ALLM_PORT)")
    serve.add_argument("--data-dir", help="where stored responses live (ALLM_DATA_DIR)")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=os.environ.get("ALLM_LOG_LEVEL", "INFO"),
        format="%(asctime)s gateway %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load(args.config, flags={"host": args.host, "port": args.port, "data_dir": args.data_dir})
    except ConfigError as exc:
        print(f"allm: {exc}", file=sys.stderr)
        return 2

    from allm.gateway.app import create_app

    app = create_app(config)
    print(
        f"allm: serving {', '.join(m.id for m in config.models)} on http://{config.host}:{config.port}",
        flush=True,
    )
    app.run(host=config.host, port=config.port, single_process=True, access_log=False, motd=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
