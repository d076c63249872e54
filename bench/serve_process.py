"""A real `fuseflow serve` in a subprocess, and plain-HTTP clients for it (tests, bench)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port(exclude: tuple[int, ...] = ()) -> int:
    """A port nothing listens on, not in `exclude`, below the ephemeral range (bind(0)
    draws from that range, and so does every server Ray starts: one of them could take a
    port drawn from it before fuseflow serve binds it) and above Ray's worker ports
    (10002-19999)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(low, 20001))
        if port in exclude:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port between 20000 and the ephemeral range")


def http(port: int, method: str, path: str, body=None, raw: bytes | None = None,
         timeout: float = 120) -> tuple[int, dict | str]:
    """One request; returns (status, parsed JSON body, or text when not JSON)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


class ServeProcess:
    """`with ServeProcess([... "serve", ...]) as s: s.post(...)`: starts the command with a
    free --port, waits for /healthz, and on exit stops it with SIGTERM (Ray shuts down)."""

    def __init__(self, command: list, cwd=None, env=None, startup_timeout: float = 300):
        self.port = free_port()
        self.command = [str(c) for c in command] + ["--port", str(self.port),
                                                    "--host", "127.0.0.1"]
        # a free gRPC port too, unless the command names one: side-by-side servers must
        # not all claim TF Serving's 8500
        self.grpc_port = free_port((self.port,)) if "--grpc-port" not in self.command else None
        if self.grpc_port:
            self.command += ["--grpc-port", str(self.grpc_port)]
        self.cwd, self.env, self.startup_timeout = cwd, env, startup_timeout
        self.log_path: Path | None = None

    def __enter__(self) -> ServeProcess:
        self.start()
        return self.wait_healthy()

    def start(self) -> None:
        import tempfile

        self.log_path = Path(tempfile.mkstemp(prefix="fuseflow-serve-", suffix=".log")[1])
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self) -> ServeProcess:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fuseflow serve exited {self.proc.returncode}:\n"
                                   f"{self.log()[-4000:]}")
            try:
                status, _ = http(self.port, "GET", "/healthz", timeout=5)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"fuseflow serve not healthy after {self.startup_timeout} s:\n"
                           f"{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def get(self, path: str, **kw):
        return http(self.port, "GET", path, **kw)

    def post(self, path: str, body=None, **kw):
        return http(self.port, "POST", path, body, **kw)


def fuseflow_command() -> list[str]:
    script = Path(sys.executable).parent / "fuseflow"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fuseflow.cli"]
