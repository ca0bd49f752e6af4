"""Pins kept by the gateway: on every instance that serves the model, through a manager killed
and restarted, and through a restart of the whole server (the data directory's pins.json).

A real `allm serve` with two text instances on the embedded SmolLM2; the manager is killed with
SIGKILL, as a crash would, and the supervisor starts it again.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from tests.integration.gateway_server import Server, running_server
from tests.waits import wait_for

MODEL = "smollm2-135m-instruct"
TOML = '[server]\ndata_dir = "{data}"\n\n[text]\ninstances = 2\n'


def text_rows(server: Server) -> list[dict[str, Any]]:
    status, body = server.json("GET", "/status")
    assert status == 200, body
    return [m for m in body["managers"] if m["modality"] == "text"]


def pinned_everywhere(server: Server) -> list[dict[str, Any]] | None:
    """The text instances, once each is live and holds the model pinned and loaded."""
    rows = text_rows(server)
    held = all(m["live"] and MODEL in m["pinned"] and MODEL in m["models"] for m in rows)
    return rows if len(rows) == 2 and held else None


def saved_pins(data: Path) -> list[str]:
    return json.loads((data / "pins.json").read_text())["pinned"]


def test_a_pin_holds_on_every_instance_through_a_crash_and_a_restart(tmp_path):
    data = tmp_path / "data"
    with running_server(TOML.format(data=data), tmp_path) as server:
        status, model = server.json("POST", f"/v1/models/{MODEL}/pin")
        assert (status, model["pinned"]) == (200, True), model
        rows = wait_for(lambda: pinned_everywhere(server), 60, "both instances to hold the pin")
        assert saved_pins(data) == [MODEL]

        # one instance dies as a crash kills it; the supervisor starts another, which the
        # gateway pins again (the new process knows nothing of the pin)
        victim = rows[0]
        os.kill(victim["pid"], signal.SIGKILL)

        def pinned_anew() -> list[dict[str, Any]] | None:
            again = pinned_everywhere(server)
            named = {m["name"]: m for m in again or []}
            return again if named and named[victim["name"]]["pid"] != victim["pid"] else None

        wait_for(pinned_anew, 120, "the restarted instance to be pinned again")

    # a new server on the same data directory pins it from the start
    with running_server(TOML.format(data=data), tmp_path) as server:
        wait_for(lambda: pinned_everywhere(server), 120, "the pin to be put back after a restart")
        status, model = server.json("POST", f"/v1/models/{MODEL}/unpin")
        assert (status, model["pinned"]) == (200, False)
        assert saved_pins(data) == []
        wait_for(
            lambda: all(MODEL not in m["pinned"] for m in text_rows(server)) or None,
            30,
            "the heartbeats to show the pin gone",
        )


def test_unloading_a_pinned_model_drops_its_pin_for_good(tmp_path):
    data = tmp_path / "data"
    with running_server(TOML.format(data=data), tmp_path) as server:
        assert server.json("POST", f"/v1/models/{MODEL}/pin")[0] == 200
        wait_for(lambda: pinned_everywhere(server), 60, "both instances to hold the pin")
        status, model = server.json("POST", f"/v1/models/{MODEL}/unload")
        assert (status, model["state"], model["pinned"]) == (200, "available", False), model
        assert saved_pins(data) == []
        # nothing puts it back: the instances stay without it
        wait_for(
            lambda: all(MODEL not in m["models"] for m in text_rows(server)) or None,
            30,
            "the heartbeats to show it unloaded",
        )
