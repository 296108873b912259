"""A lab run: build the virtual Internet, start Redis, the responder, the analyzer and a prober in
it, drive the scenario traffic, wait for the verdicts, and report. Everything is torn down on
every exit path (`Lab.close`, called from `finally`).

The e2e tests drive the same `Lab` step by step (and kill components in between); the demo is
`run_demo`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TextIO

import redis

from lab import report, zeekcluster
from lab.netns import PREFIX as NETNS_PREFIX
from lab.netns import Network, unavailable_reason
from lab.process import Child, Children, LabError, wait_for
from lab.redis import RedisServer, RedisServerError
from lab.scenarios import CLIENT_PORTS, Scenarios
from lab.topology import LISTEN_PORTS, PROXY_BASE_PORT, SENSOR_ADDR, SOCKS_PORT, Topology

PREFIX = "stepstone:"
ALLOW = "198.18.0.0/15"
ZEEK_WS_PORT = 9997
ZEEK_SCRIPTS = Path(__file__).resolve().parents[1] / "zeek-scripts"
# The responder's banners on server-first ports, used when a scenario host runs a server-first client.
BANNERS = Path(__file__).with_name("banners.toml")
# Programs the proxy scenarios run, and the Debian package of each (apt-installed when missing).
PROXY_PROGRAMS = {"proxy": ("socat", "socat"), "socat": ("socat", "socat"),
                  "socks": ("microsocks", "microsocks")}
# "zeek-cluster": a manager and two workers sharing the interface by AF_PACKET fanout (lab/zeekcluster.py).
Sensor = Literal["responder", "zeek", "zeek-cluster"]


def default_sensor() -> Sensor:
    """Zeek when a zeek binary is on PATH (the operators' setup), else the built-in responder."""
    return "zeek" if shutil.which("zeek") else "responder"


def preflight(scenarios: Scenarios, sensor: Sensor = "responder") -> None:
    """Refuse clearly, before building anything, when the machine cannot run the lab."""
    if os.geteuid() != 0:
        raise LabError("needs root: network namespaces, TUN devices and nftables "
                       "(run scripts/demo as root, or through sudo)")
    tools = ["ip", "nft", "redis-server"]
    install_missing(sorted({PROXY_PROGRAMS[h.kind] for h in scenarios.hosts if h.kind in PROXY_PROGRAMS}))
    if sensor != "responder":
        tools.append("zeek")
        if not (ZEEK_SCRIPTS / "__load__.zeek").is_file():
            raise LabError(f"--sensor zeek: the Zeek package is not at {ZEEK_SCRIPTS}")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise LabError(f"missing programs: {', '.join(missing)} (run scripts/install, or apt-get install "
                       "iproute2 nftables redis-server socat)")
    if not os.path.exists("/dev/net/tun"):
        raise LabError("no /dev/net/tun: this kernel lacks TUN (modprobe tun), which the delay lines need")
    reason = unavailable_reason()
    if reason:
        raise LabError(reason)
    with Network() as probe:
        ns = probe.add("chk")
        try:
            ns.run("nft", "-f", "-", input="table inet stepstone_check {\n chain c { type nat hook "
                   "prerouting priority dstnat; policy accept; }\n}\n")
        except Exception as exc:
            raise LabError(f"nftables does not work in a network namespace here: {exc}") from None


def install_missing(programs: list[tuple[str, str]]) -> None:
    """apt-get install the packages of the proxy programs that are missing (the proxy scenarios are
    not in scripts/install's list: only the lab needs them); one clear error if that fails."""
    missing = sorted({pkg for prog, pkg in programs if shutil.which(prog) is None})
    if not missing:
        return
    if shutil.which("apt-get") is not None:
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
        for step in ([install], [["apt-get", "update", "-qq"], install]):  # the package lists may be stale
            if all(subprocess.run(cmd, env=env, check=False, capture_output=True).returncode == 0
                   for cmd in step):
                break
    still = [prog for prog, _ in programs if shutil.which(prog) is None]
    if still:
        raise LabError(f"the proxy scenarios need {', '.join(sorted(set(still)))} and apt-get could not "
                       f"install {' '.join(missing)}: install it, or leave those scenarios out")


def uses_banners(scenarios: Scenarios) -> bool:
    """Whether some host runs a server-first client: then the responder sends banners (lab/banners.toml)."""
    return any(h.client is not None for h in scenarios.hosts)


class Lab:
    """One lab run. Use as a context manager; `close()` is idempotent and removes everything."""

    def __init__(self, scenarios: Scenarios, *, workdir: Path | None = None, seed: int = 1,
                 progress: TextIO | None = None, dedup_window: float = 5.0,
                 sensor: Sensor = "responder", zeek_backend: zeekcluster.Backend = "broker") -> None:
        # With Zeek as the sensor the responder still answers the SYNs, but Zeek reports them.
        self.sensor = sensor
        self.zeek_backend = zeek_backend  # the cluster backend of sensor "zeek-cluster"
        self.scenarios = scenarios
        self.own_workdir = workdir is None
        # Short path: the Redis unix socket path must stay under 108 bytes.
        self.net = Network()
        # Named after the namespaces' prefix, so `stepstone-lab clean --prefix` finds both.
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{NETNS_PREFIX}{self.net.tag}-lab-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logdir = self.workdir / "logs"
        self.logdir.mkdir(exist_ok=True)
        self.procdir = self.workdir / "proc"
        self.procdir.mkdir(exist_ok=True)
        self.seed = seed
        self.rng = random.Random(seed)
        self.out = progress
        self.dedup_window = dedup_window
        self.redis_server = RedisServer(aof=True, workdir=self.workdir / "redis")
        self.children = Children(self.procdir)
        self.topology = Topology(scenarios, self.net, self.children)
        self.traffic: dict[str, list[Child]] = {}  # source address -> its drivers
        self.started = time.monotonic()
        self.services: dict[str, Child] = {}  # the current process of each service
        self._client: redis.Redis | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def say(self, text: str) -> None:
        if self.out is not None:
            print(f"[{time.monotonic() - self.started:5.1f}s] {text}", file=self.out, flush=True)

    def build(self) -> None:
        (self.workdir / "redis").mkdir(exist_ok=True)
        self.say("starting redis-server (unix socket, AOF)")
        try:
            self.redis_server.start()
        except RedisServerError as exc:
            raise LabError(str(exc)) from None
        self._client = redis.Redis(unix_socket_path=str(self.redis_server.socket), decode_responses=True)
        n = len(self.scenarios.hosts)
        relays = sum(h.kind != "direct" for h in self.scenarios.hosts)
        self.say(f"building the network (namespaces sst{self.net.tag}*): router, sensor, prober, {n} hosts, "
                 f"{relays} attackers behind relays")
        self.topology.build()

    @property
    def client(self) -> redis.Redis:
        assert self._client is not None, "build() first"
        return self._client

    def start_services(self) -> None:
        sensor = self.topology.sensor
        assert sensor is not None
        if self.sensor != "responder":
            # Zeek first: the analyzer connects to its WebSocket.
            self.start_service("zeek")
            wait_for(lambda: ZEEK_WS_PORT in _listening(sensor), 60, "Zeek's WebSocket listener",
                     alive=self.service_died)
        for name in ("responder", "analyzer", "prober"):
            self.start_service(name)
        self.say("waiting for the responder, the analyzer and the prober")
        wait_for(lambda: sensor.run("nft", "list", "table", "inet", "stepstone_responder", check=False),
                 20, "the responder's nftables table", alive=self.service_died)
        wait_for(lambda: self._has_group("handshakes", "analyzers"), 30, "the analyzer's consumer group",
                 alive=self.service_died)
        wait_for(lambda: self._has_group("jobs", "probers"), 30, "the prober's consumer group",
                 alive=self.service_died)

    def service_died(self) -> str | None:
        for child in self.services.values():
            if reason := child.exited():
                return reason
        return None

    def _has_group(self, stream: str, group: str) -> bool:
        try:
            return any(g["name"] == group for g in self.client.xinfo_groups(PREFIX + stream))
        except redis.ResponseError:
            return False  # the stream does not exist yet

    def service_args(self, name: str) -> list[str]:
        url = self.redis_server.url
        darknet = str(self.scenarios.darknet)
        if name == "responder":
            report = ["--redis", url, "--prefix", PREFIX] if self.sensor == "responder" else []
            # With Zeek as the sensor the responder still sends the banners, and Zeek sees them leave.
            banners = ["--banners", str(BANNERS)] if uses_banners(self.scenarios) else []
            return ["-m", "responder.cli", "run", "--darknet", darknet, *report, *banners]
        if name == "analyzer":
            feed = (["--handshakes"] if self.sensor == "responder" else
                    ["--zeek", f"ws://{SENSOR_ADDR}:{ZEEK_WS_PORT}/v1/messages/json"])
            return ["-m", "analyzer.cli", "run", *feed, "--redis", url, "--prefix", PREFIX,
                    "--log-dir", str(self.logdir), "--consumer", "lab-analyzer", "--darknet", darknet,
                    "--dedup-window", str(self.dedup_window), "--claim-after", "5"]
        if name == "zeek":
            site = self.workdir / "lab-site.zeek"
            site.write_text(f"redef StepStone::darknet_subnets += {{ {darknet} }};\n"
                            f"redef StepStone::websocket_addr = {SENSOR_ADDR};\n"
                            f"redef StepStone::websocket_port = {ZEEK_WS_PORT}/tcp;\n"
                            # Zeek < 7.2 serves its WebSocket over TLS only unless told otherwise;
                            # the analyzer connects with ws:// (see zeek-scripts/transport.zeek).
                            "redef Broker::disable_ssl = T;\n"
                            # JSON logs: the lab reads notice.log and stepstone.log back.
                            "redef LogAscii::use_json = T;\n")
            return ["zeek", "-C", "-i", self.topology.sensor_if, str(ZEEK_SCRIPTS), str(site)]
        if name == "prober":
            # The analyzer's dedup window spaces the probes of an address; the prober need not.
            return ["-m", "prober.cli", "run", "--redis", url, "--prefix", PREFIX, "--allow", ALLOW,
                    "--concurrency", "16", "--name", "lab-prober", "--target-interval", "0",
                    "--claim-idle", "5", "--audit-log", str(self.logdir / "probes.log")]
        raise KeyError(name)

    def start_service(self, name: str) -> Child:
        ns = self.topology.sensor if name in ("responder", "zeek") else self.topology.prober
        runs = sum(1 for c in self.children.children if c.name.split(".")[0] == name)
        label = name if runs == 0 else f"{name}.{runs}"
        if name == "zeek":
            # Zeek writes its logs in its working directory: one per run, so a restarted Zeek
            # does not overwrite the logs of the one before.
            zeek_dir = self.workdir / label
            zeek_dir.mkdir(exist_ok=True)
            if self.sensor == "zeek-cluster":
                argv = self.service_args(name)
                nodes = zeekcluster.start(self.children, ns, self.topology.sensor_if, zeek_dir, label=label,
                                          scripts=argv[argv.index("-i") + 2:], backend=self.zeek_backend)
                # The manager is "zeek" (it talks to the analyzer); the other nodes are services too.
                self.services.update({f"zeek-{n}" if n != zeekcluster.MANAGER else "zeek": c
                                      for n, c in nodes.items()})
                return self.services["zeek"]
            self.services[name] = self.children.start(label, self.service_args(name), ns, cwd=zeek_dir)
        else:
            self.services[name] = self.children.start(label, self.service_args(name), ns, python=True)
        return self.services[name]

    def verdicts_delivered(self) -> bool:
        """Zeek has confirmed every verdict on the `verdicts` stream: its consumer group has none
        left undelivered and none pending (the analyzer acknowledges a verdict on Zeek's ack)."""
        try:
            groups = {g["name"]: g for g in self.client.xinfo_groups(PREFIX + "verdicts")}
        except redis.ResponseError:
            return False  # no stream yet
        zeek = groups.get("zeek")
        return bool(zeek) and zeek["pending"] == 0 and zeek["lag"] == 0

    def stop_zeek(self) -> None:
        """Stops Zeek the way an operator does (SIGTERM): it flushes its logs and exits."""
        if self.sensor == "zeek-cluster":
            nodes = {n: self.services.pop(f"zeek-{n}" if n != zeekcluster.MANAGER else "zeek")
                     for n in zeekcluster.nodes_of(self.zeek_backend)}
            zeekcluster.stop(self.children, nodes)
            return
        child = self.services.pop("zeek")
        self.children.stop(child, grace=30)

    def kill(self, name: str) -> None:
        """kill -9 a service (the e2e test's crash); `start_service(name)` brings it back."""
        child = self.services.pop(name)
        self.children.stop(child, kill=True)

    def close(self) -> None:
        try:
            self.children.stop_all()
        finally:
            try:
                self.net.close()
            finally:
                if self._client is not None:
                    self._client.close()
                self.redis_server.close()
                if self.own_workdir:
                    shutil.rmtree(self.workdir, ignore_errors=True)

    # -- traffic --------------------------------------------------------------------------------

    def start_traffic(self) -> None:
        sc = self.scenarios
        for h in self.topology.hosts:
            count = h.host.connections or sc.connections
            spacing = sc.traffic_s / count
            offset = self.rng.uniform(0.2, max(0.3, spacing))
            port = CLIENT_PORTS[h.host.client] if h.host.client else None
            targets = self.topology.darknet_targets(count, self.seed * 1000 + h.index, port)
            listen = ",".join(map(str, LISTEN_PORTS))
            tag = f"traffic{h.index}"
            client = (h.host.client, h.host.client_think_ms)
            if h.host.kind in ("direct", "scanner"):
                drivers = [self._driver(tag, h.ns, listen, [f"{a}:{p}" for a, p in targets],
                                        spacing=spacing, offset=offset, craft=h.host.kind == "scanner",
                                        client=client)]
            elif h.host.kind == "homenat":
                # Two machines behind one router, taking turns: each every other connection.
                assert h.attacker is not None and h.second is not None
                drivers = [self._driver(f"{tag}r", h.ns, listen, [], spacing=spacing, offset=offset)]
                for k, ns in enumerate((h.attacker, h.second)):
                    turn = [f"{a}:{p}" for a, p in targets[k::2]]
                    drivers.append(self._driver(f"{tag}{'am'[k]}", ns, "", turn, spacing=2 * spacing,
                                                offset=offset + k * spacing))
            else:
                assert h.attacker is not None
                drivers = [self._driver(f"{tag}r", h.ns, listen, [], spacing=spacing, offset=offset)]
                socks = None
                if h.host.kind == "nat":
                    connect = [f"{a}:{p}" for a, p in targets]
                elif h.host.kind == "socks":
                    # A SOCKS5 relay (Debian's microsocks) on the attacker side; the attacker asks it
                    # to CONNECT to each darknet target in turn.
                    socks = f"{h.relay_inside}:{SOCKS_PORT}"
                    self.children.start(f"socks{h.index}", ["microsocks", "-i", str(h.relay_inside), "-p",
                                                            str(SOCKS_PORT)], h.ns)
                    relay_ns = h.ns
                    wait_for(lambda ns=relay_ns: SOCKS_PORT in _listening(ns), 10,  # type: ignore[misc]
                             f"microsocks on {h.host.name}")
                    connect = [f"{a}:{p}" for a, p in targets]
                else:
                    connect = []
                    for k, (a, p) in enumerate(targets):
                        port = PROXY_BASE_PORT + k
                        listen_spec = f"TCP-LISTEN:{port},fork,reuseaddr,bind={h.relay_inside}"
                        socat = ["socat", listen_spec, f"TCP:{a}:{p}"]
                        self.children.start(f"socat{h.index}.{k}", socat, h.ns)
                        connect.append(f"{h.relay_inside}:{port}")
                    ports = {PROXY_BASE_PORT + k for k in range(len(targets))}
                    relay_ns = h.ns
                    wait_for(lambda ns=relay_ns, ports=ports: ports <= _listening(ns), 10,  # type: ignore[misc]
                             f"socat listeners on {h.host.name}")
                drivers.append(self._driver(f"{tag}a", h.attacker, "", connect, spacing=spacing,
                                            offset=offset, client=client, socks=socks))
            self.traffic[h.addr] = drivers
        total = sum(h.host.connections or sc.connections for h in self.topology.hosts)
        self.say(f"traffic: {total} connection requests from {len(self.topology.hosts)} hosts over "
                 f"{sc.traffic_s:.0f}s")

    def _driver(self, name: str, ns: Any, listen: str, connect: list[str], *, spacing: float,
                offset: float, craft: bool = False, client: tuple[str | None, float] = (None, 0.0),
                socks: str | None = None) -> Child:
        args = ["-m", "lab.traffic", "--spacing", f"{spacing:.3f}", "--offset", f"{offset:.3f}"]
        if craft:
            args.append("--craft")
        if client[0] is not None:
            args += ["--client", client[0], "--think-ms", f"{client[1]:g}"]
        if socks is not None:
            args += ["--socks", socks]
        if listen:
            args += ["--listen", listen]
        for target in connect:
            args += ["--connect", target]
        return self.children.start(name, args, ns, python=True)

    def attempts(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for addr, drivers in self.traffic.items():
            out[addr] = [line for d in drivers for line in _json_lines(d.out) if "dst" in line]
        return out

    def traffic_done(self) -> bool:
        return all(any(line.get("done") for line in _json_lines(d.out))
                   for drivers in self.traffic.values() for d in drivers)

    # -- observation ----------------------------------------------------------------------------

    def handshakes(self) -> list[dict[str, Any]]:
        """Every handshake the analyzer received (its handshakes.log): the stream itself is trimmed
        once the analyzer has acknowledged its entries."""
        return _json_lines(self.logdir / "handshakes.log")

    def zeek_log_runs(self, name: str) -> list[list[dict[str, Any]]]:
        """The lines of a Zeek log (`notice`, `stepstone`, ...), one list per Zeek run of the lab
        (a restarted Zeek writes in a folder of its own), in the order the runs started."""
        dirs = sorted((d for d in self.workdir.glob("zeek*") if d.is_dir()),
                      key=lambda d: int(d.name.partition(".")[2] or 0))
        return [_json_lines(d / f"{name}.log") for d in dirs]

    def zeek_log(self, name: str) -> list[dict[str, Any]]:
        """`zeek_log_runs`, all runs together."""
        return [line for run in self.zeek_log_runs(name) for line in run]

    def notices(self) -> list[dict[str, Any]]:
        """notice.log of the lab's Zeek (empty with the responder as the sensor)."""
        return self.zeek_log("notice")

    def stream_length(self, name: str) -> int:
        return int(self.client.xlen(PREFIX + name))  # type: ignore[arg-type]

    def records(self) -> list[dict[str, Any]]:
        """The analyzer's records.log: one line per measured handshake, with its source's verdict
        (stepstone.log has one line per verdict change or refresh of a source)."""
        return _json_lines(self.logdir / "records.log")

    def verdict_lines(self) -> list[dict[str, Any]]:
        """The analyzer's stepstone.log: one line per change (or refresh) of a source's verdict,
        each also an entry on the `verdicts` stream (what Zeek gets)."""
        return _json_lines(self.logdir / "stepstone.log")

    def all_seen(self) -> bool:
        """Every connection a driver completed has reached the analyzer: the client is done a
        one-way delay before the sensor sees its ACK, so "traffic done" alone is too early."""
        seen: dict[str, int] = {}
        for h in self.handshakes():
            if h.get("answered"):
                seen[h["src"]] = seen.get(h["src"], 0) + 1
        made = self.attempts()
        return bool(made) and all(seen.get(addr, 0) >= sum(1 for a in tries if a.get("ok"))
                                  for addr, tries in made.items())

    def pending_verdicts(self) -> set[str]:
        """Answered handshakes that have no records.log line yet."""
        done = {r.get("hid") for r in self.records()}
        return {h["hid"] for h in self.handshakes() if h.get("answered")} - done

    def progress_line(self) -> str:
        attempts = self.attempts()
        tried = sum(len(a) for a in attempts.values())
        total = sum(h.host.connections or self.scenarios.connections for h in self.topology.hosts)
        records = self.records()
        relays = {r["src"] for r in records if (r.get("verdict") or {}).get("relay")}
        return (f"connections {tried}/{total} · handshakes {len(self.handshakes())} · "
                f"verdicts {len(records)} · sources flagged {len(relays)}")

    def wait_verdicts(self, timeout: float, *, every: float = 2.0,
                      on_tick: Callable[[], None] | None = None) -> bool:
        """Until the traffic is over and every handshake has its records.log line; False on timeout."""
        deadline = time.monotonic() + timeout
        last = 0.0
        while True:
            if reason := self.service_died():
                raise LabError(reason)
            done = self.traffic_done() and self.all_seen() and not self.pending_verdicts()
            now = time.monotonic()
            if done or now > deadline or now - last >= every:
                last = now
                self.say(self.progress_line())
                if on_tick is not None:
                    on_tick()
            if done:
                return True
            if now > deadline:
                return False
            time.sleep(0.1)  # polling the logs, not synchronising on time

    def report(self) -> dict[str, Any]:
        sources = [report.Source(h.addr, h.host) for h in self.topology.hosts]
        notices = self.notices() if self.sensor != "responder" else None
        return report.build(self.scenarios.darknet.num_addresses, sources, self.handshakes(), self.records(),
                            self.attempts(), notices=notices)


def _listening(ns: Any) -> set[int]:
    out = ns.run("ss", "-Hltn", check=False)
    ports = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            port = fields[3].rpartition(":")[2]
            if port.isdigit():
                ports.add(int(port))
    return ports


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    out.append(obj)
    return out


def run_demo(
    scenarios: Scenarios, *, progress: TextIO = sys.stderr, keep: Path | None = None,
    sensor: Sensor | None = None, html: Path | None = None, zeek_backend: zeekcluster.Backend = "broker",
) -> Mapping[str, Any]:
    sensor = sensor or default_sensor()
    preflight(scenarios, sensor)
    with Lab(scenarios, workdir=keep, progress=progress, sensor=sensor, zeek_backend=zeek_backend) as lab:
        lab.say(f"sensor: {sensor}" + (f" ({zeek_backend} backend)" if sensor == "zeek-cluster" else ""))
        lab.build()
        lab.start_services()
        lab.start_traffic()
        finished = lab.wait_verdicts(scenarios.traffic_s + scenarios.settle_s)
        if sensor != "responder":
            with contextlib.suppress(LabError):  # the report says what is missing
                wait_for(lab.verdicts_delivered, 15, "Zeek to confirm the last verdicts")
            lab.stop_zeek()  # it writes its last log lines (notices) as it stops
        result = lab.report()
        if not finished:
            missing = len(lab.pending_verdicts())
            result["notes"].insert(0, f"the run ended with {missing} handshakes still without a verdict")
        if html is not None:  # before the teardown removes the logs it reads
            from analyzer.errors import InputError
            from analyzer.htmlreport import write_lab_report

            try:
                made = write_lab_report(lab.logdir, result, html, title=f"stepstone lab run ({sensor})",
                                        darknet_addresses=scenarios.darknet.num_addresses)
            except InputError as exc:
                raise LabError(f"--html: {exc}") from None
            lab.say(f"wrote {html} in {made.seconds:.1f} s")
        lab.say("done; tearing the lab down")
    return result
