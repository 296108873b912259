"""A private Redis Cluster on loopback for the tests and the lab: M masters (and R replicas each),
each a redis-server with `--cluster-enabled yes` in its own folder of one temporary directory,
joined with `redis-cli --cluster create`; every process stopped and the directory removed on exit.

Set up as docs/cluster.md recommends: `cluster-require-full-coverage no` (a dead master without a
replica stops its own slots only, not the whole cluster) and a short node timeout (failover in
about a second, not fifteen).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.cluster import key_slot


class ClusterError(RuntimeError):
    pass


def unavailable_reason() -> str | None:
    """Why no local cluster can run here (None: it can)."""
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    out = subprocess.run(["redis-cli", "--cluster", "help"], capture_output=True, text=True, check=False)
    if "create" not in out.stdout + out.stderr:
        return "redis-cli has no --cluster support"
    return None


def _free_pair() -> int:
    """A port P with P + 10000 (its cluster bus) free too, on loopback."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 >= 65536:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise ClusterError("no free port pair for a cluster node")


class LocalCluster:
    def __init__(self, *, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000) -> None:
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.dir = Path(tempfile.mkdtemp(prefix="stepstone-cluster-"))
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """Every node as a seed: a client (re)started while one is down finds the others."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def _node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, decode_responses=True)

    def start(self, timeout: float = 30.0) -> None:
        for _ in range(self.masters * (1 + self.replicas)):
            port = _free_pair()
            folder = self.dir / str(port)
            folder.mkdir()
            self.procs[port] = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", str(self.node_timeout_ms),
                 "--cluster-require-full-coverage", "no", "--appendonly", "no", "--save", "",
                 "--daemonize", "no", "--logfile", str(folder / "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.ports.append(port)
        deadline = time.monotonic() + timeout
        for port in self.ports:
            self._until(lambda p=port: self._node(p).ping(), deadline, f"node {port} up")
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout, check=False)
        if create.returncode != 0:
            raise ClusterError(f"redis-cli --cluster create failed: {create.stdout[-500:]} "
                               f"{create.stderr[-500:]}")
        self._until(self._ready, deadline, "the cluster ready")

    def _ready(self) -> bool:
        """Every node knows every other, says ok, and every replica is in sync with its master."""
        for port in self.alive():
            node = self._node(port)
            info = node.cluster("info")
            known = int(info.get("cluster_known_nodes", 0))
            if info.get("cluster_state") != "ok" or known != len(self.ports):
                return False
            repl = node.info("replication")
            if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                return False
            if repl.get("role") == "master" and int(repl.get("connected_slaves", 0)) < self.replicas:
                return False
        return True

    @staticmethod
    def _until(check: object, deadline: float, what: str) -> None:
        while True:
            try:
                if check():  # type: ignore[operator]
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}")
            time.sleep(0.05)  # polling a condition, not synchronising on time

    def alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def master_of(self, key: str) -> int:
        """The port of the master serving `key`'s slot now."""
        slot = key_slot(key.encode())
        for port in self.alive():
            with contextlib.suppress(redis.RedisError, OSError):
                for start, end, master, *_ in self._node(port).execute_command("CLUSTER SLOTS"):
                    if start <= slot <= end:
                        return int(master[1])
        raise ClusterError(f"no node serves slot {slot}")

    def calls(self, port: int, command: str) -> int:
        """How often node `port` has run `command` (INFO commandstats)."""
        stats = self._node(port).info("commandstats")
        return int(stats.get(f"cmdstat_{command.lower()}", {}).get("calls", 0))

    def kill(self, port: int) -> None:
        """SIGKILL: the node is gone with whatever it had not replicated."""
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def wait_failover(self, key: str, dead: int, timeout: float = 30.0) -> int:
        """Until a live master serves `key`'s slot (a replica took over from `dead`); its port."""
        deadline = time.monotonic() + timeout
        found: list[int] = []

        def moved() -> bool:
            port = self.master_of(key)
            if port == dead:
                return False
            info = self._node(port).cluster("info")
            found.append(port)
            return info.get("cluster_state") == "ok"

        self._until(moved, deadline, "the failover")
        return found[-1]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
