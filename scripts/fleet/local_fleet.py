#!/usr/bin/env python3
"""A fleet on one machine: N emulated board/serve.py servers on loopback ports behind a real HAProxy
running scripts/fleet/haproxy.cfg (its `server boardN` lines replaced by the local servers).

    .venv/bin/python scripts/fleet/local_fleet.py --bundle out/bundle --servers 3   # prints the URL; Ctrl-C stops
    .venv/bin/python -m board batch --server http://127.0.0.1:PORT --concurrency 6 --images DIR --prompt ... \
        --out r.jsonl

Why it exists: to try the fleet recipe without boards, and as the one place the fleet test
(tests/test_fleet.py) and the throughput benchmark (scripts/bench_fleet.py) start one. It needs the
`haproxy` binary (Debian/Ubuntu: apt-get install haproxy; scripts/setup.sh installs it where it can).
Each server is `board/serve.py --emulate --port 0`, so on x86 this measures this computer, not a board.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent.parent
TEMPLATE = ROOT / "scripts" / "fleet" / "haproxy.cfg"
_SERVER_LINE = re.compile(r"^(\s*)server\s+board\S*\s")


class FleetError(Exception):
    """The fleet could not start (no haproxy, a server that did not come up, ...)."""


def haproxy_binary() -> Optional[str]:
    """The haproxy command, also where Debian puts it outside a normal user's PATH."""
    found = shutil.which("haproxy")
    if found is None and os.access("/usr/sbin/haproxy", os.X_OK):
        found = "/usr/sbin/haproxy"
    return found


def render_config(template: str, servers: Sequence[tuple[str, str]]) -> str:
    """The template with its `server boardN ADDRESS` lines replaced by `servers` (name, host:port)."""
    out: list[str] = []
    replaced = False
    for line in template.splitlines(keepends=True):
        match = _SERVER_LINE.match(line)
        if match is None:
            out.append(line)
        elif not replaced:
            replaced = True
            out += [f"{match.group(1)}server {name} {address}\n" for name, address in servers]
    if not replaced:
        raise FleetError("the HAProxy template has no 'server boardN ...' lines to replace")
    return "".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One `board/serve.py --emulate --port 0` process and what it printed."""

    name: str
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    url: Optional[str] = None
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        assert self.url is not None
        return self.url.removeprefix("http://")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.url is None and "listening on http://" in line:
                self.url = line.split("listening on ")[1].split()[0]
                self.ready.set()
        self.ready.set()  # the process ended (before or after listening)


def start_server(name: str, bundle: Path, serve_args: Sequence[str] = ()) -> Server:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    proc = subprocess.Popen([sys.executable, str(ROOT / "board" / "serve.py"), "--bundle", str(bundle), "--emulate",
                             "--port", "0", "--quiet", *serve_args], stderr=subprocess.PIPE, text=True, env=env)
    server = Server(name, proc)
    threading.Thread(target=server._drain, daemon=True).start()
    return server


class LocalFleet:
    """Servers + HAProxy, started by `start()` and stopped by `close()` (or as a context manager)."""

    def __init__(self, bundle: Path, servers: int = 3, *, serve_args: Sequence[str] = (), timeout: float = 180.0):
        self.bundle = Path(bundle)
        self.count = servers
        self.serve_args = list(serve_args)
        self.timeout = timeout
        self.servers: dict[str, Server] = {}
        self.haproxy: Optional[subprocess.Popen] = None
        self._dir = Path(tempfile.mkdtemp(prefix="smolvlm-fleet-"))
        self.port = self.stats_port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def haproxy_log(self) -> str:
        path = self._dir / "haproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> "LocalFleet":
        binary = haproxy_binary()
        if binary is None:
            raise FleetError("haproxy is not installed (Debian/Ubuntu: apt-get install haproxy)")
        try:
            for i in range(1, self.count + 1):
                self.servers[f"board{i}"] = start_server(f"board{i}", self.bundle, self.serve_args)
            deadline = time.monotonic() + self.timeout
            for server in self.servers.values():
                if not server.ready.wait(max(0.0, deadline - time.monotonic())) or server.url is None:
                    raise FleetError(f"{server.name} did not start:\n" + "".join(server.lines[-20:]))
            config = self._dir / "haproxy.cfg"
            config.write_text(render_config(TEMPLATE.read_text(),
                                            [(s.name, s.address) for s in self.servers.values()]))
            self.port, self.stats_port = free_port(), free_port()
            env = {**os.environ, "FLEET_BIND": f"127.0.0.1:{self.port}",
                   "FLEET_STATS_BIND": f"127.0.0.1:{self.stats_port}"}
            with open(self._dir / "haproxy.log", "w") as log:
                self.haproxy = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=log, env=env)
            self.wait_until(lambda stats: all(s.get("status") == "UP" for s in stats.values())
                            and len(stats) == self.count, "every board UP in HAProxy")
        except BaseException:
            self.close()
            raise
        return self

    def stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's statistics for each board (status, hrsp_2xx, stot, ...), from its CSV page."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5) as response:
            text = response.read().decode()
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == "boards" and row["svname"] in self.servers}

    def wait_until(self, condition, what: str, timeout: float = 60.0) -> dict[str, dict[str, str]]:
        deadline = time.monotonic() + timeout
        stats: dict[str, dict[str, str]] = {}
        while time.monotonic() < deadline:
            if self.haproxy is not None and self.haproxy.poll() is not None:
                raise FleetError(f"haproxy exited ({self.haproxy.returncode}):\n{self.haproxy_log}")
            try:
                stats = self.stats()
            except OSError:
                stats = {}
            if stats and condition(stats):
                return stats
            time.sleep(0.1)
        raise FleetError(f"timed out waiting for {what}: {stats}")

    def kill(self, name: str) -> None:
        """Stop one server the hard way (a board losing power mid-request)."""
        self.servers[name].proc.send_signal(signal.SIGKILL)
        self.servers[name].proc.wait(30)

    def close(self) -> None:
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.send_signal(signal.SIGTERM)
            try:
                self.haproxy.wait(15)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait()
        for server in self.servers.values():
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in self.servers.values():
            try:
                server.proc.wait(60)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "LocalFleet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the fleet as Ctrl-C does


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="N emulated board/serve.py servers behind HAProxy on this machine "
                                     "(until Ctrl-C).", epilog="Arguments after -- go to every board/serve.py.")
    parser.add_argument("--bundle", required=True, help="the bundle folder (with its host/ files, for --emulate)")
    parser.add_argument("--servers", type=int, default=3, help="how many servers (3)")
    args, rest = parser.parse_known_args(argv)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    try:
        with LocalFleet(Path(args.bundle), args.servers, serve_args=rest) as fleet:
            print(f"fleet of {args.servers}: OpenAI base URL {fleet.url}/v1, statistics "
                  f"http://127.0.0.1:{fleet.stats_port}/stats (Ctrl-C stops)", file=sys.stderr, flush=True)
            signal.signal(signal.SIGTERM, _interrupt)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except FleetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
