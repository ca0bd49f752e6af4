"""Codex CLI and Claude Code, the agent CLIs people point at a local server, against `allm serve`.

Each is the npm package at the exact version clients-npm.lock names, which scripts/setup installs
outside the repository; a missing one fails its test. They run as their users run them (a Codex
provider with `wire_api = "responses"`; Claude Code with ANTHROPIC_BASE_URL), in a network
namespace with only loopback (netns.py): nothing they do can leave this machine, and the test
checks that they tried to reach nothing but allm. SmolLM2-135M's answers are not judged, the
protocol is: the client's exit status and its own events, and allm's status for every request.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.clients.netns import isolated, relay_to
from tests.integration.gateway_server import ROOT, Server, running_server

MODEL = "smollm2-135m-instruct"
PROMPT = "Say hello in one short sentence."
#: a whole agent turn on SmolLM2 (Codex's prompt is ~5,000 tokens) takes minutes on 2 busy cores
TURN_TIMEOUT_S = 600
NPM_LOCK = ROOT / "clients-npm.lock"
#: the main environment's CLI, as conftest.py's server runs it
ALLM = ROOT / ".venv" / "bin" / "allm"
ACCESS = re.compile(r"allm\.access \[\S+\]: (?P<method>[A-Z]+) (?P<path>\S+) .*\bstatus=(?P<status>\d+)")
#: Codex's own instructions are ~4,000 tokens: with them its first request (~9,600 tokens) would not
#: fit SmolLM2's 8,192-token training context. A short stand-in keeps every tool and field it sends.
CODEX_INSTRUCTIONS = "You are a coding agent running in a terminal. Answer briefly."


def npm_cli(command: str) -> Path:
    """The installed CLI clients-npm.lock names `command`, in scripts/setup's npm cache."""
    cache = Path(
        os.environ.get("ALLM_NPM_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "allm" / "npm"
    )
    for line in NPM_LOCK.read_text().splitlines():
        if line and not line.startswith("#") and line.split()[1] == command:
            spec = line.split()[0]
            path = cache / spec / "node_modules" / ".bin" / command
            if not path.is_file():
                raise RuntimeError(f"{spec} is not installed at {path}: run scripts/setup")
            return path
    raise RuntimeError(f"{NPM_LOCK.name} names no package for {command!r}")


def smollm2_path() -> str:
    """The embedded SmolLM2, found as tests/model_files.py finds it, in the main environment."""
    found = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "python"),
            "-c",
            "from tests.model_files import smollm2_path as p; print(p())",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return found.stdout.strip()


@dataclass
class Served:
    server: Server
    log: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """`allm serve` on SmolLM2 with room for an agent's prompt, its access lines in a log."""
    if not ALLM.is_file():
        raise RuntimeError(f"{ALLM} is missing: run scripts/setup")
    tmp = tmp_path_factory.mktemp("agents")
    config = (
        f'[server]\ndata_dir = "{tmp / "data"}"\n\n'
        f'[[models]]\nid = "{MODEL}"\npath = "{smollm2_path()}"\noptions = {{ n_ctx = 8192 }}\n'
    )
    log = tmp / "allm.log"
    with running_server(config, tmp, allm=ALLM, log=log) as server:
        yield Served(server, log)


@dataclass
class Run:
    proc: subprocess.CompletedProcess[str]
    #: (method, path, status) of each request allm answered while the client ran
    requests: list[tuple[str, str, int]]
    #: what the client asked the proxy door for: hosts beyond this machine
    attempts: list[str]

    def explain(self) -> str:
        return (
            f"exit {self.proc.returncode}; allm answered {self.requests}; tried {self.attempts}\n"
            f"stdout: {self.proc.stdout[-3000:]}\nstderr: {self.proc.stderr[-3000:]}"
        )


def settled(server: Server) -> None:
    """Until allm holds no request but the one asking: each access line is then written."""
    deadline = time.monotonic() + 60
    while server.json("GET", "/status")[1]["server"]["in_flight"] > 1:
        if time.monotonic() > deadline:
            raise AssertionError("allm still holds requests a minute after the client exited")
        time.sleep(0.05)


def run_isolated(served: Served, argv: list[str], env: dict[str, str], cwd: Path) -> Run:
    """`argv` in a namespace with only loopback, 127.0.0.1:<allm's port> leading to allm."""
    start = served.log.stat().st_size
    # a short directory: a Unix socket's path holds at most 107 bytes
    with tempfile.TemporaryDirectory(prefix="allm-ns-") as short:
        sock, attempts = Path(short) / "allm.sock", Path(short) / "attempts"
        with relay_to(served.server.port, sock):
            proc = subprocess.run(
                isolated(sock, port=served.server.port, attempts=attempts, argv=argv),
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=TURN_TIMEOUT_S,
                check=False,
            )
        tried = attempts.read_text().splitlines() if attempts.exists() else []
    settled(served.server)
    with served.log.open() as f:
        f.seek(start)
        lines = f.read().splitlines()
    requests = [
        (m["method"], m["path"], int(m["status"]))
        for m in map(ACCESS.search, lines)
        if m and m["path"] != "/status"
    ]
    return Run(proc, requests, tried)


