"""allm under a real supervisord, with the repository's own supervisord.conf.

The file is copied beside a link to this checkout's .venv, so its %(here)s paths (sockets,
logs, the allm command) land in the test's directory; one program is added that crash-loops
(an image manager whose configuration is broken). The catalog: SmolLM2, a tiny whisper, and a
tiny Flux whose manager never comes up.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.image_files import write_tiny_flux
from tests.integration.gateway_server import ROOT, Server, free_port
from tests.model_files import smollm2_path
from tests.waits import wait_for
from tests.whisper_files import write_tiny_whisper

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# startsecs: far longer than the broken manager takes to exit, however loaded the machine (at 2 s
# a loaded machine let one attempt count as started, and it never went FATAL).
CRASHING = """
[program:crashing]
command=%(here)s/.venv/bin/allm manager image --config %(here)s/broken.toml
autostart=true
autorestart=unexpected
exitcodes=0
startsecs=15
startretries=2
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile=%(here)s/.logs/%(program_name)s.log
"""


class Daemon:
    def __init__(self, home: Path, port: int) -> None:
        self.home = home
        self.conf = home / "supervisord.conf"
        self.server = Server(None, port, None)  # type: ignore[arg-type]
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ALLM_")},
            "ALLM_CONFIG": str(home / "allm.toml"),
            "ALLM_PORT": str(port),
            "ALLM_LOG_LEVEL": "WARNING",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            [ROOT / ".venv/bin/supervisorctl", "-c", self.conf, *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
            check=False,
        )
        return done.stdout

    def live(self, *names: str) -> bool:
        """The gateway has heard from each of these manager instances (its /status says so)."""
        with contextlib.suppress(OSError):
            managers = {m["name"]: m for m in self.server.json("GET", "/status")[1]["managers"]}
            return all(managers[name]["live"] for name in names)
        return False

    def state(self, program: str) -> tuple[str, int | None]:
        """(STATE, pid) of a program, as supervisorctl status prints it."""
        line = self.ctl("status", program).split()
        pid = int(line[3].rstrip(",")) if len(line) > 3 and line[2] == "pid" else None
        return line[1], pid

    def wait_state(self, program: str, want: str, timeout_s: float = 60) -> int | None:
        state = wait_for(lambda: (s := self.state(program))[0] == want and s, timeout_s, f"{program} {want}")
        return state[1]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    home = tmp_path_factory.mktemp("daemon")
    shutil.copy(ROOT / "supervisord.conf", home / "supervisord.conf")
    with (home / "supervisord.conf").open("a") as conf:
        conf.write(CRASHING)
    (home / ".venv").symlink_to(ROOT / ".venv")
    for sub in (".run", ".logs"):
        (home / sub).mkdir(mode=0o700)
    whisper = write_tiny_whisper(home / "whisper.ggml")
    flux = write_tiny_flux(home / "flux")
    (home / "allm.toml").write_text(
        # a deadline well inside the HTTP client's: a request that waited for the absent manager
        # would end with timeout, not with manager_failed
        f'[server]\ndata_dir = "{home / "data"}"\nheartbeat_timeout_s = 2\nrequest_timeout_s = 30\n'
        f'[[models]]\nid = "smol"\npath = "{smollm2_path()}"\n'
        f'[[models]]\nid = "whisper"\nmodality = "audio"\npath = "{whisper}"\n'
        f'[[models]]\nid = "flux"\nmodality = "image"\npath = "{flux["diffusion_model"]}"\n'
        f'options = {{ clip_l = "{flux["clip_l"]}", taesd = "{flux["taesd"]}" }}\n'
    )
    (home / "broken.toml").write_text("[server]\nport = 'not a number'\n")
    daemon = Daemon(home, free_port())
    daemon.proc = subprocess.Popen(
        [ROOT / ".venv/bin/supervisord", "-n", "-c", daemon.conf], env=daemon.env, cwd=home
    )
    try:
        for program in ("allm:text", "allm:audio", "allm:gateway"):
            daemon.wait_state(program, "RUNNING")
        wait_for(lambda: daemon.live("text#0", "audio#0"), 60, "the gateway to hear text and audio")
        yield daemon
    finally:
        if daemon.proc.poll() is None:
            daemon.ctl("shutdown")
            try:
                daemon.proc.wait(60)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()


def chat(server: Server, max_tokens: int = 8) -> tuple[int, dict]:
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
    }
    return server.json("POST", "/v1/chat/completions", body)


def test_a_request_succeeds(daemon):
    status, reply = chat(daemon.server)
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"]


def test_the_text_manager_killed_mid_stream_is_the_coded_error_then_supervisord_restarts_it(daemon):
    before = daemon.wait_state("allm:text", "RUNNING")
    conn = http.client.HTTPConnection("127.0.0.1", daemon.server.port, timeout=120)
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Write a very long essay about rivers."}],
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    events = []
    while True:
        line = response.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            events.append(line[6:].strip())
            if len(events) == 3:
                psutil.Process(before).send_signal(signal.SIGKILL)
    conn.close()
    errors = [json.loads(e)["error"] for e in events if e.startswith(b'{"error"')]
    assert errors, events[-3:]
    assert errors[0]["code"] == "internal"  # a crash, as the fault table says, not a hang
    assert "process ended" in errors[0]["message"]
    after = daemon.wait_state("allm:text", "RUNNING")
    assert after != before
    wait_for(lambda: daemon.live("text#0"), 30, "the gateway to hear the new text manager")
    status, reply = chat(daemon.server)
    assert status == 200, reply


def test_the_shipped_image_program_starts_by_hand_and_serves_images(daemon):
    # Not with the group (the default catalog has no image model): started by hand, it serves
    # the catalog's image model, and stops again cleanly.
    assert daemon.state("allm:image")[0] == "STOPPED"
    assert "started" in daemon.ctl("start", "allm:image")
    try:
        daemon.wait_state("allm:image", "RUNNING")
        wait_for(lambda: daemon.live("image#0"), 60, "the gateway to hear the image manager")
        body = {"model": "flux", "prompt": "a red square", "size": "64x64", "steps": 2}
        status, reply = daemon.server.json("POST", "/v1/images/generations", body)
        assert status == 200, reply
        assert reply["data"][0]["b64_json"] or reply["data"][0]["url"]
    finally:
        daemon.ctl("stop", "allm:image")
    daemon.wait_state("allm:image", "STOPPED")


def test_a_crash_looping_manager_goes_fatal_and_its_requests_fail_fast_and_clearly(daemon):
    daemon.wait_state("crashing", "FATAL", timeout_s=90)
    # The first request waits for the gateway to give the modality up (twice the heartbeat
    # timeout without a word from it), far inside its 30 s deadline: waiting on would have been
    # a timeout. Given up, the gateway refuses the next one at once, the same way.
    for _ in range(2):
        status, reply = daemon.server.json("POST", "/v1/images/generations", {"model": "flux", "prompt": "x"})
        assert status == 503
        assert reply["error"]["code"] == "manager_failed"
        assert "is `allm manager image` running?" in reply["error"]["message"]
    assert chat(daemon.server)[0] == 200  # the others serve on


def program_family(daemon) -> list[psutil.Process]:
    pids = [daemon.state(p)[1] for p in ("allm:text", "allm:audio", "allm:gateway")]
    assert all(pids)
    family = [psutil.Process(pid) for pid in pids]
    return family + [c for p in family for c in p.children(recursive=True)]


def test_stop_all_then_supervisords_own_shutdown_leave_no_process_behind(daemon):
    family = program_family(daemon)
    assert "stopped" in daemon.ctl("stop", "all").lower()
    _gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.cmdline() for p in alive]

    daemon.ctl("start", "allm:*")
    for program in ("allm:text", "allm:audio", "allm:gateway"):
        daemon.wait_state(program, "RUNNING")
    family = program_family(daemon)
    daemon.ctl("shutdown")  # with everything running
    assert daemon.proc.wait(60) == 0
    _gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    assert not psutil.Process().children(recursive=True)
