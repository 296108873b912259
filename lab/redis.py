"""A private redis-server for the lab and the tests: unix socket in a temporary folder, AOF on
request, stopped and removed on exit."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis


class RedisServerError(RuntimeError):
    pass


class RedisServer:
    def __init__(self, *, aof: bool = False, workdir: Path | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise RedisServerError("redis-server is not installed (Debian: apt-get install redis-server)")
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="stepstone-redis-"))
        self.socket = self.dir / "redis.sock"
        self.aof = aof
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> None:
        args = [
            "redis-server", "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "777",
            "--dir", str(self.dir), "--save", "", "--appendonly", "yes" if self.aof else "no",
            "--appendfsync", "always", "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis(unix_socket_path=str(self.socket))
        try:
            while True:
                if self.proc.poll() is not None:
                    log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                    raise RedisServerError(f"redis-server exited with {self.proc.returncode}: {log}")
                try:
                    # Wait for the AOF to be loaded, not only for the socket to accept.
                    if client.ping() and client.info("persistence").get("loading") == 0:
                        return
                except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
                    pass
                if time.monotonic() > deadline:
                    raise RedisServerError("redis-server did not come up in time")
                time.sleep(0.02)  # polling a condition, not synchronising on time
        finally:
            client.close()

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop(kill=True)
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.dir)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