def assert_only_200s_on(run: Run, path: str) -> None:
    assert any(p == path for _m, p, _s in run.requests), f"no request reached {path}: {run.explain()}"
    failed = [r for r in run.requests if r[2] >= 400]
    assert not failed, f"allm answered with errors: {run.explain()}"
    assert not run.attempts, f"the client tried to reach beyond this machine: {run.explain()}"


def quiet_env(home: Path) -> dict[str, str]:
    """A home of its own (no user's settings), and the PATH the CLIs need to find node."""
    home.mkdir()
    return {"HOME": str(home), "PATH": os.environ["PATH"], "LANG": "C.UTF-8", "TERM": "dumb"}


@pytest.mark.timeout(TURN_TIMEOUT_S + 120)
def test_codex_exec_completes_a_turn_over_the_responses_api(served, tmp_path):
    codex = npm_cli("codex")
    codex_home = tmp_path / "codex-home"
    codex_home.mkdir()
    instructions = tmp_path / "instructions.md"
    instructions.write_text(CODEX_INSTRUCTIONS)
    (codex_home / "config.toml").write_text(
        f"""\
model = "{MODEL}"
model_provider = "allm"
approval_policy = "never"
sandbox_mode = "read-only"
check_for_update_on_startup = false
model_instructions_file = "{instructions}"

[model_providers.allm]
name = "allm"
base_url = "{served.server.base_url}/v1"
wire_api = "responses"
env_key = "ALLM_API_KEY"
# a refused request fails at once, not after five tries with backoff
request_max_retries = 0
stream_max_retries = 0

[features]
plugins = false   # on, it fetches the plugin catalog from github.com

[analytics]
enabled = false
"""
    )
    env = {**quiet_env(tmp_path / "home"), "CODEX_HOME": str(codex_home), "ALLM_API_KEY": "unused"}
    work = tmp_path / "work"
    work.mkdir()
    argv = [str(codex), "exec", "--json", "--strict-config", "--skip-git-repo-check", "--ephemeral"]
    run = run_isolated(served, [*argv, "--sandbox", "read-only", "--color", "never", PROMPT], env, work)

    assert run.proc.returncode == 0, run.explain()
    events = [json.loads(line) for line in run.proc.stdout.splitlines() if line.startswith("{")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "thread.started", run.explain()
    assert "turn.started" in kinds, run.explain()
    assert kinds[-1] == "turn.completed", run.explain()
    assert not {"turn.failed", "error"} & set(kinds), run.explain()
    # usage comes back from the Responses API's completed event
    assert events[-1]["usage"]["input_tokens"] > 0, events[-1]
    assert_only_200s_on(run, "/v1/responses")


@pytest.mark.timeout(TURN_TIMEOUT_S + 120)
def test_claude_code_print_mode_completes_a_turn_over_the_messages_api(served, tmp_path):
    claude = npm_cli("claude")
    home = tmp_path / "home"
    env = {
        **quiet_env(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "ANTHROPIC_BASE_URL": served.server.base_url,
        "ANTHROPIC_AUTH_TOKEN": "unused",
        "ANTHROPIC_API_KEY": "unused",  # --bare reads only this one
        # the small model Claude Code asks for side jobs is the served one too
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL,
        "ANTHROPIC_SMALL_FAST_MODEL": MODEL,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_NON_ESSENTIAL_MODEL_CALLS": "1",
        # Claude Code asks for 32,000 tokens a reply; SmolLM2 once wrote 7,657 before a call, and
        # the next turn's prompt no longer fit the 8,192 context (a 400, rightly)
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "256",
    }
    work = tmp_path / "work"
    work.mkdir()
    # --bare: no hooks, plugin sync, prefetches or CLAUDE.md discovery; one tool (Read), allowed
    argv = [str(claude), "--bare", "-p", PROMPT, "--model", MODEL, "--tools", "Read"]
    argv += ["--allowedTools", "Read", "--permission-mode", "dontAsk"]
    run = run_isolated(served, [*argv, "--output-format", "json", "--no-session-persistence"], env, work)

    assert run.proc.returncode == 0, run.explain()
    result = json.loads(run.proc.stdout)
    assert result["type"] == "result", result
    assert (result["subtype"], result["is_error"]) == ("success", False), result
    assert isinstance(result["result"], str), result
    assert_only_200s_on(run, "/v1/messages")


def test_the_agent_clients_have_no_route_off_this_machine(served, tmp_path):
    # the namespace itself: a connection to a public address fails there, with no proxy to catch it
    probe = "import socket; socket.create_connection(('1.1.1.1', 443), timeout=5)"
    python = str(ROOT / ".venv-clients" / "bin" / "python")
    run = run_isolated(served, [python, "-c", probe], quiet_env(tmp_path / "home"), tmp_path)
    assert run.proc.returncode != 0, run.explain()
    assert "Network is unreachable" in run.proc.stderr, run.explain()
